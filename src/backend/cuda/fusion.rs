//! Multi-head fusion (cross-)attention on the GPU (`kernels/fusion_attn.cu`; CPU reference
//! `ops::fusion_attn`): the attention core between the Wq/Wk/Wv/out projections (GEMMs).

use super::kernels::FUSION_ATTN;
use super::{blocks, cfg, int, Gpu};
use crate::ops::fusion_attn::FusionShape;
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Rows of keys (queries, in dk/dv) staged in shared memory per tile, and warps per block: the
/// `FA_TILE` and `FA_WARPS` of the kernel file.
const TILE: usize = 32;
const WARPS: usize = 4;

/// Dynamic shared memory of each kernel, in bytes (kernels/fusion_attn.cu's header).
pub fn shared_bytes(head_dim: usize) -> (u32, u32, u32) {
    let d = head_dim;
    let fwd = TILE * (d + 2) * 2 + TILE * d * 2 + WARPS * d * 4;
    let dq = 2 * TILE * (d + 2) * 2 + 2 * WARPS * d * 4;
    let dkdv = dq + 2 * TILE * 4;
    (fwd as u32, dq as u32, dkdv as u32)
}

fn check(s: &FusionShape) -> Result<()> {
    if s.batch == 0 || s.queries == 0 || s.keys == 0 || s.heads == 0 {
        bail!("fusion attention: every size must be positive ({s:?})");
    }
    if s.head_dim == 0 || !s.head_dim.is_multiple_of(2) || s.head_dim > 256 {
        bail!("fusion attention kernels need an even head_dim ≤ 256 (got {})", s.head_dim);
    }
    Ok(())
}

/// Forward: `out [B, L, H, D]` (bf16) and `lse [B, H, L]` (fp32).
pub fn forward(
    gpu: &Gpu,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    s: FusionShape,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>)> {
    check(&s)?;
    if q.len() < s.q_len() || k.len() < s.kv_len() || v.len() < s.kv_len() {
        bail!("fusion attention: q/k/v buffers are smaller than {s:?} needs");
    }
    let out = gpu.zeros::<bf16>(s.q_len())?;
    let lse = gpu.zeros::<f32>(s.lse_len())?;
    let (b, l, n, h, d) = dims(&s)?;
    let scale = s.scale();
    let f = gpu.function(&FUSION_ATTN, "fusion_attn_fwd")?;
    let (smem, _, _) = shared_bytes(s.head_dim);
    // SAFETY: arguments in the kernel's order and types; sizes checked above; grid, block and
    // dynamic shared memory as the kernel file documents.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(&b)
            .arg(&l)
            .arg(&n)
            .arg(&h)
            .arg(&d)
            .arg(&scale)
            .arg(&out)
            .arg(&lse)
            .launch(cfg((blocks(s.queries, WARPS)?, s.heads as u32, s.batch as u32), 128, smem))?;
    }
    Ok((out, lse))
}

/// The gradients `dq [B, L, H, D]`, `dk, dv [B, S, H, D]` (bf16).
pub struct Grads {
    pub dq: CudaSlice<bf16>,
    pub dk: CudaSlice<bf16>,
    pub dv: CudaSlice<bf16>,
}

/// Backward from the forward's `out` and `lse` and the upstream `dout`.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    q: &CudaSlice<bf16>,
    k: &CudaSlice<bf16>,
    v: &CudaSlice<bf16>,
    out: &CudaSlice<bf16>,
    lse: &CudaSlice<f32>,
    dout: &CudaSlice<bf16>,
    s: FusionShape,
) -> Result<Grads> {
    check(&s)?;
    if dout.len() < s.q_len() || out.len() < s.q_len() || lse.len() < s.lse_len() {
        bail!("fusion attention backward: out/lse/dout buffers are smaller than {s:?} needs");
    }
    let (b, l, n, h, d) = dims(&s)?;
    let scale = s.scale();
    let (_, smem_dq, smem_dkdv) = shared_bytes(s.head_dim);
    let st = gpu.stream();
    let delta = gpu.zeros::<f32>(s.batch * s.queries * s.heads)?;
    let dq = gpu.zeros::<bf16>(s.q_len())?;
    let dk = gpu.zeros::<bf16>(s.kv_len())?;
    let dv = gpu.zeros::<bf16>(s.kv_len())?;
    let f_delta = gpu.function(&FUSION_ATTN, "fusion_attn_bwd_delta")?;
    let f_dq = gpu.function(&FUSION_ATTN, "fusion_attn_bwd_dq")?;
    let f_dkdv = gpu.function(&FUSION_ATTN, "fusion_attn_bwd_dkdv")?;
    // SAFETY: as in `forward`.
    unsafe {
        st.launch_builder(&f_delta).arg(out).arg(dout).arg(&b).arg(&l).arg(&h).arg(&d).arg(&delta).launch(cfg(
            (blocks(s.batch * s.queries * s.heads, 8)?, 1, 1),
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
            .arg(&l)
            .arg(&n)
            .arg(&h)
            .arg(&d)
            .arg(&scale)
            .arg(&dq)
            .launch(cfg((blocks(s.queries, WARPS)?, s.heads as u32, s.batch as u32), 128, smem_dq))?;
        st.launch_builder(&f_dkdv)
            .arg(q)
            .arg(k)
            .arg(v)
            .arg(dout)
            .arg(lse)
            .arg(&delta)
            .arg(&b)
            .arg(&l)
            .arg(&n)
            .arg(&h)
            .arg(&d)
            .arg(&scale)
            .arg(&dk)
            .arg(&dv)
            .launch(cfg((blocks(s.keys, WARPS)?, s.heads as u32, s.batch as u32), 128, smem_dkdv))?;
    }
    Ok(Grads { dq, dk, dv })
}

fn dims(s: &FusionShape) -> Result<(i32, i32, i32, i32, i32)> {
    Ok((int("B", s.batch)?, int("L", s.queries)?, int("S", s.keys)?, int("H", s.heads)?, int("D", s.head_dim)?))
}
