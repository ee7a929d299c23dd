//! The op set on the CPU reference ops of `crate::ops` (f32 throughout). It runs every model
//! written against `crate::opset` on the CPU; the working copy of a weight is f32, so it is its
//! own AdamW master (`Optimizer::SEPARATE_MASTER` false).

use crate::ops::activation::{gelu_backward, gelu_forward, swiglu_backward, swiglu_forward};
use crate::ops::attention::{attention, attention_backward, AttnShape, Mask};
use crate::ops::conv::depthwise_conv2d;
use crate::ops::edpo::{edpo_loss, logprob_backward, token_logprobs, HeadRows};
use crate::ops::embedding::embedding_backward;
use crate::ops::fusion_attn::{fusion_attn_backward, fusion_attn_forward_gemm};
use crate::ops::gemm::{sgemm, MatRef};
use crate::ops::loss::{cross_entropy_, IGNORE};
use crate::ops::matmul::{linear_backward, linear_forward};
use crate::ops::norm::{layer_norm_backward, layer_norm_rows, rms_norm_backward, rms_norm_rows};
use crate::ops::relu6_;
use crate::ops::rope::rotate_pairs_;
use crate::ops::similarity::mincos_topk;
use crate::opset::{
    clip_rule, Activations, AdamWScalars, Attention, Buffers, CausalShape, Conv, CrossEntropyOut, Decode, DecodeShape,
    DwShape, EdpoConfig, FusionShape, Gemm, GemmSpec, GradRef, Losses, Norms, Optimizer, Pair, PatchScores, QuantOps,
    Similarity, SimilarityShape,
};
use crate::quant::{qmatmul, qmatmul_group, qmatmul_input_grad, qrows, QMatrix};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// The op set on the CPU reference ops (f32 throughout): how every model runs on the CPU, and the
/// reference the CUDA op set is held to op by op.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostOps;

impl Buffers for HostOps {
    type Buf = Vec<f32>;
    type Stat = Vec<f32>;
    type Ids = Vec<u32>;
    fn describe(&self) -> String {
        "cpu reference ops (f32)".into()
    }

    fn upload(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn download(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn upload_stat(&self, x: &[f32]) -> Result<Vec<f32>> {
        Ok(x.to_vec())
    }

    fn download_stat(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn stat_zeros(&self, n: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; n])
    }

    fn copy(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        Ok(x.clone())
    }

    fn fill_zero(&self, x: &mut Vec<f32>) -> Result<()> {
        x.fill(0.0);
        Ok(())
    }

    fn embed(&self, table: &Vec<f32>, ids: &[u32], dim: usize) -> Result<Vec<f32>> {
        let vocab = table.len() / dim.max(1);
        let mut out = Vec::with_capacity(ids.len() * dim);
        for &id in ids {
            if id as usize >= vocab {
                bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            out.extend_from_slice(&table[id as usize * dim..(id as usize + 1) * dim]);
        }
        Ok(out)
    }

    fn embed_backward(&self, ids: &[u32], dout: &Vec<f32>, dim: usize, dtable: &mut Vec<f32>) -> Result<()> {
        embedding_backward(dtable, dout, ids, dim);
        Ok(())
    }

    fn copy_rows(
        &self,
        src: &Vec<f32>,
        src_row: usize,
        dst: &mut Vec<f32>,
        dst_row: usize,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        let (s, d) = (src_row * dim, dst_row * dim);
        if s + rows * dim > src.len() || d + rows * dim > dst.len() {
            bail!("copy_rows: rows {src_row}+{rows} of {} or {dst_row}+{rows} of {} (dim {dim})", src.len(), dst.len());
        }
        dst[d..d + rows * dim].copy_from_slice(&src[s..s + rows * dim]);
        Ok(())
    }

    fn scale(&self, x: &mut Vec<f32>, s: f32) -> Result<()> {
        x.iter_mut().for_each(|v| *v *= s);
        Ok(())
    }

    fn mul_stat(&self, x: &mut Vec<f32>, f: &[f32]) -> Result<()> {
        if x.len() != f.len() {
            bail!("mul_stat: {} values and {} factors", x.len(), f.len());
        }
        x.iter_mut().zip(f).for_each(|(v, k)| *v *= k);
        Ok(())
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<Vec<u32>> {
        Ok(ids.to_vec())
    }
}

impl Gemm for HostOps {
    fn gemm(&self, spec: &GemmSpec, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> Result<()> {
        let GemmSpec { m, n, k, trans_a, trans_b, accumulate, .. } = *spec;
        if spec.batch > 1 || spec.gelu {
            bail!("the host op set has plain GEMMs only ({spec:?})");
        }
        if spec.b_prepared {
            if trans_a || !trans_b {
                bail!("a prepared weight is the b of x·Wᵀ only ({spec:?})");
            }
            crate::ops::gemm::sgemm_linear_prepared(m, n, k, a, b, c, accumulate);
            return Ok(());
        }
        let a = if trans_a { MatRef::transposed(a, m) } else { MatRef::rows(a, k) };
        let b = if trans_b { MatRef::transposed(b, k) } else { MatRef::rows(b, n) };
        sgemm(m, n, k, a, b, c, accumulate);
        Ok(())
    }

    fn prepare_linear_weight(&self, w: Vec<f32>, n: usize, k: usize) -> Result<Vec<f32>> {
        if w.len() != n * k {
            bail!("a linear weight [{n}, {k}] needs {} values, got {}", n * k, w.len());
        }
        Ok(crate::ops::gemm::prepare_linear_weight(w, n, k))
    }

    fn gemm_bias_new(&self, spec: &GemmSpec, a: &Vec<f32>, b: &Vec<f32>, bias: &Vec<f32>) -> Result<Vec<f32>> {
        if bias.len() < spec.n {
            bail!("GEMM with bias {spec:?}: {} bias values for {} columns", bias.len(), spec.n);
        }
        if spec.b_prepared && spec.batch == 1 && !spec.gelu && !spec.trans_a && spec.trans_b && !spec.accumulate {
            if a.len() < spec.m * spec.k {
                bail!("linear layer {spec:?}: input of {} values", a.len());
            }
            return Ok(crate::ops::gemm::sgemm_linear_prepared_bias(spec.m, spec.n, spec.k, a, b, bias));
        }
        let mut c = crate::ops::gemm::bias_rows(spec.m, spec.n, bias);
        self.gemm(&GemmSpec { accumulate: true, ..*spec }, a, b, &mut c)?;
        Ok(c)
    }

    fn col_sum(&self, x: &Vec<f32>, rows: usize, out: &mut Vec<f32>) -> Result<()> {
        let n = out.len();
        for r in x[..rows * n].chunks_exact(n) {
            out.iter_mut().zip(r).for_each(|(o, v)| *o += v);
        }
        Ok(())
    }
}

/// Quantized weights stay in their blocks: `y = x·Wᵀ` by `crate::quant`'s integer kernels.
impl QuantOps for HostOps {
    type QBuf = QMatrix;

    fn upload_quant(&self, w: &QMatrix) -> Result<QMatrix> {
        Ok(w.clone())
    }

    fn quant_bytes(&self, w: &QMatrix) -> usize {
        w.nbytes()
    }

    fn qlinear(
        &self,
        x: &Vec<f32>,
        w: &QMatrix,
        rows: usize,
        bias: Option<&Vec<f32>>,
        acc: Option<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        if x.len() < rows * w.cols {
            bail!("quantized linear: {} inputs for {rows} rows of {}", x.len(), w.cols);
        }
        let x = &x[..rows * w.cols];
        match (acc, bias) {
            (Some(mut y), None) => {
                qmatmul(x, rows, w, &mut y, true);
                Ok(y)
            }
            (None, bias) => {
                let mut y = vec![0.0; rows * w.rows];
                qmatmul(x, rows, w, &mut y, false);
                if let Some(b) = bias {
                    y.chunks_exact_mut(w.rows).for_each(|r| r.iter_mut().zip(b).for_each(|(v, b)| *v += b));
                }
                Ok(y)
            }
            (Some(_), Some(_)) => bail!("a biased linear layer never adds into the residual stream"),
        }
    }

    fn qlinear_input_grad(&self, dy: &Vec<f32>, w: &QMatrix, rows: usize, acc: Option<Vec<f32>>) -> Result<Vec<f32>> {
        let accumulate = acc.is_some();
        let mut dx = acc.unwrap_or_else(|| vec![0.0; rows * w.cols]);
        qmatmul_input_grad(&dy[..rows * w.rows], rows, w, &mut dx, accumulate);
        Ok(dx)
    }

    fn qlinear_group(
        &self,
        x: &Vec<f32>,
        ws: &[&QMatrix],
        rows: usize,
        biases: &[Option<&Vec<f32>>],
    ) -> Result<Vec<Vec<f32>>> {
        let cols = ws.first().map_or(0, |w| w.cols);
        if ws.iter().any(|w| w.cols != cols) || x.len() < rows * cols || biases.len() != ws.len() {
            bail!("quantized linear group: weights of different widths or {} inputs for {rows} rows", x.len());
        }
        let mut ys = qmatmul_group(&x[..rows * cols], rows, ws);
        for ((y, w), b) in ys.iter_mut().zip(ws).zip(biases) {
            if let Some(b) = b {
                y.chunks_exact_mut(w.rows).for_each(|r| r.iter_mut().zip(b.iter()).for_each(|(v, b)| *v += b));
            }
        }
        Ok(ys)
    }

    fn qembed(&self, w: &QMatrix, ids: &[u32]) -> Result<Vec<f32>> {
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= w.rows) {
            bail!("token id {bad} is outside the vocabulary of {}", w.rows);
        }
        Ok(qrows(w, ids))
    }

    fn q_seq_logprobs(
        &self,
        hidden: &Vec<f32>,
        w: &QMatrix,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        check_head_width(hidden, w, targets)?;
        seq_logprobs_through(hidden, w, targets, seqs)
    }

    fn q_logprob_backward(
        &self,
        hidden: &Vec<f32>,
        w: &QMatrix,
        targets: &[u32],
        lse: &Vec<f32>,
        grad_seq: &Vec<f32>,
        seqs: usize,
    ) -> Result<Vec<f32>> {
        check_head_width(hidden, w, targets)?;
        logprob_backward_through(hidden, w, targets, lse, grad_seq, seqs, None)
    }
}

impl Norms for HostOps {
    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, rows: usize, eps: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut y = vec![0.0; rows * w.len()];
        rms_norm_rows(&x[..rows * w.len()], w, eps, &mut y);
        Ok((y, Vec::new()))
    }

    fn rmsnorm_backward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        _rstd: &Vec<f32>,
        _rows: usize,
        eps: f32,
        accumulate: bool,
        dx: &mut Vec<f32>,
        dw: Option<&mut Vec<f32>>,
    ) -> Result<()> {
        if !accumulate {
            dx.iter_mut().for_each(|v| *v = 0.0);
        }
        rms_norm_backward(dx, dw.map(|d| d.as_mut_slice()), dy, x, w, eps);
        Ok(())
    }

    fn layernorm(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        rows: usize,
        eps: f32,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut y = vec![0.0; rows * w.len()];
        layer_norm_rows(&x[..rows * w.len()], w, b, eps, &mut y);
        Ok((y, Vec::new()))
    }

    fn layernorm_backward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        _stats: &Vec<f32>,
        rows: usize,
        eps: f32,
        dw: &mut Vec<f32>,
        db: &mut Vec<f32>,
    ) -> Result<Vec<f32>> {
        let n = rows * w.len();
        let mut dx = vec![0.0; n];
        layer_norm_backward(&mut dx, Some(dw), Some(db), &dy[..n], &x[..n], w, eps);
        Ok(dx)
    }
}

impl Activations for HostOps {
    fn swiglu(&self, g: &Vec<f32>, u: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = vec![0.0; g.len()];
        swiglu_forward(&mut y, g, u);
        Ok(y)
    }

    fn swiglu_backward(&self, dy: &Vec<f32>, g: &Vec<f32>, u: &Vec<f32>) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut dg, mut du) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        swiglu_backward(&mut dg, &mut du, dy, g, u);
        Ok((dg, du))
    }

    fn gelu(&self, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut y = vec![0.0; x.len()];
        gelu_forward(&mut y, x);
        Ok(y)
    }

    fn gelu_backward(&self, dy: &Vec<f32>, x: &Vec<f32>) -> Result<Vec<f32>> {
        let mut dx = vec![0.0; x.len()];
        gelu_backward(&mut dx, dy, x);
        Ok(dx)
    }

    fn channel_bias_act(
        &self,
        y: &mut Vec<f32>,
        bias: &Vec<f32>,
        channels: usize,
        residual: Option<&Vec<f32>>,
        relu6: bool,
    ) -> Result<()> {
        if channels == 0
            || bias.len() < channels
            || !y.len().is_multiple_of(channels)
            || residual.is_some_and(|r| r.len() < y.len())
        {
            bail!("channel epilogue: y has {} elements for {channels} channels (bias {})", y.len(), bias.len());
        }
        // One pass over each channel's row (the encoder's 1×1 convolutions run this on every
        // map), the same arithmetic as bias, then residual, then ReLU6.
        let p = y.len() / channels;
        let act = |v: f32| if relu6 { v.clamp(0.0, 6.0) } else { v };
        for (c, row) in y.chunks_exact_mut(p).enumerate() {
            let b = bias[c];
            match residual {
                Some(r) => row.iter_mut().zip(&r[c * p..(c + 1) * p]).for_each(|(v, x)| *v = act(*v + b + x)),
                None => row.iter_mut().for_each(|v| *v = act(*v + b)),
            }
        }
        Ok(())
    }
}

impl Attention for HostOps {
    fn rope_tables(&self, cos: &[f32], sin: &[f32], _half: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((cos.to_vec(), sin.to_vec()))
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        (cos, sin): &(Vec<f32>, Vec<f32>),
        half: usize,
        rows: usize,
        t: usize,
        heads: usize,
        inverse: bool,
    ) -> Result<()> {
        for seq in x[..rows * heads * 2 * half].chunks_mut(t * heads * 2 * half) {
            rotate_pairs_(seq, cos, sin, half, heads, 0, inverse);
        }
        Ok(())
    }

    fn attention(&self, q: &Vec<f32>, k: &Vec<f32>, v: &Vec<f32>, s: CausalShape) -> Result<(Vec<f32>, Vec<f32>)> {
        let shape = AttnShape { heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim };
        let (qn, kn) = (s.seq * s.heads * s.head_dim, s.seq * s.kv_heads * s.head_dim);
        let mut out = vec![0.0; s.batch * qn];
        for b in 0..s.batch {
            let (kb, vb) = (&k[b * kn..(b + 1) * kn], &v[b * kn..(b + 1) * kn]);
            attention(
                &q[b * qn..(b + 1) * qn],
                kb,
                vb,
                shape,
                Mask::Causal { start: 0 },
                &mut out[b * qn..(b + 1) * qn],
            );
        }
        Ok((out, Vec::new()))
    }

    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        _out: &Vec<f32>,
        _lse: &Vec<f32>,
        dout: &Vec<f32>,
        s: CausalShape,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let shape = AttnShape { heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim };
        let (qn, kn) = (s.seq * s.heads * s.head_dim, s.seq * s.kv_heads * s.head_dim);
        let (mut dq, mut dk, mut dv) = (vec![0.0; s.batch * qn], vec![0.0; s.batch * kn], vec![0.0; s.batch * kn]);
        for b in 0..s.batch {
            let (qs, ks) = (b * qn..(b + 1) * qn, b * kn..(b + 1) * kn);
            attention_backward(
                &mut dq[qs.clone()],
                &mut dk[ks.clone()],
                &mut dv[ks.clone()],
                &dout[qs.clone()],
                &q[qs],
                &k[ks.clone()],
                &v[ks],
                shape,
                Mask::Causal { start: 0 },
            );
        }
        Ok((dq, dk, dv))
    }

    fn fusion_attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        s: FusionShape,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let (mut out, mut lse) = (vec![0.0; s.q_len()], vec![0.0; s.lse_len()]);
        fusion_attn_forward_gemm(q, k, v, s, &mut out, &mut lse);
        Ok((out, lse))
    }

    fn fusion_attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        s: FusionShape,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let g = fusion_attn_backward(q, k, v, out, lse, dout, s);
        Ok((g.dq, g.dk, g.dv))
    }
}

impl Decode for HostOps {
    fn rope_at(
        &self,
        x: &mut Vec<f32>,
        (cos, sin): &(Vec<f32>, Vec<f32>),
        half: usize,
        heads: usize,
        pos: &Vec<u32>,
        rows: usize,
    ) -> Result<()> {
        let width = heads * 2 * half;
        if x.len() < rows * width || pos.len() < rows || pos.iter().any(|&p| (p as usize + 1) * half > cos.len()) {
            bail!("rope_at: [{rows}, {heads}, {}] rows or positions outside the table", 2 * half);
        }
        for (row, &p) in x[..rows * width].chunks_exact_mut(width).zip(pos) {
            rotate_pairs_(row, cos, sin, half, heads, p as usize, false);
        }
        Ok(())
    }

    fn kv_append(
        &self,
        src: &Vec<f32>,
        seq: &Vec<u32>,
        pos: &Vec<u32>,
        rows: usize,
        width: usize,
        slots: usize,
        cache: &mut Vec<f32>,
    ) -> Result<()> {
        let seqs = cache.len() / (slots * width).max(1);
        for r in 0..rows {
            let (b, p) = (seq[r] as usize, pos[r] as usize);
            if b >= seqs || p >= slots || (r + 1) * width > src.len() {
                bail!("kv_append row {r}: sequence {b} position {p} outside the cache ({seqs} × {slots})");
            }
            let at = (b * slots + p) * width;
            cache[at..at + width].copy_from_slice(&src[r * width..(r + 1) * width]);
        }
        Ok(())
    }

    fn decode_attention(
        &self,
        q: &Vec<f32>,
        k_cache: &Vec<f32>,
        v_cache: &Vec<f32>,
        s: DecodeShape,
        seq: &Vec<u32>,
        pos: &Vec<u32>,
        rows: usize,
    ) -> Result<Vec<f32>> {
        let (qw, kw) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        if rows > seq.len().min(pos.len())
            || q.len() < rows * qw
            || k_cache.len() < s.cache_len()
            || v_cache.len() < s.cache_len()
        {
            bail!("decode attention: buffers smaller than {rows} queries of {s:?} need");
        }
        s.check(&seq[..rows], &pos[..rows])?;
        let shape = AttnShape { heads: s.heads, kv_heads: s.kv_heads, head_dim: s.head_dim };
        let mut out = vec![0.0; rows * qw];
        for n in 0..rows {
            let (b, p) = (seq[n] as usize, pos[n] as usize);
            let keys = (b * s.slots) * kw..(b * s.slots + p + 1) * kw;
            attention(
                &q[n * qw..(n + 1) * qw],
                &k_cache[keys.clone()],
                &v_cache[keys],
                shape,
                Mask::Causal { start: p },
                &mut out[n * qw..(n + 1) * qw],
            );
        }
        Ok(out)
    }
}

impl Losses for HostOps {
    fn cross_entropy(
        &self,
        hidden: &Vec<f32>,
        w: &Vec<f32>,
        targets: &[u32],
        seq_weights: &[f32],
        d_weight: Option<&mut Vec<f32>>,
    ) -> Result<CrossEntropyOut<Self>> {
        let seqs = seq_weights.len();
        if seqs == 0 || !targets.len().is_multiple_of(seqs) {
            bail!("cross-entropy: {} targets do not split into {seqs} sequences", targets.len());
        }
        let t = targets.len() / seqs;
        let c = hidden.len() / targets.len().max(1);
        let vocab = w.len() / c.max(1);
        let mut seq_logp = vec![0.0; seqs];
        let mut d_hidden = vec![0.0; hidden.len()];
        let mut d_weight = zeroed_head_grad(d_weight, w.len(), "cross-entropy")?;
        for (n, lp) in seq_logp.iter_mut().enumerate() {
            let rows: Vec<usize> = (n * t..(n + 1) * t).filter(|&r| targets[r] != IGNORE).collect();
            if rows.is_empty() {
                continue;
            }
            let h: Vec<f32> = rows.iter().flat_map(|&r| hidden[r * c..(r + 1) * c].iter().copied()).collect();
            let mut logits = vec![0.0; rows.len() * vocab];
            linear_forward(&mut logits, &h, w, None, rows.len(), c, vocab);
            let row_targets: Vec<u32> = rows.iter().map(|&r| targets[r]).collect();
            let ce = cross_entropy_(&mut logits, &row_targets, vocab);
            *lp = -ce.loss * ce.tokens as f32;
            let rescale = ce.tokens as f32 * seq_weights[n];
            logits.iter_mut().for_each(|x| *x *= rescale);
            let mut dh = vec![0.0; rows.len() * c];
            linear_backward(Some(&mut dh), d_weight.as_deref_mut(), None, &logits, &h, w, rows.len(), c, vocab);
            for (i, &r) in rows.iter().enumerate() {
                d_hidden[r * c..(r + 1) * c].copy_from_slice(&dh[i * c..(i + 1) * c]);
            }
        }
        Ok(CrossEntropyOut { seq_logp, d_hidden })
    }

    fn seq_logprobs(
        &self,
        hidden: &Vec<f32>,
        w: &Vec<f32>,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        seq_logprobs_through(hidden, w, targets, seqs)
    }

    fn edpo_loss(
        &self,
        policy: &Vec<f32>,
        reference: &Vec<f32>,
        pairs: &[Pair],
        cfg: EdpoConfig,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        if policy.len() != reference.len()
            || pairs.iter().any(|p| p.chosen >= policy.len() || p.rejected >= policy.len())
        {
            bail!("E-DPO loss: {} policy and {} reference values for pairs {pairs:?}", policy.len(), reference.len());
        }
        let l = edpo_loss(policy, reference, pairs, cfg);
        Ok((l.margins, l.grad_policy))
    }

    fn logprob_backward(
        &self,
        hidden: &Vec<f32>,
        w: &Vec<f32>,
        targets: &[u32],
        lse: &Vec<f32>,
        grad_seq: &Vec<f32>,
        seqs: usize,
        d_weight: Option<&mut Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let dw = zeroed_head_grad(d_weight, w.len(), "log-prob backward")?;
        logprob_backward_through(hidden, w, targets, lse, grad_seq, seqs, dw)
    }
}

/// [`Losses::seq_logprobs`] through an LM head in f32 or in quantized blocks.
fn seq_logprobs_through<W: HeadRows + ?Sized>(
    hidden: &[f32],
    w: &W,
    targets: &[u32],
    seqs: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let t = seq_len(targets.len(), seqs)?;
    let c = hidden.len() / targets.len();
    if hidden.len() != targets.len() * c {
        bail!("sequence log-probabilities: {} hidden values for {} targets", hidden.len(), targets.len());
    }
    // Ignored positions are masked out: their log-probability and log-sum-exp stay 0.
    let mask: Vec<bool> = targets.iter().map(|&y| y != IGNORE).collect();
    let tl = token_logprobs(hidden, w, c, targets, &mask);
    Ok((tl.logp.chunks(t).map(|l| l.iter().sum()).collect(), tl.lse))
}

/// [`Losses::logprob_backward`] through an LM head in f32 or in quantized blocks (`dw`: the
/// head's gradient, zeroed, for a head that trains).
fn logprob_backward_through<W: HeadRows + ?Sized>(
    hidden: &[f32],
    w: &W,
    targets: &[u32],
    lse: &[f32],
    grad_seq: &[f32],
    seqs: usize,
    dw: Option<&mut [f32]>,
) -> Result<Vec<f32>> {
    let t = seq_len(targets.len(), seqs)?;
    let c = hidden.len() / targets.len();
    let grad_token: Vec<f32> =
        targets.iter().enumerate().map(|(r, &y)| if y == IGNORE { 0.0 } else { grad_seq[r / t] }).collect();
    let tg: Vec<u32> = targets.iter().map(|&y| if y == IGNORE { 0 } else { y }).collect();
    Ok(logprob_backward(hidden, w, c, &tg, lse, &grad_token, dw))
}

/// Refuses hidden states `[targets.len(), C]` whose `C` is not the quantized LM head's width.
fn check_head_width(hidden: &[f32], w: &QMatrix, targets: &[u32]) -> Result<()> {
    if targets.is_empty() || hidden.len() != targets.len() * w.cols {
        bail!(
            "loss through the quantized LM head: {} hidden values for {} targets, the head's rows have {}",
            hidden.len(),
            targets.len(),
            w.cols
        );
    }
    Ok(())
}

/// The LM head's gradient buffer a loss op was handed, checked against the head's size and
/// zeroed for the op to accumulate into (the op set's contract is that it overwrites it).
fn zeroed_head_grad<'a>(dw: Option<&'a mut Vec<f32>>, head: usize, op: &str) -> Result<Option<&'a mut [f32]>> {
    let Some(dw) = dw else { return Ok(None) };
    if dw.len() != head {
        bail!("{op}: the LM head's gradient buffer has {} values, the head {head}", dw.len());
    }
    dw.fill(0.0);
    Ok(Some(dw.as_mut_slice()))
}

impl Optimizer for HostOps {
    const SEPARATE_MASTER: bool = false;

    fn adamw(
        &self,
        x: Option<&mut Vec<f32>>,
        grad: GradRef<'_, Self>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        w: &mut Vec<f32>,
        s: &AdamWScalars,
        decay: bool,
        clip: &Vec<f32>,
    ) -> Result<()> {
        let g = match grad {
            GradRef::Buf(g) | GradRef::Stat(g) => g,
        };
        if clip[1] != 0.0 {
            return Ok(());
        }
        let decay = if decay { s.decay_factor } else { 1.0 };
        let factor = clip[0];
        // f32 working copies are their own masters; a separate one is kept in step with them.
        let mut update = |x: &mut [f32]| {
            x.par_iter_mut().zip(m.par_iter_mut()).zip(v.par_iter_mut()).zip(g.par_iter()).with_min_len(4096).for_each(
                |(((x, m), v), &g)| {
                    let gi = if factor == 1.0 { g } else { g * factor };
                    *x *= decay;
                    *m = s.b1 * *m + s.c1 * gi;
                    *v = s.b2 * *v + s.c2 * gi * gi;
                    *x -= s.step_size * *m / (v.sqrt() / s.bc2_sqrt + s.eps);
                },
            );
        };
        match x {
            Some(x) => {
                update(x);
                w.copy_from_slice(x);
            }
            None => update(w),
        }
        Ok(())
    }

    fn sum_squares(&self, g: GradRef<'_, Self>, acc: &mut Vec<f32>) -> Result<()> {
        let g = match g {
            GradRef::Buf(g) | GradRef::Stat(g) => g,
        };
        // Chunk sums in parallel, added in chunk order: the same value on any thread count.
        let parts: Vec<f64> =
            g.par_chunks(1 << 14).map(|c| c.iter().map(|&x| x as f64 * x as f64).sum::<f64>()).collect();
        let s: f64 = parts.iter().sum();
        acc[0] = (acc[0] as f64 + s) as f32;
        Ok(())
    }

    fn clip_factor(&self, sumsq: &Vec<f32>, max_norm: Option<f32>) -> Result<Vec<f32>> {
        Ok(clip_rule(sumsq[0] as f64, max_norm).to_vec())
    }
}

impl Conv for HostOps {
    fn dwconv(&self, x: &Vec<f32>, w: &Vec<f32>, bias: &Vec<f32>, s: DwShape, relu6: bool) -> Result<Vec<f32>> {
        if x.len() < s.in_len() || w.len() < s.c * s.k * s.k || bias.len() < s.c {
            bail!("depthwise convolution: x, w or bias is smaller than {s:?} needs");
        }
        let plane = s.c * s.h * s.w;
        let mut out = Vec::new();
        for img in x[..s.in_len()].chunks_exact(plane) {
            let (y, _, _) = depthwise_conv2d(img, s.c, s.h, s.w, w, s.k, s.stride, s.pad, bias);
            if out.is_empty() {
                out = y; // one image (the encoder's case): no copy
            } else {
                out.extend(y);
            }
        }
        if relu6 {
            relu6_(&mut out);
        }
        Ok(out)
    }
}

impl Similarity for HostOps {
    fn mincos_topk(&self, test: &Vec<f32>, reference: Option<&Vec<f32>>, s: SimilarityShape) -> Result<PatchScores> {
        let c = s.channels;
        if c == 0 || s.patches == 0 || test.len() < s.patches * c {
            bail!("similarity search: test holds {} values, {s:?} needs {}", test.len(), s.patches * c);
        }
        let reference = match reference {
            Some(r) if s.ref_patches == 0 || r.len() < s.ref_patches * c => {
                bail!("similarity search: reference holds {} values, {s:?} needs {}", r.len(), s.ref_patches * c)
            }
            Some(r) => Some(&r[..s.ref_patches * c]),
            None => None,
        };
        Ok(mincos_topk(&test[..s.patches * c], reference, c, s.k, s.reduce))
    }
}

/// Positions per sequence of `rows` targets over `seqs` sequences.
fn seq_len(rows: usize, seqs: usize) -> Result<usize> {
    if seqs == 0 || rows == 0 || !rows.is_multiple_of(seqs) {
        bail!("{rows} targets do not split into {seqs} sequences");
    }
    Ok(rows / seqs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linear layer through a prepared weight gives the plain `x·Wᵀ + b` (bit for bit where
    /// the weight stays as it is, within f32 rounding where it was packed), and the host op set
    /// refuses a prepared weight where it is not the `b` of `x·Wᵀ`, and a weight of the wrong size.
    #[test]
    fn a_prepared_weight_is_the_b_of_a_linear_layer_only() {
        let ops = HostOps;
        let (m, n, k) = (130, 70, 40);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.01).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.01).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.1).collect();
        let plain = ops.gemm_bias_new(&GemmSpec::linear(m, n, k), &x, &w, &bias).unwrap();
        let prepared = ops.prepare_linear_weight(w.clone(), n, k).unwrap();
        let spec = GemmSpec { b_prepared: true, ..GemmSpec::linear(m, n, k) };
        let got = ops.gemm_bias_new(&spec, &x, &prepared, &bias).unwrap();
        for (a, b) in got.iter().zip(&plain) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
        let mut c = vec![0.0; m * n];
        let err = ops.gemm(&GemmSpec { trans_b: false, ..spec }, &x, &prepared, &mut c).unwrap_err();
        assert!(err.to_string().contains("prepared weight"), "{err}");
        assert!(ops.prepare_linear_weight(w, n, k + 1).is_err());
    }

    /// Two AdamW steps against the update computed by hand (PyTorch's AdamW: decoupled decay,
    /// bias-corrected moments), with the working copy as its own master and with a separate one;
    /// a skipped step (`clip[1] = 1`) changes nothing.
    #[test]
    fn adamw_matches_hand_computed_two_steps() {
        let cfg = crate::train::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let lr = 0.1;
        let no_clip = vec![1.0, 0.0, 0.0];
        let (mut w, mut m, mut v) = (vec![1.0f32, -0.5, 2.0], vec![0.0f32; 3], vec![0.0f32; 3]);
        let (mut master, mut w2, mut m2, mut v2) = (w.clone(), w.clone(), m.clone(), v.clone());
        let step =
            |t: u64, g: &Vec<f32>, w: &mut Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>, x: Option<&mut Vec<f32>>| {
                let s = AdamWScalars::new(&cfg, t, lr);
                HostOps.adamw(x, GradRef::Buf(g), m, v, w, &s, true, &no_clip).unwrap();
            };
        // Step 1: decay ×(1 − 0.01); m = 0.1g, v = 0.001g²; bias-corrected m̂/√v̂ = sign(g) (0 for
        // g = 0), so p = 0.99·p₀ − 0.1·sign(g₁) = [0.89, −0.395, 1.98].
        let g1 = vec![0.5, -1.0, 0.0];
        step(1, &g1, &mut w, &mut m, &mut v, None);
        step(1, &g1, &mut w2, &mut m2, &mut v2, Some(&mut master));
        for (a, e) in w.iter().zip([0.89, -0.395, 1.98]) {
            assert!((a - e).abs() < 1e-6, "step 1: {a} vs {e}");
        }
        // Step 2, g₂ = [0.5, 1, 2]: p ← 0.99p = [0.8811, −0.39105, 1.9602];
        // m = [0.095, 0.01, 0.2], v = [0.00049975, 0.001999, 0.004];
        // lr/(1−0.9²) = 0.1/0.19, √v/√(1−0.999²) = [0.5, 1, √(0.004/0.001999) = 1.4145672];
        // p −= [0.1, 0.0052631579, 0.0744136] → [0.7811, −0.3963132, 1.8857863].
        let g2 = vec![0.5, 1.0, 2.0];
        step(2, &g2, &mut w, &mut m, &mut v, None);
        step(2, &g2, &mut w2, &mut m2, &mut v2, Some(&mut master));
        for (a, e) in w.iter().zip([0.7811, -0.396_313_16, 1.885_786_3]) {
            assert!((a - e).abs() < 1e-6, "step 2: {a} vs {e}");
        }
        assert!((m[2] - 0.2).abs() < 1e-7 && (v[0] / 0.000_499_75 - 1.0).abs() < 1e-6, "{m:?} {v:?}");
        assert_eq!((&w2, &master), (&w, &w), "a separate master takes the same update");
        let before = w.clone();
        let s = AdamWScalars::new(&cfg, 3, lr);
        HostOps.adamw(None, GradRef::Buf(&g2), &mut m, &mut v, &mut w, &s, true, &vec![1.0, 1.0, f32::NAN]).unwrap();
        assert_eq!(w, before, "a skipped step changes nothing");
    }

    /// The fused channel epilogue is bias, then residual, then ReLU6, per channel row.
    #[test]
    fn channel_bias_act_adds_bias_and_residual_then_clamps() {
        let (channels, p) = (3, 4);
        let y0: Vec<f32> = (0..channels * p).map(|i| i as f32 * 0.9 - 4.0).collect();
        let res: Vec<f32> = (0..channels * p).map(|i| (i % 5) as f32 - 2.0).collect();
        let bias = vec![-1.0, 0.5, 2.0];
        for (residual, relu6) in [(None, false), (None, true), (Some(&res), false), (Some(&res), true)] {
            let mut y = y0.clone();
            HostOps.channel_bias_act(&mut y, &bias, channels, residual, relu6).unwrap();
            for (i, &got) in y.iter().enumerate() {
                let mut want = y0[i] + bias[i / p] + residual.map_or(0.0, |r| r[i]);
                if relu6 {
                    want = want.clamp(0.0, 6.0);
                }
                assert_eq!(got, want, "element {i}, residual {}, relu6 {relu6}", residual.is_some());
            }
        }
        let mut short = vec![0.0; 5];
        assert!(HostOps.channel_bias_act(&mut short, &bias, channels, None, true).is_err());
    }
}
