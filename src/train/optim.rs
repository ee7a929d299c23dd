//! AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, as `torch.optim.AdamW` computes
//! it, so a run can be compared step for step with PyTorch.
//!
//! Per step `t` (1-based) and parameter: `p ← p·(1 − lr·wd)` (decayed parameters only),
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)`.
//! State (step count and per-parameter `m`, `v`, keyed by parameter name) is plain serde data, so
//! a checkpoint restores it exactly.

use super::param::ParamSet;
pub use crate::opset::AdamWScalars;
use rayon::prelude::*;
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

#[derive(Clone, Debug)]
pub struct AdamW {
    pub cfg: AdamWConfig,
    pub state: AdamWState,
}

impl AdamW {
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, state: AdamWState::default() }
    }

    pub fn from_state(cfg: AdamWConfig, state: AdamWState) -> Self {
        AdamW { cfg, state }
    }

    pub fn step_count(&self) -> u64 {
        self.state.step
    }

    /// One update of every trainable parameter from its gradient at learning rate `lr`.
    /// Gradients are left as they are (the caller zeroes them).
    pub fn step(&mut self, params: &mut ParamSet, lr: f32) {
        self.state.step += 1;
        let AdamWScalars { b1, c1, b2, c2, step_size, bc2_sqrt, eps, decay_factor } =
            AdamWScalars::new(&self.cfg, self.state.step, lr);
        for p in params.trainable_mut() {
            assert_eq!(p.grad.len(), p.value.len(), "parameter {:?}: gradient and value differ in length", p.name);
            if !self.state.moments.contains_key(&p.name) {
                let z = vec![0.0; p.value.len()];
                self.state.moments.insert(p.name.clone(), Moments { m: z.clone(), v: z });
            }
            let st = self.state.moments.get_mut(&p.name).expect("inserted above");
            assert_eq!(st.m.len(), p.value.len(), "parameter {:?}: optimizer state has another size", p.name);
            let decay = if p.decay { decay_factor } else { 1.0 };
            p.value
                .par_iter_mut()
                .zip(p.grad.par_iter())
                .zip(st.m.par_iter_mut().zip(st.v.par_iter_mut()))
                .with_min_len(4096)
                .for_each(|((x, &g), (m, v))| {
                    *x *= decay;
                    *m = b1 * *m + c1 * g;
                    *v = b2 * *v + c2 * g * g;
                    *x -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adamw_matches_hand_computed_two_steps_train() {
        let mut ps = ParamSet::new();
        let id = ps.add("p", &[3], vec![1.0, -0.5, 2.0], true).unwrap();
        ps[id].decay = true;
        let mut opt = AdamW::new(AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 });
        let lr = 0.1;
        // Step 1: decay ×(1 − 0.01); m = 0.1g, v = 0.001g²; bias-corrected m̂/√v̂ = sign(g) (0 for
        // g = 0), so p = 0.99·p₀ − 0.1·sign(g₁) = [0.89, −0.395, 1.98].
        ps[id].grad = vec![0.5, -1.0, 0.0];
        opt.step(&mut ps, lr);
        for (a, e) in ps[id].value.iter().zip([0.89, -0.395, 1.98]) {
            assert!((a - e).abs() < 1e-6, "step 1: {a} vs {e}");
        }
        // Step 2, g₂ = [0.5, 1, 2]: p ← 0.99p = [0.8811, −0.39105, 1.9602];
        // m = [0.095, 0.01, 0.2], v = [0.00049975, 0.001999, 0.004];
        // lr/(1−0.9²) = 0.1/0.19, √v/√(1−0.999²) = [0.5, 1, √(0.004/0.001999) = 1.4145672];
        // p −= [0.1, 0.0052631579, 0.0744136] → [0.7811, −0.3963132, 1.8857863].
        ps[id].grad = vec![0.5, 1.0, 2.0];
        opt.step(&mut ps, lr);
        for (a, e) in ps[id].value.iter().zip([0.7811, -0.396_313_16, 1.885_786_3]) {
            assert!((a - e).abs() < 1e-6, "step 2: {a} vs {e}");
        }
        assert_eq!(opt.step_count(), 2);
        let st = &opt.state.moments["p"];
        assert!((st.m[2] - 0.2).abs() < 1e-7 && (st.v[0] / 0.000_499_75 - 1.0).abs() < 1e-6, "{st:?}");
    }

    #[test]
    fn adamw_state_round_trips_through_json_train() {
        let mut ps = ParamSet::new();
        let id = ps.add("w", &[2, 2], vec![0.3, -0.1, 0.7, 0.2], true).unwrap();
        let frozen = ps.add("f", &[2], vec![1.0, 2.0], false).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        let grads = |k: usize| (0..4).map(|i| ((i * 7 + k * 3) % 5) as f32 * 0.1 - 0.2).collect::<Vec<f32>>();
        for k in 0..3 {
            ps[id].grad = grads(k);
            opt.step(&mut ps, 1e-2);
        }
        assert!(!opt.state.moments.contains_key("f"), "frozen parameters carry no state");
        assert_eq!(ps[frozen].value, vec![1.0, 2.0]);
        let json = serde_json::to_string(&opt.state).unwrap();
        let mut resumed = AdamW::from_state(opt.cfg, serde_json::from_str(&json).unwrap());
        assert_eq!(resumed.state, opt.state);
        let mut ps2 = ps.clone();
        for k in 3..6 {
            ps[id].grad = grads(k);
            ps2[id].grad = grads(k);
            opt.step(&mut ps, 1e-2);
            resumed.step(&mut ps2, 1e-2);
        }
        let bits = |p: &ParamSet| p[id].value.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ps), bits(&ps2), "a resumed optimizer continues bit for bit");
    }
}
