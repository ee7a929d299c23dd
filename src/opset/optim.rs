//! The optimiser: AdamW over fp32 master weights, and global gradient-norm clipping.

use super::Buffers;
use anyhow::Result;

/// A gradient for [`Optimizer::adamw`]: a [`Buffers::Buf`] (from the weight-gradient GEMMs) or a
/// [`Buffers::Stat`] (norm weights, reduced in fp32).
pub enum GradRef<'a, O: Buffers + ?Sized> {
    Buf(&'a O::Buf),
    Stat(&'a O::Stat),
}

/// The per-step scalars of the update, formed in f64 as PyTorch forms them and rounded once: the
/// CPU step below and the GPU kernels (`kernels/llm_ops.cu`) take the same values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWScalars {
    pub b1: f32,
    /// `1 − β₁`
    pub c1: f32,
    pub b2: f32,
    /// `1 − β₂`
    pub c2: f32,
    /// `lr / (1 − β₁ᵗ)`
    pub step_size: f32,
    /// `√(1 − β₂ᵗ)`
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `1 − lr·wd`, applied to decayed parameters only.
    pub decay_factor: f32,
}

/// `train::clip_grad_norm`'s rule on a computed `Σ g²`: `[factor, skip, norm]`.
pub fn clip_rule(sumsq: f64, max_norm: Option<f32>) -> [f32; 3] {
    let norm = sumsq.sqrt() as f32;
    if !norm.is_finite() {
        return [1.0, 1.0, norm];
    }
    let factor = match max_norm {
        Some(max) if norm > max => max / (norm + 1e-6),
        _ => 1.0,
    };
    [factor, 0.0, norm]
}

/// AdamW and the clipping factor, computed on the device.
pub trait Optimizer: Buffers {
    /// Whether a trainable tensor needs an fp32 master beside its working copy: `true` where
    /// [`Buffers::Buf`] is narrower than fp32 (bf16 on the GPU); `false` where the working copy
    /// is fp32 and serves as its own master (the CPU), which saves a copy of every weight.
    const SEPARATE_MASTER: bool;

    /// One AdamW update of the fp32 master `x` (and moments `m`, `v`) that also refreshes `w`,
    /// the working copy the ops read (with `x = None`, of `w` itself, which must then be fp32:
    /// `SEPARATE_MASTER` false), from the gradient times `clip[0]`; nothing changes when
    /// `clip[1]` is non-zero (a non-finite gradient norm: the step is skipped). `clip` is what
    /// [`Optimizer::clip_factor`] makes.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        x: Option<&mut Self::Stat>,
        grad: GradRef<'_, Self>,
        m: &mut Self::Stat,
        v: &mut Self::Stat,
        w: &mut Self::Buf,
        s: &AdamWScalars,
        decay: bool,
        clip: &Self::Stat,
    ) -> Result<()>;
    /// `acc[0] += Σ g²` over a gradient.
    fn sum_squares(&self, g: GradRef<'_, Self>, acc: &mut Self::Stat) -> Result<()>;
    /// From `sumsq[0] = Σ g²` over every gradient, the clipping of `train::clip_grad_norm`:
    /// `[factor, skip, norm]` with `factor = max/(norm + 1e-6)` when `norm > max` (else 1) and
    /// `skip = 1` when the norm is not finite. `None` never clips.
    fn clip_factor(&self, sumsq: &Self::Stat, max_norm: Option<f32>) -> Result<Self::Stat>;
}
