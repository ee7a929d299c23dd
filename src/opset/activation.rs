//! Elementwise activations: SwiGLU, GELU, and the channel bias + ReLU6 epilogue of the
//! convolutional encoder.

use super::Buffers;
use anyhow::Result;

/// Elementwise activations and their backward.
pub trait Activations: Buffers {
    /// `silu(g)·u`.
    fn swiglu(&self, g: &Self::Buf, u: &Self::Buf) -> Result<Self::Buf>;
    /// `(dg, du)`.
    fn swiglu_backward(&self, dy: &Self::Buf, g: &Self::Buf, u: &Self::Buf) -> Result<(Self::Buf, Self::Buf)>;
    /// GELU, exact erf form (`ops::activation::gelu_forward`).
    fn gelu(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// `dx = dy·gelu'(x)`.
    fn gelu_backward(&self, dy: &Self::Buf, x: &Self::Buf) -> Result<Self::Buf>;
    /// `y[c, p] = act(y[c, p] + bias[c] (+ residual[c, p]))` over `y [channels, P]`.
    fn channel_bias_act(
        &self,
        y: &mut Self::Buf,
        bias: &Self::Stat,
        channels: usize,
        residual: Option<&Self::Buf>,
        relu6: bool,
    ) -> Result<()>;
}
