//! Scaled dot-product attention with grouped-query heads (CPU reference).
//!
//! Layouts: queries `[T, H, D]`, keys and values `[S, H_kv, D]` (a KV cache is just the first S
//! rows), output `[T, H, D]`. Query head `h` reads key/value head `h / (H / H_kv)`.

use super::activation::softmax_;
use super::dot::dot;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Which keys a query may see.
#[derive(Clone, Copy, Debug)]
pub enum Mask<'a> {
    /// Query `t` sits at absolute position `start + t` and sees keys `0..=start + t`.
    Causal { start: usize },
    /// Every query sees every key whose flag is true (padding mask); `None` sees all.
    Keys(Option<&'a [bool]>),
}

pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, mask: Mask, out: &mut [f32]) {
    let AttnShape { heads, kv_heads, head_dim: d } = s;
    let s_len = k.len() / (kv_heads * d);
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    // One task per (query, head): independent rows of the output.
    out.par_chunks_mut(d).enumerate().for_each(|(row, o)| {
        let (t, h) = (row / heads, row % heads);
        let kvh = h / group;
        let qv = &q[(t * heads + h) * d..(t * heads + h + 1) * d];
        let visible = match mask {
            Mask::Causal { start } => (start + t + 1).min(s_len),
            Mask::Keys(_) => s_len,
        };
        let mut scores = vec![f32::NEG_INFINITY; visible];
        for (j, sc) in scores.iter_mut().enumerate() {
            if let Mask::Keys(Some(m)) = mask {
                if !m[j] {
                    continue;
                }
            }
            let kv = &k[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
            *sc = dot(qv, kv) * scale;
        }
        softmax_(&mut scores);
        o.fill(0.0);
        for (j, &p) in scores.iter().enumerate() {
            if p == 0.0 {
                continue;
            }
            let vv = &v[(j * kv_heads + kvh) * d..(j * kv_heads + kvh + 1) * d];
            o.iter_mut().zip(vv).for_each(|(acc, x)| *acc += p * x);
        }
    });
}

/// Whether query `t` may attend to key `j` (the forward's rule).
fn sees(mask: Mask, t: usize, j: usize) -> bool {
    match mask {
        Mask::Causal { start } => j <= start + t,
        Mask::Keys(None) => true,
        Mask::Keys(Some(m)) => m[j],
    }
}

/// Backward of [`attention`], accumulating into `dq` `[T, H, D]` and `dk`, `dv` `[S, H_kv, D]`.
///
/// The softmax is recomputed from `q` and `k` rather than read from saved probabilities: saving
/// them costs `T·H·S` floats per layer (quadratic in the sequence), recomputing costs one more
/// `q·k` pass, and the CUDA kernel must work the same way (FlashAttention-2). Two passes, each
/// with one writer per output row so no locks and a deterministic result:
/// 1. per query row `(t, h)`: `P = softmax(s)`, `o = P·V`, `δ = dout·o`, `dP_j = dout·v_j`,
///    `dS_j = P_j·(dP_j − δ)`, `dq += scale·Σ_j dS_j·k_j`; keeps `logsumexp(s)` and `δ`;
/// 2. per key row `(j, g)`: over the queries of group `g` that see `j`, `P` from the kept
///    log-sum-exp, `dk_j += scale·Σ dS·q`, `dv_j += Σ P·dout`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    dout: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    mask: Mask,
) {
    let AttnShape { heads, kv_heads, head_dim: d } = s;
    let s_len = k.len() / (kv_heads * d);
    let t_len = q.len() / (heads * d);
    let group = heads / kv_heads;
    let scale = 1.0 / (d as f32).sqrt();
    fn row(x: &[f32], i: usize, d: usize) -> &[f32] {
        &x[i * d..(i + 1) * d]
    }
    let mut lse = vec![f32::NEG_INFINITY; t_len * heads];
    let mut delta = vec![0.0f32; t_len * heads];
    dq.par_chunks_mut(d).zip(lse.par_iter_mut().zip(delta.par_iter_mut())).enumerate().for_each(
        |(r, (dqr, (lse_r, delta_r)))| {
            let (t, h) = (r / heads, r % heads);
            let kvh = h / group;
            let (qv, go) = (row(q, r, d), row(dout, r, d));
            let mut p: Vec<f32> =
                (0..s_len)
                    .map(|j| {
                        if sees(mask, t, j) {
                            dot(qv, row(k, j * kv_heads + kvh, d)) * scale
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                    .collect();
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if max == f32::NEG_INFINITY {
                return; // sees nothing: output 0, no gradient
            }
            let mut sum = 0.0f32;
            for x in p.iter_mut() {
                *x = (*x - max).exp();
                sum += *x;
            }
            *lse_r = max + sum.ln();
            p.iter_mut().for_each(|x| *x /= sum);
            // δ = dout·o with o = Σ P_j v_j, without materialising o.
            let dp: Vec<f32> =
                (0..s_len).map(|j| if p[j] == 0.0 { 0.0 } else { dot(go, row(v, j * kv_heads + kvh, d)) }).collect();
            let del = dot(&p, &dp);
            *delta_r = del;
            for j in 0..s_len {
                if p[j] == 0.0 {
                    continue;
                }
                let ds = p[j] * (dp[j] - del) * scale;
                dqr.iter_mut().zip(row(k, j * kv_heads + kvh, d)).for_each(|(a, &b)| *a += ds * b);
            }
        },
    );
    dk.par_chunks_mut(d).zip(dv.par_chunks_mut(d)).enumerate().for_each(|(r, (dkr, dvr))| {
        let (j, g) = (r / kv_heads, r % kv_heads);
        let (kj, vj) = (row(k, r, d), row(v, r, d));
        for t in 0..t_len {
            if !sees(mask, t, j) {
                continue;
            }
            for h in g * group..(g + 1) * group {
                let qr = t * heads + h;
                if lse[qr] == f32::NEG_INFINITY {
                    continue;
                }
                let (qv, go) = (row(q, qr, d), row(dout, qr, d));
                let p = (dot(qv, kj) * scale - lse[qr]).exp();
                let ds = p * (dot(go, vj) - delta[qr]) * scale;
                dkr.iter_mut().zip(qv).for_each(|(a, &b)| *a += ds * b);
                dvr.iter_mut().zip(go).for_each(|(a, &b)| *a += p * b);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::gradcheck::{check, project, rng, uniform, Tol};

    fn check_attention(s: AttnShape, t_len: usize, s_len: usize, mask: Mask, seed: u64) {
        let mut g = rng(seed);
        let q = uniform(&mut g, t_len * s.heads * s.head_dim, -1.5, 1.5);
        let k = uniform(&mut g, s_len * s.kv_heads * s.head_dim, -1.5, 1.5);
        let v = uniform(&mut g, s_len * s.kv_heads * s.head_dim, -1.0, 1.0);
        let r = uniform(&mut g, q.len(), -1.0, 1.0);
        let f = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0.0; q.len()];
            attention(q, k, v, s, mask, &mut out);
            project(&out, &r)
        };
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        attention_backward(&mut dq, &mut dk, &mut dv, &r, &q, &k, &v, s, mask);
        let tol = Tol { atol: 1e-3, rtol: 1e-2 };
        check("dq", &q, &dq, 1e-2, tol, |q| f(q, &k, &v));
        check("dk", &k, &dk, 1e-2, tol, |k| f(&q, k, &v));
        check("dv", &v, &dv, 1e-2, tol, |v| f(&q, &k, v));
    }

    #[test]
    fn causal_gqa_attention_backward_matches_finite_differences_grad() {
        let s = AttnShape { heads: 4, kv_heads: 2, head_dim: 3 };
        check_attention(s, 5, 5, Mask::Causal { start: 0 }, 51);
        // Continuing after a 2-token prefix: 3 queries over 5 keys.
        check_attention(s, 3, 5, Mask::Causal { start: 2 }, 52);
    }

    #[test]
    fn bidirectional_attention_backward_matches_finite_differences_grad() {
        // Fusion-attention shape: fewer queries than keys, no mask, H = H_kv.
        let s = AttnShape { heads: 3, kv_heads: 3, head_dim: 5 };
        check_attention(s, 2, 7, Mask::Keys(None), 53);
        let keep = [true, false, true, true, false, true];
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 4 };
        check_attention(s, 3, 6, Mask::Keys(Some(&keep)), 54);
    }

    #[test]
    fn causal_first_query_returns_first_value_and_gqa_shares_heads() {
        // 2 query heads share 1 kv head; D = 2; three positions.
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 2 };
        let q = vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0];
        let k = vec![1.0, 0.0, 0.0, 1.0, 5.0, 5.0];
        let v = vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0];
        let mut out = vec![0.0; 8];
        attention(&q, &k, &v, s, Mask::Causal { start: 0 }, &mut out);
        assert_eq!(&out[0..4], &[10.0, 20.0, 10.0, 20.0]);
        // Second query sees two keys with equal scores: the mean of the first two values.
        assert!((out[4] - 20.0).abs() < 1e-5 && (out[5] - 30.0).abs() < 1e-5);
    }
}
