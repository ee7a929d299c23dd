//! The SAGE model (ARCHITECTURE.md §1), written once against the op set ([`StepOps`]): the
//! adapter, the fusion attention and its LayerNorm projection, the sequence assembly (text, image
//! and fact rows) and the LLM ([`Llama`], full or LoRA), forward and backward, the clipped AdamW
//! update, KV-cached generation and E-DPO's sequence log-probabilities. On the CPU it runs on
//! `backend::cpu::HostOps` (f32), on the GPU on `CudaOps` (bf16, fp32 statistics).
//!
//! - [`head`]: the head's configuration and parameters, and its host-side inputs (pooling, the
//!   min-cosine patch selection);
//! - [`plan`]: [`SageModel`], the model's definition on the host (frozen encoder, tokenizer,
//!   template, parameter layout) and the [`SeqPlan`] of each example;
//! - this file: [`Sage`], the plans realised on an op set.
//!
//! A step takes the [`SeqPlan`]s of its examples (built once on the host: tokenization, pooled
//! patches, the patch selection, none of which depends on a trained parameter), right-pads them
//! to one length (a padded row sees only earlier rows under the causal mask and has no target,
//! so its gradient is exactly zero), and weighs each sequence `1/(B·answer tokens)`: the loss is
//! the mean of the examples' mean token losses. No wait for the host inside a step. Not here: the
//! frozen vision encoder, which runs once per image (its patch tokens are cached).

pub mod head;
pub mod map_cue;
pub mod plan;

pub use head::{FactsMode, FusionInput, ImageInput, SageConfig, SageHead, Selection, FUSION_PREFIX, PARAM_PREFIX};
pub use plan::{Example, SageModel, SeqPlan, SYSTEM_PROMPT};

use crate::models::llama::{weight_grad, Grad, Grads, Llama, RowsForward, StepGrads};
use crate::models::sampling::Sampling;
use crate::ops::loss::IGNORE;
use crate::opset::GemmSpec;
use crate::opset::StepOps;
use crate::opset::{EdpoConfig, Pair};
use crate::train::{AdamWConfig, ParamSet};
use anyhow::{bail, Result};
use head::{HeadParams, LinearParams, LN_EPS};

/// The number of leading rows all `plans` share (two or more plans; `None` when they share
/// nothing or the shared rows are not a prefix every plan continues with text alone): the same
/// images and fact rows at the same places, the same text runs, until the first text run that
/// differs. Each plan must continue past the prefix with text runs only, covering its rows.
pub fn shared_prefix(plans: &[SeqPlan]) -> Option<usize> {
    let first = plans.first()?;
    if plans.len() < 2 {
        return None;
    }
    // The first row where a plan's text runs part from the first plan's.
    let mut prefix = first.t;
    for p in &plans[1..] {
        let at = first.text.iter().zip(&p.text).find(|(a, b)| a != b).map(|(a, b)| a.0.min(b.0))?;
        prefix = prefix.min(at);
    }
    let same_images = plans.iter().all(|p| {
        p.images.len() == first.images.len()
            && p.images.iter().zip(&first.images).all(|(a, b)| a.0 == b.0 && a.1.pooled == b.1.pooled)
    });
    let same_facts = plans.iter().all(|p| match (&p.facts, &first.facts) {
        (None, None) => true,
        (Some(a), Some(b)) => a.0 == b.0 && a.1 == b.1 && a.2.diff == b.2.diff && a.2.v_sel == b.2.v_sel,
        _ => false,
    });
    let inside = |at: usize, rows: usize| at + rows <= prefix;
    let before = first.images.iter().all(|(at, i)| inside(*at, i.rows))
        && first.facts.as_ref().is_none_or(|(at, ids, _)| inside(*at, ids.len()));
    // Past the prefix: text runs only, starting exactly at it and filling every row.
    let continues = plans.iter().all(|p| {
        let tail: Vec<&(usize, Vec<u32>)> = p.text.iter().filter(|(at, _)| *at >= prefix).collect();
        let rows: usize = tail.iter().map(|(_, ids)| ids.len()).sum();
        tail.first().is_some_and(|(at, _)| *at == prefix)
            && prefix + rows == p.t
            && p.text.iter().filter(|(at, _)| *at < prefix).all(|(at, ids)| at + ids.len() <= prefix)
            && rows > 0
    });
    (prefix > 0 && same_images && same_facts && before && continues).then_some(prefix)
}

/// Terms of the preference loss beyond the paper's, each off when `None`.
#[derive(Clone, Debug, Default)]
pub struct PrefTerms {
    /// Per answer: the factor `s_i` its log-probabilities are multiplied by inside the margin
    /// (`1/answer tokens`: length-normalised log-ratios); `None`: summed log-probabilities.
    pub length_scale: Option<Vec<f32>>,
    /// Per answer: the weight `c_i` of `−log π(a_i)` added to the loss (an SFT term on the chosen
    /// answers, as TRL's `rpo_alpha`); `None`: no such term.
    pub nll: Option<Vec<f32>>,
}

/// A head layer on the device: indices into [`Llama::params`].
#[derive(Clone, Copy)]
struct Lin {
    w: usize,
    b: usize,
    in_f: usize,
    out_f: usize,
}

struct HeadIx {
    fc1: Lin,
    fc2: Lin,
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
    norm_w: usize,
    norm_b: usize,
}

/// What one image's adapter backward needs.
struct ImageActs<O: StepOps> {
    row: usize,
    rows: usize,
    pooled: O::Buf,
    h_pre: O::Buf,
    h: O::Buf,
}

/// What one example's fusion backward needs.
struct FactActs<O: StepOps> {
    row: usize,
    l: usize,
    s: usize,
    t_g: O::Buf,
    diff: O::Buf,
    v_sel: O::Buf,
    q: O::Buf,
    k: O::Buf,
    v: O::Buf,
    attn: O::Buf,
    lse: O::Stat,
    pre: O::Buf,
    stats: O::Stat,
}

/// A [`Sage::forward`]: the LLM's forward (final hidden states in `llm.hidden`), the padded
/// targets `[B·T]`, and what the head's and the embedding's backward need.
pub struct SageForward<O: StepOps> {
    pub llm: RowsForward<O>,
    pub targets: Vec<u32>,
    images: Vec<ImageActs<O>>,
    facts: Vec<FactActs<O>>,
    text_ids: Vec<u32>,
    text_rows: Vec<u32>,
}

/// A batch's input rows `x [B·T, d]` before the LLM, and what the head's backward needs.
struct Assembled<O: StepOps> {
    x: O::Buf,
    targets: Vec<u32>,
    t: usize,
    images: Vec<ImageActs<O>>,
    facts: Vec<FactActs<O>>,
    text_ids: Vec<u32>,
    text_rows: Vec<u32>,
}

/// The head's gradients, accumulated over a step's examples.
struct HeadGrads<O: StepOps> {
    w: Vec<(usize, O::Buf)>,
    b: Vec<(usize, O::Stat)>,
}

impl<O: StepOps> HeadGrads<O> {
    /// Whether parameter `i` gets a gradient (is trainable).
    fn has(&self, i: usize) -> bool {
        self.w.iter().any(|(j, _)| *j == i) || self.b.iter().any(|(j, _)| *j == i)
    }
}

pub struct Sage<O: StepOps> {
    pub llm: Llama<O>,
    head: HeadIx,
    config: SageConfig,
    llm_dim: usize,
}

impl<O: StepOps> Sage<O> {
    /// Copies the model (LLM and head) from `params` to the op set; with `adamw` the trainable
    /// tensors get optimizer state, without it (inference) nothing trains.
    pub fn new(
        ops: O,
        model: &SageModel,
        params: &ParamSet,
        adamw: Option<AdamWConfig>,
        max_grad_norm: Option<f32>,
    ) -> Result<Self> {
        let mut llm = Llama::new(ops, &model.llm, params, adamw)?;
        llm.max_grad_norm = max_grad_norm;
        let HeadParams { adapter_fc1, adapter_fc2, fusion_q, fusion_k, fusion_v, fusion_out, proj_norm_w, proj_norm_b } =
            model.head.params();
        let mut lin = |(w, b, in_f, out_f): LinearParams| -> Result<Lin> {
            Ok(Lin { w: llm.add_param(&params[w])?, b: llm.add_param(&params[b])?, in_f, out_f })
        };
        let (fc1, fc2) = (lin(adapter_fc1)?, lin(adapter_fc2)?);
        let (q, k, v, out) = (lin(fusion_q)?, lin(fusion_k)?, lin(fusion_v)?, lin(fusion_out)?);
        let norm_w = llm.add_param(&params[proj_norm_w])?;
        let norm_b = llm.add_param(&params[proj_norm_b])?;
        Ok(Sage {
            llm,
            head: HeadIx { fc1, fc2, q, k, v, out, norm_w, norm_b },
            config: model.head.config.clone(),
            llm_dim: model.llm.hidden_size(),
        })
    }

    pub fn ops(&self) -> &O {
        &self.llm.ops
    }

    /// `x·Wᵀ + b` for a head layer.
    fn linear(&self, l: Lin, x: &O::Buf, rows: usize) -> Result<O::Buf> {
        self.ops().gemm_bias_new(&GemmSpec::linear(rows, l.out_f, l.in_f), x, self.llm.w(l.w), self.llm.w(l.b))
    }

    /// Backward of [`Sage::linear`]: accumulates the weight and bias gradients (when
    /// trainable) and returns `dx` when asked.
    fn linear_backward(
        &self,
        l: Lin,
        x: &O::Buf,
        dy: &O::Buf,
        rows: usize,
        want_dx: bool,
        g: &mut HeadGrads<O>,
    ) -> Result<Option<O::Buf>> {
        let o = self.ops();
        if let Some((_, dw)) = g.w.iter_mut().find(|(i, _)| *i == l.w) {
            o.gemm(&GemmSpec { accumulate: true, ..weight_grad(l.out_f, l.in_f, rows) }, dy, x, dw)?;
        }
        if let Some((_, db)) = g.b.iter_mut().find(|(i, _)| *i == l.b) {
            o.col_sum(dy, rows, db)?;
        }
        if !want_dx {
            return Ok(None);
        }
        Ok(Some(o.gemm_new(&GemmSpec::nn(rows, l.in_f, l.out_f), dy, self.llm.w(l.w))?))
    }

    /// Zero gradients for the head's trainable tensors.
    fn head_grads(&self) -> Result<HeadGrads<O>> {
        let o = self.ops();
        let h = &self.head;
        let mut g = HeadGrads { w: Vec::new(), b: Vec::new() };
        for l in [h.fc1, h.fc2, h.q, h.k, h.v, h.out] {
            if self.llm.params[l.w].trainable() {
                g.w.push((l.w, self.llm.zeroed_grad(l.w)?));
            }
            if self.llm.params[l.b].trainable() {
                g.b.push((l.b, o.stat_zeros(l.out_f)?));
            }
        }
        for i in [h.norm_w, h.norm_b] {
            if self.llm.params[i].trainable() {
                g.b.push((i, o.stat_zeros(self.llm_dim)?));
            }
        }
        Ok(g)
    }

    /// Forward, cross-entropy and backward of one batch of examples; queues the work and returns
    /// the gradients of every trainable tensor (the LLM's and the head's).
    pub fn forward_backward(&self, plans: &[SeqPlan]) -> Result<StepGrads<O>> {
        let weights: Vec<f32> = plans.iter().map(|p| 1.0 / (plans.len() * p.counted().max(1)) as f32).collect();
        let fwd = self.forward(plans, true)?;
        let mut d_head = self.llm.lm_head_grad()?;
        let ce = self.llm.cross_entropy(&fwd.llm.hidden, &fwd.targets, &weights, d_head.as_mut())?;
        let grads = self.backward(fwd, &ce.d_hidden, d_head)?;
        Ok(StepGrads::new(ce.seq_logp, weights, grads))
    }

    /// The loss [`Sage::forward_backward`] takes (the mean of the examples' mean answer-token
    /// cross-entropies), from a forward alone: a validation loss, or a finite-difference probe.
    pub fn loss(&self, plans: &[SeqPlan]) -> Result<f32> {
        let fwd = self.forward(plans, false)?;
        let o = self.ops();
        let (seq_logp, _) = self.llm.seq_logprobs(&fwd.llm.hidden, &fwd.targets, plans.len())?;
        let seq_logp = o.download_stat(&seq_logp)?;
        let loss: f64 =
            plans.iter().zip(&seq_logp).map(|(p, &lp)| -(lp as f64) / (plans.len() * p.counted().max(1)) as f64).sum();
        Ok(loss as f32)
    }

    /// The forward of one batch of examples, right-padded to the longest: the final hidden states
    /// `[B·T, d]` (in `.llm.hidden`), the padded targets, and, with `keep`, what the backward
    /// needs.
    pub fn forward(&self, plans: &[SeqPlan], keep: bool) -> Result<SageForward<O>> {
        let Assembled { x, targets, images, facts, text_ids, text_rows, .. } = self.assemble(plans)?;
        let llm = self.llm.forward_rows(x, &targets, plans.len(), keep)?;
        Ok(SageForward { llm, targets, images, facts, text_ids, text_rows })
    }

    /// The LLM's input rows of a batch of examples, right-padded to the longest: text rows from
    /// the token table, image rows from the adapter, fact rows from the fusion attention.
    fn assemble(&self, plans: &[SeqPlan]) -> Result<Assembled<O>> {
        let o = self.ops();
        let d = self.llm_dim;
        let batch = plans.len();
        let t = plans.iter().map(|p| p.t).max().unwrap_or(0);
        if batch == 0 || t == 0 {
            bail!("a SAGE step needs at least one non-empty example");
        }
        let mut targets = vec![IGNORE; batch * t];
        for (n, p) in plans.iter().enumerate() {
            targets[n * t..n * t + p.t].copy_from_slice(&p.targets);
        }
        // Text rows: every run of every example embedded at once, then copied into place.
        let mut x = o.zeros(batch * t * d)?;
        let text_ids: Vec<u32> =
            plans.iter().flat_map(|p| p.text.iter().flat_map(|(_, ids)| ids.iter().copied())).collect();
        let mut text_rows = Vec::with_capacity(text_ids.len());
        if !text_ids.is_empty() {
            let emb = self.llm.embed_tokens(&text_ids)?;
            let mut from = 0;
            for (n, p) in plans.iter().enumerate() {
                for (at, ids) in &p.text {
                    o.copy_rows(&emb, from, &mut x, n * t + at, ids.len(), d)?;
                    text_rows.extend((0..ids.len()).map(|i| (n * t + at + i) as u32));
                    from += ids.len();
                }
            }
        }
        let (mut images, mut facts) = (Vec::new(), Vec::new());
        for (n, p) in plans.iter().enumerate() {
            for (at, input) in &p.images {
                let a = self.adapter_forward(n * t + at, input.rows, &input.pooled)?;
                let out = self.linear(self.head.fc2, &a.h, a.rows)?;
                o.copy_rows(&out, 0, &mut x, a.row, a.rows, d)?;
                images.push(a);
            }
            if let Some((at, ids, input)) = &p.facts {
                let (rows, a) = self.facts_forward(n * t + at, ids, input.s, &input.diff, &input.v_sel)?;
                o.copy_rows(&rows, 0, &mut x, a.row, a.l, d)?;
                facts.push(a);
            }
        }
        Ok(Assembled { x, targets, t, images, facts, text_ids, text_rows })
    }

    /// The backward of a [`Sage::forward`] from `∂loss/∂hidden` and the LM head's gradient:
    /// the gradients by parameter index.
    pub fn backward(&self, fwd: SageForward<O>, d_hidden: &O::Buf, d_head: Option<O::Buf>) -> Result<Grads<O>> {
        let o = self.ops();
        let d = self.llm_dim;
        let SageForward { llm, images, facts, text_ids, text_rows, .. } = fwd;
        let (mut grads, dx) = self.llm.backward_rows(llm, d_hidden, d_head)?;
        let mut hg = self.head_grads()?;
        for a in &images {
            let mut d_out = o.zeros(a.rows * d)?;
            o.copy_rows(&dx, a.row, &mut d_out, 0, a.rows, d)?;
            let dh = self.linear_backward(self.head.fc2, &a.h, &d_out, a.rows, true, &mut hg)?.expect("asked for dx");
            let dh_pre = o.gelu_backward(&dh, &a.h_pre)?;
            self.linear_backward(self.head.fc1, &a.pooled, &dh_pre, a.rows, false, &mut hg)?;
        }
        for a in &facts {
            self.facts_backward(a, &dx, &mut hg)?;
        }
        // The text rows' gradient reaches the token table when it trains (full fine-tuning).
        // Gathering rows of dx is an embedding lookup with dx as the table.
        if !text_rows.is_empty() && self.llm.params[self.llm.token_embd()].trainable() {
            let d_text = o.embed(&dx, &text_rows, d)?;
            self.llm.embed_backward(&text_ids, &d_text, &mut grads)?;
        }
        for (i, w) in hg.w {
            grads[i] = Some(Grad::Buf(w));
        }
        for (i, b) in hg.b {
            grads[i] = Some(Grad::Stat(b));
        }
        Ok(grads)
    }

    /// Generates an answer to each plan's prompt (plans made without an answer): a stop id ends
    /// a sequence, as do `max_new` tokens or the context limit. The prompts' rows are assembled
    /// once, prefilled into a KV cache, and decoded with [`Llama::generate_rows`] (on the GPU the
    /// logits are bf16 GEMM outputs, so a greedy choice between logits closer than that may
    /// differ from the CPU's).
    pub fn generate(
        &self,
        plans: &[SeqPlan],
        max_new: usize,
        stop_ids: &[u32],
        sampling: Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        if plans.is_empty() || max_new == 0 {
            return Ok(vec![Vec::new(); plans.len()]);
        }
        // The head's activations are not needed past the assembly: only the rows are kept.
        let Assembled { x, t, .. } = self.assemble(plans)?;
        let lens: Vec<usize> = plans.iter().map(|p| p.t).collect();
        self.llm.generate_rows(x, t, &lens, max_new, stop_ids, sampling)
    }

    /// Greedy or sampled answers to `exs` (the questions of a batch, sharing each weight read of
    /// the decode steps): the answers (decoded, trimmed) and the patch selection of each example
    /// (when facts are fused).
    pub fn answer_batch(
        &self,
        model: &SageModel,
        exs: &[Example],
        max_new: usize,
        sampling: Sampling,
    ) -> Result<Vec<(String, Option<Selection>)>> {
        let plans = exs.iter().map(|e| model.plan(&Example { answer: None, ..*e })).collect::<Result<Vec<_>>>()?;
        let ids = self.generate(&plans, max_new, &model.tokenizer.stop_ids, sampling)?;
        ids.iter()
            .zip(plans)
            .map(|(ids, p)| {
                Ok((model.tokenizer.decode(ids, true)?.trim().to_string(), p.facts.map(|(_, _, f)| f.selection)))
            })
            .collect()
    }

    /// The log-probabilities (over the whole vocabulary) of each id in `candidates` as the first
    /// token of each plan's answer (plans made without an answer): `[plans.len()][candidates.len()]`
    /// from one forward, no decoding. A Yes/No conclusion or an option letter read this way is
    /// what greedy generation would start with whenever its first token is one of the candidates.
    ///
    /// Questions about one image pair share everything before the question (the system prompt,
    /// the images, the facts): when the plans do, the shared rows run once ([`shared_prefix`]),
    /// the first plan whole into a KV cache, and every other plan's own rows continue from a copy
    /// of its prefix ([`Llama::extend`]); otherwise every plan runs whole.
    pub fn first_token_logprobs(&self, plans: &[SeqPlan], candidates: &[u32]) -> Result<Vec<Vec<f64>>> {
        let logits = match shared_prefix(plans) {
            Some(l) => self.last_logits_sharing(plans, l)?,
            None => self.last_logits(plans)?,
        };
        let vocab = logits.len() / plans.len().max(1);
        if let Some(&c) = candidates.iter().find(|&&c| c as usize >= vocab) {
            bail!("candidate token {c} is outside the vocabulary ({vocab} tokens)");
        }
        Ok(logits
            .chunks(vocab)
            .map(|row| {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
                candidates.iter().map(|&c| row[c as usize] as f64 - lse).collect()
            })
            .collect())
    }

    /// The logits at each plan's last position, `[plans.len(), V]`, from one padded forward.
    pub fn last_logits(&self, plans: &[SeqPlan]) -> Result<Vec<f32>> {
        let fwd = self.forward(plans, false)?;
        let t = plans.iter().map(|p| p.t).max().unwrap_or(0);
        // The last prompt position predicts the first answer token (right padding is invisible
        // to it under the causal mask).
        let rows: Vec<u32> = plans.iter().enumerate().map(|(b, p)| (b * t + p.t - 1) as u32).collect();
        self.llm.logits_of_rows(&fwd.llm.hidden, &rows)
    }

    /// [`Sage::last_logits`] of plans whose first `prefix` rows are the same ([`shared_prefix`]).
    fn last_logits_sharing(&self, plans: &[SeqPlan], prefix: usize) -> Result<Vec<f32>> {
        let first = &plans[0];
        let Assembled { x, .. } = self.assemble(std::slice::from_ref(first))?;
        let mut whole = self.llm.new_cache(1, first.t)?;
        let hidden = self.llm.prefill(x, first.t, &[first.t], &mut whole)?;
        let mut logits = self.llm.logits_of_rows(&hidden, &[first.t as u32 - 1])?;
        let rest = &plans[1..];
        if rest.is_empty() {
            return Ok(logits);
        }
        let slots = rest.iter().map(|p| p.t).max().unwrap_or(prefix);
        let mut cache = self.llm.new_cache(rest.len(), slots)?;
        let (mut ids, mut seqs, mut last) = (Vec::new(), Vec::new(), Vec::new());
        for (q, p) in rest.iter().enumerate() {
            self.llm.copy_prefix(&whole, 0, &mut cache, q, prefix)?;
            for (_, run) in p.text.iter().filter(|(at, _)| *at >= prefix) {
                ids.extend_from_slice(run);
            }
            seqs.resize(ids.len(), q);
            last.push(ids.len() as u32 - 1);
        }
        let hidden = self.llm.extend(self.llm.embed_tokens(&ids)?, &seqs, &mut cache)?;
        logits.extend(self.llm.logits_of_rows(&hidden, &last)?);
        Ok(logits)
    }

    /// The answers' sequence log-probabilities `Σ log p(answer token)`, `[plans.len()]`, without
    /// a backward (E-DPO's frozen reference model).
    pub fn answer_logprobs(&self, plans: &[SeqPlan]) -> Result<O::Stat> {
        let fwd = self.forward(plans, false)?;
        Ok(self.llm.seq_logprobs(&fwd.llm.hidden, &fwd.targets, plans.len())?.0)
    }

    /// The E-DPO loss's forward and backward (ARCHITECTURE.md §1) over the answers `plans` of a
    /// batch of instances: their sequence log-probabilities under this policy, the margins of
    /// `pairs` against the reference log-probabilities `reference`, `∂loss/∂π` times `seq_scale`
    /// (each instance's weight in the step's mean), the optional [`PrefTerms`], the fused
    /// log-probability backward and the model's backward. Returns the margins and the policy's
    /// sequence log-probabilities (on the op set) and the gradients; nothing waits unless a
    /// [`PrefTerms`] option is on (its `n` per-answer values are scaled or adjusted on the host).
    pub fn edpo_forward_backward(
        &self,
        plans: &[SeqPlan],
        reference: &[f32],
        pairs: &[Pair],
        seq_scale: &[f32],
        cfg: EdpoConfig,
        terms: &PrefTerms,
    ) -> Result<(O::Stat, O::Stat, Grads<O>)> {
        let n = plans.len();
        if reference.len() != n || seq_scale.len() != n {
            bail!("E-DPO step: {n} answers, {} reference values, {} weights", reference.len(), seq_scale.len());
        }
        if terms.length_scale.as_ref().is_some_and(|l| l.len() != n) || terms.nll.as_ref().is_some_and(|c| c.len() != n)
        {
            bail!("E-DPO step: the length scales or NLL weights do not have one value per answer ({n})");
        }
        let fwd = self.forward(plans, true)?;
        let o = self.ops();
        let (policy, lse) = self.llm.seq_logprobs(&fwd.llm.hidden, &fwd.targets, n)?;
        // Length-normalised log-ratios: the loss op sees π_i·s_i and r_i·s_i, and its gradient
        // with respect to π_i·s_i is scaled by s_i on the way back.
        let (margins, mut grad) = match &terms.length_scale {
            None => o.edpo_loss(&policy, &o.upload_stat(reference)?, pairs, cfg)?,
            Some(ls) => {
                let mut scaled = o.download_stat(&policy)?;
                scaled.iter_mut().zip(ls).for_each(|(v, s)| *v *= s);
                let r: Vec<f32> = reference.iter().zip(ls).map(|(r, s)| r * s).collect();
                o.edpo_loss(&o.upload_stat(&scaled)?, &o.upload_stat(&r)?, pairs, cfg)?
            }
        };
        let scale: Vec<f32> = match &terms.length_scale {
            None => seq_scale.to_vec(),
            Some(ls) => seq_scale.iter().zip(ls).map(|(a, b)| a * b).collect(),
        };
        o.mul_stat(&mut grad, &scale)?;
        if let Some(c) = &terms.nll {
            // ∂(−c_i·π_i)/∂π_i = −c_i.
            let mut g = o.download_stat(&grad)?;
            g.iter_mut().zip(c).for_each(|(g, c)| *g -= c);
            grad = o.upload_stat(&g)?;
        }
        let mut d_head = self.llm.lm_head_grad()?;
        let dh = self.llm.logprob_backward(&fwd.llm.hidden, &fwd.targets, &lse, &grad, n, d_head.as_mut())?;
        let grads = self.backward(fwd, &dh, d_head)?;
        Ok((margins, policy, grads))
    }

    /// One E-DPO step: [`Sage::edpo_forward_backward`] and the clipped AdamW at `lr`. Returns the
    /// margins, the policy's sequence log-probabilities and the gradient norm, read after the
    /// optimizer is queued.
    #[allow(clippy::too_many_arguments)]
    pub fn edpo_step(
        &mut self,
        plans: &[SeqPlan],
        reference: &[f32],
        pairs: &[Pair],
        seq_scale: &[f32],
        cfg: EdpoConfig,
        terms: &PrefTerms,
        lr: f32,
    ) -> Result<(Vec<f32>, Vec<f32>, f32)> {
        let (margins, policy, grads) = self.edpo_forward_backward(plans, reference, pairs, seq_scale, cfg, terms)?;
        let applied = self.llm.apply(grads, lr)?;
        let margins = self.ops().download_stat(&margins)?;
        let policy = self.ops().download_stat(&policy)?;
        let norm = self.llm.finish(&applied)?;
        Ok((margins, policy, norm))
    }

    /// One step on a loss of whole answers' log-probabilities (GRPO's policy gradient): the
    /// sequence log-probabilities `log π(a_i)` of `plans` (with their answers) under this model,
    /// `loss_of(log π)` on the host returning the loss and `∂loss/∂log π(a_i)` per answer, the
    /// fused log-probability backward, the model's backward and the clipped AdamW at `lr`.
    /// Returns the log-probabilities (before the update), the loss and the gradient norm.
    pub fn sequence_step(
        &mut self,
        plans: &[SeqPlan],
        loss_of: impl FnOnce(&[f32]) -> Result<(f32, Vec<f32>)>,
        lr: f32,
    ) -> Result<(Vec<f32>, f32, f32)> {
        let n = plans.len();
        let fwd = self.forward(plans, true)?;
        let o = self.ops();
        let (policy, lse) = self.llm.seq_logprobs(&fwd.llm.hidden, &fwd.targets, n)?;
        let policy = o.download_stat(&policy)?;
        let (loss, grad) = loss_of(&policy)?;
        if grad.len() != n {
            bail!("sequence step: {n} answers, {} gradient values", grad.len());
        }
        let grad = o.upload_stat(&grad)?;
        let mut d_head = self.llm.lm_head_grad()?;
        let dh = self.llm.logprob_backward(&fwd.llm.hidden, &fwd.targets, &lse, &grad, n, d_head.as_mut())?;
        let grads = self.backward(fwd, &dh, d_head)?;
        let applied = self.llm.apply(grads, lr)?;
        let norm = self.llm.finish(&applied)?;
        Ok((policy, loss, norm))
    }

    /// `fc1` and GELU of the adapter (the caller runs `fc2`).
    fn adapter_forward(&self, row: usize, rows: usize, pooled: &[f32]) -> Result<ImageActs<O>> {
        let pooled = self.ops().upload(pooled)?;
        let h_pre = self.linear(self.head.fc1, &pooled, rows)?;
        let h = self.ops().gelu(&h_pre)?;
        Ok(ImageActs { row, rows, pooled, h_pre, h })
    }

    /// The fact tokens of one example: `t_g` (mean-pooled token embeddings of each sentence, as a
    /// GEMM with an averaging matrix), the fusion attention over the selected patches, the output
    /// projection and the LayerNorm.
    fn facts_forward(
        &self,
        row: usize,
        ids: &[Vec<u32>],
        s: usize,
        diff: &[f32],
        v_sel: &[f32],
    ) -> Result<(O::Buf, FactActs<O>)> {
        let o = self.ops();
        let (d, l) = (self.llm_dim, ids.len());
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let emb = self.llm.embed_tokens(&flat)?;
        let mut avg = vec![0.0f32; l * flat.len()];
        let mut from = 0;
        for (i, sent) in ids.iter().enumerate() {
            avg[i * flat.len() + from..i * flat.len() + from + sent.len()].fill(1.0 / sent.len() as f32);
            from += sent.len();
        }
        // The averaging matrix is bf16 on the GPU: 1/n rounds by at most 2⁻⁹ relative, the
        // rounding t_g gets stored with anyway.
        let t_g = o.gemm_new(&GemmSpec::nn(l, d, flat.len()), &o.upload(&avg)?, &emb)?;
        let (diff, v_sel) = (o.upload(diff)?, o.upload(v_sel)?);
        let h = &self.head;
        let q = self.linear(h.q, &t_g, l)?;
        let k = self.linear(h.k, &diff, s)?;
        let v = self.linear(h.v, &v_sel, s)?;
        let (attn, lse) = o.fusion_attention(&q, &k, &v, self.config.fusion_shape(l, s))?;
        let pre = self.linear(h.out, &attn, l)?;
        let (rows, stats) = o.layernorm(&pre, self.llm.w(h.norm_w), self.llm.w(h.norm_b), l, LN_EPS)?;
        Ok((rows, FactActs { row, l, s, t_g, diff, v_sel, q, k, v, attn, lse, pre, stats }))
    }

    fn facts_backward(&self, a: &FactActs<O>, dx: &O::Buf, hg: &mut HeadGrads<O>) -> Result<()> {
        let o = self.ops();
        let (d, h) = (self.llm_dim, &self.head);
        let mut d_out = o.zeros(a.l * d)?;
        o.copy_rows(dx, a.row, &mut d_out, 0, a.l, d)?;
        // The norm's gradients accumulate straight into the step's (scratch ones when frozen).
        let mut take = |i: usize| match hg.b.iter().position(|(j, _)| *j == i) {
            Some(at) => Ok((Some(i), hg.b.swap_remove(at).1)),
            None => o.stat_zeros(d).map(|z| (None, z)),
        };
        let ((wi, mut dw), (bi, mut db)) = (take(h.norm_w)?, take(h.norm_b)?);
        let d_pre =
            o.layernorm_backward(&a.pre, self.llm.w(h.norm_w), &d_out, &a.stats, a.l, LN_EPS, &mut dw, &mut db)?;
        hg.b.extend(wi.map(|i| (i, dw)).into_iter().chain(bi.map(|i| (i, db))));
        // Below the out projection only the q/k/v projections train (their inputs are frozen
        // features and embeddings): with them frozen (E-DPO) the attention's backward is skipped.
        let inner = [h.q, h.k, h.v].iter().any(|l| hg.has(l.w) || hg.has(l.b));
        let d_attn = self.linear_backward(h.out, &a.attn, &d_pre, a.l, inner, hg)?;
        let Some(d_attn) = d_attn else { return Ok(()) };
        let (dq, dk, dv) = o.fusion_attention_backward(
            &a.q,
            &a.k,
            &a.v,
            &a.attn,
            &a.lse,
            &d_attn,
            self.config.fusion_shape(a.l, a.s),
        )?;
        self.linear_backward(h.q, &a.t_g, &dq, a.l, false, hg)?;
        self.linear_backward(h.k, &a.diff, &dk, a.s, false, hg)?;
        self.linear_backward(h.v, &a.v_sel, &dv, a.s, false, hg)?;
        Ok(())
    }

    /// A full step: forward, backward, the clipped AdamW at `lr`. Returns `(loss, gradient norm
    /// before clipping)`, read after the optimizer is queued (the step's only wait).
    pub fn train_step(&mut self, plans: &[SeqPlan], lr: f32) -> Result<(f32, f32)> {
        let mut g = self.forward_backward(plans)?;
        let applied = self.llm.apply(std::mem::take(&mut g.grads), lr)?;
        let loss = self.llm.loss(&g)?;
        let norm = self.llm.finish(&applied)?;
        Ok((loss, norm))
    }
}
