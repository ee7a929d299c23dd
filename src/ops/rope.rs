//! Rotary position embedding in the GGUF/llama.cpp layout: rotation pairs are adjacent
//! elements `(x[2i], x[2i+1])`. (The GGUF converter permutes LLaMA's Q/K weights so that this
//! matches HF's rotate-half layout on the original checkpoint.)

use rayon::prelude::*;

/// Precomputed `cos`/`sin` tables for positions `0..max_pos` and `head_dim / 2` frequencies.
#[derive(Clone)]
pub struct RopeTable {
    pub half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    pub fn new(head_dim: usize, base: f32, max_pos: usize) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for p in 0..max_pos {
            for i in 0..half {
                let freq = (base as f64).powf(-2.0 * i as f64 / head_dim as f64);
                let angle = p as f64 * freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        RopeTable { half, cos, sin }
    }

    /// `(cos, sin)`, each `[max_pos, half]`: what a device copy of the table uploads.
    pub fn tables(&self) -> (&[f32], &[f32]) {
        (&self.cos, &self.sin)
    }

    pub fn max_pos(&self) -> usize {
        self.cos.len() / self.half.max(1)
    }

    /// Rotates `x[tokens, heads, head_dim]` in place; token `t` is at position `start + t`.
    pub fn apply_pairs_(&self, x: &mut [f32], heads: usize, start: usize) {
        rotate_pairs_(x, &self.cos, &self.sin, self.half, heads, start, false);
    }

    /// Backward of [`RopeTable::apply_pairs_`], in place on the gradient: a rotation's
    /// Jacobian is the rotation itself, so the gradient with respect to the input is the
    /// gradient rotated back by the same angle (the transpose, `−θ`).
    pub fn apply_pairs_backward_(&self, dx: &mut [f32], heads: usize, start: usize) {
        let row = heads * self.half * 2;
        dx.par_chunks_mut(row).enumerate().for_each(|(t, tok)| {
            rotate_pairs_(tok, &self.cos, &self.sin, self.half, heads, start + t, true);
        });
    }
}

/// The rotation itself, from tables `cos`, `sin` `[max_pos, half]`: each token of
/// `x[tokens, heads, 2·half]` (token `t` at position `start + t`) turns by its angles, or back by
/// them with `inverse`. [`RopeTable`] and the host op set of the device step both call it.
pub fn rotate_pairs_(x: &mut [f32], cos: &[f32], sin: &[f32], half: usize, heads: usize, start: usize, inverse: bool) {
    let hd = half * 2;
    for (t, tok) in x.chunks_mut(heads * hd).enumerate() {
        let base = (start + t) * half;
        let (c, s) = (&cos[base..base + half], &sin[base..base + half]);
        for head in tok.chunks_mut(hd) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                if inverse {
                    head[2 * i] = a * c[i] + b * s[i];
                    head[2 * i + 1] = -a * s[i] + b * c[i];
                } else {
                    head[2 * i] = a * c[i] - b * s[i];
                    head[2 * i + 1] = a * s[i] + b * c[i];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::gradcheck::{check, project, rng, uniform, Tol};

    #[test]
    fn rope_backward_matches_finite_differences_grad() {
        let (t, heads, hd, start) = (3, 3, 6, 2);
        let table = RopeTable::new(hd, 100.0, 8);
        let mut g = rng(41);
        let x = uniform(&mut g, t * heads * hd, -1.0, 1.0);
        let r = uniform(&mut g, x.len(), -1.0, 1.0);
        let mut dx = r.clone();
        table.apply_pairs_backward_(&mut dx, heads, start);
        check("dx", &x, &dx, 1e-2, Tol { atol: 1e-3, rtol: 1e-2 }, |x| {
            let mut y = x.to_vec();
            table.apply_pairs_(&mut y, heads, start);
            project(&y, &r)
        });
    }

    #[test]
    fn rope_preserves_norm_and_relative_angle() {
        let table = RopeTable::new(4, 10000.0, 8);
        let mut x = vec![1.0, 0.0, 0.5, 0.5];
        table.apply_pairs_(&mut x, 1, 3);
        let n: f32 = x.iter().map(|v| v * v).sum();
        assert!((n - 1.5).abs() < 1e-5);
        assert!((x[0] - 3.0f32.cos()).abs() < 1e-6 && (x[1] - 3.0f32.sin()).abs() < 1e-6);
    }
}
