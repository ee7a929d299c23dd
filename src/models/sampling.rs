//! Choosing the next token from logits: greedy at temperature 0, else temperature and nucleus
//! (top-p) sampling with a seeded generator, one sampler per sequence.

use rand::{Rng, SeedableRng};

/// Decoding settings: greedy at temperature 0, else temperature + nucleus (top-p) sampling.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    /// The settings of row `row` of a batch: the seed mixed with the row (row 0 keeps it).
    pub fn for_row(self, row: usize) -> Sampling {
        Sampling { seed: self.seed ^ (row as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15), ..self }
    }
}

pub struct Sampler {
    cfg: Sampling,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    pub fn new(cfg: Sampling) -> Self {
        Sampler { cfg, rng: rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut probs: Vec<(u32, f32)> =
            logits.iter().enumerate().map(|(i, &l)| (i as u32, l / self.cfg.temperature)).collect();
        let max = probs.iter().map(|p| p.1).fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for p in probs.iter_mut() {
            p.1 = (p.1 - max).exp();
            sum += p.1;
        }
        probs.iter_mut().for_each(|p| p.1 /= sum);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= self.cfg.top_p {
                keep = i + 1;
                break;
            }
        }
        let total: f32 = probs[..keep].iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for p in &probs[..keep] {
            r -= p.1;
            if r <= 0.0 {
                return p.0;
            }
        }
        probs[keep - 1].0
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    xs.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
        as u32
}
