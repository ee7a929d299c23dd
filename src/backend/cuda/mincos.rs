//! Fused min-cosine top-K on the GPU (`kernels/mincos_topk.cu`; CPU reference
//! `ops::similarity::mincos_topk`). Four launches: inverse norms, the tensor-core similarity
//! reduction (the P×P' matrix is never written), the split merge + top-K, and the gather of the
//! selected patches and their differences to the nearest reference patch.

use super::kernels::MINCOS_TOPK;
use super::{blocks, cfg, int, Gpu};
use crate::opset::Reduce;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Shapes of one batched call: test `[batch, patches, channels]`, reference
/// `[batch, ref_patches, channels]` (ignored when `zero_shot`: the test is its own reference).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct MincosShape {
    pub batch: usize,
    pub patches: usize,
    pub ref_patches: usize,
    pub channels: usize,
    pub k: usize,
    pub reduce: Reduce,
    pub zero_shot: bool,
}

/// The similarity-reduction kernel (llm.c-style numbered variants; v2 is kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Variant {
    /// SIMT fp32 tiles: any channel count.
    V1,
    /// Tensor cores (`mma.sync` bf16): needs `channels % 8 == 0`.
    V2,
}

/// Per batch item: `sim`, `ref_index`, `map` `[B, P]`, `topk` `[B, K]` (−1 past P), and the fusion
/// attention's inputs `v_sel = t[topk]`, `d = t[topk] − r[nn[topk]]` `[B, K, C]`.
pub struct MincosOut {
    pub sim: CudaSlice<f32>,
    pub ref_index: CudaSlice<i32>,
    pub map: CudaSlice<f32>,
    pub topk: CudaSlice<i32>,
    pub v_sel: CudaSlice<bf16>,
    pub d: CudaSlice<bf16>,
}

/// The variant to use by default: v2 where it applies.
pub fn default_variant(channels: usize) -> Variant {
    if channels.is_multiple_of(8) {
        Variant::V2
    } else {
        Variant::V1
    }
}

/// Reference-row splits: enough blocks to cover the GPU twice when `B·ceil(P/64)` alone is too few
/// (B = 1 at inference), never more than there are 64-row reference tiles.
pub fn default_splits(s: &MincosShape, sm_count: usize) -> usize {
    let row_blocks = s.batch * s.patches.div_ceil(64);
    let ref_tiles = effective_ref_patches(s).div_ceil(64).max(1);
    (2 * sm_count.max(1)).div_ceil(row_blocks.max(1)).clamp(1, ref_tiles)
}

fn effective_ref_patches(s: &MincosShape) -> usize {
    if s.zero_shot {
        s.patches
    } else {
        s.ref_patches
    }
}

/// Runs the four launches. `reference` is `None` exactly when `s.zero_shot`.
pub fn mincos_topk(
    gpu: &Gpu,
    test: &CudaSlice<bf16>,
    reference: Option<&CudaSlice<bf16>>,
    s: MincosShape,
    variant: Variant,
    nsplit: usize,
) -> Result<MincosOut> {
    let pr = effective_ref_patches(&s);
    let (b, p, c, k) = (s.batch, s.patches, s.channels, s.k);
    if b == 0 || p == 0 || c == 0 || k == 0 || pr == 0 || nsplit == 0 {
        bail!("mincos_topk: every size must be positive ({s:?}, nsplit {nsplit})");
    }
    if variant == Variant::V2 && c % 8 != 0 {
        bail!("mincos_topk v2 needs channels % 8 == 0 (got {c}); use v1");
    }
    if test.len() < b * p * c {
        bail!("mincos_topk: test buffer has {} elements, the shape needs {}", test.len(), b * p * c);
    }
    let reference = match (reference, s.zero_shot) {
        (None, true) => test,
        (Some(r), false) if r.len() >= b * pr * c => r,
        (Some(r), false) => bail!("mincos_topk: reference buffer has {} elements, needs {}", r.len(), b * pr * c),
        (Some(_), true) => bail!("mincos_topk: zero-shot takes no reference buffer"),
        (None, false) => bail!("mincos_topk: a reference buffer is required unless zero-shot"),
    };
    let (bi, pi, pri, ci, ki) = (int("B", b)?, int("P", p)?, int("P'", pr)?, int("C", c)?, int("K", k)?);
    let (reduce, zero_shot) = (i32::from(s.reduce == Reduce::Min), i32::from(s.zero_shot));
    let st = gpu.stream();

    let inv_t = gpu.zeros::<f32>(b * p)?;
    let inv_r = if s.zero_shot { None } else { Some(gpu.zeros::<f32>(b * pr)?) };
    let norms = gpu.function(&MINCOS_TOPK, "mincos_inv_norms")?;
    let (rows_t, rows_r) = (int("B·P", b * p)?, int("B·P'", b * pr)?);
    // SAFETY (every launch below): argument types and order match the kernel's signature in
    // kernels/mincos_topk.cu, buffers hold the element counts checked above, and grid/block are
    // the ones kernels/README.md documents.
    unsafe {
        st.launch_builder(&norms).arg(test).arg(&inv_t).arg(&rows_t).arg(&ci).launch(cfg(
            (blocks(b * p, 8)?, 1, 1),
            256,
            0,
        ))?;
        if let Some(inv_r) = &inv_r {
            st.launch_builder(&norms).arg(reference).arg(inv_r).arg(&rows_r).arg(&ci).launch(cfg(
                (blocks(b * pr, 8)?, 1, 1),
                256,
                0,
            ))?;
        }
    }
    let inv_r = inv_r.as_ref().unwrap_or(&inv_t);

    let part_val = gpu.zeros::<f32>(nsplit * b * p)?;
    let part_idx = gpu.zeros::<i32>(nsplit * b * p)?;
    let (name, block) = match variant {
        Variant::V1 => ("mincos_reduce_v1", 256),
        Variant::V2 => ("mincos_reduce_v2", 128),
    };
    let reduce_fn = gpu.function(&MINCOS_TOPK, name)?;
    let grid = (blocks(p, 64)?, b as u32, nsplit as u32);
    unsafe {
        st.launch_builder(&reduce_fn)
            .arg(test)
            .arg(reference)
            .arg(&inv_t)
            .arg(inv_r)
            .arg(&bi)
            .arg(&pi)
            .arg(&pri)
            .arg(&ci)
            .arg(&reduce)
            .arg(&zero_shot)
            .arg(&part_val)
            .arg(&part_idx)
            .launch(cfg(grid, block, 0))?;
    }

    let sim = gpu.zeros::<f32>(b * p)?;
    let ref_index = gpu.zeros::<i32>(b * p)?;
    let map = gpu.zeros::<f32>(b * p)?;
    let topk = gpu.zeros::<i32>(b * k)?;
    let merge = gpu.function(&MINCOS_TOPK, "mincos_merge_topk")?;
    let ns = int("nsplit", nsplit)?;
    unsafe {
        st.launch_builder(&merge)
            .arg(&part_val)
            .arg(&part_idx)
            .arg(&ns)
            .arg(&bi)
            .arg(&pi)
            .arg(&reduce)
            .arg(&ki)
            .arg(&sim)
            .arg(&ref_index)
            .arg(&map)
            .arg(&topk)
            .launch(cfg((b as u32, 1, 1), 256, 0))?;
    }

    let v_sel = gpu.zeros::<bf16>(b * k * c)?;
    let d = gpu.zeros::<bf16>(b * k * c)?;
    let gather = gpu.function(&MINCOS_TOPK, "mincos_gather")?;
    unsafe {
        st.launch_builder(&gather)
            .arg(test)
            .arg(reference)
            .arg(&topk)
            .arg(&ref_index)
            .arg(&pi)
            .arg(&pri)
            .arg(&ci)
            .arg(&ki)
            .arg(&v_sel)
            .arg(&d)
            .launch(cfg((k as u32, b as u32, 1), 128, 0))?;
    }
    Ok(MincosOut { sim, ref_index, map, topk, v_sel, d })
}
