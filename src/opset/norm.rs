//! Row normalisations: RMSNorm (the LLM) and LayerNorm (the SAGE head), forward and backward.

use super::Buffers;
use anyhow::Result;

/// RMSNorm and LayerNorm over rows, with the statistics their backward reads.
pub trait Norms: Buffers {
    /// RMSNorm over `rows` rows of `w.len()`: `(y, rstd)`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, eps: f32) -> Result<(Self::Buf, Self::Stat)>;
    /// RMSNorm backward: `dx` (added to when `accumulate`, else overwritten), `dw += …` unless
    /// the weight is frozen (`None`).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        rstd: &Self::Stat,
        rows: usize,
        eps: f32,
        accumulate: bool,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Stat>,
    ) -> Result<()>;
    /// LayerNorm over `rows` rows of `w.len()`: `(y, stats)`, the statistics the backward reads.
    fn layernorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        rows: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Stat)>;
    /// Its backward: returns `dx`; `dw += Σ dy·x̂`, `db += Σ dy`.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        stats: &Self::Stat,
        rows: usize,
        eps: f32,
        dw: &mut Self::Stat,
        db: &mut Self::Stat,
    ) -> Result<Self::Buf>;
}
