//! The LLaMA decoder's sequence ops on the GPU (`kernels/llm_attn.cu`): RoPE, causal grouped-query
//! attention (forward and backward), and the token embedding (gather and its deterministic
//! backward). CPU references: `ops::rope`, `ops::attention` (`Mask::Causal { start: 0 }`),
//! `ops::embedding`.

use super::kernels::{FUSION_ATTN, LLM_ATTN};
use super::{blocks, cfg, int, Gpu};
use crate::opset::CausalShape;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Warps (queries or keys) per attention block and keys per tile: `CA_WARPS`, `CA_TILE`.
const WARPS: usize = 4;
const TILE: usize = 32;

/// `B, T, H, H_kv, D` as kernel arguments.
fn dims(s: &CausalShape) -> Result<[i32; 5]> {
    Ok([int("B", s.batch)?, int("T", s.seq)?, int("H", s.heads)?, int("H_kv", s.kv_heads)?, int("D", s.head_dim)?])
}

/// Dynamic shared memory of the forward, dq and dk/dv kernels (the kernel file's header).
pub fn shared_bytes(head_dim: usize) -> (u32, u32, u32) {
    let d = head_dim;
    let fwd = TILE * (d + 2) * 2 + TILE * d * 2 + WARPS * d * 4;
    let dq = 2 * TILE * (d + 2) * 2 + 2 * WARPS * d * 4;
    (fwd as u32, dq as u32, (dq + 2 * TILE * 4) as u32)
}

/// Rotates `x [rows, heads, 2·half]` in place, row `r` at position `r % t` (each of the `rows / t`
/// sequences starts at 0); `inverse` turns back (the backward). `cos`, `sin` `[max_pos, half]` are
/// uploaded from the host's `ops::rope` table, so both sides rotate by the same rounded values.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    gpu: &Gpu,
    x: &mut CudaSlice<bf16>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    half: usize,
    rows: usize,
    t: usize,
    heads: usize,
    inverse: bool,
) -> Result<()> {
    let d = 2 * half;
    let max_pos = cos.len() / half.max(1);
    if half == 0
        || sin.len() != cos.len()
        || t == 0
        || !rows.is_multiple_of(t)
        || x.len() < rows * heads * d
        || t > max_pos
    {
        bail!(
            "rope: x has {} elements for [{rows}, {heads}, {d}] in sequences of {t} (table {max_pos} positions)",
            x.len()
        );
    }
    let f = gpu.function(&LLM_ATTN, "rope_pairs")?;
    let (ri, ti, hi, di, start) = (int("rows", rows)?, int("T", t)?, int("heads", heads)?, int("D", d)?, 0i32);
    let sign = if inverse { -1.0f32 } else { 1.0 };
    // SAFETY: argument order and types as in kernels/llm_attn.cu; sizes checked above.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(&*x)
            .arg(cos)
            .arg(sin)
            .arg(&ri)
            .arg(&ti)
            .arg(&hi)
            .arg(&di)
            .arg(&start)
            .arg(&sign)
            .launch(cfg((blocks(rows * heads * half, 256)?, 1, 1), 256, 0))?;
    }
    Ok(())
}

/// Causal attention forward: `out [B, T, H, D]` (bf16), `lse [B, H, T]` (fp32).
pub fn attention_forward(
    gpu: &Gpu,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    s: CausalShape,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>)> {
    s.check()?;
    if q.len() < s.q_len() || k.len() < s.kv_len() || v.len() < s.kv_len() {
        bail!("causal attention: q/k/v buffers are smaller than {s:?} needs");
    }
    // SAFETY: the forward writes every element of out and lse (each live query row).
    let (out, lse) = unsafe { (gpu.uninit::<bf16>(s.q_len())?, gpu.uninit::<f32>(s.stat_len())?) };
    let [b, t, h, hkv, d] = dims(&s)?;
    let scale = s.scale();
    let f = gpu.function(&LLM_ATTN, "causal_attn_fwd")?;
    let (smem, _, _) = shared_bytes(s.head_dim);
    // SAFETY: as in `rope`; grid, block and dynamic shared memory as the kernel file documents.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&hkv)
            .arg(&d)
            .arg(&scale)
            .arg(&out)
            .arg(&lse)
            .launch(cfg((blocks(s.seq, WARPS)?, s.heads as u32, s.batch as u32), 128, smem))?;
    }
    Ok((out, lse))
}

/// Causal attention backward from the forward's `out`, `lse` and the output gradient `dout`:
/// `(dq [B, T, H, D], dk, dv [B, T, H_kv, D])`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    gpu: &Gpu,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    out: &CudaSlice<bf16>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    s: CausalShape,
) -> Result<(CudaSlice<bf16>, CudaSlice<bf16>, CudaSlice<bf16>)> {
    s.check()?;
    if q.len() < s.q_len() || out.len() < s.q_len() || dout.len() < s.q_len() {
        bail!("causal attention backward: q/out/dout are smaller than {s:?} needs");
    }
    if k.len() < s.kv_len() || v.len() < s.kv_len() || lse.len() < s.stat_len() {
        bail!("causal attention backward: k/v/lse are smaller than {s:?} needs");
    }
    let [b, t, h, hkv, d] = dims(&s)?;
    let scale = s.scale();
    // SAFETY: delta, dq, dk and dv are written in full (every row has a live owner).
    let (delta, dq, dk, dv) = unsafe {
        (
            gpu.uninit::<f32>(s.stat_len())?,
            gpu.uninit::<bf16>(s.q_len())?,
            gpu.uninit::<bf16>(s.kv_len())?,
            gpu.uninit::<bf16>(s.kv_len())?,
        )
    };
    // delta = Σ dout·out per query row: fusion attention's kernel, the same [B, T, H, D] layout.
    let f_delta = gpu.function(&FUSION_ATTN, "fusion_attn_bwd_delta")?;
    let f_dq = gpu.function(&LLM_ATTN, "causal_attn_bwd_dq")?;
    let f_dkdv = gpu.function(&LLM_ATTN, "causal_attn_bwd_dkdv")?;
    let (_, smem_dq, smem_dkdv) = shared_bytes(s.head_dim);
    let st = gpu.stream();
    // SAFETY: as in `attention_forward`.
    unsafe {
        st.launch_builder(&f_delta).arg(out).arg(dout).arg(&b).arg(&t).arg(&h).arg(&d).arg(&delta).launch(cfg(
            (blocks(s.batch * s.seq * s.heads, 8)?, 1, 1),
            256,
            0,
        ))?;
        st.launch_builder(&f_dq)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&hkv)
            .arg(&d)
            .arg(&scale)
            .arg(&dq)
            .launch(cfg((blocks(s.seq, WARPS)?, s.heads as u32, s.batch as u32), 128, smem_dq))?;
        st.launch_builder(&f_dkdv)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&b)
            .arg(&t)
            .arg(&h)
            .arg(&hkv)
            .arg(&d)
            .arg(&scale)
            .arg(&dk)
            .arg(&dv)
            .launch(cfg((blocks(s.seq, WARPS)?, s.kv_heads as u32, s.batch as u32), 128, smem_dkdv))?;
    }
    Ok((dq, dk, dv))
}

/// `out [ids.len(), dim] = table[ids]`.
pub fn embedding_forward(gpu: &Gpu, table: &CudaSlice<bf16>, ids: &[u32], dim: usize) -> Result<CudaSlice<bf16>> {
    let vocab = table.len() / dim.max(1);
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let ids_i: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let dev_ids = gpu.upload(&ids_i)?;
    // SAFETY: one block per row copies the whole row.
    let out = unsafe { gpu.uninit::<bf16>(ids.len() * dim)? };
    let f = gpu.function(&LLM_ATTN, "embedding_fwd")?;
    let (ri, ci) = (int("rows", ids.len())?, int("C", dim)?);
    // SAFETY: as in `rope`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(table).arg(&dev_ids).arg(&ri).arg(&ci).arg(&out).launch(cfg(
            (ids.len().max(1) as u32, 1, 1),
            128,
            0,
        ))?;
    }
    Ok(out)
}

/// The embedding backward's plan: positions sorted by token (stable), where each distinct token's
/// run starts, and the tokens. One block per distinct token sums its run in this order.
#[derive(Debug, PartialEq, Eq)]
pub struct EmbedPlan {
    pub order: Vec<i32>,
    pub starts: Vec<i32>,
    pub tokens: Vec<i32>,
}

impl EmbedPlan {
    /// Positions whose id is `u32::MAX` are left out (no gradient), as in `ops::embedding`.
    pub fn new(ids: &[u32]) -> EmbedPlan {
        let mut order: Vec<i32> = (0..ids.len() as i32).filter(|&r| ids[r as usize] != u32::MAX).collect();
        order.sort_by_key(|&r| ids[r as usize]);
        let (mut starts, mut tokens) = (Vec::new(), Vec::new());
        for (p, &r) in order.iter().enumerate() {
            let id = ids[r as usize] as i32;
            if tokens.last() != Some(&id) {
                starts.push(p as i32);
                tokens.push(id);
            }
        }
        starts.push(order.len() as i32);
        EmbedPlan { order, starts, tokens }
    }
}

/// `dtable[ids[r]] += dout[r]` for every position `r` (deterministic: no atomics).
pub fn embedding_backward(
    gpu: &Gpu,
    ids: &[u32],
    dout: &CudaSlice<bf16>,
    dim: usize,
    dtable: &mut CudaSlice<bf16>,
) -> Result<()> {
    let vocab = dtable.len() / dim.max(1);
    if dout.len() < ids.len() * dim {
        bail!("embedding backward: dout has {} elements, [{}, {dim}] needs {}", dout.len(), ids.len(), ids.len() * dim);
    }
    if let Some(bad) = ids.iter().find(|&&id| id != u32::MAX && id as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let plan = EmbedPlan::new(ids);
    if plan.tokens.is_empty() {
        return Ok(());
    }
    let (order, starts, tokens) = (gpu.upload(&plan.order)?, gpu.upload(&plan.starts)?, gpu.upload(&plan.tokens)?);
    let f = gpu.function(&LLM_ATTN, "embedding_bwd")?;
    let (ui, ci) = (int("distinct tokens", plan.tokens.len())?, int("C", dim)?);
    // SAFETY: as in `rope`; every token index was checked against the table.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(dout)
            .arg(&order)
            .arg(&starts)
            .arg(&tokens)
            .arg(&ui)
            .arg(&ci)
            .arg(&*dtable)
            .launch(cfg((plan.tokens.len() as u32, 1, 1), 128, 0))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embed_plan_groups_positions_by_token_in_order() {
        let plan = EmbedPlan::new(&[5, 2, 5, u32::MAX, 2, 9]);
        assert_eq!(plan.order, vec![1, 4, 0, 2, 5]);
        assert_eq!(plan.tokens, vec![2, 5, 9]);
        assert_eq!(plan.starts, vec![0, 2, 4, 5]);
        assert_eq!(EmbedPlan::new(&[]).starts, vec![0]);
    }

    #[test]
    fn attention_shared_memory_fits_the_default_48k_for_every_head_dim() {
        for d in [2, 64, 128, 256] {
            let (a, b, c) = shared_bytes(d);
            assert!(a.max(b).max(c) <= 48 * 1024, "D {d}: {a} {b} {c}");
        }
    }
}
