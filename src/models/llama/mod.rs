//! The LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied or separate LM
//! head), written once against the op set ([`StepOps`]): the same model trains, scores and
//! generates on the CPU (`backend::cpu::HostOps`, f32) and on the GPU (`CudaOps`: bf16 weights,
//! activations and weight gradients, fp32 statistics, masters and moments).
//!
//! - [`config`]: the hyperparameters, read from GGUF and validated against the tensors;
//! - [`weights`]: where each tensor sits in a [`ParamSet`] under its GGUF name, LoRA adapters,
//!   merged and adapter-only checkpoints;
//! - this file: the forward over a batch of equal-length sequences, the cross-entropy, the
//!   backward and the clipped AdamW step, with no wait for the host inside a step (the loss and
//!   gradient norm are read after the optimizer's launches are queued);
//! - [`decode`]: the KV cache, prefill, single-query decode steps and batched generation;
//! - [`chat`]: a chat model (tokenizer, template, streaming generation) on top.
//!
//! A step takes token ids ([`Llama::forward_backward`]) or input rows that the caller built
//! ([`Llama::forward_backward_rows`]: the SAGE model's image, fact and text rows), and the
//! optimizer ([`Llama::apply`]) clips the global gradient norm on the device. Extra tensors (the
//! SAGE head) join the same parameter list through [`Llama::add_param`]. LoRA adapters run as
//! `y = x·Wᵀ + (scale·x·Aᵀ)·Bᵀ`; frozen tensors get neither a gradient nor optimizer state.

pub mod chat;
pub mod config;
mod decode;
pub mod source;
pub mod weights;

pub use chat::{ChatModel, Generation};
pub use config::{Family, LlamaConfig};
pub use decode::KvCache;
pub use source::LlmSource;
pub use weights::{BaseWeights, Block, Finetune, Linear, LinearWeight, LlamaParams, LoraAdapter, LINEAR_NAMES};

use crate::ops::loss::IGNORE;
use crate::opset::GemmSpec;
use crate::opset::{CausalShape, CrossEntropyOut, GradRef, StepOps};
use crate::train::{AdamWConfig, AdamWScalars, AdamWState, Moments, Param, ParamId, ParamSet};
use crate::user_bail;
use anyhow::{bail, Result};
use decode::CacheFill;
use std::sync::Mutex;

/// The optimizer's view of a trainable tensor: the moments and, where the working copy is not
/// fp32 ([`Optimizer::SEPARATE_MASTER`]), an fp32 master.
struct OptState<O: StepOps> {
    master: Option<O::Stat>,
    m: O::Stat,
    v: O::Stat,
}

/// One tensor on the op set: the working copy the ops read and, when trainable, its optimizer
/// state.
pub struct OpParam<O: StepOps> {
    pub name: String,
    pub numel: usize,
    w: O::Buf,
    opt: Option<OptState<O>>,
    decay: bool,
}

impl<O: StepOps> OpParam<O> {
    pub fn trainable(&self) -> bool {
        self.opt.is_some()
    }
}

/// Gradients by parameter index (`None`: frozen, or not reached).
pub type Grads<O> = Vec<Option<Grad<O>>>;

/// A gradient as the backward produced it.
pub enum Grad<O: StepOps> {
    Buf(O::Buf),
    Stat(O::Stat),
}

impl<O: StepOps> Grad<O> {
    pub fn as_ref(&self) -> GradRef<'_, O> {
        match self {
            Grad::Buf(b) => GradRef::Buf(b),
            Grad::Stat(x) => GradRef::Stat(x),
        }
    }
}

/// Where a linear layer's weight sits: [`Llama::params`] (dense) or [`Llama::qweights`] (frozen
/// quantized blocks).
#[derive(Clone, Copy)]
enum Wix {
    Dense(usize),
    Quant(usize),
}

/// A linear layer: indices into [`Llama::params`] / [`Llama::qweights`], and its adapter.
struct LinearIds {
    w: Wix,
    bias: Option<usize>,
    in_f: usize,
    out_f: usize,
    /// `(lora_a, lora_b, rank, scale)`
    lora: Option<(usize, usize, usize, f32)>,
}

/// `blk.N`.
struct BlockIds {
    attn_norm: usize,
    attn_q: LinearIds,
    attn_k: LinearIds,
    attn_v: LinearIds,
    attn_output: LinearIds,
    ffn_norm: usize,
    ffn_gate: LinearIds,
    ffn_up: LinearIds,
    ffn_down: LinearIds,
}

/// What one block's backward needs from its forward.
struct BlockActs<O: StepOps> {
    x: O::Buf,
    h1: O::Buf,
    rstd1: O::Stat,
    /// Queries and keys after RoPE.
    q: O::Buf,
    k: O::Buf,
    v: O::Buf,
    /// Attention output (before `attn_output`) and its log-sum-exp.
    ctx: O::Buf,
    lse: O::Stat,
    x1: O::Buf,
    h2: O::Buf,
    rstd2: O::Stat,
    gate: O::Buf,
    up: O::Buf,
    s: O::Buf,
    /// Each adapter's hidden `scale·x·Aᵀ` (q, k, v, output, gate, up, down).
    lora: [Option<O::Buf>; 7],
}

/// A [`Llama::forward_rows`]: the final hidden states `[batch·T, d]` and what the backward
/// needs.
pub struct RowsForward<O: StepOps> {
    acts: Vec<BlockActs<O>>,
    kept: bool,
    /// The residual stream after the last block, and `output_norm`'s statistics.
    x_out: O::Buf,
    rstd_f: O::Stat,
    pub hidden: O::Buf,
    rows: usize,
    shape: CausalShape,
}

/// See [`Llama::weight_memory`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct WeightMemory {
    pub dense_values: usize,
    pub quant_bytes: usize,
    pub quant_tensors: usize,
}

/// The loss of a step, still on the device, and the gradients by parameter index.
pub struct StepGrads<O: StepOps> {
    seq_logp: O::Stat,
    seq_weights: Vec<f32>,
    pub grads: Vec<Option<Grad<O>>>,
}

impl<O: StepOps> StepGrads<O> {
    /// Gradients and the (device) sequence log-probabilities of a loss `−Σ_n seq_weights[n]·seq_logp[n]`.
    pub fn new(seq_logp: O::Stat, seq_weights: Vec<f32>, grads: Vec<Option<Grad<O>>>) -> Self {
        StepGrads { seq_logp, seq_weights, grads }
    }
}

/// What [`Llama::apply`] queued: the clipping it applied, read back by
/// [`Llama::finish`].
pub struct Applied<O: StepOps> {
    clip: O::Stat,
}

pub struct Llama<O: StepOps> {
    pub ops: O,
    pub config: LlamaConfig,
    pub params: Vec<OpParam<O>>,
    token_embd: usize,
    blocks: Vec<BlockIds>,
    output_norm: usize,
    output: usize,
    /// Frozen quantized weights (`BaseWeights::Quantized`): linear layers, and the LM head's and
    /// token table's blocks, which every reader of those tables reads (they have no f32 copy).
    qweights: Vec<O::QBuf>,
    head_q: Option<usize>,
    embd_q: Option<usize>,
    rope: (O::Stat, O::Stat),
    /// `None`: an inference model, where nothing trains and no optimizer state is held.
    adamw: Option<AdamWConfig>,
    /// Clip the global gradient norm to this (`None`: never).
    pub max_grad_norm: Option<f32>,
    step: u64,
    /// Gradient buffers by parameter index, handed back by [`Llama::apply`] and reused by the
    /// next backward, so that a step allocates no gradient memory after the first: on the CPU a
    /// fresh buffer of the vocabulary-sized tables was page-faulted in and unmapped again every
    /// step, a tenth of a SmolLM2-135M step. Locked only to take or hand back a buffer.
    grad_pool: Mutex<Vec<Option<O::Buf>>>,
}

impl<O: StepOps> Llama<O> {
    /// Copies `model`'s weights (from `params`) to the op set. With `adamw`, trainable tensors get
    /// zero moments (and fp32 masters where the working copy is not fp32), frozen ones (LoRA's
    /// base weights) are working copies only; without it (inference) every tensor is frozen.
    pub fn new(ops: O, model: &LlamaParams, params: &ParamSet, adamw: Option<AdamWConfig>) -> Result<Llama<O>> {
        let rope = {
            let (cos, sin) = model.rope_table().tables();
            ops.rope_tables(cos, sin, model.config.head_dim / 2)?
        };
        let mut dev = Llama {
            ops,
            config: model.config.clone(),
            params: Vec::new(),
            token_embd: 0,
            blocks: Vec::new(),
            output_norm: 0,
            output: 0,
            qweights: Vec::new(),
            head_q: None,
            embd_q: None,
            rope,
            adamw,
            max_grad_norm: None,
            step: 0,
            grad_pool: Mutex::new(Vec::new()),
        };
        let mut index = std::collections::HashMap::new();
        for id in model.param_ids() {
            index.insert(id, dev.add_param(&params[id])?);
        }
        let quantized = model.embd_q.is_some()
            || model.head_q.is_some()
            || model.blocks.iter().flat_map(|b| b.linears()).any(|l| matches!(l.weight, LinearWeight::Quant(_)));
        if quantized && dev.adamw.is_some() && model.finetune == Finetune::Full {
            user_bail!(
                "a quantized base is frozen: it trains through LoRA adapters (QLoRA), not full fine-tuning; \
                 use LoRA or keep the base in f32"
            );
        }
        let ix = |id: ParamId| index[&id];
        let mut blocks = Vec::with_capacity(model.blocks.len());
        for b in &model.blocks {
            let mut lin = |l: &Linear| -> Result<LinearIds> {
                let w = match &l.weight {
                    LinearWeight::Param(id) => Wix::Dense(ix(*id)),
                    LinearWeight::Quant(q) => {
                        dev.qweights.push(dev.ops.upload_quant(q)?);
                        Wix::Quant(dev.qweights.len() - 1)
                    }
                };
                Ok(LinearIds {
                    w,
                    bias: l.bias.map(ix),
                    in_f: l.in_features,
                    out_f: l.out_features,
                    lora: l.lora.map(|a| (ix(a.lora_a), ix(a.lora_b), a.rank, a.scale)),
                })
            };
            blocks.push(BlockIds {
                attn_norm: ix(b.attn_norm),
                attn_q: lin(&b.attn_q)?,
                attn_k: lin(&b.attn_k)?,
                attn_v: lin(&b.attn_v)?,
                attn_output: lin(&b.attn_output)?,
                ffn_norm: ix(b.ffn_norm),
                ffn_gate: lin(&b.ffn_gate)?,
                ffn_up: lin(&b.ffn_up)?,
                ffn_down: lin(&b.ffn_down)?,
            });
        }
        dev.blocks = blocks;
        if let Some(q) = &model.head_q {
            dev.qweights.push(dev.ops.upload_quant(q)?);
            dev.head_q = Some(dev.qweights.len() - 1);
        }
        // A tied head is the token table: one copy serves both.
        dev.embd_q = match (&model.embd_q, model.tied) {
            (Some(_), true) => dev.head_q,
            (Some(q), false) => {
                dev.qweights.push(dev.ops.upload_quant(q)?);
                Some(dev.qweights.len() - 1)
            }
            (None, _) => None,
        };
        // Tables held only as blocks (the loader made no f32 copy) get an entry without values.
        dev.token_embd = match model.token_embd {
            Some(id) => ix(id),
            None => dev.add_blocks_only_table("token_embd.weight")?,
        };
        dev.output_norm = ix(model.output_norm);
        dev.output = match (model.output, model.tied) {
            (Some(id), _) => ix(id),
            (None, true) => dev.token_embd,
            (None, false) => dev.add_blocks_only_table("output.weight")?,
        };
        Ok(dev)
    }

    /// Uploads one more tensor (e.g. the SAGE head's) into the parameter list the optimizer,
    /// clipping and [`Llama::download_into`] walk; returns its index.
    pub fn add_param(&mut self, p: &Param) -> Result<usize> {
        let o = &self.ops;
        let opt = if p.trainable && self.adamw.is_some() {
            Some(OptState {
                master: if O::SEPARATE_MASTER { Some(o.upload_stat(&p.value)?) } else { None },
                m: o.stat_zeros(p.numel())?,
                v: o.stat_zeros(p.numel())?,
            })
        } else {
            None
        };
        self.params.push(OpParam {
            name: p.name.clone(),
            numel: p.numel(),
            w: o.upload(&p.value)?,
            opt,
            decay: p.decay,
        });
        Ok(self.params.len() - 1)
    }

    /// A frozen table the op set reads only from its quantized blocks: a parameter entry with no
    /// values, so the indices and names of the f32 layout still hold.
    fn add_blocks_only_table(&mut self, name: &str) -> Result<usize> {
        self.params.push(OpParam { name: name.to_string(), numel: 0, w: self.ops.zeros(1)?, opt: None, decay: false });
        Ok(self.params.len() - 1)
    }

    /// Overwrites parameter `i` (its working copy and fp32 master) with `values`, e.g. to probe a
    /// loss at moved weights.
    pub fn write_param(&mut self, i: usize, values: &[f32]) -> Result<()> {
        let p = &mut self.params[i];
        if values.len() != p.numel {
            bail!("parameter `{}` has {} values, got {}", p.name, p.numel, values.len());
        }
        p.w = self.ops.upload(values)?;
        if let Some(master) = p.opt.as_mut().and_then(|st| st.master.as_mut()) {
            *master = self.ops.upload_stat(values)?;
        }
        Ok(())
    }

    /// Optimizer steps taken (skipped ones not counted).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The working copy of parameter `i`, as the ops read it.
    pub fn w(&self, i: usize) -> &O::Buf {
        &self.params[i].w
    }

    fn trainable(&self, i: usize) -> bool {
        self.params[i].trainable()
    }

    /// The token embedding table's index (the SAGE step embeds its text tokens with it).
    pub fn token_embd(&self) -> usize {
        self.token_embd
    }

    /// The token table's rows of `ids`, `[ids.len(), d]` (from its quantized blocks when the
    /// model keeps them: the same values the f32 table holds).
    pub fn embed_tokens(&self, ids: &[u32]) -> Result<O::Buf> {
        match self.embd_q {
            Some(q) => self.ops.qembed(&self.qweights[q], ids),
            None => self.ops.embed(self.w(self.token_embd), ids, self.config.hidden_size),
        }
    }

    /// What the weights take on the backend: f32 (or bf16) values of the dense tensors and bytes
    /// of the quantized ones.
    pub fn weight_memory(&self) -> WeightMemory {
        WeightMemory {
            dense_values: self.params.iter().map(|p| p.numel).sum(),
            quant_bytes: self.qweights.iter().map(|q| self.ops.quant_bytes(q)).sum(),
            quant_tensors: self.qweights.len(),
        }
    }

    fn shape(&self, batch: usize, seq: usize) -> CausalShape {
        let c = &self.config;
        CausalShape { batch, seq, heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim }
    }

    /// Forward, cross-entropy and backward over `batch` sequences: `inputs` and `targets` are
    /// `[batch·T]` token ids (targets already shifted; `IGNORE` skips a position); the loss is the
    /// mean over every counted position. Queues the work and returns the gradients; nothing waits
    /// for the device.
    pub fn forward_backward(&self, inputs: &[u32], targets: &[u32], batch: usize) -> Result<StepGrads<O>> {
        let counted = targets.iter().filter(|&&x| x != IGNORE).count();
        let x = self.embed_tokens(inputs)?;
        let (mut g, dx) = self.forward_backward_rows(x, targets, &vec![1.0 / counted.max(1) as f32; batch])?;
        self.embed_backward(inputs, &dx, &mut g.grads)?;
        Ok(g)
    }

    /// Adds the gradient of embedded rows `dx [ids.len(), d]` to the token table's (which, with
    /// tied embeddings, already holds the LM head's). Nothing when the table is frozen.
    pub fn embed_backward(&self, ids: &[u32], dx: &O::Buf, grads: &mut [Option<Grad<O>>]) -> Result<()> {
        if !self.trainable(self.token_embd) || ids.is_empty() {
            return Ok(());
        }
        let o = &self.ops;
        let d = self.config.hidden_size;
        let mut dtable = match grads[self.token_embd].take() {
            Some(Grad::Buf(g)) => g,
            _ => self.zeroed_grad(self.token_embd)?,
        };
        o.embed_backward(ids, dx, d, &mut dtable)?;
        grads[self.token_embd] = Some(Grad::Buf(dtable));
        Ok(())
    }

    /// [`Llama::forward_backward`] from input rows `x [batch·T, d]`: the loss is
    /// `−Σ_n seq_weights[n]·Σ_t log p(target)` over the `seq_weights.len()` sequences. Returns
    /// the gradients and `∂loss/∂x`.
    pub fn forward_backward_rows(
        &self,
        x: O::Buf,
        targets: &[u32],
        seq_weights: &[f32],
    ) -> Result<(StepGrads<O>, O::Buf)> {
        let fwd = self.forward_rows(x, targets, seq_weights.len(), true)?;
        let mut d_head = self.lm_head_grad()?;
        let ce = self.cross_entropy(&fwd.hidden, targets, seq_weights, d_head.as_mut())?;
        let (grads, dx) = self.backward_rows(fwd, &ce.d_hidden, d_head)?;
        Ok((StepGrads { seq_logp: ce.seq_logp, seq_weights: seq_weights.to_vec(), grads }, dx))
    }

    /// The frozen LM head's blocks, which the losses read when the model holds the head only as
    /// blocks (a quantized base). `None`: the losses read the f32 working copy.
    fn quantized_loss_head(&self) -> Option<&O::QBuf> {
        self.head_q.map(|q| &self.qweights[q])
    }

    /// [`Losses::cross_entropy`] of `hidden` through the LM head (its blocks when
    /// [`Llama::quantized_loss_head`]: the sequence log-probabilities, then their backward with
    /// `∂loss/∂seq_n = −seq_weights[n]`; one more pass over the head than the fused loss, and no
    /// f32 copy of it).
    ///
    /// [`Losses::cross_entropy`]: crate::opset::Losses::cross_entropy
    pub fn cross_entropy(
        &self,
        hidden: &O::Buf,
        targets: &[u32],
        seq_weights: &[f32],
        d_head: Option<&mut O::Buf>,
    ) -> Result<CrossEntropyOut<O>> {
        let Some(q) = self.quantized_loss_head() else {
            return self.ops.cross_entropy(hidden, self.lm_head()?, targets, seq_weights, d_head);
        };
        if d_head.is_some() {
            bail!("the quantized LM head is frozen: it has no gradient buffer");
        }
        let seqs = seq_weights.len();
        let (seq_logp, lse) = self.ops.q_seq_logprobs(hidden, q, targets, seqs)?;
        let grad_seq: Vec<f32> = seq_weights.iter().map(|w| -w).collect();
        let d_hidden =
            self.ops.q_logprob_backward(hidden, q, targets, &lse, &self.ops.upload_stat(&grad_seq)?, seqs)?;
        Ok(CrossEntropyOut { seq_logp, d_hidden })
    }

    /// [`Losses::seq_logprobs`] of `hidden` through the LM head (its blocks when
    /// [`Llama::quantized_loss_head`]).
    ///
    /// [`Losses::seq_logprobs`]: crate::opset::Losses::seq_logprobs
    pub fn seq_logprobs(&self, hidden: &O::Buf, targets: &[u32], seqs: usize) -> Result<(O::Stat, O::Stat)> {
        match self.quantized_loss_head() {
            Some(q) => self.ops.q_seq_logprobs(hidden, q, targets, seqs),
            None => self.ops.seq_logprobs(hidden, self.lm_head()?, targets, seqs),
        }
    }

    /// [`Losses::logprob_backward`] through the LM head (its blocks when
    /// [`Llama::quantized_loss_head`], which take no `d_head`).
    ///
    /// [`Losses::logprob_backward`]: crate::opset::Losses::logprob_backward
    #[allow(clippy::too_many_arguments)]
    pub fn logprob_backward(
        &self,
        hidden: &O::Buf,
        targets: &[u32],
        lse: &O::Stat,
        grad_seq: &O::Stat,
        seqs: usize,
        d_head: Option<&mut O::Buf>,
    ) -> Result<O::Buf> {
        match self.quantized_loss_head() {
            Some(_) if d_head.is_some() => bail!("the quantized LM head is frozen: it has no gradient buffer"),
            Some(q) => self.ops.q_logprob_backward(hidden, q, targets, lse, grad_seq, seqs),
            None => self.ops.logprob_backward(hidden, self.lm_head()?, targets, lse, grad_seq, seqs, d_head),
        }
    }

    /// The LM head's working copy (`output.weight`, or the tied token table), for the losses;
    /// an error when the model holds the head only as quantized blocks.
    pub fn lm_head(&self) -> Result<&O::Buf> {
        if self.params[self.output].numel == 0 {
            bail!("this model reads its frozen LM head from quantized blocks and holds no f32 copy of it");
        }
        Ok(self.w(self.output))
    }

    /// Whether the LM head gets a gradient.
    pub fn lm_head_trains(&self) -> bool {
        self.trainable(self.output)
    }

    /// A buffer for the LM head's gradient, which the loss op overwrites; `None` when the head
    /// is frozen.
    pub fn lm_head_grad(&self) -> Result<Option<O::Buf>> {
        if self.lm_head_trains() {
            Ok(Some(self.grad_buffer(self.output)?))
        } else {
            Ok(None)
        }
    }

    /// A gradient buffer for parameter `i` with unspecified contents, which the caller
    /// overwrites whole: the one [`Llama::apply`] handed back after the last step, else a new one.
    fn grad_buffer(&self, i: usize) -> Result<O::Buf> {
        match self.take_pooled(i) {
            Some(b) => Ok(b),
            None => self.ops.zeros(self.params[i].numel),
        }
    }

    /// A zeroed gradient buffer for parameter `i`, to accumulate into.
    pub fn zeroed_grad(&self, i: usize) -> Result<O::Buf> {
        match self.take_pooled(i) {
            Some(mut b) => {
                self.ops.fill_zero(&mut b)?;
                Ok(b)
            }
            None => self.ops.zeros(self.params[i].numel),
        }
    }

    fn take_pooled(&self, i: usize) -> Option<O::Buf> {
        // A poisoned lock only means another thread panicked between take and hand-back; the
        // pool's buffers are still whole.
        let mut pool = self.grad_pool.lock().unwrap_or_else(|e| e.into_inner());
        pool.get_mut(i).and_then(Option::take)
    }

    /// Keeps the buffers of `grads` for the next step's backward.
    fn recycle(&mut self, grads: Vec<Option<Grad<O>>>) {
        let pool = self.grad_pool.get_mut().unwrap_or_else(|e| e.into_inner());
        pool.resize_with(self.params.len(), || None);
        for (slot, g) in pool.iter_mut().zip(grads) {
            if let Some(Grad::Buf(b)) = g {
                *slot = Some(b);
            }
        }
    }

    /// The decoder over input rows `x [batch·T, d]` (`targets` only checked here): the final
    /// hidden states, and, with `keep`, what [`Llama::backward_rows`] needs (inference
    /// drops each block's activations as it goes).
    pub fn forward_rows(&self, x: O::Buf, targets: &[u32], batch: usize, keep: bool) -> Result<RowsForward<O>> {
        self.forward_rows_filling(x, targets, batch, keep, None)
    }

    /// [`Llama::forward_rows`], appending each block's rotated keys and values to a cache
    /// when given one (the prefill of `decode`).
    fn forward_rows_filling(
        &self,
        mut x: O::Buf,
        targets: &[u32],
        batch: usize,
        keep: bool,
        mut fill: Option<CacheFill<'_, O>>,
    ) -> Result<RowsForward<O>> {
        let c = &self.config;
        let rows = targets.len();
        if batch == 0 || rows == 0 || !rows.is_multiple_of(batch) {
            bail!("a step needs batch·T targets (got {rows} targets, batch {batch})");
        }
        let t = rows / batch;
        let max_pos = self.config.context_length;
        if t > max_pos {
            user_bail!("sequences of {t} positions exceed the model's {max_pos}");
        }
        if let Some(bad) = targets.iter().find(|&&x| x != IGNORE && x as usize >= c.vocab_size) {
            user_bail!("target token {bad} is outside the vocabulary of {}", c.vocab_size);
        }
        let o = &self.ops;
        let eps = c.rms_norm_eps;
        let half = c.head_dim / 2;
        let shape = self.shape(batch, t);
        let mut acts = Vec::with_capacity(self.blocks.len());
        let kvd = c.num_kv_heads * c.head_dim;
        for (i, b) in self.blocks.iter().enumerate() {
            let (h1, rstd1) = o.rmsnorm(&x, self.w(b.attn_norm), rows, eps)?;
            let (mut q, lq) = self.linear(&b.attn_q, &h1, rows, None)?;
            let (mut k, lk) = self.linear(&b.attn_k, &h1, rows, None)?;
            let (v, lv) = self.linear(&b.attn_v, &h1, rows, None)?;
            o.rope(&mut q, &self.rope, half, rows, t, c.num_heads, false)?;
            o.rope(&mut k, &self.rope, half, rows, t, c.num_kv_heads, false)?;
            if let Some(f) = fill.as_mut() {
                let slots = f.cache.shape().slots;
                o.kv_append(&k, &f.seq, &f.pos, rows, kvd, slots, &mut f.cache.k[i])?;
                o.kv_append(&v, &f.seq, &f.pos, rows, kvd, slots, &mut f.cache.v[i])?;
            }
            let (ctx, lse) = o.attention(&q, &k, &v, shape)?;
            let (x1, lo) = self.linear(&b.attn_output, &ctx, rows, Some(o.copy(&x)?))?;
            let (h2, rstd2) = o.rmsnorm(&x1, self.w(b.ffn_norm), rows, eps)?;
            let (gate, lg) = self.linear(&b.ffn_gate, &h2, rows, None)?;
            let (up, lu) = self.linear(&b.ffn_up, &h2, rows, None)?;
            let s = o.swiglu(&gate, &up)?;
            let (y, ld) = self.linear(&b.ffn_down, &s, rows, Some(o.copy(&x1)?))?;
            if keep {
                let lora = [lq, lk, lv, lo, lg, lu, ld];
                acts.push(BlockActs { x, h1, rstd1, q, k, v, ctx, lse, x1, h2, rstd2, gate, up, s, lora });
            }
            x = y;
        }
        let (hidden, rstd_f) = o.rmsnorm(&x, self.w(self.output_norm), rows, eps)?;
        Ok(RowsForward { acts, kept: keep, x_out: x, rstd_f, hidden, rows, shape })
    }

    /// The backward of [`Llama::forward_rows`] from `∂loss/∂hidden` (and the LM head's
    /// gradient, which the loss op computes): the gradients by parameter index and `∂loss/∂x`.
    pub fn backward_rows(
        &self,
        fwd: RowsForward<O>,
        d_hidden: &O::Buf,
        d_head: Option<O::Buf>,
    ) -> Result<(Grads<O>, O::Buf)> {
        let o = &self.ops;
        let RowsForward { acts, kept, x_out, rstd_f, hidden, rows, shape } = fwd;
        if !kept {
            bail!("backward of a forward that kept no activations");
        }
        drop(hidden);
        let (d, eps) = (self.config.hidden_size, self.config.rms_norm_eps);
        let mut grads: Vec<Option<Grad<O>>> = (0..self.params.len()).map(|_| None).collect();
        let mut dx = o.zeros(rows * d)?;
        let mut dg = self.norm_grad(self.output_norm, d)?;
        o.rmsnorm_backward(
            &x_out,
            self.w(self.output_norm),
            d_hidden,
            &rstd_f,
            rows,
            eps,
            false,
            &mut dx,
            dg.as_mut(),
        )?;
        grads[self.output_norm] = dg.map(Grad::Stat);
        // The LM head; with tied embeddings this is also token_embd's, which the embedding
        // backward adds to.
        grads[self.output] = d_head.map(Grad::Buf);
        for (b, a) in self.blocks.iter().zip(acts).rev() {
            dx = self.block_backward(b, a, &dx, rows, shape, &mut grads)?;
        }
        Ok((grads, dx))
    }

    /// A zero fp32 gradient for a norm weight, or `None` when it is frozen.
    fn norm_grad(&self, i: usize, n: usize) -> Result<Option<O::Stat>> {
        if self.trainable(i) {
            Ok(Some(self.ops.stat_zeros(n)?))
        } else {
            Ok(None)
        }
    }

    /// `y = x·Wᵀ (+ b) (+ scale·(x·Aᵀ)·Bᵀ)`, added to `acc` when given (the residual stream).
    /// Returns `y` and the adapter's hidden `scale·x·Aᵀ`, which the backward needs.
    fn linear(&self, l: &LinearIds, x: &O::Buf, rows: usize, acc: Option<O::Buf>) -> Result<(O::Buf, Option<O::Buf>)> {
        let o = &self.ops;
        let spec = GemmSpec::linear(rows, l.out_f, l.in_f);
        let mut y = match (l.w, acc, l.bias) {
            (Wix::Quant(q), acc, bias) => o.qlinear(x, &self.qweights[q], rows, bias.map(|b| self.w(b)), acc)?,
            (Wix::Dense(w), Some(mut y), None) => {
                o.gemm(&GemmSpec { accumulate: true, ..spec }, x, self.w(w), &mut y)?;
                y
            }
            (Wix::Dense(w), None, None) => o.gemm_new(&spec, x, self.w(w))?,
            (Wix::Dense(w), None, Some(b)) => o.gemm_bias_new(&spec, x, self.w(w), self.w(b))?,
            // Only q, k and v carry biases, and none of them adds to the residual stream.
            (Wix::Dense(_), Some(_), Some(_)) => bail!("a biased linear layer never adds into the residual stream"),
        };
        let Some((a, b, rank, scale)) = l.lora else { return Ok((y, None)) };
        let mut u = o.gemm_new(&GemmSpec::linear(rows, rank, l.in_f), x, self.w(a))?;
        o.scale(&mut u, scale)?;
        o.gemm(&GemmSpec { accumulate: true, ..GemmSpec::linear(rows, l.out_f, rank) }, &u, self.w(b), &mut y)?;
        Ok((y, Some(u)))
    }

    /// Linear layers that read the same input `x` (no residual): quantized ones without an
    /// adapter go through one [`QuantOps::qlinear_group`] call (the decode step's q/k/v and
    /// gate/up), anything else layer by layer.
    fn linears_of(&self, ls: &[&LinearIds], x: &O::Buf, rows: usize) -> Result<Vec<O::Buf>> {
        let quant: Option<Vec<&O::QBuf>> = ls
            .iter()
            .map(|l| match (l.w, l.lora) {
                (Wix::Quant(q), None) => Some(&self.qweights[q]),
                _ => None,
            })
            .collect();
        match quant {
            Some(ws) => {
                let biases: Vec<Option<&O::Buf>> = ls.iter().map(|l| l.bias.map(|b| self.w(b))).collect();
                self.ops.qlinear_group(x, &ws, rows, &biases)
            }
            None => ls.iter().map(|l| Ok(self.linear(l, x, rows, None)?.0)).collect(),
        }
    }

    /// Backward of [`Llama::linear`] from `dy`: `dx` (new, or added to `acc`), and the
    /// weight and adapter gradients of whatever is trainable.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        l: &LinearIds,
        x: &O::Buf,
        u: Option<&O::Buf>,
        dy: &O::Buf,
        rows: usize,
        acc: Option<O::Buf>,
        grads: &mut [Option<Grad<O>>],
    ) -> Result<O::Buf> {
        let o = &self.ops;
        // dx (+)= dy·W and dW = dyᵀ·x for a linear layer W [out, in].
        let input_grad = GemmSpec::nn(rows, l.in_f, l.out_f);
        let mut dx = match (l.w, acc) {
            // A quantized weight is frozen: only the input gradient, from its blocks.
            (Wix::Quant(q), acc) => o.qlinear_input_grad(dy, &self.qweights[q], rows, acc)?,
            (Wix::Dense(w), Some(mut dx)) => {
                o.gemm(&GemmSpec { accumulate: true, ..input_grad }, dy, self.w(w), &mut dx)?;
                dx
            }
            (Wix::Dense(w), None) => o.gemm_new(&input_grad, dy, self.w(w))?,
        };
        if let Wix::Dense(w) = l.w {
            if self.trainable(w) {
                grads[w] = Some(Grad::Buf(self.weight_grad_of(w, &weight_grad(l.out_f, l.in_f, rows), dy, x)?));
            }
        }
        if let Some(b) = l.bias.filter(|&b| self.trainable(b)) {
            let mut db = o.stat_zeros(l.out_f)?;
            o.col_sum(dy, rows, &mut db)?;
            grads[b] = Some(Grad::Stat(db));
        }
        if let Some((a, b, rank, scale)) = l.lora {
            let u = u.ok_or_else(|| anyhow::anyhow!("an adapter's forward keeps its hidden"))?;
            grads[b] = Some(Grad::Buf(self.weight_grad_of(b, &weight_grad(l.out_f, rank, rows), dy, u)?));
            let mut du = o.gemm_new(&GemmSpec::nn(rows, rank, l.out_f), dy, self.w(b))?;
            o.scale(&mut du, scale)?;
            grads[a] = Some(Grad::Buf(self.weight_grad_of(a, &weight_grad(rank, l.in_f, rows), &du, x)?));
            o.gemm(&GemmSpec { accumulate: true, ..GemmSpec::nn(rows, l.in_f, rank) }, &du, self.w(a), &mut dx)?;
        }
        Ok(dx)
    }

    /// Parameter `i`'s gradient `dyᵀ·x` as `spec` says, in a reused buffer.
    fn weight_grad_of(&self, i: usize, spec: &GemmSpec, dy: &O::Buf, x: &O::Buf) -> Result<O::Buf> {
        let mut g = self.grad_buffer(i)?;
        self.ops.gemm(&GemmSpec { accumulate: false, ..*spec }, dy, x, &mut g)?;
        Ok(g)
    }

    /// Backward of one block given `dy`, the gradient of its output; returns its input's.
    fn block_backward(
        &self,
        b: &BlockIds,
        a: BlockActs<O>,
        dy: &O::Buf,
        rows: usize,
        shape: CausalShape,
        grads: &mut [Option<Grad<O>>],
    ) -> Result<O::Buf> {
        let c = &self.config;
        let o = &self.ops;
        let (d, eps, half) = (c.hidden_size, c.rms_norm_eps, c.head_dim / 2);
        let [lq, lk, lv, lo, lg, lu, ld] = &a.lora;
        // MLP branch; the residual passes dy straight to x₁.
        let mut dx1 = o.copy(dy)?;
        let ds = self.linear_backward(&b.ffn_down, &a.s, ld.as_ref(), dy, rows, None, grads)?;
        let (dgate, dup) = o.swiglu_backward(&ds, &a.gate, &a.up)?;
        drop(ds);
        let dh2 = self.linear_backward(&b.ffn_gate, &a.h2, lg.as_ref(), &dgate, rows, None, grads)?;
        let dh2 = self.linear_backward(&b.ffn_up, &a.h2, lu.as_ref(), &dup, rows, Some(dh2), grads)?;
        let mut dg2 = self.norm_grad(b.ffn_norm, d)?;
        o.rmsnorm_backward(&a.x1, self.w(b.ffn_norm), &dh2, &a.rstd2, rows, eps, true, &mut dx1, dg2.as_mut())?;
        grads[b.ffn_norm] = dg2.map(Grad::Stat);
        // Attention branch; the residual passes dx₁ to x.
        let mut dx = o.copy(&dx1)?;
        let dctx = self.linear_backward(&b.attn_output, &a.ctx, lo.as_ref(), &dx1, rows, None, grads)?;
        let (mut dq, mut dk, dv) = o.attention_backward(&a.q, &a.k, &a.v, &a.ctx, &a.lse, &dctx, shape)?;
        o.rope(&mut dq, &self.rope, half, rows, shape.seq, c.num_heads, true)?;
        o.rope(&mut dk, &self.rope, half, rows, shape.seq, c.num_kv_heads, true)?;
        let dh1 = self.linear_backward(&b.attn_q, &a.h1, lq.as_ref(), &dq, rows, None, grads)?;
        let dh1 = self.linear_backward(&b.attn_k, &a.h1, lk.as_ref(), &dk, rows, Some(dh1), grads)?;
        let dh1 = self.linear_backward(&b.attn_v, &a.h1, lv.as_ref(), &dv, rows, Some(dh1), grads)?;
        let mut dg1 = self.norm_grad(b.attn_norm, d)?;
        o.rmsnorm_backward(&a.x, self.w(b.attn_norm), &dh1, &a.rstd1, rows, eps, true, &mut dx, dg1.as_mut())?;
        grads[b.attn_norm] = dg1.map(Grad::Stat);
        Ok(dx)
    }

    /// One optimizer step over every parameter with a gradient: the global gradient norm and the
    /// clipping factor are computed on the device, then AdamW at `lr` (skipped on a non-finite
    /// norm). Queues the work; [`Llama::finish`] reads the norm back.
    pub fn apply(&mut self, grads: Vec<Option<Grad<O>>>, lr: f32) -> Result<Applied<O>> {
        let mut sumsq = self.ops.stat_zeros(1)?;
        for g in grads.iter().flatten() {
            self.ops.sum_squares(g.as_ref(), &mut sumsq)?;
        }
        let clip = self.ops.clip_factor(&sumsq, self.max_grad_norm)?;
        self.step += 1;
        let Some(adamw) = &self.adamw else { bail!("an inference model (built without an optimizer) cannot step") };
        let s = AdamWScalars::new(adamw, self.step, lr);
        let Llama { ops, params, .. } = self;
        for (p, g) in params.iter_mut().zip(&grads) {
            let (Some(g), Some(st)) = (g, p.opt.as_mut()) else { continue };
            ops.adamw(st.master.as_mut(), g.as_ref(), &mut st.m, &mut st.v, &mut p.w, &s, p.decay, &clip)?;
        }
        // The optimizer's reads are queued ahead of whatever next writes these buffers.
        self.recycle(grads);
        Ok(Applied { clip })
    }

    /// Waits for an [`Llama::apply`] and returns the gradient norm before clipping; a
    /// non-finite norm means the step was skipped (and is not counted).
    pub fn finish(&mut self, a: &Applied<O>) -> Result<f32> {
        let c = self.ops.download_stat(&a.clip)?;
        if c[1] != 0.0 {
            self.step -= 1;
        }
        Ok(c[2])
    }

    /// The loss of a [`Llama::forward_backward`] (waits for the device).
    pub fn loss(&self, g: &StepGrads<O>) -> Result<f32> {
        let seq = self.ops.download_stat(&g.seq_logp)?;
        Ok(-seq.iter().zip(&g.seq_weights).map(|(&x, &w)| x as f64 * w as f64).sum::<f64>() as f32)
    }

    /// A full step: forward, backward, AdamW at `lr`; returns the loss (read after the optimizer
    /// is queued, the step's only wait).
    pub fn train_step(&mut self, inputs: &[u32], targets: &[u32], batch: usize, lr: f32) -> Result<f32> {
        let mut g = self.forward_backward(inputs, targets, batch)?;
        let applied = self.apply(std::mem::take(&mut g.grads), lr)?;
        let loss = self.loss(&g)?;
        self.finish(&applied)?;
        Ok(loss)
    }

    /// Copies the fp32 master weights of the trainable tensors back into `params` (by name), e.g.
    /// for a checkpoint or for generating on the host.
    pub fn download_into(&self, params: &mut ParamSet) -> Result<()> {
        for p in &self.params {
            let Some(st) = &p.opt else { continue };
            let id =
                params.id(&p.name).ok_or_else(|| anyhow::anyhow!("no parameter `{}` to copy back into", p.name))?;
            let v = match &st.master {
                Some(master) => self.ops.download_stat(master)?,
                None => self.ops.download(&p.w)?,
            };
            if v.len() != params[id].value.len() {
                bail!(
                    "parameter `{}` has {} values on the device and {} on the host",
                    p.name,
                    v.len(),
                    params[id].value.len()
                );
            }
            params[id].value = v;
        }
        Ok(())
    }

    /// The optimizer state (step count and moments by name), as `train::AdamW` keeps it: what a
    /// checkpoint saves.
    pub fn optimizer_state(&self) -> Result<AdamWState> {
        let mut moments = std::collections::BTreeMap::new();
        for p in &self.params {
            if let Some(st) = &p.opt {
                let (m, v) = (self.ops.download_stat(&st.m)?, self.ops.download_stat(&st.v)?);
                moments.insert(p.name.clone(), Moments { m, v });
            }
        }
        Ok(AdamWState { step: self.step, moments })
    }

    /// Restores [`Llama::optimizer_state`] (a resumed run; the weights come through
    /// `params` at construction). A trainable tensor without saved moments starts from zero.
    pub fn restore_optimizer(&mut self, state: &AdamWState) -> Result<()> {
        for p in &mut self.params {
            let (Some(st), Some(saved)) = (p.opt.as_mut(), state.moments.get(&p.name)) else { continue };
            if saved.m.len() != p.numel || saved.v.len() != p.numel {
                bail!("optimizer state of `{}` has {} values, the tensor {}", p.name, saved.m.len(), p.numel);
            }
            st.m = self.ops.upload_stat(&saved.m)?;
            st.v = self.ops.upload_stat(&saved.v)?;
        }
        self.step = state.step;
        Ok(())
    }

    /// A gradient as host floats.
    pub fn download_grad(&self, g: &Grad<O>) -> Result<Vec<f32>> {
        match g {
            Grad::Buf(b) => self.ops.download(b),
            Grad::Stat(s) => self.ops.download_stat(s),
        }
    }
}

/// `dW [out, in] = dyᵀ·x` over `rows` rows.
pub fn weight_grad(out_f: usize, in_f: usize, rows: usize) -> GemmSpec {
    GemmSpec { trans_a: true, ..GemmSpec::nn(out_f, in_f, rows) }
}

#[cfg(test)]
mod tests;
