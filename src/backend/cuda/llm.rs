//! The LLaMA training step's row and elementwise ops on the GPU (`kernels/llm_ops.cu`): RMSNorm,
//! SwiGLU, AdamW and the gradient-norm clipping, each beside its CPU reference (`ops::norm`,
//! `ops::activation`, `train::optim::AdamW`, `train::clip`). The steps that string them together
//! with the GEMMs and attention are `models::llama` and `models::sage`.

use super::kernels::LLM_OPS;
use super::{blocks, cfg, int, Gpu};
use crate::train::{AdamWConfig, AdamWScalars};
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Rows of one weight-gradient chunk in the RMSNorm backward (fixed, so results do not depend on
/// the device).
pub const DW_CHUNK_ROWS: usize = 64;

/// `y = x·rstd·w` over `rows` rows of `C`; returns `(y, rstd)`.
pub fn rmsnorm_forward(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    rows: usize,
    eps: f32,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>)> {
    let c = w.len();
    if rows == 0 || c == 0 || x.len() < rows * c {
        bail!("rmsnorm: x has {} elements, [{rows}, {c}] needs {}", x.len(), rows * c);
    }
    let y = gpu.zeros::<bf16>(rows * c)?;
    let rstd = gpu.zeros::<f32>(rows)?;
    let f = gpu.function(&LLM_OPS, "rmsnorm_fwd")?;
    let (ri, ci) = (int("rows", rows)?, int("C", c)?);
    // SAFETY: argument order and types as in kernels/llm_ops.cu; sizes checked above.
    unsafe {
        gpu.stream().launch_builder(&f).arg(x).arg(w).arg(&ri).arg(&ci).arg(&eps).arg(&y).arg(&rstd).launch(cfg(
            (blocks(rows, 8)?, 1, 1),
            256,
            0,
        ))?;
    }
    Ok((y, rstd))
}

/// RMSNorm backward: `dx` (added to when `accumulate`, else overwritten) and `dw += Σ_rows
/// dy·x·rstd` (fp32).
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_backward(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    dy: &CudaSlice<bf16>,
    rstd: &CudaSlice<f32>,
    rows: usize,
    accumulate: bool,
    dx: &mut CudaSlice<bf16>,
    dw: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    let c = w.len();
    if rows == 0 || c == 0 || [x.len(), dy.len(), dx.len()].iter().any(|&n| n < rows * c) || rstd.len() < rows {
        bail!("rmsnorm backward: buffers are smaller than [{rows}, {c}] needs");
    }
    let (ri, ci, acc) = (int("rows", rows)?, int("C", c)?, i32::from(accumulate));
    let f = gpu.function(&LLM_OPS, "rmsnorm_bwd_dx")?;
    // SAFETY: as in `rmsnorm_forward`.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(x)
            .arg(w)
            .arg(dy)
            .arg(rstd)
            .arg(&ri)
            .arg(&ci)
            .arg(&acc)
            .arg(&*dx)
            .launch(cfg((blocks(rows, 8)?, 1, 1), 256, 0))?;
    }
    if let Some(dw) = dw {
        if dw.len() < c {
            bail!("rmsnorm backward: dw has {} elements, needs {c}", dw.len());
        }
        let chunks = rows.div_ceil(DW_CHUNK_ROWS);
        let part = gpu.zeros::<f32>(chunks * c)?;
        let (partial, sum) =
            (gpu.function(&LLM_OPS, "rmsnorm_bwd_dw_partial")?, gpu.function(&LLM_OPS, "sum_rows_f32")?);
        let (per, nch) = (int("chunk rows", DW_CHUNK_ROWS)?, int("chunks", chunks)?);
        // SAFETY: as above; `part` holds chunks × C values.
        unsafe {
            gpu.stream()
                .launch_builder(&partial)
                .arg(x)
                .arg(dy)
                .arg(rstd)
                .arg(&ri)
                .arg(&ci)
                .arg(&per)
                .arg(&part)
                .launch(cfg((blocks(c, 256)?, chunks as u32, 1), 256, 0))?;
            gpu.stream().launch_builder(&sum).arg(&part).arg(&nch).arg(&ci).arg(&*dw).launch(cfg(
                (blocks(c, 256)?, 1, 1),
                256,
                0,
            ))?;
        }
    }
    Ok(())
}

/// `y = silu(g)·u`.
pub fn swiglu_forward(gpu: &Gpu, g: &CudaSlice<bf16>, u: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
    if g.len() != u.len() {
        bail!("swiglu: gate has {} elements, up has {}", g.len(), u.len());
    }
    let n = g.len();
    let y = gpu.zeros::<bf16>(n)?;
    let f = gpu.function(&LLM_OPS, "swiglu_fwd")?;
    let nl = n as i64;
    // SAFETY: as in `rmsnorm_forward`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(g).arg(u).arg(&nl).arg(&y).launch(cfg((blocks(n, 256)?, 1, 1), 256, 0))?;
    }
    Ok(y)
}

/// SwiGLU backward into `dg`, `du` (added to when `accumulate`).
pub fn swiglu_backward(
    gpu: &Gpu,
    dy: &CudaSlice<bf16>,
    g: &CudaSlice<bf16>,
    u: &CudaSlice<bf16>,
    accumulate: bool,
    dg: &mut CudaSlice<bf16>,
    du: &mut CudaSlice<bf16>,
) -> Result<()> {
    let n = g.len();
    if [dy.len(), u.len(), dg.len(), du.len()].iter().any(|&m| m != n) {
        bail!("swiglu backward: every buffer must hold {n} elements");
    }
    let f = gpu.function(&LLM_OPS, "swiglu_bwd")?;
    let (nl, acc) = (n as i64, i32::from(accumulate));
    // SAFETY: as in `rmsnorm_forward`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(dy).arg(g).arg(u).arg(&nl).arg(&acc).arg(&*dg).arg(&*du).launch(cfg(
            (blocks(n, 256)?, 1, 1),
            256,
            0,
        ))?;
    }
    Ok(())
}

/// One AdamW update of fp32 `x` from `grad` with moments `m`, `v`, at step `t` (1-based) and
/// learning rate `lr`: the arithmetic of `train::optim::AdamW::step`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    grad: &CudaSlice<f32>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    cfg_: AdamWConfig,
    t: u64,
    lr: f32,
    decay: bool,
) -> Result<()> {
    let n = x.len();
    if [grad.len(), m.len(), v.len()].iter().any(|&k| k != n) || t == 0 {
        bail!("adamw: x, grad, m and v must all hold {n} elements, and t ≥ 1");
    }
    let s = AdamWScalars::new(&cfg_, t, lr);
    let decay_factor = if decay { s.decay_factor } else { 1.0 };
    let f = gpu.function(&LLM_OPS, "adamw_step")?;
    let nl = n as i64;
    // SAFETY: as in `rmsnorm_forward`.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(&*x)
            .arg(grad)
            .arg(&*m)
            .arg(&*v)
            .arg(&nl)
            .arg(&s.b1)
            .arg(&s.c1)
            .arg(&s.b2)
            .arg(&s.c2)
            .arg(&s.step_size)
            .arg(&s.bc2_sqrt)
            .arg(&s.eps)
            .arg(&decay_factor)
            .launch(cfg((blocks(n, 256)?, 1, 1), 256, 0))?;
    }
    Ok(())
}

/// A gradient for [`adamw_step_mixed`]: bf16 (from the weight-gradient GEMMs) or fp32 (norm
/// weights, reduced in fp32).
pub enum MixedGrad<'a> {
    Bf16(&'a CudaSlice<bf16>),
    F32(&'a CudaSlice<f32>),
}

/// The mixed-precision AdamW of the GPU training step: updates the fp32 master `x` and moments as
/// [`adamw_step`] does from the gradient times `clip[0]` and writes `w = bf16(x)`, the copy the
/// GEMMs read; `clip[1] ≠ 0` skips the update ([`clip_factor`] makes `clip`).
#[allow(clippy::too_many_arguments)]
pub fn adamw_step_mixed(
    gpu: &Gpu,
    x: &mut CudaSlice<f32>,
    grad: MixedGrad<'_>,
    m: &mut CudaSlice<f32>,
    v: &mut CudaSlice<f32>,
    w: &mut CudaSlice<bf16>,
    s: &AdamWScalars,
    decay: bool,
    clip: &CudaSlice<f32>,
) -> Result<()> {
    let n = x.len();
    let g_len = match grad {
        MixedGrad::Bf16(g) => g.len(),
        MixedGrad::F32(g) => g.len(),
    };
    if [g_len, m.len(), v.len(), w.len()].iter().any(|&k| k != n) {
        bail!("adamw: x, grad, m, v and w must all hold {n} elements");
    }
    if clip.len() < 2 {
        bail!("adamw: the clip buffer holds {} values, needs [factor, skip]", clip.len());
    }
    let decay_factor = if decay { s.decay_factor } else { 1.0 };
    let nl = n as i64;
    let name = if matches!(grad, MixedGrad::Bf16(_)) { "adamw_step_bf16" } else { "adamw_step_bf16w" };
    let f = gpu.function(&LLM_OPS, name)?;
    let mut b = gpu.stream().launch_builder(&f);
    b.arg(&*x);
    match grad {
        MixedGrad::Bf16(g) => b.arg(g),
        MixedGrad::F32(g) => b.arg(g),
    };
    b.arg(&*m)
        .arg(&*v)
        .arg(&*w)
        .arg(&nl)
        .arg(&s.b1)
        .arg(&s.c1)
        .arg(&s.b2)
        .arg(&s.c2)
        .arg(&s.step_size)
        .arg(&s.bc2_sqrt)
        .arg(&s.eps)
        .arg(&decay_factor)
        .arg(clip);
    // SAFETY: as in `rmsnorm_forward`; both kernels share this argument list.
    unsafe { b.launch(cfg((blocks(n, 256)?, 1, 1), 256, 0)) }?;
    Ok(())
}

/// Blocks of the gradient-norm partial sums: `SUMSQ_BLOCKS` of kernels/llm_ops.cu.
pub const SUMSQ_BLOCKS: usize = 256;

/// `acc[0] += Σ g²` over a gradient (bf16 or fp32), in fixed partials summed in order.
pub fn sum_squares(gpu: &Gpu, g: MixedGrad<'_>, acc: &mut CudaSlice<f32>) -> Result<()> {
    let (name, n) = match g {
        MixedGrad::Bf16(x) => ("sumsq_partial_bf16", x.len()),
        MixedGrad::F32(x) => ("sumsq_partial_f32", x.len()),
    };
    if acc.is_empty() {
        bail!("sum_squares: the accumulator is empty");
    }
    // SAFETY: every block writes its partial.
    let part = unsafe { gpu.uninit::<f32>(SUMSQ_BLOCKS)? };
    let (f, sum) = (gpu.function(&LLM_OPS, name)?, gpu.function(&LLM_OPS, "sum_rows_f32")?);
    let (nl, chunks, one) = (n as i64, int("blocks", SUMSQ_BLOCKS)?, 1i32);
    let mut b = gpu.stream().launch_builder(&f);
    match g {
        MixedGrad::Bf16(x) => b.arg(x),
        MixedGrad::F32(x) => b.arg(x),
    };
    b.arg(&nl).arg(&part);
    // SAFETY: argument order and types as in kernels/llm_ops.cu; the kernels grid-stride over n.
    unsafe {
        b.launch(cfg((SUMSQ_BLOCKS as u32, 1, 1), 256, 0))?;
        gpu.stream().launch_builder(&sum).arg(&part).arg(&chunks).arg(&one).arg(&*acc).launch(cfg(
            (1, 1, 1),
            256,
            0,
        ))?;
    }
    Ok(())
}

/// `[factor, skip, norm]` from `sumsq[0]` (`train::clip_grad_norm`'s rule; `None` never clips).
pub fn clip_factor(gpu: &Gpu, sumsq: &CudaSlice<f32>, max_norm: Option<f32>) -> Result<CudaSlice<f32>> {
    // SAFETY: clip_factor writes all three values.
    let out = unsafe { gpu.uninit::<f32>(3)? };
    let f = gpu.function(&LLM_OPS, "clip_factor")?;
    let max = max_norm.unwrap_or(0.0);
    // SAFETY: as in `rmsnorm_forward`.
    unsafe { gpu.stream().launch_builder(&f).arg(sumsq).arg(&max).arg(&out).launch(cfg((1, 1, 1), 32, 0))? };
    Ok(out)
}
