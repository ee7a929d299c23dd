//! Linear layers whose frozen weight stays in a checkpoint's quantized blocks
//! ([`crate::quant::QMatrix`]): inference from the blocks, and the input gradient QLoRA's
//! backward needs (a quantized weight never gets a gradient of its own), and the losses through a
//! frozen LM head kept as blocks.

use super::{Buffers, Gemm, GemmSpec, Losses};
use crate::quant::QMatrix;
use anyhow::{bail, Result};

/// The quantized-weight ops.
pub trait QuantOps: Buffers {
    /// A quantized weight on the backend.
    type QBuf;
    fn upload_quant(&self, w: &QMatrix) -> Result<Self::QBuf>;
    /// Bytes the backend holds for `w` (for the memory reports).
    fn quant_bytes(&self, w: &Self::QBuf) -> usize;
    /// `y [rows, out] = x [rows, in]·Wᵀ (+ bias) (+ acc)`: a linear layer, its output new or
    /// added to `acc` (the residual stream; never with a bias).
    fn qlinear(
        &self,
        x: &Self::Buf,
        w: &Self::QBuf,
        rows: usize,
        bias: Option<&Self::Buf>,
        acc: Option<Self::Buf>,
    ) -> Result<Self::Buf>;
    /// `dx [rows, in] = dy [rows, out]·W`, new or added to `acc`.
    fn qlinear_input_grad(
        &self,
        dy: &Self::Buf,
        w: &Self::QBuf,
        rows: usize,
        acc: Option<Self::Buf>,
    ) -> Result<Self::Buf>;
    /// [`QuantOps::qlinear`] of several weights reading the same input `x` (no accumulation):
    /// one call, so a backend may quantize `x` once and run the products in one pass.
    fn qlinear_group(
        &self,
        x: &Self::Buf,
        ws: &[&Self::QBuf],
        rows: usize,
        biases: &[Option<&Self::Buf>],
    ) -> Result<Vec<Self::Buf>> {
        ws.iter().zip(biases).map(|(w, b)| self.qlinear(x, w, rows, *b, None)).collect()
    }
    /// Rows `ids` of the table `w`, `[ids.len(), in]` (an embedding lookup).
    fn qembed(&self, w: &Self::QBuf, ids: &[u32]) -> Result<Self::Buf>;
    /// [`Losses::seq_logprobs`] through a frozen LM head `w` kept as blocks: `(seq [N], lse [N·T])`.
    fn q_seq_logprobs(
        &self,
        hidden: &Self::Buf,
        w: &Self::QBuf,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(Self::Stat, Self::Stat)>;
    /// [`Losses::logprob_backward`] through a frozen LM head kept as blocks: `∂/∂hidden` only
    /// (a quantized head never gets a gradient).
    fn q_logprob_backward(
        &self,
        hidden: &Self::Buf,
        w: &Self::QBuf,
        targets: &[u32],
        lse: &Self::Stat,
        grad_seq: &Self::Stat,
        seqs: usize,
    ) -> Result<Self::Buf>;
}

/// A quantized weight dequantized at upload, for a backend without quantized kernels (the GPU
/// today): the same results through its dense GEMM, without the memory saving.
pub struct DenseQuant<B> {
    pub w: B,
    pub rows: usize,
    pub cols: usize,
    pub bytes: usize,
}

/// [`QuantOps`] on a backend's dense ops, for [`DenseQuant`] weights.
pub mod dense {
    use super::*;

    /// Dequantizes `w` and uploads it; `bytes` counts 2 per value (the GPU's bf16 buffers).
    pub fn upload<O: Buffers>(o: &O, w: &QMatrix) -> Result<DenseQuant<O::Buf>> {
        let bytes = w.rows * w.cols * 2;
        Ok(DenseQuant { w: o.upload(&w.dequantize())?, rows: w.rows, cols: w.cols, bytes })
    }

    pub fn qlinear<O: Gemm>(
        o: &O,
        x: &O::Buf,
        w: &DenseQuant<O::Buf>,
        rows: usize,
        bias: Option<&O::Buf>,
        acc: Option<O::Buf>,
    ) -> Result<O::Buf> {
        let spec = GemmSpec::linear(rows, w.rows, w.cols);
        match (acc, bias) {
            (Some(mut y), None) => {
                o.gemm(&GemmSpec { accumulate: true, ..spec }, x, &w.w, &mut y)?;
                Ok(y)
            }
            (None, None) => o.gemm_new(&spec, x, &w.w),
            (None, Some(b)) => o.gemm_bias_new(&spec, x, &w.w, b),
            (Some(_), Some(_)) => bail!("a biased linear layer never adds into the residual stream"),
        }
    }

    pub fn seq_logprobs<O: Losses>(
        o: &O,
        hidden: &O::Buf,
        w: &DenseQuant<O::Buf>,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(O::Stat, O::Stat)> {
        o.seq_logprobs(hidden, &w.w, targets, seqs)
    }

    pub fn logprob_backward<O: Losses>(
        o: &O,
        hidden: &O::Buf,
        w: &DenseQuant<O::Buf>,
        targets: &[u32],
        lse: &O::Stat,
        grad_seq: &O::Stat,
        seqs: usize,
    ) -> Result<O::Buf> {
        o.logprob_backward(hidden, &w.w, targets, lse, grad_seq, seqs, None)
    }

    pub fn input_grad<O: Gemm>(
        o: &O,
        dy: &O::Buf,
        w: &DenseQuant<O::Buf>,
        rows: usize,
        acc: Option<O::Buf>,
    ) -> Result<O::Buf> {
        let spec = GemmSpec::nn(rows, w.cols, w.rows);
        match acc {
            Some(mut dx) => {
                o.gemm(&GemmSpec { accumulate: true, ..spec }, dy, &w.w, &mut dx)?;
                Ok(dx)
            }
            None => o.gemm_new(&spec, dy, &w.w),
        }
    }
}
