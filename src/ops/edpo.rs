//! The E-DPO loss (ARCHITECTURE.md §1, stage 2), CPU reference of `kernels/edpo_loss.cu`.
//!
//! Sequences `n = 0..N` are the answers of all pairs (prompt + answer, `T` positions each). From
//! the last hidden states `h [N, T, C]` and the LM-head weight `W [V, C]`, position `t` predicts
//! `targets[n, t]` (already shifted: the token at `t + 1`) and counts where `mask[n, t]` is true
//! (answer tokens):
//!
//! ```text
//! lse_t = log Σ_v exp(h_t·W_v)          vocabulary-chunked, online max/sum
//! logp_t = h_t·W_target − lse_t,   π_n = Σ_t mask·logp_t
//! d_p = β[(π_c − ρ_c) − (π_r − ρ_r)] − η|ΔH_p|,   loss = mean_p −log σ(d_p)
//! ```
//!
//! with `ρ` the same sums under the frozen reference model and `ΔH_p = H(a_c) − H(a_r)` the
//! difference of the judge-score entropies. η = 0 is plain DPO. An answer may sit in two pairs.
//! Gradient: `∂loss/∂π_n = β Σ_{p: c_p = n} g_p − β Σ_{p: r_p = n} g_p`, `g_p = −σ(−d_p)/P`; per
//! token `∂loss/∂z_v = g_t (1[v = target] − softmax_v)` with `g_t = ∂loss/∂π_n · mask`, then
//! `∂h_t = Σ_v ∂z_v W_v` and `∂W_v = Σ_t ∂z_{t,v} h_t`. As in the kernel, the `[N, T, V]`
//! log-probabilities never exist: rows and vocabulary are processed in blocks.

use crate::ops::gemm::{sgemm, MatRef};
pub use crate::opset::{EdpoConfig, Pair};
use rayon::prelude::*;

/// Vocabulary columns per block of the online log-sum-exp.
pub const VOCAB_CHUNK: usize = 4096;
/// Token rows per block.
const ROW_BLOCK: usize = 64;

/// Where the LM head's rows `W [V, C]` come from: f32 values (`[f32]`), or a table that writes
/// a block of rows as f32 into a buffer when asked (a frozen head kept as quantized blocks, which
/// `crate::quant` implements), so the losses never hold the whole head in f32.
pub trait HeadRows: Sync {
    /// `V`, for rows of `c` values.
    fn vocab(&self, c: usize) -> usize;
    /// Rows `v0..v0 + n` as `[n, c]` f32, in `buf` if they have to be made.
    fn rows<'a>(&'a self, v0: usize, n: usize, c: usize, buf: &'a mut Vec<f32>) -> &'a [f32];
}

impl HeadRows for [f32] {
    fn vocab(&self, c: usize) -> usize {
        assert!(self.len().is_multiple_of(c), "edpo: weight must be [V, C]");
        self.len() / c
    }
    fn rows<'a>(&'a self, v0: usize, n: usize, c: usize, _: &'a mut Vec<f32>) -> &'a [f32] {
        &self[v0 * c..(v0 + n) * c]
    }
}

impl HeadRows for Vec<f32> {
    fn vocab(&self, c: usize) -> usize {
        self.as_slice().vocab(c)
    }
    fn rows<'a>(&'a self, v0: usize, n: usize, c: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        self.as_slice().rows(v0, n, c, buf)
    }
}

/// Per-token target log-probabilities and log-sum-exps (0 at masked positions).
#[derive(Clone, Debug)]
pub struct TokenLogprobs {
    pub logp: Vec<f32>,
    pub lse: Vec<f32>,
}

/// `hidden [R, C]`, `weight [V, C]`, `targets [R]`, `mask [R]`: log-softmax of `hidden·weightᵀ`
/// at the targets, for the unmasked rows, with an online max/sum over vocabulary blocks.
pub fn token_logprobs<W: HeadRows + ?Sized>(
    hidden: &[f32],
    weight: &W,
    c: usize,
    targets: &[u32],
    mask: &[bool],
) -> TokenLogprobs {
    token_logprobs_chunked(hidden, weight, c, targets, mask, VOCAB_CHUNK)
}

/// [`token_logprobs`] with an explicit vocabulary block size (tests use tiny ones).
pub fn token_logprobs_chunked<W: HeadRows + ?Sized>(
    hidden: &[f32],
    weight: &W,
    c: usize,
    targets: &[u32],
    mask: &[bool],
    vocab_chunk: usize,
) -> TokenLogprobs {
    let r = targets.len();
    assert_eq!(hidden.len(), r * c, "edpo: hidden must be [R, C]");
    assert_eq!(mask.len(), r, "edpo: mask must be [R]");
    assert!(c > 0, "edpo: weight must be [V, C]");
    let v = weight.vocab(c);
    let rows: Vec<usize> = (0..r).filter(|&i| mask[i]).collect();
    for &i in &rows {
        assert!((targets[i] as usize) < v, "edpo: target {} at row {i} is outside the vocabulary ({v})", targets[i]);
    }
    // Vocabulary chunks outside, row blocks inside: each chunk of the head is made once
    // (dequantized, for a head kept as blocks) for every row. Each row keeps a running max, sum
    // and target logit, updated chunk by chunk in order.
    let chunk = vocab_chunk.max(1);
    let hb = gather_rows(hidden, c, &rows);
    let mut state = vec![(f32::NEG_INFINITY, 0.0f32, 0.0f32); rows.len()];
    let mut wbuf = Vec::new();
    for v0 in (0..v).step_by(chunk) {
        let vc = chunk.min(v - v0);
        let w = weight.rows(v0, vc, c, &mut wbuf);
        hb.par_chunks(ROW_BLOCK * c)
            .zip(state.par_chunks_mut(ROW_BLOCK))
            .zip(rows.par_chunks(ROW_BLOCK))
            .for_each_init(Vec::new, |z, ((h, st), blk)| {
                z.resize(blk.len() * vc, 0.0);
                sgemm(blk.len(), vc, c, MatRef::rows(h, c), MatRef::transposed(w, c), z, false);
                for ((zr, (m, s, tgt)), &row) in z.chunks_exact(vc).zip(st.iter_mut()).zip(blk) {
                    let cm = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mn = m.max(cm);
                    *s = *s * (*m - mn).exp() + zr.iter().map(|&x| (x - mn).exp()).sum::<f32>();
                    *m = mn;
                    let y = targets[row] as usize;
                    if (v0..v0 + vc).contains(&y) {
                        *tgt = zr[y - v0];
                    }
                }
            });
    }
    let mut out = TokenLogprobs { logp: vec![0.0; r], lse: vec![0.0; r] };
    for (&row, &(m, s, t)) in rows.iter().zip(&state) {
        let l = m + s.ln();
        out.logp[row] = t - l;
        out.lse[row] = l;
    }
    out
}

fn gather_rows(x: &[f32], c: usize, rows: &[usize]) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * c);
    for &r in rows {
        out.extend_from_slice(&x[r * c..(r + 1) * c]);
    }
    out
}

/// `π_n = Σ_t mask[n, t] · logp[n, t]` over sequences of `t` positions.
pub fn masked_sequence_sums(logp: &[f32], mask: &[bool], t: usize) -> Vec<f32> {
    assert!(t > 0 && logp.len().is_multiple_of(t) && mask.len() == logp.len());
    logp.chunks(t)
        .zip(mask.chunks(t))
        .map(|(l, m)| l.iter().zip(m).filter(|(_, &on)| on).map(|(x, _)| x).sum())
        .collect()
}

/// The loss from per-sequence log-probabilities, and its gradient with respect to the policy's.
#[derive(Clone, Debug)]
pub struct EdpoLoss {
    /// Mean over pairs of `−log σ(d_p)`.
    pub loss: f32,
    pub margins: Vec<f32>,
    pub pair_losses: Vec<f32>,
    /// `∂loss/∂π_n` per sequence (0 for sequences in no pair).
    pub grad_policy: Vec<f32>,
}

/// `−log σ(x)`, stable for any `x`.
fn neg_log_sigmoid(x: f64) -> f64 {
    (-x).max(0.0) + (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// E-DPO on sequence log-probabilities: `policy[n]` (π) and `reference[n]` (ρ). Computed in f64.
pub fn edpo_loss(policy: &[f32], reference: &[f32], pairs: &[Pair], cfg: EdpoConfig) -> EdpoLoss {
    assert_eq!(policy.len(), reference.len(), "edpo: policy and reference log-probs differ in length");
    let n = policy.len();
    let (beta, eta) = (cfg.beta as f64, cfg.eta as f64);
    let p = pairs.len().max(1) as f64;
    let mut out = EdpoLoss { loss: 0.0, margins: vec![], pair_losses: vec![], grad_policy: vec![0.0; n] };
    let mut grad = vec![0.0f64; n];
    let mut total = 0.0f64;
    for pr in pairs {
        assert!(pr.chosen < n && pr.rejected < n, "edpo: pair {pr:?} indexes past {n} sequences");
        let lr = |i: usize| policy[i] as f64 - reference[i] as f64;
        let d = beta * (lr(pr.chosen) - lr(pr.rejected)) - eta * (pr.delta_h as f64).abs();
        let l = neg_log_sigmoid(d);
        let g = -sigmoid(-d) / p; // ∂(mean loss)/∂d
        grad[pr.chosen] += beta * g;
        grad[pr.rejected] -= beta * g;
        total += l;
        out.margins.push(d as f32);
        out.pair_losses.push(l as f32);
    }
    out.loss = (total / p) as f32;
    out.grad_policy = grad.into_iter().map(|g| g as f32).collect();
    out
}

/// Gradients of `Σ_t grad_token[t] · logp_t` with respect to `hidden [R, C]` (returned) and, when
/// `dw` is given, `weight [V, C]` (added to `dw`; skipped for a frozen LM head, a third of the
/// work), given the forward's `lse`: `∂z_v = g_t (1[v = target] − exp(z_v − lse_t))`. Rows with
/// a zero upstream gradient are skipped.
pub fn logprob_backward<W: HeadRows + ?Sized>(
    hidden: &[f32],
    weight: &W,
    c: usize,
    targets: &[u32],
    lse: &[f32],
    grad_token: &[f32],
    mut dw: Option<&mut [f32]>,
) -> Vec<f32> {
    let r = targets.len();
    assert!(hidden.len() == r * c && lse.len() == r && grad_token.len() == r);
    let v = weight.vocab(c);
    assert!(dw.as_ref().is_none_or(|dw| dw.len() == v * c));
    let mut dh = vec![0.0f32; r * c];
    let rows: Vec<usize> = (0..r).filter(|&i| grad_token[i] != 0.0).collect();
    let chunk = VOCAB_CHUNK.min(v.max(1));
    let mut z = vec![0.0f32; ROW_BLOCK * chunk];
    // As in the forward, vocabulary chunks outside (each made once), row blocks inside: each
    // row's `∂h` sums the chunks in order, each chunk's `∂W` the row blocks in order.
    let hb = gather_rows(hidden, c, &rows);
    let mut dh_rows = vec![0.0f32; rows.len() * c];
    let mut wbuf = Vec::new();
    for v0 in (0..v).step_by(chunk) {
        let vc = chunk.min(v - v0);
        let w = weight.rows(v0, vc, c, &mut wbuf);
        for (i, blk) in rows.chunks(ROW_BLOCK).enumerate() {
            let nb = blk.len();
            let h = &hb[i * ROW_BLOCK * c..][..nb * c];
            let zb = &mut z[..nb * vc];
            sgemm(nb, vc, c, MatRef::rows(h, c), MatRef::transposed(w, c), zb, false);
            // In place: logits → ∂loss/∂logits.
            zb.par_chunks_mut(vc).zip(blk.par_iter()).for_each(|(zr, &row)| {
                let (g, l, y) = (grad_token[row], lse[row], targets[row] as usize);
                for (j, x) in zr.iter_mut().enumerate() {
                    let onehot = if v0 + j == y { 1.0 } else { 0.0 };
                    *x = g * (onehot - (*x - l).exp());
                }
            });
            // dh_blk += dz · W_chunk;  dW_chunk += dzᵀ · h_blk.
            let dhb = &mut dh_rows[i * ROW_BLOCK * c..][..nb * c];
            sgemm(nb, c, vc, MatRef::rows(zb, vc), MatRef::rows(w, c), dhb, true);
            if let Some(dw) = dw.as_deref_mut() {
                sgemm(vc, c, nb, MatRef::transposed(zb, vc), MatRef::rows(h, c), &mut dw[v0 * c..(v0 + vc) * c], true);
            }
        }
    }
    for (k, &row) in rows.iter().enumerate() {
        dh[row * c..(row + 1) * c].copy_from_slice(&dh_rows[k * c..(k + 1) * c]);
    }
    dh
}

/// Everything the fused loss needs for one step.
#[derive(Clone, Copy)]
pub struct EdpoBatch<'a> {
    /// Policy hidden states `[N, T, C]`.
    pub hidden: &'a [f32],
    /// Policy LM-head weight `[V, C]`.
    pub weight: &'a [f32],
    pub c: usize,
    pub t: usize,
    /// `[N, T]`, already shifted.
    pub targets: &'a [u32],
    /// `[N, T]`: answer positions.
    pub mask: &'a [bool],
    /// `ρ_n`: the reference model's sequence log-probabilities `[N]` (from [`token_logprobs`] and
    /// [`masked_sequence_sums`] on its own hidden states and weight).
    pub reference: &'a [f32],
    pub pairs: &'a [Pair],
    pub cfg: EdpoConfig,
}

#[derive(Clone, Debug)]
pub struct EdpoStep {
    pub loss: EdpoLoss,
    /// `π_n`.
    pub policy: Vec<f32>,
    /// `∂loss/∂hidden [N, T, C]`.
    pub d_hidden: Vec<f32>,
    /// `∂loss/∂weight [V, C]`.
    pub d_weight: Vec<f32>,
}

/// Forward and backward of the fused E-DPO loss for the policy.
pub fn edpo_step(b: EdpoBatch) -> EdpoStep {
    let tl = token_logprobs(b.hidden, b.weight, b.c, b.targets, b.mask);
    let policy = masked_sequence_sums(&tl.logp, b.mask, b.t);
    let loss = edpo_loss(&policy, b.reference, b.pairs, b.cfg);
    let grad_token: Vec<f32> =
        (0..b.targets.len()).map(|i| if b.mask[i] { loss.grad_policy[i / b.t] } else { 0.0 }).collect();
    let mut d_weight = vec![0.0f32; b.weight.len()];
    let d_hidden = logprob_backward(b.hidden, b.weight, b.c, b.targets, &tl.lse, &grad_token, Some(&mut d_weight));
    EdpoStep { loss, policy, d_hidden, d_weight }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn uniform(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    struct Fixture {
        hidden: Vec<f32>,
        weight: Vec<f32>,
        targets: Vec<u32>,
        mask: Vec<bool>,
        reference: Vec<f32>,
        pairs: Vec<Pair>,
    }
    const N: usize = 4;
    const T: usize = 3;
    const C: usize = 5;
    const V: usize = 7;
    const CFG: EdpoConfig = EdpoConfig { beta: 0.7, eta: 0.3 };

    fn fixture() -> Fixture {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let hidden = uniform(&mut rng, N * T * C);
        let weight = uniform(&mut rng, V * C);
        let targets = (0..N * T).map(|_| rng.random_range(0..V as u32)).collect();
        // The first position of every sequence is prompt; the rest is answer.
        let mask = (0..N * T).map(|i| i % T != 0).collect();
        let reference = uniform(&mut rng, N).iter().map(|x| x * 3.0 - 4.0).collect();
        // Sequence 0 is chosen in two pairs, sequence 1 rejected in two (shared answers).
        let pairs = vec![
            Pair { chosen: 0, rejected: 1, delta_h: 0.4 },
            Pair { chosen: 0, rejected: 2, delta_h: -0.2 },
            Pair { chosen: 3, rejected: 1, delta_h: 0.1 },
        ];
        Fixture { hidden, weight, targets, mask, reference, pairs }
    }

    fn step(f: &Fixture, hidden: &[f32], weight: &[f32]) -> EdpoStep {
        edpo_step(EdpoBatch {
            hidden,
            weight,
            c: C,
            t: T,
            targets: &f.targets,
            mask: &f.mask,
            reference: &f.reference,
            pairs: &f.pairs,
            cfg: CFG,
        })
    }

    #[test]
    fn edpo_online_vocab_chunks_match_a_direct_log_softmax() {
        let f = fixture();
        for chunk in [1, 3, V, 100] {
            let tl = token_logprobs_chunked(&f.hidden, &f.weight, C, &f.targets, &f.mask, chunk);
            for r in 0..N * T {
                if !f.mask[r] {
                    assert_eq!((tl.logp[r], tl.lse[r]), (0.0, 0.0));
                    continue;
                }
                let z: Vec<f64> = (0..V)
                    .map(|v| (0..C).map(|k| f.hidden[r * C + k] as f64 * f.weight[v * C + k] as f64).sum())
                    .collect();
                let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
                let want = z[f.targets[r] as usize] - lse;
                assert!((tl.logp[r] as f64 - want).abs() < 1e-5, "chunk {chunk} row {r}: {} vs {want}", tl.logp[r]);
                assert!((tl.lse[r] as f64 - lse).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn edpo_gradient_wrt_policy_logprobs_matches_finite_differences() {
        let f = fixture();
        let policy: Vec<f32> = vec![-3.0, -5.5, -4.2, -2.9];
        let l = edpo_loss(&policy, &f.reference, &f.pairs, CFG);
        let eps = 1e-3f32;
        for n in 0..N {
            let (mut p, mut m) = (policy.clone(), policy.clone());
            p[n] += eps;
            m[n] -= eps;
            let fd = (edpo_loss(&p, &f.reference, &f.pairs, CFG).loss
                - edpo_loss(&m, &f.reference, &f.pairs, CFG).loss)
                / (2.0 * eps);
            assert!((fd - l.grad_policy[n]).abs() < 1e-4, "sequence {n}: analytic {}, fd {fd}", l.grad_policy[n]);
        }
    }

    #[test]
    fn edpo_gradient_wrt_hidden_and_lm_head_matches_finite_differences() {
        let f = fixture();
        let s = step(&f, &f.hidden, &f.weight);
        let eps = 1e-2f32;
        let loss_at = |h: &[f32], w: &[f32]| step(&f, h, w).loss.loss as f64;
        for i in 0..f.hidden.len() {
            let (mut hp, mut hm) = (f.hidden.clone(), f.hidden.clone());
            hp[i] += eps;
            hm[i] -= eps;
            let fd = ((loss_at(&hp, &f.weight) - loss_at(&hm, &f.weight)) / (2.0 * eps as f64)) as f32;
            let a = s.d_hidden[i];
            assert!((fd - a).abs() <= 2e-4 + 1e-2 * a.abs(), "d_hidden[{i}]: analytic {a}, fd {fd}");
            if !f.mask[i / C] {
                assert_eq!(a, 0.0, "a prompt position has no gradient");
            }
        }
        for i in 0..f.weight.len() {
            let (mut wp, mut wm) = (f.weight.clone(), f.weight.clone());
            wp[i] += eps;
            wm[i] -= eps;
            let fd = ((loss_at(&f.hidden, &wp) - loss_at(&f.hidden, &wm)) / (2.0 * eps as f64)) as f32;
            let a = s.d_weight[i];
            assert!((fd - a).abs() <= 2e-4 + 1e-2 * a.abs(), "d_weight[{i}]: analytic {a}, fd {fd}");
        }
    }

    #[test]
    fn edpo_with_eta_zero_is_plain_dpo() {
        let f = fixture();
        let policy: Vec<f32> = vec![-3.0, -5.5, -4.2, -2.9];
        let (beta, eta) = (0.7f64, 0.3f64);
        let dpo = edpo_loss(&policy, &f.reference, &f.pairs, EdpoConfig { beta: beta as f32, eta: 0.0 });
        let mut want = 0.0f64;
        for (k, p) in f.pairs.iter().enumerate() {
            let d = beta
                * ((policy[p.chosen] as f64 - f.reference[p.chosen] as f64)
                    - (policy[p.rejected] as f64 - f.reference[p.rejected] as f64));
            // −log σ(d) written the textbook way (fine at these magnitudes).
            let l = -(1.0 / (1.0 + (-d).exp())).ln();
            assert!((dpo.margins[k] as f64 - d).abs() < 1e-6);
            assert!((dpo.pair_losses[k] as f64 - l).abs() < 1e-6);
            want += l;
        }
        assert!((dpo.loss as f64 - want / f.pairs.len() as f64).abs() < 1e-6);
        // η > 0 lowers every margin by exactly η|ΔH| and so raises the loss.
        let edpo = edpo_loss(&policy, &f.reference, &f.pairs, EdpoConfig { beta: beta as f32, eta: eta as f32 });
        for (k, p) in f.pairs.iter().enumerate() {
            let shift = dpo.margins[k] - edpo.margins[k];
            assert!((shift as f64 - eta * (p.delta_h as f64).abs()).abs() < 1e-6);
        }
        assert!(edpo.loss > dpo.loss);
    }

    #[test]
    fn edpo_loss_is_stable_for_large_margins() {
        let pairs = [Pair { chosen: 0, rejected: 1, delta_h: 0.0 }];
        let cfg = EdpoConfig { beta: 1.0, eta: 0.0 };
        let big = edpo_loss(&[200.0, -200.0], &[0.0, 0.0], &pairs, cfg);
        assert!(big.loss.is_finite() && big.loss < 1e-30 && big.grad_policy[0].abs() < 1e-30);
        let bad = edpo_loss(&[-200.0, 200.0], &[0.0, 0.0], &pairs, cfg);
        assert!((bad.loss - 400.0).abs() < 1e-3 && (bad.grad_policy[0] + 1.0).abs() < 1e-6);
    }
}
