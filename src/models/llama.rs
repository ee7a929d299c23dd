//! LLaMA-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, tied embeddings) with a
//! KV cache, loaded from GGUF with llama.cpp's tensor names (`token_embd`, `blk.N.attn_q`, ...).
//! SmolLM2-135M-Instruct is the embedded default.

use super::WeightSource;
use crate::formats::chat_template::{ChatTemplate, Message};
use crate::formats::gguf::Gguf;
use crate::formats::tokenizer::TextTokenizer;
use crate::ops::attention::{attention, AttnShape, Mask};
use crate::ops::rope::RopeTable;
use crate::ops::{self, embedding, linear, rms_norm};
use crate::tensor::Tensor;
use crate::user_err;
use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};
use std::path::Path;

#[derive(Clone, Debug, serde::Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
    pub context_length: usize,
}

impl LlamaConfig {
    /// Reads the hyperparameters from GGUF metadata and validates them against the file's tensors
    /// ([`LlamaConfig::validate`]): nothing downstream sees a model that cannot run.
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let arch = g.meta_str("general.architecture")?;
        if arch != "llama" {
            return Err(user_err!("{}: architecture `{arch}` is not a LLaMA-family model", g.path.display()));
        }
        let u = |k: &str| g.meta_u64(&format!("llama.{k}")).map(|v| v as usize);
        let opt_u = |k: &str| g.meta_u64_opt(&format!("llama.{k}")).map(|v| v.map(|v| v as usize));
        let opt_f = |k: &str| g.meta_f64_opt(&format!("llama.{k}"));
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        if num_heads == 0 || (hidden_size % num_heads != 0 && opt_u("rope.dimension_count")?.is_none()) {
            // Without an explicit head size it is embedding_length / head_count.
            return Err(key_err(
                &g.path,
                "llama.attention.head_count",
                num_heads,
                &format!("a divisor of llama.embedding_length = {hidden_size}"),
            ));
        }
        let vocab_size = match opt_u("vocab_size")? {
            Some(v) => v,
            None => g.tensors.get("token_embd.weight").map(|t| t.shape[0]).context("vocabulary size")?,
        };
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: u("feed_forward_length")?,
            num_layers: u("block_count")?,
            num_heads,
            num_kv_heads: opt_u("attention.head_count_kv")?.unwrap_or(num_heads),
            head_dim: opt_u("rope.dimension_count")?.unwrap_or(hidden_size / num_heads),
            rope_theta: opt_f("rope.freq_base")?.unwrap_or(10000.0) as f32,
            rms_norm_eps: opt_f("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f32,
            context_length: opt_u("context_length")?.unwrap_or(2048),
        };
        config.validate(&g.path, g)?;
        if let Some(tokens) = g.metadata.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) {
            if tokens.len() > config.vocab_size {
                return Err(key_err(
                    &g.path,
                    "tokenizer.ggml.tokens",
                    format!("{} tokens", tokens.len()),
                    &format!("at most the {} rows of token_embd.weight", config.vocab_size),
                ));
            }
        }
        Ok(config)
    }

    /// Every hyperparameter in range and consistent with the tensors of `w` (shapes of every
    /// block's weights, no blocks beyond `block_count`). Errors name `file`, the GGUF key and the
    /// range it must lie in. Runs before any weight is read, and before any op sees the config
    /// (the ops index with these numbers and would panic on them).
    pub fn validate(&self, file: &Path, w: &dyn WeightSource) -> Result<()> {
        let range = |key: &str, v: usize, lo: usize, hi: usize| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(key_err(file, key, v, &format!("{lo}..={hi}")))
            }
        };
        let c = self;
        range("llama.block_count", c.num_layers, 1, MAX_LAYERS)?;
        range("llama.embedding_length", c.hidden_size, 1, MAX_WIDTH)?;
        range("llama.feed_forward_length", c.intermediate_size, 1, MAX_WIDTH * 8)?;
        range("llama.vocab_size", c.vocab_size, 1, MAX_VOCAB)?;
        range("llama.context_length", c.context_length, 1, MAX_CONTEXT)?;
        range("llama.attention.head_count", c.num_heads, 1, c.hidden_size)?;
        range("llama.attention.head_count_kv", c.num_kv_heads, 1, c.num_heads)?;
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(key_err(
                file,
                "llama.attention.head_count_kv",
                c.num_kv_heads,
                &format!("a divisor of llama.attention.head_count = {}", c.num_heads),
            ));
        }
        // RoPE rotates pairs, so the head size is even; it also sizes Q and K (checked on the
        // tensors below), which is what catches a head count that contradicts the weights.
        if c.head_dim < 2 || !c.head_dim.is_multiple_of(2) || c.head_dim > MAX_WIDTH {
            return Err(key_err(
                file,
                "llama.rope.dimension_count",
                c.head_dim,
                &format!("an even head size in 2..={MAX_WIDTH}"),
            ));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 1.0) {
            return Err(key_err(file, "llama.rope.freq_base", c.rope_theta, "a finite number > 1 (LLaMA uses 10000)"));
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0) {
            return Err(key_err(
                file,
                "llama.attention.layer_norm_rms_epsilon",
                c.rms_norm_eps,
                "a finite number in (0, 1), typically 1e-5",
            ));
        }
        self.check_tensors(file, w)
    }

    /// Every weight the decoder reads has the shape the hyperparameters imply.
    fn check_tensors(&self, file: &Path, w: &dyn WeightSource) -> Result<()> {
        let c = self;
        let (d, ff, qd, kvd) =
            (c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let implied_by = format!(
            "llama.embedding_length = {d}, llama.feed_forward_length = {ff}, llama.attention.head_count = {}, \
             llama.attention.head_count_kv = {}, head size {} (llama.rope.dimension_count)",
            c.num_heads, c.num_kv_heads, c.head_dim
        );
        let expect = |name: &str, shape: &[usize]| -> Result<()> {
            match w.shape(name) {
                None => {
                    Err(user_err!("{}: tensor `{name}` is missing (is this the right architecture?)", file.display()))
                }
                Some(s) if s != shape => Err(user_err!(
                    "{}: tensor `{name}` has shape {s:?}, but the metadata ({implied_by}) implies {shape:?}",
                    file.display()
                )),
                Some(_) => Ok(()),
            }
        };
        expect("token_embd.weight", &[c.vocab_size, d])?;
        expect("output_norm.weight", &[d])?;
        if w.contains("output.weight") {
            expect("output.weight", &[c.vocab_size, d])?;
        }
        for i in 0..c.num_layers {
            let t = |n: &str| format!("blk.{i}.{n}.weight");
            expect(&t("attn_norm"), &[d])?;
            expect(&t("attn_q"), &[qd, d])?;
            expect(&t("attn_k"), &[kvd, d])?;
            expect(&t("attn_v"), &[kvd, d])?;
            expect(&t("attn_output"), &[d, qd])?;
            expect(&t("ffn_norm"), &[d])?;
            expect(&t("ffn_gate"), &[ff, d])?;
            expect(&t("ffn_up"), &[ff, d])?;
            expect(&t("ffn_down"), &[d, ff])?;
        }
        // Weights of a block past the count would be silently ignored: the count is wrong.
        let n = c.num_layers;
        if BLOCK_TENSORS.iter().any(|t| w.contains(&format!("blk.{n}.{t}.weight"))) {
            return Err(key_err(
                file,
                "llama.block_count",
                n,
                &format!("the number of blocks in the file (it holds weights of block blk.{n})"),
            ));
        }
        Ok(())
    }
}

/// Upper bounds that no LLaMA-family model reaches but that keep every size computed from them
/// (RoPE tables, KV caches, activations) far from overflow or an absurd allocation.
const MAX_LAYERS: usize = 1024;
const MAX_WIDTH: usize = 1 << 16;
const MAX_VOCAB: usize = 1 << 22;
const MAX_CONTEXT: usize = 1 << 20;

/// The weights of `blk.N`, by their GGUF names.
const BLOCK_TENSORS: [&str; 9] =
    ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"];

/// "`file`: `key` = value is out of range; expected ...".
fn key_err(file: &Path, key: &str, value: impl std::fmt::Display, expected: &str) -> anyhow::Error {
    user_err!("{}: metadata key `{key}` = {value} is out of range; expected {expected}", file.display())
}

/// `blk.N`
struct Block {
    attn_norm: Tensor,
    attn_q: Tensor,
    attn_k: Tensor,
    attn_v: Tensor,
    attn_output: Tensor,
    ffn_norm: Tensor,
    ffn_gate: Tensor,
    ffn_up: Tensor,
    ffn_down: Tensor,
}

pub struct Llama {
    pub config: LlamaConfig,
    token_embd: Tensor,
    blocks: Vec<Block>,
    output_norm: Tensor,
    /// `output.weight`, or the token embedding when tied.
    output: Tensor,
    rope: RopeTable,
}

/// Keys and values of every layer for the positions seen so far.
pub struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    pub len: usize,
}

impl Llama {
    pub fn from_weights(config: LlamaConfig, w: &dyn WeightSource, max_positions: usize) -> Result<Self> {
        let blocks = (0..config.num_layers)
            .map(|i| {
                let t = |n: &str| w.get(&format!("blk.{i}.{n}.weight"));
                Ok(Block {
                    attn_norm: t("attn_norm")?,
                    attn_q: t("attn_q")?,
                    attn_k: t("attn_k")?,
                    attn_v: t("attn_v")?,
                    attn_output: t("attn_output")?,
                    ffn_norm: t("ffn_norm")?,
                    ffn_gate: t("ffn_gate")?,
                    ffn_up: t("ffn_up")?,
                    ffn_down: t("ffn_down")?,
                })
            })
            .collect::<Result<_>>()?;
        let token_embd = w.get("token_embd.weight")?;
        let output = if w.contains("output.weight") { w.get("output.weight")? } else { token_embd.clone() };
        let rope = RopeTable::new(config.head_dim, config.rope_theta, max_positions.min(config.context_length));
        Ok(Llama { token_embd, blocks, output_norm: w.get("output_norm.weight")?, output, rope, config })
    }

    pub fn new_cache(&self) -> KvCache {
        let n = self.config.num_layers;
        KvCache { k: vec![Vec::new(); n], v: vec![Vec::new(); n], len: 0 }
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_pos()
    }

    /// Token embeddings `[T, d]` (the SAGE model mixes these with image and fact tokens).
    pub fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        embedding(&self.token_embd, ids)
    }

    /// Runs `x[T, d]` (embeddings of the next T positions) through the decoder, appending to the
    /// cache; returns the final hidden states `[T, d]` after the output norm.
    pub fn forward_embeddings(&self, x: Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let c = &self.config;
        let t = x.shape()[0];
        let start = cache.len;
        if start + t > self.rope.max_pos() {
            return Err(user_err!(
                "the sequence needs {} positions but the model was set up for {}; shorten the prompt or --max-tokens",
                start + t,
                self.rope.max_pos()
            ));
        }
        let shape = AttnShape { heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim };
        let mut x = x;
        for (b, blk) in self.blocks.iter().enumerate() {
            let h = rms_norm(&x, &blk.attn_norm, c.rms_norm_eps)?;
            let mut q = linear(&h, &blk.attn_q, None)?.into_f32s()?;
            let mut k = linear(&h, &blk.attn_k, None)?.into_f32s()?;
            let v = linear(&h, &blk.attn_v, None)?.into_f32s()?;
            self.rope.apply_pairs_(&mut q, c.num_heads, start);
            self.rope.apply_pairs_(&mut k, c.num_kv_heads, start);
            cache.k[b].extend_from_slice(&k);
            cache.v[b].extend_from_slice(&v);
            let mut ctx = vec![0.0; t * c.num_heads * c.head_dim];
            attention(&q, &cache.k[b], &cache.v[b], shape, Mask::Causal { start }, &mut ctx);
            let ctx = Tensor::from_vec(ctx, &[t, c.num_heads * c.head_dim])?;
            let mut xs = x.into_f32s()?;
            ops::add_(&mut xs, &linear(&ctx, &blk.attn_output, None)?)?;
            let x1 = Tensor::from_vec(xs, &[t, c.hidden_size])?;
            let h = rms_norm(&x1, &blk.ffn_norm, c.rms_norm_eps)?;
            let g = ops::swiglu(&linear(&h, &blk.ffn_gate, None)?, &linear(&h, &blk.ffn_up, None)?)?;
            let mut xs = x1.into_f32s()?;
            ops::add_(&mut xs, &linear(&g, &blk.ffn_down, None)?)?;
            x = Tensor::from_vec(xs, &[t, c.hidden_size])?;
        }
        cache.len += t;
        rms_norm(&x, &self.output_norm, c.rms_norm_eps)
    }

    /// Logits `[vocab]` for the last position of `hidden[T, d]`.
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Vec<f32>> {
        let t = hidden.shape()[0];
        let last = hidden.narrow_rows(t - 1, t)?;
        linear(&last, &self.output, None)?.into_f32s()
    }
}

/// Decoding settings: greedy at temperature 0, else temperature + nucleus (top-p) sampling.
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
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

/// A chat model: decoder, tokenizer and chat template from one GGUF file.
pub struct ChatModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
}

pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl ChatModel {
    pub fn load(path: &Path, max_positions: usize) -> Result<Self> {
        let g = Gguf::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let tokenizer = TextTokenizer::from_gguf(&g)?;
        let template_src = g.meta_str("tokenizer.chat_template").map_err(|_| {
            user_err!("{} has no chat template (tokenizer.chat_template); use an instruct model", path.display())
        })?;
        let tok = |key: &str| {
            g.meta_u64(key).ok().and_then(|id| tokenizer.decode(&[id as u32], false).ok()).unwrap_or_default()
        };
        let template =
            ChatTemplate::new(template_src, &tok("tokenizer.ggml.bos_token_id"), &tok("tokenizer.ggml.eos_token_id"))?;
        let model =
            Llama::from_weights(config, &g, max_positions).with_context(|| format!("loading {}", path.display()))?;
        Ok(ChatModel { model, tokenizer, template })
    }

    /// Formats `messages` with the chat template and decodes up to `max_tokens` new tokens;
    /// `on_token` sees each piece of text as it is produced.
    pub fn chat(
        &self,
        messages: &[Message],
        max_tokens: usize,
        sampling: Sampling,
        mut on_token: impl FnMut(&str),
    ) -> Result<Generation> {
        let prompt = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&prompt, false)?;
        let mut cache = self.model.new_cache();
        let mut sampler = Sampler::new(sampling);
        let t0 = std::time::Instant::now();
        let h = self.model.forward_embeddings(self.model.embed(&ids)?, &mut cache)?;
        let mut logits = self.model.last_logits(&h)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let mut out: Vec<u32> = Vec::new();
        let mut printed = 0;
        for _ in 0..max_tokens {
            let next = sampler.sample(&logits);
            if self.tokenizer.stop_ids.contains(&next) {
                break;
            }
            out.push(next);
            // Decode the whole tail so multi-byte characters split across tokens print whole.
            let text = self.tokenizer.decode(&out, true)?;
            if text.len() > printed && !text.ends_with('\u{FFFD}') {
                on_token(&text[printed..]);
                printed = text.len();
            }
            if cache.len + 1 > self.model.max_positions() {
                break;
            }
            let h = self.model.forward_embeddings(self.model.embed(&[next])?, &mut cache)?;
            logits = self.model.last_logits(&h)?;
        }
        let text = self.tokenizer.decode(&out, true)?;
        Ok(Generation {
            text,
            prompt_tokens: ids.len(),
            tokens: out,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}
