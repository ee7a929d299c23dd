//! KV-cached decoding on the GPU (`kernels/llm_decode.cu`): RoPE at explicit positions, the cache
//! append, and single-query attention over the cache. CPU references: `ops::rope::rotate_pairs_`
//! and `ops::attention` with `Mask::Causal { start: pos }` (see `backend::cpu::HostOps`).

use super::kernels::LLM_DECODE;
use super::{blocks, cfg, int, Gpu};
use crate::opset::DecodeShape;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Row indices for the kernels (`int32`).
pub fn upload_ids(gpu: &Gpu, ids: &[u32]) -> Result<CudaSlice<i32>> {
    let v = ids.iter().map(|&i| int("index", i as usize)).collect::<Result<Vec<i32>>>()?;
    // A zero-length upload is refused by the driver; an empty step never launches anyway.
    gpu.upload(if v.is_empty() { &[0] } else { &v })
}

/// Rotates row `r` of `x [rows, heads, 2·half]` by its position `pos[r]` (the tables as in
/// [`super::llm_attn::rope`]).
#[allow(clippy::too_many_arguments)]
pub fn rope_at(
    gpu: &Gpu,
    x: &mut CudaSlice<bf16>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    half: usize,
    heads: usize,
    pos: &CudaSlice<i32>,
    rows: usize,
    max_pos: usize,
) -> Result<()> {
    let d = 2 * half;
    if half == 0
        || sin.len() != cos.len()
        || cos.len() < max_pos * half
        || x.len() < rows * heads * d
        || pos.len() < rows
    {
        bail!("rope_at: x has {} elements for [{rows}, {heads}, {d}] ({} positions)", x.len(), pos.len());
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&LLM_DECODE, "rope_pairs_at")?;
    let (ri, hi, di) = (int("rows", rows)?, int("heads", heads)?, int("D", d)?);
    // SAFETY: argument order and types as in kernels/llm_decode.cu; the caller checked every
    // position against the table (`DecodeShape::check`, slots ≤ max_pos).
    unsafe {
        gpu.stream().launch_builder(&f).arg(&*x).arg(cos).arg(sin).arg(pos).arg(&ri).arg(&hi).arg(&di).launch(cfg(
            (blocks(rows * heads * half, 256)?, 1, 1),
            256,
            0,
        ))?;
    }
    Ok(())
}

/// `dst[seq[r], pos[r], :] = src[r, :]` for the `rows` rows of `src [rows, width]`, into a cache
/// `dst [seqs, slots, width]`.
#[allow(clippy::too_many_arguments)]
pub fn kv_append(
    gpu: &Gpu,
    src: &CudaSlice<bf16>,
    seq: &CudaSlice<i32>,
    pos: &CudaSlice<i32>,
    rows: usize,
    width: usize,
    slots: usize,
    dst: &mut CudaSlice<bf16>,
) -> Result<()> {
    if src.len() < rows * width
        || seq.len() < rows
        || pos.len() < rows
        || !dst.len().is_multiple_of((slots * width).max(1))
    {
        bail!("kv_append: {} source elements, {} rows of {width} into a cache of {}", src.len(), rows, dst.len());
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.function(&LLM_DECODE, "kv_append")?;
    let (ri, wi, si) = (int("rows", rows)?, int("width", width)?, int("slots", slots)?);
    // SAFETY: as in `rope_at`; the caller checked (seq, pos) against the cache.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(src)
            .arg(seq)
            .arg(pos)
            .arg(&ri)
            .arg(&wi)
            .arg(&si)
            .arg(&*dst)
            .launch(cfg((rows as u32, 1, 1), 128, 0))?;
    }
    Ok(())
}

/// Which decode-attention kernel: variant 1 (a block per head and query, the op set's) or variant
/// 2 (flash-decoding: each query's keys in chunks of `chunk` positions, a multiple of 128, over
/// several blocks, then a combine kernel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeVariant {
    V1,
    V2 { chunk: usize },
}

impl DecodeVariant {
    /// Variant 2 with enough chunks for about two blocks per SM (at most one chunk per 128
    /// positions), or variant 1 when the batch already fills the device.
    pub fn for_device(s: &DecodeShape, queries: usize, sm_count: usize) -> DecodeVariant {
        let blocks = (queries * s.heads).max(1);
        let splits = (2 * sm_count).div_ceil(blocks).clamp(1, s.slots.div_ceil(128).max(1));
        if splits == 1 {
            return DecodeVariant::V1;
        }
        DecodeVariant::V2 { chunk: s.slots.div_ceil(splits).div_ceil(128) * 128 }
    }
}

/// Single-query attention for `rows` queries `q [rows, H, D]`: query `n` of sequence `seq[n]`
/// sees its keys `0..=pos[n]` in the caches `kc`, `vc`. Returns `out [rows, H, D]`. Variant 1.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    gpu: &Gpu,
    q: &CudaSlice<bf16>,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    s: DecodeShape,
    seq: &CudaSlice<i32>,
    pos: &CudaSlice<i32>,
    rows: usize,
) -> Result<CudaSlice<bf16>> {
    decode_attention_variant(gpu, q, kc, vc, s, seq, pos, rows, DecodeVariant::V1)
}

/// [`decode_attention`] with the kernel variant chosen by the caller (`sage bench kernels` times
/// both).
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_variant(
    gpu: &Gpu,
    q: &CudaSlice<bf16>,
    kc: &CudaSlice<bf16>,
    vc: &CudaSlice<bf16>,
    s: DecodeShape,
    seq: &CudaSlice<i32>,
    pos: &CudaSlice<i32>,
    rows: usize,
    variant: DecodeVariant,
) -> Result<CudaSlice<bf16>> {
    // The shape alone (the caller checked the rows' (sequence, position) pairs).
    s.check_shape()?;
    let q_len = rows * s.heads * s.head_dim;
    if q.len() < q_len || kc.len() < s.cache_len() || vc.len() < s.cache_len() || seq.len() < rows || pos.len() < rows {
        bail!("decode attention: buffers smaller than {rows} queries of {s:?} need");
    }
    // SAFETY: every (query, head) block writes its whole output row.
    let out = unsafe { gpu.uninit::<bf16>(q_len)? };
    if rows == 0 {
        return Ok(out);
    }
    if rows > 65535 {
        bail!("decode attention: {rows} queries in one step exceed the grid's 65535 (decode in smaller batches)");
    }
    let (ni, si) = (int("rows", rows)?, int("slots", s.slots)?);
    let (hi, hkvi, di) = (int("H", s.heads)?, int("H_kv", s.kv_heads)?, int("D", s.head_dim)?);
    let scale = s.scale();
    // Variant 2's chunking and its fp32 partials: (chunk, splits, part_o, part_ml).
    let split = match variant {
        DecodeVariant::V1 => None,
        DecodeVariant::V2 { chunk } => {
            if chunk == 0 || chunk % 128 != 0 {
                bail!("decode attention v2: the chunk ({chunk}) must be a positive multiple of 128");
            }
            let splits = s.slots.div_ceil(chunk);
            let parts = rows * s.heads * splits;
            // SAFETY: every (head, query, chunk) block writes its accumulator and statistics.
            let (part_o, part_ml) = unsafe { (gpu.uninit::<f32>(parts * s.head_dim)?, gpu.uninit::<f32>(parts * 2)?) };
            Some((int("chunk", chunk)?, int("splits", splits)?, part_o, part_ml))
        }
    };
    let name = if split.is_some() { "decode_attn_split" } else { "decode_attn" };
    let f = gpu.function(&LLM_DECODE, name)?;
    // SAFETY: as in `rope_at`; grid (H, N) for v1, (H, N, splits) for v2, block 128, static
    // shared memory; both kernels take the same leading arguments.
    unsafe {
        let mut b = gpu.stream().launch_builder(&f);
        b.arg(q).arg(kc).arg(vc).arg(seq).arg(pos).arg(&ni).arg(&si).arg(&hi).arg(&hkvi).arg(&di).arg(&scale);
        match &split {
            None => b.arg(&out).launch(cfg((s.heads as u32, rows as u32, 1), 128, 0))?,
            Some((ci, spi, part_o, part_ml)) => {
                b.arg(ci).arg(part_o).arg(part_ml).launch(cfg((s.heads as u32, rows as u32, *spi as u32), 128, 0))?
            }
        };
    }
    if let Some((_, spi, part_o, part_ml)) = &split {
        let f = gpu.function(&LLM_DECODE, "decode_attn_combine")?;
        // SAFETY: as above; grid (H, N), block 128.
        unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(part_o)
                .arg(part_ml)
                .arg(&ni)
                .arg(&hi)
                .arg(&di)
                .arg(spi)
                .arg(&out)
                .launch(cfg((s.heads as u32, rows as u32, 1), 128, 0))?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_two_splits_small_batches_over_the_device() {
        let s = DecodeShape { seqs: 64, slots: 1024, heads: 14, kv_heads: 2, head_dim: 64 };
        // 14 blocks for 132 SMs: eight chunks of 128 (one per 128 positions at most).
        assert_eq!(DecodeVariant::for_device(&s, 1, 132), DecodeVariant::V2 { chunk: 128 });
        // 224 blocks: two chunks of 512.
        assert_eq!(DecodeVariant::for_device(&s, 16, 132), DecodeVariant::V2 { chunk: 512 });
        // 896 blocks already fill the device.
        assert_eq!(DecodeVariant::for_device(&s, 64, 132), DecodeVariant::V1);
        // A short cache: never a chunk past it.
        let short = DecodeShape { slots: 100, ..s };
        assert_eq!(DecodeVariant::for_device(&short, 1, 132), DecodeVariant::V1);
    }
}
