//! Linear layers from quantized blocks on the GPU (`kernels/qgemm.cu`): the weight is uploaded as
//! the GGUF's bytes and dequantized in registers as each product loads it. CPU reference:
//! `quant::dequantize` then the f32 product (the CPU's own quantized kernels, `quant::matmul`,
//! quantize the activations too; these keep them bf16).

use super::kernels::QGEMM;
use super::{blocks, cfg, int, Gpu};
use crate::quant::{QMatrix, QType};
use anyhow::{bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// Rows of the activations one block of the products keeps in registers (`QG_ROWS` in the kernel).
const ROWS_PER_BLOCK: usize = 8;
/// The grid's y dimension is at most 65 535 blocks.
const MAX_GRID_Y: usize = 65_535;

/// A `[rows, cols]` weight on the device in its quantized blocks.
pub struct QWeight {
    pub blocks: CudaSlice<u8>,
    pub qtype: QType,
    pub rows: usize,
    pub cols: usize,
}

impl QWeight {
    /// Device bytes of the blocks.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols / self.qtype.block_len() * self.qtype.block_bytes()
    }
}

/// The kernel's type code: the position in [`QType::ALL`] (kernels/qgemm.cu lists them).
fn code(t: QType) -> i32 {
    QType::ALL.iter().position(|&q| q == t).expect("every QType is in QType::ALL") as i32
}

pub fn upload(gpu: &Gpu, w: &QMatrix) -> Result<QWeight> {
    int("a quantized weight's columns", w.cols)?;
    Ok(QWeight { blocks: gpu.upload(&w.data)?, qtype: w.qtype, rows: w.rows, cols: w.cols })
}

fn row_tiles(rows: usize) -> Result<u32> {
    let tiles = rows.div_ceil(ROWS_PER_BLOCK);
    if tiles > MAX_GRID_Y {
        bail!("{rows} rows of activations exceed the quantized GEMM's grid ({MAX_GRID_Y} tiles of {ROWS_PER_BLOCK})");
    }
    Ok(tiles.max(1) as u32)
}

/// A product's output: `acc` to add into (flag 1), or `n` new elements, which the kernel writes
/// every one of (flag 0).
fn output(gpu: &Gpu, acc: Option<CudaSlice<bf16>>, n: usize) -> Result<(CudaSlice<bf16>, i32)> {
    Ok(match acc {
        Some(buf) => (buf, 1),
        // SAFETY: without accumulation each kernel writes every output element.
        None => (unsafe { gpu.uninit::<bf16>(n)? }, 0),
    })
}

/// `y [rows, out] = x [rows, in]·Wᵀ (+ bias) (+ acc)`; the output is `acc` when given (the residual
/// stream), else new.
pub fn linear(
    gpu: &Gpu,
    x: &CudaSlice<bf16>,
    w: &QWeight,
    rows: usize,
    bias: Option<&CudaSlice<bf16>>,
    acc: Option<CudaSlice<bf16>>,
) -> Result<CudaSlice<bf16>> {
    if x.len() < rows * w.cols
        || bias.is_some_and(|b| b.len() < w.rows)
        || acc.as_ref().is_some_and(|y| y.len() < rows * w.rows)
    {
        bail!("quantized linear: x has {} elements for [{rows}, {}], W is [{}, {}]", x.len(), w.cols, w.rows, w.cols);
    }
    let (y, acc_i) = output(gpu, acc, rows * w.rows)?;
    if rows == 0 {
        return Ok(y);
    }
    let f = gpu.function(&QGEMM, "qgemm_xwt")?;
    let (qt, out, inn, ri) = (code(w.qtype), int("out", w.rows)?, int("in", w.cols)?, int("rows", rows)?);
    let has_bias = i32::from(bias.is_some());
    // The kernel reads `bias` only when has_bias; any valid pointer stands in otherwise.
    let b = bias.unwrap_or(x);
    // SAFETY: argument order and types as in kernels/qgemm.cu; sizes checked above, the blocks
    // hold `out` whole rows (`QMatrix::new` checked them).
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(&w.blocks)
            .arg(&qt)
            .arg(&out)
            .arg(&inn)
            .arg(x)
            .arg(&ri)
            .arg(b)
            .arg(&has_bias)
            .arg(&acc_i)
            .arg(&y)
            .launch(cfg((blocks(w.rows, 4)?, row_tiles(rows)?, 1), 128, 0))?;
    }
    Ok(y)
}

/// `dx [rows, in] = dy [rows, out]·W`, into `acc` when given, else new.
pub fn input_grad(
    gpu: &Gpu,
    dy: &CudaSlice<bf16>,
    w: &QWeight,
    rows: usize,
    acc: Option<CudaSlice<bf16>>,
) -> Result<CudaSlice<bf16>> {
    if dy.len() < rows * w.rows || acc.as_ref().is_some_and(|dx| dx.len() < rows * w.cols) {
        bail!(
            "quantized input gradient: dy has {} elements for [{rows}, {}], W is [{}, {}]",
            dy.len(),
            w.rows,
            w.rows,
            w.cols
        );
    }
    let (dx, acc_i) = output(gpu, acc, rows * w.cols)?;
    if rows == 0 {
        return Ok(dx);
    }
    let f = gpu.function(&QGEMM, "qgemm_dyw")?;
    let (qt, out, inn, ri) = (code(w.qtype), int("out", w.rows)?, int("in", w.cols)?, int("rows", rows)?);
    // SAFETY: as in `linear`.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(&w.blocks)
            .arg(&qt)
            .arg(&out)
            .arg(&inn)
            .arg(dy)
            .arg(&ri)
            .arg(&acc_i)
            .arg(&dx)
            .launch(cfg((blocks(w.cols, 256)?, row_tiles(rows)?, 1), 256, 0))?;
    }
    Ok(dx)
}

/// Rows `ids` of the table `w` as bf16, `[ids.len(), cols]` (an embedding lookup).
pub fn embed(gpu: &Gpu, w: &QWeight, ids: &[u32]) -> Result<CudaSlice<bf16>> {
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= w.rows) {
        bail!("token id {bad} is outside the vocabulary of {}", w.rows);
    }
    // SAFETY: one block per id writes its whole row.
    let out = unsafe { gpu.uninit::<bf16>(ids.len() * w.cols)? };
    if ids.is_empty() {
        return Ok(out);
    }
    let dev_ids = super::llm_decode::upload_ids(gpu, ids)?;
    let f = gpu.function(&QGEMM, "qembed")?;
    let (qt, inn) = (code(w.qtype), int("in", w.cols)?);
    // SAFETY: as in `linear`; every id was checked against the table above.
    unsafe {
        gpu.stream().launch_builder(&f).arg(&w.blocks).arg(&qt).arg(&inn).arg(&dev_ids).arg(&out).launch(cfg(
            (blocks(ids.len(), 1)?, 1, 1),
            128,
            0,
        ))?;
    }
    Ok(out)
}

/// The whole of `w` as a bf16 `[rows, cols]` buffer: for the loss kernels, which read a bf16 LM
/// head (the buffer lives for one loss call).
pub fn dequantize(gpu: &Gpu, w: &QWeight) -> Result<CudaSlice<bf16>> {
    // SAFETY: one block per row writes the whole row.
    let out = unsafe { gpu.uninit::<bf16>(w.rows * w.cols)? };
    let f = gpu.function(&QGEMM, "qdequant_rows")?;
    let (qt, inn) = (code(w.qtype), int("in", w.cols)?);
    // SAFETY: as in `linear`.
    unsafe {
        gpu.stream().launch_builder(&f).arg(&w.blocks).arg(&qt).arg(&inn).arg(&out).launch(cfg(
            (blocks(w.rows, 1)?, 1, 1),
            128,
            0,
        ))?;
    }
    Ok(out)
}
