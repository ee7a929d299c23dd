//! Linear layers whose frozen weight stays in a checkpoint's quantized blocks
//! ([`crate::qmatrix::QMatrix`]): inference from the blocks, and the input gradient QLoRA's
//! backward needs (a quantized weight never gets a gradient of its own), and the losses through a
//! frozen LM head kept as blocks.

use super::Buffers;
use crate::qmatrix::QMatrix;
use anyhow::Result;

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
