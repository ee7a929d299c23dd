//! The SAGE head's row and elementwise ops on the GPU (`kernels/head_ops.cu`): LayerNorm, GELU,
//! column sums and an in-place scale, each beside its CPU reference (`ops::norm`,
//! `ops::activation`, `backend::cpu::HostOps`). The chunked reductions finish with
//! `llm_ops.cu`'s `sum_rows_f32`, so every result has one writer and does not depend on the device.

use super::kernels::{HEAD_OPS, LLM_OPS};
use super::{blocks, cfg, int, Gpu};
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Rows of one partial-sum chunk in the column reductions (fixed, so results do not depend on the
/// device).
pub const CHUNK_ROWS: usize = 64;

/// `out[j] += Σ_k part[k, j]` over `chunks` partials of `c` columns.
fn finish_sum(gpu: &Gpu, part: &CudaSlice<f32>, chunks: usize, c: usize, out: &mut CudaSlice<f32>) -> Result<()> {
    let f = gpu.function(&LLM_OPS, "sum_rows_f32")?;
    let (nch, ci) = (int("chunks", chunks)?, int("C", c)?);
    // SAFETY: argument order and types as in kernels/llm_ops.cu; `part` holds chunks × c values and
    // `out` at least c (checked by the callers).
    unsafe {
        gpu.stream().launch_builder(&f).arg(part).arg(&nch).arg(&ci).arg(&*out).launch(cfg(
            (blocks(c, 256)?, 1, 1),
            256,
            0,
        ))?;
    }
    Ok(())
}

/// LayerNorm over `rows` rows of `w.len()`: `(y, stats [rows, 2] = (mean, rstd))`.
pub fn layernorm_forward(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    b: &CudaSlice<bf16>,
    rows: usize,
    eps: f32,
) -> Result<(CudaSlice<bf16>, CudaSlice<f32>)> {
    let c = w.len();
    if rows == 0 || c == 0 || x.len() < rows * c || b.len() != c {
        bail!("layernorm: x has {} elements and b {}, [{rows}, {c}] needs {} and {c}", x.len(), b.len(), rows * c);
    }
    // SAFETY: layernorm_fwd writes every y and stats element of the `rows` rows.
    let (y, stats) = unsafe { (gpu.uninit::<bf16>(rows * c)?, gpu.uninit::<f32>(2 * rows)?) };
    let f = gpu.function(&HEAD_OPS, "layernorm_fwd")?;
    let (ri, ci) = (int("rows", rows)?, int("C", c)?);
    // SAFETY: argument order and types as in kernels/head_ops.cu; sizes checked above.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(x)
            .arg(w)
            .arg(b)
            .arg(&ri)
            .arg(&ci)
            .arg(&eps)
            .arg(&y)
            .arg(&stats)
            .launch(cfg((blocks(rows, 8)?, 1, 1), 256, 0))?;
    }
    Ok((y, stats))
}

/// LayerNorm backward: returns `dx`; `dw += Σ dy·x̂`, `db += Σ dy` (fp32).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &CudaSlice<bf16>,
    dy: &CudaSlice<bf16>,
    stats: &CudaSlice<f32>,
    rows: usize,
    dw: &mut CudaSlice<f32>,
    db: &mut CudaSlice<f32>,
) -> Result<CudaSlice<bf16>> {
    let c = w.len();
    if rows == 0 || c == 0 || x.len() < rows * c || dy.len() < rows * c || stats.len() < 2 * rows {
        bail!("layernorm backward: buffers are smaller than [{rows}, {c}] needs");
    }
    if dw.len() < c || db.len() < c {
        bail!("layernorm backward: dw/db hold {}/{} values, need {c}", dw.len(), db.len());
    }
    // SAFETY: layernorm_bwd_dx writes every element of the `rows` rows.
    let dx = unsafe { gpu.uninit::<bf16>(rows * c)? };
    let (ri, ci) = (int("rows", rows)?, int("C", c)?);
    let f = gpu.function(&HEAD_OPS, "layernorm_bwd_dx")?;
    let chunks = rows.div_ceil(CHUNK_ROWS);
    // SAFETY: every chunk × c partial is written by layernorm_bwd_dwdb_partial.
    let (pw, pb) = unsafe { (gpu.uninit::<f32>(chunks * c)?, gpu.uninit::<f32>(chunks * c)?) };
    let partial = gpu.function(&HEAD_OPS, "layernorm_bwd_dwdb_partial")?;
    let per = int("chunk rows", CHUNK_ROWS)?;
    // SAFETY: as in `layernorm_forward`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(x).arg(w).arg(dy).arg(stats).arg(&ri).arg(&ci).arg(&dx).launch(cfg(
            (blocks(rows, 8)?, 1, 1),
            256,
            0,
        ))?;
        gpu.stream()
            .launch_builder(&partial)
            .arg(x)
            .arg(dy)
            .arg(stats)
            .arg(&ri)
            .arg(&ci)
            .arg(&per)
            .arg(&pw)
            .arg(&pb)
            .launch(cfg((blocks(c, 256)?, chunks as u32, 1), 256, 0))?;
    }
    finish_sum(gpu, &pw, chunks, c, dw)?;
    finish_sum(gpu, &pb, chunks, c, db)?;
    Ok(dx)
}

/// `out[j] += Σ_r x[r, j]` over `rows` rows of `out.len()` columns.
pub fn col_sum(gpu: &Gpu, x: &CudaSlice<bf16>, rows: usize, out: &mut CudaSlice<f32>) -> Result<()> {
    let c = out.len();
    if rows == 0 || c == 0 || x.len() < rows * c {
        bail!("col_sum: x has {} elements, [{rows}, {c}] needs {}", x.len(), rows * c);
    }
    let chunks = rows.div_ceil(CHUNK_ROWS);
    // SAFETY: colsum_partial writes every chunk × c partial.
    let part = unsafe { gpu.uninit::<f32>(chunks * c)? };
    let f = gpu.function(&HEAD_OPS, "colsum_partial")?;
    let (ri, ci, per) = (int("rows", rows)?, int("C", c)?, int("chunk rows", CHUNK_ROWS)?);
    // SAFETY: as in `layernorm_forward`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(x).arg(&ri).arg(&ci).arg(&per).arg(&part).launch(cfg(
            (blocks(c, 256)?, chunks as u32, 1),
            256,
            0,
        ))?;
    }
    finish_sum(gpu, &part, chunks, c, out)
}

/// `gelu(x)` (exact erf form).
pub fn gelu_forward(gpu: &Gpu, x: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
    let n = x.len();
    // SAFETY: gelu_fwd writes all n elements.
    let y = unsafe { gpu.uninit::<bf16>(n)? };
    let f = gpu.function(&HEAD_OPS, "gelu_fwd")?;
    let nl = n as i64;
    // SAFETY: as in `layernorm_forward`.
    unsafe { gpu.stream().launch_builder(&f).arg(x).arg(&nl).arg(&y).launch(cfg((blocks(n, 256)?, 1, 1), 256, 0))? };
    Ok(y)
}

/// `dx = dy·gelu'(x)`.
pub fn gelu_backward(gpu: &Gpu, dy: &CudaSlice<bf16>, x: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
    let n = x.len();
    if dy.len() != n {
        bail!("gelu backward: dy has {} elements, x {n}", dy.len());
    }
    // SAFETY: gelu_bwd writes all n elements.
    let dx = unsafe { gpu.uninit::<bf16>(n)? };
    let f = gpu.function(&HEAD_OPS, "gelu_bwd")?;
    let nl = n as i64;
    // SAFETY: as in `layernorm_forward`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(dy).arg(x).arg(&nl).arg(&dx).launch(cfg((blocks(n, 256)?, 1, 1), 256, 0))?
    };
    Ok(dx)
}

/// `x *= s` in place.
pub fn scale(gpu: &Gpu, x: &mut CudaSlice<bf16>, s: f32) -> Result<()> {
    let n = x.len();
    let f = gpu.function(&HEAD_OPS, "scale_bf16")?;
    let nl = n as i64;
    // SAFETY: as in `layernorm_forward`.
    unsafe { gpu.stream().launch_builder(&f).arg(&*x).arg(&nl).arg(&s).launch(cfg((blocks(n, 256)?, 1, 1), 256, 0))? };
    Ok(())
}

/// `x[i] *= f[i]` (fp32).
pub fn mul(gpu: &Gpu, x: &mut CudaSlice<f32>, f: &CudaSlice<f32>) -> Result<()> {
    let n = x.len();
    if f.len() != n {
        bail!("mul: {n} values and {} factors", f.len());
    }
    let k = gpu.function(&HEAD_OPS, "mul_f32")?;
    let nl = n as i64;
    // SAFETY: as in `layernorm_forward`.
    unsafe { gpu.stream().launch_builder(&k).arg(&*x).arg(f).arg(&nl).launch(cfg((blocks(n, 256)?, 1, 1), 256, 0))? };
    Ok(())
}
