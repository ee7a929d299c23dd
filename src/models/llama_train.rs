//! LLaMA with gradients, for SFE and E-DPO: the decoder of [`super::llama::Llama`], but with its
//! weights in a [`ParamSet`] under the GGUF tensor names and every op's backward chained, so a loss
//! reaches the weights and the input embeddings (which the SAGE model builds from image, fact and
//! text tokens).
//!
//! `Finetune::Full` trains every tensor. `Finetune::Lora` freezes them (no gradient memory) and
//! trains low-rank adapters on the chosen linear layers, `y = x·Wᵀ + (alpha/rank)·(x·Aᵀ)·Bᵀ`, with
//! `B` starting at zero so that step 0 is exactly the base model.
//!
//! The forward calls the same op functions in the same order as the inference model, so the two
//! agree to rounding on the same weights (tested on SmolLM2). The backward recomputes attention
//! probabilities (as the op does) and keeps per block only the activations its ops need, about
//! 8.5k floats per token per block at SmolLM2 size. Logits are computed only at the rows that
//! carry a target: `[T, V]` at V = 49k would dwarf everything else.

use super::llama::{LlamaConfig, Sampler, Sampling};
use super::WeightSource;
use crate::ops::activation::{swiglu_backward, swiglu_forward};
use crate::ops::attention::{attention, attention_backward, AttnShape, Mask};
use crate::ops::embedding::embedding_backward;
use crate::ops::gemm::{sgemm, MatRef};
use crate::ops::loss::{cross_entropy_, IGNORE};
use crate::ops::matmul::{linear_backward, linear_forward};
use crate::ops::norm::{rms_norm_backward, rms_norm_rows};
use crate::ops::rope::RopeTable;
use crate::tensor::{DType, Tensor};
use crate::train::{ParamId, ParamSet, SeedRng};
use crate::user_bail;
use anyhow::Result;
use rayon::prelude::*;
use std::collections::BTreeMap;

/// The linear layers of a block in checkpoint order: the names LoRA `targets` may use.
pub const LINEAR_NAMES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// What the optimizer may change.
#[derive(Clone, Debug, PartialEq)]
pub enum Finetune {
    /// Every tensor is trainable.
    Full,
    /// Base weights frozen; adapters `blk.N.<target>.lora_a` `[rank, in]` and `.lora_b`
    /// `[out, rank]` on each target in [`LINEAR_NAMES`], scaled by `alpha / rank`.
    Lora { rank: usize, alpha: f32, targets: Vec<String> },
}

/// A low-rank adapter beside a frozen weight: adds `scale · B·A` to it.
#[derive(Clone, Copy, Debug)]
pub struct LoraAdapter {
    pub lora_a: ParamId,
    pub lora_b: ParamId,
    pub rank: usize,
    pub scale: f32,
}

/// `blk.N.<name>.weight` `[out, in]`: a bias-free linear layer, optionally with an adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: ParamId,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// `y[rows, out] = x·Wᵀ (+ scale·(x·Aᵀ)·Bᵀ)`, overwriting `y`. Returns the adapter's hidden
    /// `scale·x·Aᵀ` `[rows, rank]`, which the backward needs.
    fn forward(&self, ps: &ParamSet, x: &[f32], rows: usize, y: &mut [f32]) -> Option<Vec<f32>> {
        linear_forward(y, x, &ps[self.weight].value, None, rows, self.in_features, self.out_features);
        let l = self.lora.as_ref()?;
        let mut u = vec![0.0; rows * l.rank];
        linear_forward(&mut u, x, &ps[l.lora_a].value, None, rows, self.in_features, l.rank);
        u.iter_mut().for_each(|v| *v *= l.scale);
        // Accumulate into y: with B = 0 this adds exact zeros, so an untrained adapter leaves the
        // base model's output bit for bit.
        let b = MatRef::transposed(&ps[l.lora_b].value, l.rank);
        sgemm(rows, self.out_features, l.rank, MatRef::rows(&u, l.rank), b, y, true);
        Some(u)
    }

    /// Backward of [`Linear::forward`]: `dx += dy·W'`; weight and adapter gradients accumulate
    /// where trainable.
    fn backward(&self, ps: &mut ParamSet, x: &[f32], u: Option<&[f32]>, dy: &[f32], dx: &mut [f32], rows: usize) {
        let (in_f, out_f) = (self.in_features, self.out_features);
        let (w, dw) = ps[self.weight].value_and_grad();
        linear_backward(Some(&mut *dx), dw, None, dy, x, w, rows, in_f, out_f);
        if let Some(l) = &self.lora {
            let u = u.expect("an adapter's forward saves its hidden");
            let [a, b] = ps.many_mut([l.lora_a, l.lora_b]);
            let (bv, db) = b.value_and_grad();
            let mut du = vec![0.0; rows * l.rank];
            linear_backward(Some(&mut du), db, None, dy, u, bv, rows, l.rank, out_f);
            du.iter_mut().for_each(|v| *v *= l.scale);
            let (av, da) = a.value_and_grad();
            linear_backward(Some(dx), da, None, &du, x, av, rows, in_f, l.rank);
        }
    }

    /// The effective weight `W + scale·B·A` `[out, in]`.
    fn merged(&self, ps: &ParamSet) -> Vec<f32> {
        let mut w = ps[self.weight].value.clone();
        if let Some(l) = &self.lora {
            let b: Vec<f32> = ps[l.lora_b].value.iter().map(|v| v * l.scale).collect();
            let a = MatRef::rows(&ps[l.lora_a].value, self.in_features);
            sgemm(self.out_features, self.in_features, l.rank, MatRef::rows(&b, l.rank), a, &mut w, true);
        }
        w
    }
}

/// `blk.N`
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: ParamId,
    pub attn_q: Linear,
    pub attn_k: Linear,
    pub attn_v: Linear,
    pub attn_output: Linear,
    pub ffn_norm: ParamId,
    pub ffn_gate: Linear,
    pub ffn_up: Linear,
    pub ffn_down: Linear,
}

impl Block {
    /// The linear layers, in [`LINEAR_NAMES`] order.
    pub fn linears(&self) -> [&Linear; 7] {
        [&self.attn_q, &self.attn_k, &self.attn_v, &self.attn_output, &self.ffn_gate, &self.ffn_up, &self.ffn_down]
    }
}

// Indices into `BlockActs::lora`, in [`LINEAR_NAMES`] order.
const Q: usize = 0;
const K: usize = 1;
const V: usize = 2;
const O: usize = 3;
const GATE: usize = 4;
const UP: usize = 5;
const DOWN: usize = 6;

/// Keys (after RoPE) and values `[S, H_kv·D]` of every layer for the positions seen so far.
#[derive(Default)]
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
}

/// What one block's backward needs from its forward (its keys and values are in the cache).
struct BlockActs {
    /// The block input (the residual stream).
    x: Vec<f32>,
    h1: Vec<f32>,
    /// Queries after RoPE.
    q: Vec<f32>,
    /// Attention output, before `attn_output`.
    ctx: Vec<f32>,
    x1: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `silu(gate)·up`, the input of `ffn_down`.
    s: Vec<f32>,
    /// Each adapter's hidden `scale·x·Aᵀ`, where the layer has one.
    lora: [Option<Vec<f32>>; 7],
}

/// [`TrainableLlama::attn_in`]'s outputs.
struct AttnIn {
    h1: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    lora: [Option<Vec<f32>>; 3],
}

/// [`TrainableLlama::attn_out_mlp`]'s outputs.
struct MlpOut {
    y: Vec<f32>,
    x1: Vec<f32>,
    h2: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    s: Vec<f32>,
    lora: [Option<Vec<f32>>; 4],
}

/// Saved activations of one [`TrainableLlama::forward`].
pub struct Activations {
    t: usize,
    blocks: Vec<BlockActs>,
    kv: KvCache,
    /// The residual stream after the last block, before `output_norm`.
    x_out: Vec<f32>,
}

impl Activations {
    /// Number of positions the forward ran over.
    pub fn seq_len(&self) -> usize {
        self.t
    }
}

pub struct TrainableLlama {
    pub config: LlamaConfig,
    pub finetune: Finetune,
    pub token_embd: ParamId,
    pub blocks: Vec<Block>,
    pub output_norm: ParamId,
    /// The LM head: `output.weight` when the checkpoint has one, else `token_embd` (tied, as in
    /// SmolLM2).
    pub output: ParamId,
    rope: RopeTable,
}

impl TrainableLlama {
    /// Registers every weight into `params` under its GGUF name (`token_embd.weight`,
    /// `blk.{i}.attn_q.weight`, ..., `output_norm.weight`). Full: all trainable. LoRA: base weights
    /// frozen; adapters `blk.{i}.{target}.lora_a` `[rank, in]` drawn uniform in `±1/√in` from `rng`
    /// (PyTorch's Kaiming-uniform with `a = √5`, as PEFT initialises A) and `.lora_b` `[out, rank]`
    /// zero, both trainable.
    pub fn load(
        weights: &dyn WeightSource,
        config: LlamaConfig,
        finetune: &Finetune,
        params: &mut ParamSet,
        rng: &mut SeedRng,
    ) -> Result<Self> {
        if let Finetune::Lora { rank, alpha, targets } = finetune {
            if *rank == 0 || !alpha.is_finite() {
                user_bail!("LoRA needs rank ≥ 1 and a finite alpha, got rank {rank}, alpha {alpha}");
            }
            if targets.is_empty() {
                user_bail!("LoRA without targets trains nothing; choose from {}", LINEAR_NAMES.join(", "));
            }
            if let Some(bad) = targets.iter().find(|t| !LINEAR_NAMES.contains(&t.as_str())) {
                user_bail!("unknown LoRA target `{bad}`; choose from {}", LINEAR_NAMES.join(", "));
            }
        }
        let c = &config;
        let full = matches!(finetune, Finetune::Full);
        let tensor = |params: &mut ParamSet, name: &str, shape: &[usize]| -> Result<ParamId> {
            let t = weights.get(name)?;
            if t.shape() != shape {
                user_bail!("tensor `{name}` has shape {:?}, the config says {shape:?}", t.shape());
            }
            params.register(name, &t, full)
        };
        let (d, qd, kvd) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let token_embd = tensor(params, "token_embd.weight", &[c.vocab_size, d])?;
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let mut linear = |params: &mut ParamSet, name: &str, out_f: usize, in_f: usize| -> Result<Linear> {
                let prefix = format!("blk.{i}.{name}");
                let weight = tensor(params, &format!("{prefix}.weight"), &[out_f, in_f])?;
                let lora = match finetune {
                    Finetune::Lora { rank, alpha, targets } if targets.iter().any(|t| t == name) => {
                        let bound = 1.0 / (in_f as f32).sqrt();
                        let a = rng.uniform(rank * in_f, -bound, bound);
                        let lora_a = params.add(format!("{prefix}.lora_a"), &[*rank, in_f], a, true)?;
                        let b = vec![0.0; out_f * rank];
                        let lora_b = params.add(format!("{prefix}.lora_b"), &[out_f, *rank], b, true)?;
                        Some(LoraAdapter { lora_a, lora_b, rank: *rank, scale: alpha / *rank as f32 })
                    }
                    _ => None,
                };
                Ok(Linear { weight, in_features: in_f, out_features: out_f, lora })
            };
            let attn_norm = tensor(params, &format!("blk.{i}.attn_norm.weight"), &[d])?;
            let attn_q = linear(params, "attn_q", qd, d)?;
            let attn_k = linear(params, "attn_k", kvd, d)?;
            let attn_v = linear(params, "attn_v", kvd, d)?;
            let attn_output = linear(params, "attn_output", d, qd)?;
            let ffn_norm = tensor(params, &format!("blk.{i}.ffn_norm.weight"), &[d])?;
            let ffn_gate = linear(params, "ffn_gate", c.intermediate_size, d)?;
            let ffn_up = linear(params, "ffn_up", c.intermediate_size, d)?;
            let ffn_down = linear(params, "ffn_down", d, c.intermediate_size)?;
            blocks.push(Block { attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down });
        }
        let output_norm = tensor(params, "output_norm.weight", &[d])?;
        let output = if weights.contains("output.weight") {
            tensor(params, "output.weight", &[c.vocab_size, d])?
        } else {
            token_embd
        };
        // Every position the model can take: sin/cos are computed per position, so the values do
        // not depend on the table's length (the inference model's shorter table agrees).
        let rope = RopeTable::new(c.head_dim, c.rope_theta, c.context_length);
        Ok(TrainableLlama { config, finetune: finetune.clone(), token_embd, blocks, output_norm, output, rope })
    }

    /// The RoPE table (every position the model can take).
    pub fn rope_table(&self) -> &RopeTable {
        &self.rope
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Most positions a sequence (prompt plus generated tokens) may have.
    pub fn max_positions(&self) -> usize {
        self.rope.max_pos()
    }

    /// Every parameter this model registered (base weights and adapters), in registration order.
    pub fn param_ids(&self) -> Vec<ParamId> {
        let mut ids = vec![self.token_embd];
        for b in &self.blocks {
            ids.push(b.attn_norm);
            ids.push(b.ffn_norm);
            for l in b.linears() {
                ids.push(l.weight);
                if let Some(a) = &l.lora {
                    ids.extend([a.lora_a, a.lora_b]);
                }
            }
        }
        ids.push(self.output_norm);
        if self.output != self.token_embd {
            ids.push(self.output);
        }
        ids
    }

    /// Token embeddings `[ids.len(), d]` (for building mixed input sequences). Panics on an id
    /// outside the vocabulary.
    pub fn embed(&self, params: &ParamSet, ids: &[u32]) -> Vec<f32> {
        let (d, vocab) = (self.hidden_size(), self.vocab_size());
        let table = &params[self.token_embd].value;
        let mut out = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            assert!((id as usize) < vocab, "token id {id} is outside the vocabulary of {vocab}");
            out.extend_from_slice(&table[id as usize * d..(id as usize + 1) * d]);
        }
        out
    }

    /// Backward of [`TrainableLlama::embed`]: scatter-adds `d_emb` into the embedding gradient
    /// (no-op when frozen; ids equal to `u32::MAX` are skipped).
    pub fn embed_backward(&self, params: &mut ParamSet, ids: &[u32], d_emb: &[f32]) {
        assert_eq!(d_emb.len(), ids.len() * self.hidden_size(), "embed_backward: d_emb must be [ids.len(), d]");
        if let (_, Some(grad)) = params[self.token_embd].value_and_grad() {
            embedding_backward(grad, d_emb, ids, self.hidden_size());
        }
    }

    pub fn new_cache(&self) -> KvCache {
        let n = self.config.num_layers;
        KvCache { k: vec![Vec::new(); n], v: vec![Vec::new(); n], len: 0 }
    }

    /// Full causal forward over input embeddings `x[T, d]` from position 0. Returns the final
    /// hidden states after `output_norm` `[T, d]` and what [`TrainableLlama::backward`] needs.
    /// Panics unless `x` is `[T, d]` with `1 ≤ T ≤` [`TrainableLlama::max_positions`].
    pub fn forward(&self, params: &ParamSet, x: &[f32], t: usize) -> (Vec<f32>, Activations) {
        if let Err(e) = self.check_input(x, t, 0) {
            panic!("TrainableLlama::forward: {e}");
        }
        let mut kv = self.new_cache();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        let x_out = self.decode(params, x.to_vec(), t, &mut kv, Some(&mut blocks));
        let hidden = self.final_norm(params, &x_out);
        (hidden, Activations { t, blocks, kv, x_out })
    }

    /// Runs `x[T, d]` (the next T positions) through the decoder without saving activations,
    /// appending to `cache`; returns the hidden states after `output_norm` `[T, d]`.
    pub fn forward_cached(&self, params: &ParamSet, x: &[f32], t: usize, cache: &mut KvCache) -> Result<Vec<f32>> {
        self.check_input(x, t, cache.len)?;
        let x_out = self.decode(params, x.to_vec(), t, cache, None);
        Ok(self.final_norm(params, &x_out))
    }

    fn check_input(&self, x: &[f32], t: usize, start: usize) -> Result<()> {
        let d = self.hidden_size();
        if t == 0 || x.len() != t * d {
            user_bail!("the input must be [T, {d}] embeddings with T ≥ 1, got {} values for T = {t}", x.len());
        }
        if start + t > self.max_positions() {
            user_bail!(
                "the sequence needs {} positions but the model has {}; shorten the input",
                start + t,
                self.max_positions()
            );
        }
        Ok(())
    }

    fn final_norm(&self, params: &ParamSet, x: &[f32]) -> Vec<f32> {
        let mut h = vec![0.0; x.len()];
        rms_norm_rows(x, &params[self.output_norm].value, self.config.rms_norm_eps, &mut h);
        h
    }

    /// All blocks over `x[T, d]` at positions `cache.len..`; returns the residual stream after
    /// the last block and pushes each block's activations to `saved` when given.
    fn decode(
        &self,
        params: &ParamSet,
        mut x: Vec<f32>,
        t: usize,
        cache: &mut KvCache,
        mut saved: Option<&mut Vec<BlockActs>>,
    ) -> Vec<f32> {
        let start = cache.len;
        for (i, blk) in self.blocks.iter().enumerate() {
            let (k, v) = (&mut cache.k[i], &mut cache.v[i]);
            let (y, acts) = self.block_forward(params, blk, x, t, start, k, v, saved.is_some());
            if let (Some(s), Some(a)) = (saved.as_deref_mut(), acts) {
                s.push(a);
            }
            x = y;
        }
        cache.len += t;
        x
    }

    /// One block, in the inference model's op order:
    /// `h = rms(x)·g₁; q,k,v = h·W{q,k,v}ᵀ; rope(q,k); a = causal_gqa(q,k,v); x₁ = x + a·Woᵀ;`
    /// `h₂ = rms(x₁)·g₂; y = x₁ + (silu(h₂·W_gateᵀ) ⊙ h₂·W_upᵀ)·W_downᵀ`.
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        params: &ParamSet,
        blk: &Block,
        x: Vec<f32>,
        t: usize,
        start: usize,
        k_cache: &mut Vec<f32>,
        v_cache: &mut Vec<f32>,
        save: bool,
    ) -> (Vec<f32>, Option<BlockActs>) {
        let c = &self.config;
        let qd = c.num_heads * c.head_dim;
        let mut a = self.attn_in(params, blk, &x, t);
        self.rope_(&mut a.q, c.num_heads, start);
        self.rope_(&mut a.k, c.num_kv_heads, start);
        k_cache.extend_from_slice(&a.k);
        v_cache.extend_from_slice(&a.v);
        let mut ctx = vec![0.0; t * qd];
        attention(&a.q, k_cache, v_cache, self.attn_shape(), Mask::Causal { start }, &mut ctx);
        let m = self.attn_out_mlp(params, blk, &x, &ctx, t);
        let [u_q, u_k, u_v] = a.lora;
        let [u_o, u_gate, u_up, u_down] = m.lora;
        let lora = [u_q, u_k, u_v, u_o, u_gate, u_up, u_down];
        let acts = save.then_some(BlockActs {
            x,
            h1: a.h1,
            q: a.q,
            ctx,
            x1: m.x1,
            h2: m.h2,
            gate: m.gate,
            up: m.up,
            s: m.s,
            lora,
        });
        (m.y, acts)
    }

    /// The attention input half of a block over `rows` independent rows: `h = rms(x)·g₁` and the
    /// q/k/v projections (before RoPE, which depends on each row's position).
    fn attn_in(&self, params: &ParamSet, blk: &Block, x: &[f32], rows: usize) -> AttnIn {
        let c = &self.config;
        let (d, qd, kvd) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut h1 = vec![0.0; rows * d];
        rms_norm_rows(x, &params[blk.attn_norm].value, c.rms_norm_eps, &mut h1);
        let (mut q, mut k, mut v) = (vec![0.0; rows * qd], vec![0.0; rows * kvd], vec![0.0; rows * kvd]);
        let u_q = blk.attn_q.forward(params, &h1, rows, &mut q);
        let u_k = blk.attn_k.forward(params, &h1, rows, &mut k);
        let u_v = blk.attn_v.forward(params, &h1, rows, &mut v);
        AttnIn { h1, q, k, v, lora: [u_q, u_k, u_v] }
    }

    /// The rest of a block over `rows` independent rows, from the attention output `ctx`:
    /// `x₁ = x + ctx·Woᵀ`, then the MLP and its residual.
    fn attn_out_mlp(&self, params: &ParamSet, blk: &Block, x: &[f32], ctx: &[f32], rows: usize) -> MlpOut {
        let c = &self.config;
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let mut x1 = vec![0.0; rows * d];
        let u_o = blk.attn_output.forward(params, ctx, rows, &mut x1);
        add_(&mut x1, x);
        let mut h2 = vec![0.0; rows * d];
        rms_norm_rows(&x1, &params[blk.ffn_norm].value, c.rms_norm_eps, &mut h2);
        let (mut gate, mut up, mut s) = (vec![0.0; rows * f], vec![0.0; rows * f], vec![0.0; rows * f]);
        let u_gate = blk.ffn_gate.forward(params, &h2, rows, &mut gate);
        let u_up = blk.ffn_up.forward(params, &h2, rows, &mut up);
        swiglu_forward(&mut s, &gate, &up);
        let mut y = vec![0.0; rows * d];
        let u_down = blk.ffn_down.forward(params, &s, rows, &mut y);
        add_(&mut y, &x1);
        MlpOut { y, x1, h2, gate, up, s, lora: [u_o, u_gate, u_up, u_down] }
    }

    /// One decode step for several sequences at once: row `b` of `x [B, d]` is the next token of
    /// sequence `b`, at position `caches[b].len`. The linear layers run as one `[B, ·]` GEMM, so a
    /// weight is read once per step rather than once per sequence; RoPE and attention run per
    /// sequence over its own cache. Returns the hidden states after `output_norm` `[B, d]`.
    pub fn decode_step_batch(&self, params: &ParamSet, x: &[f32], caches: &mut [KvCache]) -> Result<Vec<f32>> {
        let (c, d, bsz) = (&self.config, self.hidden_size(), caches.len());
        if bsz == 0 || x.len() != bsz * d {
            user_bail!("decode_step_batch: x must be [{bsz}, {d}], got {} values", x.len());
        }
        if let Some(full) = caches.iter().find(|k| k.len + 1 > self.max_positions()) {
            user_bail!("a sequence already fills all {} positions of the model", full.len);
        }
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut x = x.to_vec();
        for (i, blk) in self.blocks.iter().enumerate() {
            let mut a = self.attn_in(params, blk, &x, bsz);
            let mut ctx = vec![0.0; bsz * qd];
            for (b, cache) in caches.iter_mut().enumerate() {
                let (q, k) = (&mut a.q[b * qd..(b + 1) * qd], &mut a.k[b * kvd..(b + 1) * kvd]);
                self.rope.apply_pairs_(q, c.num_heads, cache.len);
                self.rope.apply_pairs_(k, c.num_kv_heads, cache.len);
                cache.k[i].extend_from_slice(k);
                cache.v[i].extend_from_slice(&a.v[b * kvd..(b + 1) * kvd]);
                let mask = Mask::Causal { start: cache.len };
                attention(q, &cache.k[i], &cache.v[i], self.attn_shape(), mask, &mut ctx[b * qd..(b + 1) * qd]);
            }
            x = self.attn_out_mlp(params, blk, &x, &ctx, bsz).y;
        }
        caches.iter_mut().for_each(|k| k.len += 1);
        Ok(self.final_norm(params, &x))
    }

    /// Backward of one block given `dy` (gradient of its output); returns the gradient of its input.
    fn block_backward(
        &self,
        params: &mut ParamSet,
        blk: &Block,
        a: &BlockActs,
        kv: (&[f32], &[f32]),
        dy: &[f32],
    ) -> Vec<f32> {
        let c = &self.config;
        let (d, f, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let t = a.x.len() / d;
        let u = |i: usize| a.lora[i].as_deref();
        // MLP branch; the residual passes dy straight to x₁.
        let mut dx1 = dy.to_vec();
        let mut ds = vec![0.0; t * f];
        blk.ffn_down.backward(params, &a.s, u(DOWN), dy, &mut ds, t);
        let (mut dgate, mut dup) = (vec![0.0; t * f], vec![0.0; t * f]);
        swiglu_backward(&mut dgate, &mut dup, &ds, &a.gate, &a.up);
        drop(ds);
        let mut dh2 = vec![0.0; t * d];
        blk.ffn_gate.backward(params, &a.h2, u(GATE), &dgate, &mut dh2, t);
        blk.ffn_up.backward(params, &a.h2, u(UP), &dup, &mut dh2, t);
        let (g2, dg2) = params[blk.ffn_norm].value_and_grad();
        rms_norm_backward(&mut dx1, dg2, &dh2, &a.x1, g2, eps);
        // Attention branch; the residual passes dx₁ to x.
        let mut dx = dx1.clone();
        let mut dctx = vec![0.0; t * qd];
        blk.attn_output.backward(params, &a.ctx, u(O), &dx1, &mut dctx, t);
        let (mut dq, mut dk, mut dv) = (vec![0.0; t * qd], vec![0.0; t * kvd], vec![0.0; t * kvd]);
        let (k, v) = kv;
        attention_backward(&mut dq, &mut dk, &mut dv, &dctx, &a.q, k, v, self.attn_shape(), Mask::Causal { start: 0 });
        self.rope.apply_pairs_backward_(&mut dq, c.num_heads, 0);
        self.rope.apply_pairs_backward_(&mut dk, c.num_kv_heads, 0);
        let mut dh1 = vec![0.0; t * d];
        blk.attn_q.backward(params, &a.h1, u(Q), &dq, &mut dh1, t);
        blk.attn_k.backward(params, &a.h1, u(K), &dk, &mut dh1, t);
        blk.attn_v.backward(params, &a.h1, u(V), &dv, &mut dh1, t);
        let (g1, dg1) = params[blk.attn_norm].value_and_grad();
        rms_norm_backward(&mut dx, dg1, &dh1, &a.x, g1, eps);
        dx
    }

    fn attn_shape(&self) -> AttnShape {
        let c = &self.config;
        AttnShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim }
    }

    /// RoPE over `x[T, heads, D]` from position `start`, in parallel over token chunks (the op
    /// itself is serial).
    fn rope_(&self, x: &mut [f32], heads: usize, start: usize) {
        const TOKENS: usize = 16;
        let row = heads * self.config.head_dim;
        x.par_chunks_mut(TOKENS * row)
            .enumerate()
            .for_each(|(i, chunk)| self.rope.apply_pairs_(chunk, heads, start + i * TOKENS));
    }

    /// Backward through the decoder from `d_hidden` (gradient of the hidden states `forward`
    /// returned, `[T, d]`): accumulates weight gradients (trainable parameters only) and returns
    /// the gradient of the input embeddings `[T, d]`.
    pub fn backward(&self, params: &mut ParamSet, acts: &Activations, d_hidden: &[f32]) -> Vec<f32> {
        let d = self.hidden_size();
        assert_eq!(d_hidden.len(), acts.t * d, "backward: d_hidden must be [T, d] for the forward's T");
        let mut dx = vec![0.0; acts.t * d];
        let (g, dg) = params[self.output_norm].value_and_grad();
        rms_norm_backward(&mut dx, dg, d_hidden, &acts.x_out, g, self.config.rms_norm_eps);
        for (i, blk) in self.blocks.iter().enumerate().rev() {
            dx = self.block_backward(params, blk, &acts.blocks[i], (&acts.kv.k[i], &acts.kv.v[i]), &dx);
        }
        dx
    }

    /// Logits `[rows.len(), V]` at the given positions of `hidden[T, d]`.
    pub fn logits(&self, params: &ParamSet, hidden: &[f32], rows: &[usize]) -> Vec<f32> {
        let (d, vocab) = (self.hidden_size(), self.vocab_size());
        let h = gather_rows(hidden, rows, d);
        let mut out = vec![0.0; rows.len() * vocab];
        linear_forward(&mut out, &h, &params[self.output].value, None, rows.len(), d, vocab);
        out
    }

    /// Backward of [`TrainableLlama::logits`]: adds `dW` into the LM head's (the tied
    /// embedding's) gradient when trainable and returns `d_hidden[T, d]`, zero at rows not listed.
    pub fn logits_backward(
        &self,
        params: &mut ParamSet,
        hidden: &[f32],
        rows: &[usize],
        dlogits: &[f32],
        t: usize,
    ) -> Vec<f32> {
        let (d, vocab) = (self.hidden_size(), self.vocab_size());
        assert_eq!(dlogits.len(), rows.len() * vocab, "logits_backward: dlogits must be [rows.len(), V]");
        let h = gather_rows(hidden, rows, d);
        let mut dh = vec![0.0; rows.len() * d];
        let (w, dw) = params[self.output].value_and_grad();
        linear_backward(Some(&mut dh), dw, None, dlogits, &h, w, rows.len(), d, vocab);
        let mut d_hidden = vec![0.0; t * d];
        for (&r, g) in rows.iter().zip(dh.chunks_exact(d)) {
            d_hidden[r * d..(r + 1) * d].iter_mut().zip(g).for_each(|(a, b)| *a += b);
        }
        d_hidden
    }

    /// Teacher-forced loss for input embeddings `x[T, d]`: `targets[i]` is the token position `i`
    /// should predict (already shifted; [`IGNORE`] = `u32::MAX` skips the position). Returns the
    /// mean cross-entropy over counted positions (0 when none), with logits computed only there.
    /// With `backward`, gradients accumulate into the trainable parameters and the gradient of
    /// `x` `[T, d]` is returned, for the caller to carry into whatever produced `x`.
    pub fn loss(
        &self,
        params: &mut ParamSet,
        x: &[f32],
        t: usize,
        targets: &[u32],
        backward: bool,
    ) -> Result<(f32, Option<Vec<f32>>)> {
        self.check_input(x, t, 0)?;
        if targets.len() != t {
            user_bail!("{} targets for a sequence of {t} positions", targets.len());
        }
        if let Some(bad) = targets.iter().find(|&&id| id != IGNORE && id as usize >= self.vocab_size()) {
            user_bail!("target token {bad} is outside the vocabulary of {}", self.vocab_size());
        }
        let rows: Vec<usize> = (0..t).filter(|&i| targets[i] != IGNORE).collect();
        if rows.is_empty() {
            return Ok((0.0, backward.then(|| vec![0.0; x.len()])));
        }
        let row_targets: Vec<u32> = rows.iter().map(|&i| targets[i]).collect();
        if !backward {
            let hidden = self.forward_cached(params, x, t, &mut self.new_cache())?;
            let mut logits = self.logits(params, &hidden, &rows);
            return Ok((cross_entropy_(&mut logits, &row_targets, self.vocab_size()).loss, None));
        }
        let (hidden, acts) = self.forward(params, x, t);
        let mut logits = self.logits(params, &hidden, &rows);
        // In place: `logits` now holds dloss/dlogits.
        let ce = cross_entropy_(&mut logits, &row_targets, self.vocab_size());
        let d_hidden = self.logits_backward(params, &hidden, &rows, &logits, t);
        drop(logits);
        Ok((ce.loss, Some(self.backward(params, &acts, &d_hidden))))
    }

    /// Decodes after the input embeddings `x[T, d]` with a KV cache and no gradients: up to
    /// `max_new` tokens, stopping before the first token in `stop_ids` (not returned) or when the
    /// positions run out. Greedy at temperature 0.
    pub fn generate(
        &self,
        params: &ParamSet,
        x: &[f32],
        t: usize,
        max_new: usize,
        stop_ids: &[u32],
        sampling: Sampling,
    ) -> Result<Vec<u32>> {
        let mut cache = self.new_cache();
        let mut sampler = Sampler::new(sampling);
        let hidden = self.forward_cached(params, x, t, &mut cache)?;
        let mut logits = self.logits(params, &hidden, &[t - 1]);
        let mut out = Vec::new();
        while out.len() < max_new {
            let next = sampler.sample(&logits);
            if stop_ids.contains(&next) {
                break;
            }
            out.push(next);
            if out.len() == max_new || cache.len + 1 > self.max_positions() {
                break;
            }
            let hidden = self.forward_cached(params, &self.embed(params, &[next]), 1, &mut cache)?;
            logits = self.logits(params, &hidden, &[0]);
        }
        Ok(out)
    }

    /// [`TrainableLlama::generate`] for several prompts at once (`(x [T, d], T)` each), with the
    /// same stopping rules per sequence: each prompt is prefilled on its own, then every decode
    /// step runs all unfinished sequences through [`TrainableLlama::decode_step_batch`]. Each
    /// sequence has its own sampler seeded as `generate` seeds it, so greedy and sampled outputs
    /// are those of `generate` (up to the summation order of a row inside a batched GEMM).
    pub fn generate_batch(
        &self,
        params: &ParamSet,
        prompts: &[(&[f32], usize)],
        max_new: usize,
        stop_ids: &[u32],
        sampling: Sampling,
    ) -> Result<Vec<Vec<u32>>> {
        let n = prompts.len();
        let mut outs = vec![Vec::new(); n];
        if max_new == 0 {
            return Ok(outs);
        }
        let vocab = self.vocab_size();
        let mut caches: Vec<KvCache> = (0..n).map(|_| self.new_cache()).collect();
        let mut samplers: Vec<Sampler> = (0..n).map(|_| Sampler::new(sampling)).collect();
        let mut next = vec![0u32; n];
        let mut active = Vec::new();
        // Records a sampled token; true while the sequence goes on.
        let take = |b: usize, tok: u32, outs: &mut Vec<Vec<u32>>, cache: &KvCache| -> bool {
            if stop_ids.contains(&tok) {
                return false;
            }
            outs[b].push(tok);
            outs[b].len() < max_new && cache.len < self.max_positions()
        };
        for (b, &(x, t)) in prompts.iter().enumerate() {
            let hidden = self.forward_cached(params, x, t, &mut caches[b])?;
            let tok = samplers[b].sample(&self.logits(params, &hidden, &[t - 1]));
            if take(b, tok, &mut outs, &caches[b]) {
                next[b] = tok;
                active.push(b);
            }
        }
        while !active.is_empty() {
            let ids: Vec<u32> = active.iter().map(|&b| next[b]).collect();
            let x = self.embed(params, &ids);
            let mut batch: Vec<KvCache> = active.iter().map(|&b| std::mem::take(&mut caches[b])).collect();
            let hidden = self.decode_step_batch(params, &x, &mut batch);
            for (&b, cache) in active.iter().zip(batch) {
                caches[b] = cache;
            }
            let hidden = hidden?;
            let rows: Vec<usize> = (0..active.len()).collect();
            let logits = self.logits(params, &hidden, &rows);
            let mut still = Vec::with_capacity(active.len());
            for (j, &b) in active.iter().enumerate() {
                let tok = samplers[b].sample(&logits[j * vocab..(j + 1) * vocab]);
                if take(b, tok, &mut outs, &caches[b]) {
                    next[b] = tok;
                    still.push(b);
                }
            }
            active = still;
        }
        Ok(outs)
    }

    /// The weights for saving under their GGUF names, with every adapter folded into its base
    /// weight (`W + alpha/rank · B·A`): a plain LLaMA checkpoint that
    /// [`super::llama::Llama::from_weights`] or `TrainableLlama::load(.., Finetune::Full, ..)` reads.
    pub fn merged_weights(&self, params: &ParamSet) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        let mut put = |id: ParamId, value: Vec<f32>| -> Result<()> {
            out.insert(params[id].name.clone(), Tensor::from_vec(value, &params[id].shape)?);
            Ok(())
        };
        put(self.token_embd, params[self.token_embd].value.clone())?;
        for b in &self.blocks {
            put(b.attn_norm, params[b.attn_norm].value.clone())?;
            put(b.ffn_norm, params[b.ffn_norm].value.clone())?;
            for l in b.linears() {
                put(l.weight, l.merged(params))?;
            }
        }
        put(self.output_norm, params[self.output_norm].value.clone())?;
        if self.output != self.token_embd {
            put(self.output, params[self.output].value.clone())?;
        }
        Ok(out)
    }

    /// Only the trainable tensors of this model under their parameter names (every weight for
    /// Full, the `lora_a`/`lora_b` adapters for LoRA): a small checkpoint to write beside the base
    /// GGUF and read back with [`TrainableLlama::load_trainable_weights`].
    pub fn trainable_weights(&self, params: &ParamSet) -> Result<BTreeMap<String, Tensor>> {
        self.param_ids()
            .into_iter()
            .filter(|&id| params[id].trainable)
            .map(|id| Ok((params[id].name.clone(), params[id].tensor())))
            .collect()
    }

    /// Overwrites this model's trainable parameters with the tensors of the same names in `src`
    /// (what [`TrainableLlama::trainable_weights`] saved). Fails on a missing tensor or a shape
    /// that differs.
    pub fn load_trainable_weights(&self, params: &mut ParamSet, src: &dyn WeightSource) -> Result<()> {
        for id in self.param_ids() {
            if !params[id].trainable {
                continue;
            }
            let name = params[id].name.clone();
            let t = src.get(&name)?;
            if t.shape() != params[id].shape {
                user_bail!("tensor `{name}` has shape {:?}, the model expects {:?}", t.shape(), params[id].shape);
            }
            params[id].value = t.to_dtype(DType::F32).into_f32s()?;
        }
        Ok(())
    }
}

/// `a += b`, in parallel (residual connections).
fn add_(a: &mut [f32], b: &[f32]) {
    a.par_iter_mut().zip(b.par_iter()).with_min_len(4096).for_each(|(x, y)| *x += y);
}

/// Rows `rows` of `x[.., d]`, stacked.
fn gather_rows(x: &[f32], rows: &[usize], d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::gguf::Gguf;
    use crate::formats::tokenizer::TextTokenizer;
    use crate::models::llama::{argmax, Llama};
    use crate::models::StateDict;
    use crate::ops::gradcheck::{assert_grad, numeric_grad, rng, uniform, Tol};
    use crate::train::{streams, AdamW, AdamWConfig};

    const D: usize = 16;
    const T: usize = 6;
    const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };

    fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 37,
            hidden_size: D,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            context_length: 32,
        }
    }

    /// Random weights under the GGUF names, for [`tiny_config`].
    fn tiny_weights(seed: u64) -> StateDict {
        let c = tiny_config();
        let (qd, kvd, f) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        let mut g = rng(seed);
        let mut tensors = BTreeMap::new();
        let mut put = |name: String, shape: &[usize], lo: f32, hi: f32| {
            let t = Tensor::from_vec(uniform(&mut g, shape.iter().product(), lo, hi), shape).unwrap();
            tensors.insert(name, t);
        };
        put("token_embd.weight".into(), &[c.vocab_size, D], -1.0, 1.0);
        for i in 0..c.num_layers {
            put(format!("blk.{i}.attn_norm.weight"), &[D], 0.5, 1.5);
            put(format!("blk.{i}.attn_q.weight"), &[qd, D], -0.5, 0.5);
            put(format!("blk.{i}.attn_k.weight"), &[kvd, D], -0.5, 0.5);
            put(format!("blk.{i}.attn_v.weight"), &[kvd, D], -0.5, 0.5);
            put(format!("blk.{i}.attn_output.weight"), &[D, qd], -0.5, 0.5);
            put(format!("blk.{i}.ffn_norm.weight"), &[D], 0.5, 1.5);
            put(format!("blk.{i}.ffn_gate.weight"), &[f, D], -0.5, 0.5);
            put(format!("blk.{i}.ffn_up.weight"), &[f, D], -0.5, 0.5);
            put(format!("blk.{i}.ffn_down.weight"), &[D, f], -0.5, 0.5);
        }
        put("output_norm.weight".into(), &[D], 0.5, 1.5);
        StateDict { path: "tiny".into(), tensors }
    }

    fn load(w: &dyn WeightSource, config: LlamaConfig, finetune: &Finetune) -> (TrainableLlama, ParamSet) {
        let mut ps = ParamSet::new();
        let m = TrainableLlama::load(w, config, finetune, &mut ps, &mut SeedRng::new(5, streams::INIT)).unwrap();
        (m, ps)
    }

    fn lora(rank: usize, targets: &[&str]) -> Finetune {
        Finetune::Lora { rank, alpha: 2.0 * rank as f32, targets: targets.iter().map(|s| s.to_string()).collect() }
    }

    /// Gives every `lora_b` random values, so adapters have an effect and A gets gradient.
    fn randomise_lora_b(ps: &mut ParamSet, seed: u64) {
        let mut g = rng(seed);
        for p in ps.iter_mut().filter(|p| p.name.ends_with(".lora_b")) {
            p.value = uniform(&mut g, p.numel(), -0.5, 0.5);
        }
    }

    const IDS: [u32; T] = [3, 17, 36, 0, 9, 17];
    const TARGETS: [u32; T] = [IGNORE, 36, 0, IGNORE, 17, 4];
    // Mean cross-entropy of a 2-layer f32 model, central differences with ε = 1e-2: the f32
    // rounding of the loss (≈4e-7) over 2ε is ≈2e-5 and the truncation error O(ε²) ≈1e-4, so
    // 3e-4 absolute plus 1 % relative leaves room without hiding a wrong term.
    const TOL: Tol = Tol { atol: 3e-4, rtol: 1e-2 };

    /// Analytic gradients of `loss(backward = true)` (input and the named parameters) against
    /// central differences, with the input built by `embed` so the tied embedding sees both uses.
    fn gradcheck(m: &TrainableLlama, ps: &mut ParamSet, names: &[&str]) {
        let x = m.embed(ps, &IDS);
        let (loss, dx) = m.loss(ps, &x, T, &TARGETS, true).unwrap();
        let dx = dx.unwrap();
        m.embed_backward(ps, &IDS, &dx);
        let mut probe = ps.clone();
        let no_grad = m.loss(&mut probe, &x, T, &TARGETS, false).unwrap().0;
        assert_eq!(loss, no_grad, "the loss does not depend on `backward`");
        let numeric = numeric_grad(&x, 1e-2, |x| m.loss(&mut probe, x, T, &TARGETS, false).unwrap().0 as f64);
        assert_grad("x", &dx, &numeric, TOL);
        for name in names {
            let id = ps.id(name).unwrap_or_else(|| panic!("no parameter {name}"));
            let numeric = numeric_grad(&ps[id].value, 1e-2, |v| {
                probe[id].value.copy_from_slice(v);
                let x = m.embed(&probe, &IDS);
                m.loss(&mut probe, &x, T, &TARGETS, false).unwrap().0 as f64
            });
            probe[id].value.copy_from_slice(&ps[id].value);
            assert_grad(name, &ps[id].grad, &numeric, TOL);
        }
    }

    #[test]
    fn llama_train_full_loss_backward_matches_finite_differences_grad() {
        let (m, mut ps) = load(&tiny_weights(1), tiny_config(), &Finetune::Full);
        let names = [
            "token_embd.weight",
            "blk.0.attn_norm.weight",
            "blk.0.attn_q.weight",
            "blk.0.attn_k.weight",
            "blk.0.ffn_up.weight",
            "blk.1.attn_v.weight",
            "blk.1.attn_output.weight",
            "blk.1.ffn_norm.weight",
            "blk.1.ffn_gate.weight",
            "blk.1.ffn_down.weight",
            "output_norm.weight",
        ];
        gradcheck(&m, &mut ps, &names);
    }

    #[test]
    fn llama_train_lora_backward_matches_finite_differences_grad() {
        let (m, mut ps) = load(&tiny_weights(2), tiny_config(), &lora(3, &LINEAR_NAMES));
        randomise_lora_b(&mut ps, 3);
        let mut names = Vec::new();
        for (i, t) in
            [(0, "attn_q"), (0, "attn_v"), (0, "ffn_gate"), (1, "attn_k"), (1, "attn_output"), (1, "ffn_down")]
        {
            names.push(format!("blk.{i}.{t}.lora_a"));
            names.push(format!("blk.{i}.{t}.lora_b"));
        }
        names.push("blk.1.ffn_up.lora_b".into());
        gradcheck(&m, &mut ps, &names.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(ps.iter().filter(|p| !p.name.contains(".lora_")).all(|p| p.grad.is_empty()));
    }

    #[test]
    fn llama_train_lora_with_zero_b_is_exactly_the_base_model() {
        let w = tiny_weights(4);
        let (base, mut base_ps) = load(&w, tiny_config(), &Finetune::Full);
        let (adapted, mut lora_ps) = load(&w, tiny_config(), &lora(4, &LINEAR_NAMES));
        let x = base.embed(&base_ps, &IDS);
        let (l0, dx0) = base.loss(&mut base_ps, &x, T, &TARGETS, true).unwrap();
        let (l1, dx1) = adapted.loss(&mut lora_ps, &x, T, &TARGETS, true).unwrap();
        assert_eq!(l0.to_bits(), l1.to_bits(), "loss {l0} vs {l1}");
        assert_eq!(dx0, dx1, "input gradients");
        // With B = 0 only B gets gradient (dA = Bᵀ·… = 0), as in LoRA.
        let a = lora_ps.id("blk.0.attn_q.lora_a").unwrap();
        let b = lora_ps.id("blk.0.attn_q.lora_b").unwrap();
        assert!(lora_ps[a].grad.iter().all(|&g| g == 0.0) && lora_ps[b].grad.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn llama_train_merged_lora_gives_the_adapter_logits() {
        let w = tiny_weights(6);
        let (m, mut ps) = load(&w, tiny_config(), &lora(2, &["attn_q", "attn_v", "ffn_down", "ffn_up"]));
        randomise_lora_b(&mut ps, 7);
        let x = m.embed(&ps, &IDS);
        let rows: Vec<usize> = (0..T).collect();
        let want = m.logits(&ps, &m.forward(&ps, &x, T).0, &rows);
        let (base, base_ps) = load(&w, tiny_config(), &Finetune::Full);
        let base_logits = base.logits(&base_ps, &base.forward(&base_ps, &x, T).0, &rows);
        assert!(max_abs_diff(&want, &base_logits) > 1e-2, "the adapters must change the output");

        let merged = StateDict { path: "merged".into(), tensors: m.merged_weights(&ps).unwrap() };
        assert!(merged.tensors.keys().all(|k| k.ends_with(".weight")) && merged.tensors.len() == w.tensors.len());
        let (mm, mps) = load(&merged, tiny_config(), &Finetune::Full);
        let got = mm.logits(&mps, &mm.forward(&mps, &x, T).0, &rows);
        assert!(max_abs_diff(&want, &got) < 1e-5, "merged vs adapter: {}", max_abs_diff(&want, &got));
        // The inference model reads the merged checkpoint too.
        let llama = Llama::from_weights(tiny_config(), &merged, 32).unwrap();
        let mut cache = llama.new_cache();
        let h = llama.forward_embeddings(Tensor::from_vec(x.clone(), &[T, D]).unwrap(), &mut cache).unwrap();
        let last = llama.last_logits(&h).unwrap();
        assert!(max_abs_diff(&want[(T - 1) * 37..], &last) < 1e-5);

        // Saving only the adapters and loading them into a fresh LoRA model restores the output.
        let saved = StateDict { path: "adapters".into(), tensors: m.trainable_weights(&ps).unwrap() };
        assert_eq!(saved.tensors.len(), 2 * 4 * 2);
        assert!(saved.tensors.keys().all(|k| k.contains(".lora_")));
        let (fresh, mut fresh_ps) = load(&w, tiny_config(), &lora(2, &["attn_q", "attn_v", "ffn_down", "ffn_up"]));
        fresh.load_trainable_weights(&mut fresh_ps, &saved).unwrap();
        assert_eq!(want, fresh.logits(&fresh_ps, &fresh.forward(&fresh_ps, &x, T).0, &rows));
    }

    #[test]
    fn llama_train_lora_freezes_the_base_and_training_moves_only_adapters() {
        let (m, mut ps) = load(&tiny_weights(8), tiny_config(), &lora(4, &["attn_q", "attn_v"]));
        for p in ps.iter() {
            let adapter = p.name.contains(".lora_");
            assert_eq!(p.trainable, adapter, "{}", p.name);
            assert_eq!(p.grad.len(), if adapter { p.numel() } else { 0 }, "{}: gradient memory", p.name);
        }
        // Per layer: q has A [4, 16] and B [16, 4]; v has A [4, 16] and B [8, 4].
        assert_eq!(ps.num_trainable(), 2 * (64 + 64 + 64 + 32));
        let before = ps.clone();
        let mut opt = AdamW::new(AdamWConfig::default());
        let x = m.embed(&ps, &IDS);
        let mut losses = Vec::new();
        for _ in 0..30 {
            let (loss, dx) = m.loss(&mut ps, &x, T, &TARGETS, true).unwrap();
            m.embed_backward(&mut ps, &IDS, &dx.unwrap()); // frozen: a no-op
            opt.step(&mut ps, 2e-2);
            ps.zero_grad();
            losses.push(loss);
        }
        for (p, q) in ps.iter().zip(before.iter()) {
            if p.name.contains(".lora_") {
                assert_ne!(p.value, q.value, "{} did not train", p.name);
            } else {
                assert_eq!(p.value, q.value, "{} is frozen but changed", p.name);
            }
        }
        assert!(losses[29] < 0.5 * losses[0], "LoRA does not fit one sequence: {losses:?}");
    }

    #[test]
    fn llama_train_batched_generation_equals_one_sequence_at_a_time() {
        let (m, mut ps) = load(&tiny_weights(9), tiny_config(), &lora(2, &["attn_q", "ffn_down"]));
        randomise_lora_b(&mut ps, 4);
        // Prompts of different lengths; one stops early on a stop id, one runs into the context
        // length (32 positions), one into max_new.
        let prompts: Vec<Vec<u32>> = vec![vec![4, 30, 11], vec![7], (0..27).map(|i| (i * 5 % 37) as u32).collect()];
        let xs: Vec<Vec<f32>> = prompts.iter().map(|p| m.embed(&ps, p)).collect();
        let batch: Vec<(&[f32], usize)> = xs.iter().zip(&prompts).map(|(x, p)| (x.as_slice(), p.len())).collect();
        for sampling in [GREEDY, Sampling { temperature: 0.9, top_p: 0.95, seed: 11 }] {
            let one: Vec<Vec<u32>> =
                batch.iter().map(|&(x, t)| m.generate(&ps, x, t, 9, &[], sampling).unwrap()).collect();
            assert_eq!(m.generate_batch(&ps, &batch, 9, &[], sampling).unwrap(), one, "{sampling:?}");
            assert_eq!(one[2].len(), 32 - 27 + 1, "the long prompt runs out of positions (the last token needs none)");
            let stop = [one[0][1]];
            let one: Vec<Vec<u32>> =
                batch.iter().map(|&(x, t)| m.generate(&ps, x, t, 9, &stop, sampling).unwrap()).collect();
            assert_eq!(m.generate_batch(&ps, &batch, 9, &stop, sampling).unwrap(), one, "{sampling:?} with a stop id");
        }
        assert!(m.generate_batch(&ps, &batch, 0, &[], GREEDY).unwrap().iter().all(|o| o.is_empty()));
    }

    #[test]
    fn llama_train_kv_cached_generate_agrees_with_full_forward_argmax() {
        let (m, ps) = load(&tiny_weights(9), tiny_config(), &Finetune::Full);
        let prompt = [4u32, 30, 11];
        let x = m.embed(&ps, &prompt);
        let out = m.generate(&ps, &x, prompt.len(), 8, &[], GREEDY).unwrap();
        assert_eq!(out.len(), 8);
        let mut seq = prompt.to_vec();
        for &tok in &out {
            let (hidden, _) = m.forward(&ps, &m.embed(&ps, &seq), seq.len());
            assert_eq!(argmax(&m.logits(&ps, &hidden, &[seq.len() - 1])), tok, "after {seq:?}");
            seq.push(tok);
        }
        // The cached hidden states equal the full forward's, position by position.
        let mut cache = m.new_cache();
        let emb = m.embed(&ps, &seq);
        let mut cached = m.forward_cached(&ps, &emb[..3 * D], 3, &mut cache).unwrap();
        for i in 3..seq.len() {
            cached.extend(m.forward_cached(&ps, &emb[i * D..(i + 1) * D], 1, &mut cache).unwrap());
        }
        let full = m.forward(&ps, &emb, seq.len()).0;
        assert!(max_abs_diff(&cached, &full) < 1e-5);
        // Stops before a stop id, which is not returned; sampling is reproducible.
        let stop = m.generate(&ps, &x, prompt.len(), 8, &[out[2]], GREEDY).unwrap();
        assert_eq!(stop, out[..out.iter().position(|&t| t == out[2]).unwrap()]);
        let hot = Sampling { temperature: 1.0, top_p: 0.9, seed: 3 };
        assert_eq!(m.generate(&ps, &x, 3, 8, &[], hot).unwrap(), m.generate(&ps, &x, 3, 8, &[], hot).unwrap());
        // Positions run out at the context length (32).
        assert_eq!(m.generate(&ps, &x, 3, 100, &[], GREEDY).unwrap().len(), 32 - 3 + 1);
    }

    #[test]
    fn llama_train_rejects_bad_input_and_config() {
        let w = tiny_weights(10);
        let mut ps = ParamSet::new();
        let mut r = SeedRng::new(0, 0);
        let bad = TrainableLlama::load(&w, tiny_config(), &lora(2, &["attn_x"]), &mut ps, &mut r);
        assert!(bad.err().unwrap().to_string().contains("unknown LoRA target `attn_x`"));
        let (m, mut ps) = load(&w, tiny_config(), &Finetune::Full);
        let x = m.embed(&ps, &IDS);
        assert!(m.loss(&mut ps, &x, T, &TARGETS[..5], false).is_err());
        assert!(m.loss(&mut ps, &x, T, &[37, 0, 0, 0, 0, 0], false).is_err());
        assert!(m.loss(&mut ps, &x[..D * 5], T, &TARGETS, false).is_err());
        assert_eq!(m.loss(&mut ps, &x, T, &[IGNORE; T], true).unwrap(), (0.0, Some(vec![0.0; T * D])));
        let long = vec![0.0; 33 * D];
        assert!(m.generate(&ps, &long, 33, 1, &[], GREEDY).is_err());
    }

    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    fn smollm2() -> (Gguf, LlamaConfig) {
        let g = Gguf::open(&crate::assets::Asset::SmolLm2Gguf.path().unwrap()).unwrap();
        let config = LlamaConfig::from_gguf(&g).unwrap();
        (g, config)
    }

    #[test]
    fn llama_train_forward_matches_inference_llama_on_smollm2() {
        let (g, config) = smollm2();
        let ids = TextTokenizer::from_gguf(&g).unwrap().encode("The capital of France is", false).unwrap();
        let t = ids.len();
        let want = {
            let llama = Llama::from_weights(config.clone(), &g, 64).unwrap();
            let mut cache = llama.new_cache();
            let h = llama.forward_embeddings(llama.embed(&ids).unwrap(), &mut cache).unwrap();
            llama.last_logits(&h).unwrap()
        };
        // LoRA with B = 0 is the base model exactly, and keeps the test off 0.5 GB of gradients.
        let (m, ps) = load(&g, config, &lora(8, &["attn_q", "attn_v"]));
        let (hidden, _) = m.forward(&ps, &m.embed(&ps, &ids), t);
        let got = m.logits(&ps, &hidden, &[t - 1]);
        let scale = want.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let rel = max_abs_diff(&got, &want) / scale;
        assert!(rel <= 1e-4, "max |Δlogit| / max |logit| = {rel}");
        assert_eq!(argmax(&got), argmax(&want));
    }

    /// One forward + backward at T = 256 on SmolLM2-135M. Run with
    /// `cargo nextest run --release --run-ignored only -E 'test(llama_train_smollm2_step_timing)' --no-capture`.
    #[test]
    #[ignore = "timing on real weights; prints, asserts nothing about time"]
    fn llama_train_smollm2_step_timing() {
        let (g, config) = smollm2();
        let t = 256;
        let mut r = rng(1);
        let ids: Vec<u32> = (0..t + 1).map(|_| (uniform(&mut r, 1, 0.0, 1.0)[0] * 49152.0) as u32).collect();
        // Train on the second half, as an answer after a prompt.
        let targets: Vec<u32> = (0..t).map(|i| if i >= t / 2 { ids[i + 1] } else { IGNORE }).collect();
        for (what, ft) in [("LoRA r8 q,v", lora(8, &["attn_q", "attn_v"])), ("full", Finetune::Full)] {
            let (m, mut ps) = load(&g, config.clone(), &ft);
            let x = m.embed(&ps, &ids[..t]);
            for run in 0..3 {
                let t0 = std::time::Instant::now();
                let (loss, dx) = m.loss(&mut ps, &x, t, &targets, true).unwrap();
                m.embed_backward(&mut ps, &ids[..t], &dx.unwrap());
                let fb = t0.elapsed().as_secs_f64();
                let t1 = std::time::Instant::now();
                m.loss(&mut ps, &x, t, &targets, false).unwrap();
                let f = t1.elapsed().as_secs_f64();
                println!("{what}: T={t} run {run}: forward+backward {fb:.2} s, forward only {f:.2} s, loss {loss:.3}");
            }
        }
    }
}
