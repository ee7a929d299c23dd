//! Multi-head fusion (cross-)attention, forward and backward (CPU reference of
//! `kernels/fusion_attn.cu`; ARCHITECTURE.md §1, §4).
//!
//! The L fact vectors attend over the K selected patches, per sample and head:
//! `q [B, L, H, D]`, `k, v [B, S, H, D]` (S = K patches), `out [B, L, H, D]`,
//! `out_i = Σ_j softmax_j(scale · q_i·k_j) · v_j` with `scale = 1/√D`, and
//! `lse [B, H, L] = log Σ_j exp(scale · q_i·k_j)` kept for the backward pass. The projections
//! (Wq, Wk, Wv, out) are linear layers around this core.
//!
//! Backward (llm.c style, given `dout` and the forward's `out` and `lse`):
//! `delta_i = dout_i·out_i`, `p_ij = exp(scale q_i·k_j − lse_i)`, `dp_ij = dout_i·v_j`,
//! `ds_ij = p_ij (dp_ij − delta_i)`; `dq_i = scale Σ_j ds_ij k_j`, `dk_j = scale Σ_i ds_ij q_i`,
//! `dv_j = Σ_i p_ij dout_i`.

use super::dot::dot;
use super::vmath;
pub use crate::opset::FusionShape;
use rayon::prelude::*;

fn check_lens(s: &FusionShape, q: usize, k: usize, v: usize) {
    assert_eq!(q, s.q_len(), "fusion attention: q has the wrong length for {s:?}");
    assert_eq!(k, s.kv_len(), "fusion attention: k has the wrong length for {s:?}");
    assert_eq!(v, s.kv_len(), "fusion attention: v has the wrong length for {s:?}");
}

/// Forward: writes `out [B, L, H, D]` and `lse [B, H, L]`. With no keys (S = 0) the output is
/// zero and `lse` is −∞.
pub fn fusion_attn_forward(q: &[f32], k: &[f32], v: &[f32], s: FusionShape, out: &mut [f32], lse: &mut [f32]) {
    check_lens(&s, q.len(), k.len(), v.len());
    assert_eq!(out.len(), s.q_len());
    assert_eq!(lse.len(), s.lse_len());
    let FusionShape { queries: l, keys: n, heads: h, head_dim: d, .. } = s;
    let scale = s.scale();
    let row = |rows: usize, b: usize, i: usize, hh: usize| {
        let start = ((b * rows + i) * h + hh) * d;
        start..start + d
    };
    // One task per sample: its out rows and its lse block are contiguous.
    out.par_chunks_mut(l * h * d).zip(lse.par_chunks_mut(h * l)).enumerate().for_each(|(b, (ob, lb))| {
        let mut scores = vec![0.0f32; n];
        for hh in 0..h {
            for i in 0..l {
                let qi = &q[row(l, b, i, hh)];
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = scale * dot(qi, &k[row(n, b, j, hh)]);
                }
                let o = &mut ob[(i * h + hh) * d..(i * h + hh + 1) * d];
                o.fill(0.0);
                if n == 0 {
                    lb[hh * l + i] = f32::NEG_INFINITY;
                    continue;
                }
                let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0f32;
                for (j, sc) in scores.iter().enumerate() {
                    let p = (sc - m).exp();
                    sum += p;
                    o.iter_mut().zip(&v[row(n, b, j, hh)]).for_each(|(acc, x)| *acc += p * x);
                }
                o.iter_mut().for_each(|x| *x /= sum);
                lb[hh * l + i] = m + sum.ln();
            }
        }
    });
}

/// Query rows per task of [`fusion_attn_forward_gemm`]: the score block stays in L2 at a few
/// thousand keys.
const QUERY_BLOCK: usize = 64;

/// [`fusion_attn_forward`] as GEMMs (the host path; the loop above stays the reference): one task
/// per (sample, head, block of 64 queries), each `scores = scale · Q·Kᵀ` and `out = P·V` through
/// `ops::gemm` on strided views of the head, so a single long sequence (a ViT's 257–1025 tokens)
/// is spread over every thread instead of one task per sample.
pub fn fusion_attn_forward_gemm(q: &[f32], k: &[f32], v: &[f32], s: FusionShape, out: &mut [f32], lse: &mut [f32]) {
    // Serial GEMMs: the blocks are already one task per thread.
    use crate::ops::gemm::{prepare_rhs, sgemm_serial_prepared, MatRef};
    check_lens(&s, q.len(), k.len(), v.len());
    assert_eq!(out.len(), s.q_len());
    assert_eq!(lse.len(), s.lse_len());
    let FusionShape { batch, queries: l, keys: n, heads: h, head_dim: d } = s;
    if n == 0 {
        out.fill(0.0);
        lse.fill(f32::NEG_INFINITY);
        return;
    }
    let scale = s.scale();
    let stride = h * d;
    let tasks: Vec<(usize, usize, usize)> = (0..batch)
        .flat_map(|b| (0..h).flat_map(move |hh| (0..l).step_by(QUERY_BLOCK).map(move |i0| (b, hh, i0))))
        .collect();
    // Each head's keys (as `Kᵀ`) and values prepared once for all its blocks of queries: packed
    // for the AVX-512 kernel, they are not transposed again by every block.
    let heads: Vec<_> = (0..batch * h)
        .into_par_iter()
        .map(|bh| {
            let ks = ((bh / h) * n * h + bh % h) * d;
            let kt = MatRef { data: &k[ks..], row_stride: 1, col_stride: stride };
            let vm = MatRef { data: &v[ks..], row_stride: stride, col_stride: 1 };
            (prepare_rhs(kt, d, n), prepare_rhs(vm, n, d))
        })
        .collect();
    // Each worker reuses one score buffer (`QUERY_BLOCK × keys`, 262 KB at 1025 keys): a new
    // zeroed one per block was a memset of the whole buffer that the product then overwrote.
    let blocks: Vec<(Vec<f32>, Vec<f32>)> = tasks
        .par_iter()
        .map_init(Vec::new, |p, &(b, hh, i0)| {
            let rows = QUERY_BLOCK.min(l - i0);
            let qs = ((b * l + i0) * h + hh) * d;
            let qm = MatRef { data: &q[qs..], row_stride: stride, col_stride: 1 };
            let (kt, vm) = &heads[b * h + hh];
            p.resize(rows * n, 0.0);
            sgemm_serial_prepared(rows, n, d, qm, kt, p, false);
            // Unnormalised probabilities through the second GEMM, then each output row divided
            // by its sum: d wide instead of n.
            let stats: Vec<(f32, f32)> = p.chunks_exact_mut(n).map(|r| vmath::softmax_numerators_(r, scale)).collect();
            let mut o = vec![0.0f32; rows * d];
            sgemm_serial_prepared(rows, d, n, MatRef::rows(p, n), vm, &mut o, false);
            for (orow, &(_, sum)) in o.chunks_exact_mut(d).zip(&stats) {
                let inv = 1.0 / sum;
                orow.iter_mut().for_each(|x| *x *= inv);
            }
            (o, stats.iter().map(|&(m, sum)| m + sum.ln()).collect::<Vec<f32>>())
        })
        .collect();
    for (&(b, hh, i0), (o, lse_rows)) in tasks.iter().zip(&blocks) {
        for (r, (orow, &ls)) in o.chunks_exact(d).zip(lse_rows).enumerate() {
            let at = ((b * l + i0 + r) * h + hh) * d;
            out[at..at + d].copy_from_slice(orow);
            lse[(b * h + hh) * l + i0 + r] = ls;
        }
    }
}

/// Gradients of the fusion attention for upstream `dout`, from the forward's `out` and `lse`.
pub struct FusionGrads {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
}

/// Backward: `dq [B, L, H, D]`, `dk, dv [B, S, H, D]`.
#[allow(clippy::too_many_arguments)]
pub fn fusion_attn_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    s: FusionShape,
) -> FusionGrads {
    check_lens(&s, q.len(), k.len(), v.len());
    assert_eq!(out.len(), s.q_len());
    assert_eq!(dout.len(), s.q_len());
    assert_eq!(lse.len(), s.lse_len());
    let FusionShape { queries: l, keys: n, heads: h, head_dim: d, .. } = s;
    let scale = s.scale();
    let mut dq = vec![0.0f32; s.q_len()];
    let mut dk = vec![0.0f32; s.kv_len()];
    let mut dv = vec![0.0f32; s.kv_len()];
    let at = |rows: usize, b: usize, i: usize, hh: usize| ((b * rows + i) * h + hh) * d;
    dq.par_chunks_mut(l * h * d)
        .zip(dk.par_chunks_mut(n * h * d))
        .zip(dv.par_chunks_mut(n * h * d))
        .enumerate()
        .for_each(|(b, ((dqb, dkb), dvb))| {
            for hh in 0..h {
                for i in 0..l {
                    let qo = at(l, b, i, hh);
                    let (qi, oi, doi) = (&q[qo..qo + d], &out[qo..qo + d], &dout[qo..qo + d]);
                    let delta = dot(doi, oi);
                    let lse_i = lse[(b * h + hh) * l + i];
                    let lq = (i * h + hh) * d;
                    for j in 0..n {
                        let ko = at(n, b, j, hh);
                        let (kj, vj) = (&k[ko..ko + d], &v[ko..ko + d]);
                        let p = (scale * dot(qi, kj) - lse_i).exp();
                        let ds = p * (dot(doi, vj) - delta);
                        let lk = (j * h + hh) * d;
                        for e in 0..d {
                            dqb[lq + e] += scale * ds * kj[e];
                            dkb[lk + e] += scale * ds * qi[e];
                            dvb[lk + e] += p * doi[e];
                        }
                    }
                }
            }
        });
    FusionGrads { dq, dk, dv }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn randn(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    const SHAPE: FusionShape = FusionShape { batch: 2, queries: 3, keys: 5, heads: 2, head_dim: 4 };

    fn loss(q: &[f32], k: &[f32], v: &[f32], g: &[f32], s: FusionShape) -> f64 {
        let mut out = vec![0.0; s.q_len()];
        let mut lse = vec![0.0; s.lse_len()];
        fusion_attn_forward(q, k, v, s, &mut out, &mut lse);
        out.iter().zip(g).map(|(a, b)| *a as f64 * *b as f64).sum()
    }

    #[test]
    fn the_gemm_forward_matches_the_reference_loop() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        // A block boundary (130 = 2·64 + 2 queries), one query, no keys, several samples; heads
        // of 64 with ≥ 64 keys, whose keys and values are packed once per head where the CPU has
        // AVX-512.
        for (batch, queries, keys, head_dim) in
            [(1, 130, 70, 8), (3, 1, 5, 8), (2, 7, 0, 8), (2, 65, 9, 8), (2, 130, 200, 64), (1, 3, 64, 64)]
        {
            let s = FusionShape { batch, queries, keys, heads: 3, head_dim };
            let (q, k, v) = (randn(&mut rng, s.q_len()), randn(&mut rng, s.kv_len()), randn(&mut rng, s.kv_len()));
            let (mut o1, mut l1) = (vec![0.0; s.q_len()], vec![0.0; s.lse_len()]);
            let (mut o2, mut l2) = (vec![1.0; s.q_len()], vec![1.0; s.lse_len()]);
            fusion_attn_forward(&q, &k, &v, s, &mut o1, &mut l1);
            fusion_attn_forward_gemm(&q, &k, &v, s, &mut o2, &mut l2);
            let err = o1.iter().zip(&o2).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-5, "{s:?}: out differs by {err}");
            for (a, b) in l1.iter().zip(&l2) {
                assert!(a == b || (a - b).abs() < 1e-5, "{s:?}: lse {a} vs {b}");
            }
        }
    }

    #[test]
    fn fusion_attn_forward_matches_a_direct_softmax_and_lse() {
        let s = FusionShape { batch: 1, queries: 1, keys: 2, heads: 1, head_dim: 2 };
        let (q, k, v) = ([1.0, 0.0], [2.0_f32.sqrt(), 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]);
        let mut out = [0.0; 2];
        let mut lse = [0.0];
        fusion_attn_forward(&q, &k, &v, s, &mut out, &mut lse);
        // Scores: scale · q·k = (1, 0) → softmax (e/(e+1), 1/(e+1)).
        let e = std::f32::consts::E;
        let (p0, p1) = (e / (e + 1.0), 1.0 / (e + 1.0));
        assert!((out[0] - (p0 + 3.0 * p1)).abs() < 1e-6 && (out[1] - (2.0 * p0 + 4.0 * p1)).abs() < 1e-6);
        assert!((lse[0] - (e + 1.0).ln()).abs() < 1e-6);
    }

    #[test]
    fn fusion_attn_backward_matches_finite_differences() {
        let s = SHAPE;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (q, k, v) = (randn(&mut rng, s.q_len()), randn(&mut rng, s.kv_len()), randn(&mut rng, s.kv_len()));
        let g = randn(&mut rng, s.q_len());
        let mut out = vec![0.0; s.q_len()];
        let mut lse = vec![0.0; s.lse_len()];
        fusion_attn_forward(&q, &k, &v, s, &mut out, &mut lse);
        let grads = fusion_attn_backward(&q, &k, &v, &out, &lse, &g, s);
        let eps = 1e-2f32;
        let check = |name: &str, which: usize, analytic: &[f32]| {
            for idx in 0..analytic.len() {
                let mut bufs = [q.clone(), k.clone(), v.clone()];
                bufs[which][idx] += eps;
                let plus = loss(&bufs[0], &bufs[1], &bufs[2], &g, s);
                bufs[which][idx] -= 2.0 * eps;
                let minus = loss(&bufs[0], &bufs[1], &bufs[2], &g, s);
                let fd = ((plus - minus) / (2.0 * eps as f64)) as f32;
                let a = analytic[idx];
                assert!(
                    (fd - a).abs() <= 2e-3 + 1e-2 * a.abs(),
                    "d{name}[{idx}]: analytic {a}, finite difference {fd}"
                );
            }
        };
        check("q", 0, &grads.dq);
        check("k", 1, &grads.dk);
        check("v", 2, &grads.dv);
    }

    #[test]
    fn fusion_attn_heads_and_samples_are_independent() {
        // Changing sample 1, head 0 leaves sample 0 and head 1 of sample 1 untouched.
        let s = SHAPE;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (q, mut k, v) = (randn(&mut rng, s.q_len()), randn(&mut rng, s.kv_len()), randn(&mut rng, s.kv_len()));
        let run = |k: &[f32]| {
            let mut out = vec![0.0; s.q_len()];
            let mut lse = vec![0.0; s.lse_len()];
            fusion_attn_forward(&q, k, &v, s, &mut out, &mut lse);
            out
        };
        let before = run(&k);
        let d = s.head_dim;
        k[((s.keys + 1) * s.heads) * d] += 1.0; // b = 1, j = 1, h = 0, e = 0
        let after = run(&k);
        for (idx, (a, b)) in before.iter().zip(&after).enumerate() {
            let (row, hh) = (idx / d / s.heads, (idx / d) % s.heads);
            let changed = row >= s.queries && hh == 0;
            assert_eq!(a != b, changed, "element {idx}");
        }
    }
}
