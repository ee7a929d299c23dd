//! The optimizer's settings and state. AdamW (Loshchilov & Hutter): Adam with decoupled weight
//! decay, as `torch.optim.AdamW` computes it (the update runs on the op set,
//! `opset::Optimizer::adamw`, from the scalars formed here).
//!
//! Per step `t` (1-based) and parameter: `p ← p·(1 − lr·wd)` (decayed parameters only),
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
//! State (step count and per-parameter `m`, `v`, keyed by parameter name) is plain serde data, so
//! a checkpoint restores it exactly.

use super::schedule::CosineSchedule;
pub use crate::opset::AdamWScalars;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamWConfig {
    // f64 like PyTorch's Python floats: `1 − β₂` is formed before rounding to f32.
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// PyTorch's defaults.
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl AdamWScalars {
    /// For step `t` (1-based) at learning rate `lr`.
    pub fn new(cfg: &AdamWConfig, t: u64, lr: f32) -> AdamWScalars {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = *cfg;
        let t = i32::try_from(t).unwrap_or(i32::MAX);
        AdamWScalars {
            b1: beta1 as f32,
            c1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            c2: (1.0 - beta2) as f32,
            step_size: (lr as f64 / (1.0 - beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
            eps: eps as f32,
            decay_factor: (1.0 - lr as f64 * weight_decay) as f32,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AdamWState {
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Keyed by parameter name (not registration order), so state survives reordering.
    pub moments: BTreeMap<String, Moments>,
}

/// How a stage optimises: AdamW, the learning-rate schedule and gradient clipping.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub adamw: AdamWConfig,
    pub schedule: CosineSchedule,
    /// Clip the global gradient norm to this; `None` does not clip.
    pub max_grad_norm: Option<f32>,
}
