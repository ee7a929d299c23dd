//! The hyperparameters of a LLaMA-family decoder, read from GGUF metadata and validated against
//! the file's tensors before any op runs.

use crate::formats::gguf::Gguf;
use crate::models::WeightSource;
use crate::user_err;
use anyhow::{Context, Result};
use std::path::Path;

/// Which decoder of the LLaMA lineage a checkpoint holds: the GGUF metadata prefix and what the
/// blocks carry beyond LLaMA's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// LLaMA, SmolLM2: bias-free linear layers.
    Llama,
    /// Qwen2, Qwen2.5: biases on the query, key and value projections.
    Qwen2,
}

impl Family {
    /// The family of GGUF `general.architecture`, if it is one the decoder runs.
    pub fn from_arch(arch: &str) -> Option<Family> {
        match arch {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        }
    }

    /// The GGUF metadata prefix (`llama.block_count`, `qwen2.block_count`).
    pub fn prefix(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }

    /// Whether the checkpoint's RoPE turns element `i` of a head with element `i + head_dim/2`
    /// (GGUF's "NeoX" rope type, as in Qwen2) rather than with its neighbour (LLaMA GGUF files,
    /// whose converter permuted q and k). The loader permutes q and k of such a checkpoint to the
    /// decoder's adjacent pairs ([`super::weights::halves_to_pairs`]).
    pub fn rope_halves(self) -> bool {
        self == Family::Qwen2
    }

    /// Whether `attn_q`, `attn_k` and `attn_v` carry a bias.
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LlamaConfig {
    pub family: Family,
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
        let Some(family) = Family::from_arch(arch) else {
            return Err(user_err!(
                "{}: architecture `{arch}` is not one the decoder runs (llama, qwen2)",
                g.path.display()
            ));
        };
        let p = family.prefix();
        let u = |k: &str| g.meta_u64(&format!("{p}.{k}")).map(|v| v as usize);
        let opt_u = |k: &str| g.meta_u64_opt(&format!("{p}.{k}")).map(|v| v.map(|v| v as usize));
        let opt_f = |k: &str| g.meta_f64_opt(&format!("{p}.{k}"));
        let hidden_size = u("embedding_length")?;
        let num_heads = u("attention.head_count")?;
        if num_heads == 0 || (hidden_size % num_heads != 0 && opt_u("rope.dimension_count")?.is_none()) {
            // Without an explicit head size it is embedding_length / head_count.
            return Err(key_err(
                &g.path,
                &format!("{p}.attention.head_count"),
                num_heads,
                &format!("a divisor of {p}.embedding_length = {hidden_size}"),
            ));
        }
        let vocab_size = match opt_u("vocab_size")? {
            Some(v) => v,
            None => g.tensors.get("token_embd.weight").map(|t| t.shape[0]).context("vocabulary size")?,
        };
        let config = LlamaConfig {
            family,
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

    /// `{family}.{key}`: a GGUF metadata key of this family, for errors.
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.family.prefix())
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
        let k = |key: &str| c.key(key);
        range(&k("block_count"), c.num_layers, 1, MAX_LAYERS)?;
        range(&k("embedding_length"), c.hidden_size, 1, MAX_WIDTH)?;
        range(&k("feed_forward_length"), c.intermediate_size, 1, MAX_WIDTH * 8)?;
        range(&k("vocab_size"), c.vocab_size, 1, MAX_VOCAB)?;
        range(&k("context_length"), c.context_length, 1, MAX_CONTEXT)?;
        range(&k("attention.head_count"), c.num_heads, 1, c.hidden_size)?;
        range(&k("attention.head_count_kv"), c.num_kv_heads, 1, c.num_heads)?;
        if !c.num_heads.is_multiple_of(c.num_kv_heads) {
            return Err(key_err(
                file,
                &k("attention.head_count_kv"),
                c.num_kv_heads,
                &format!("a divisor of {} = {}", k("attention.head_count"), c.num_heads),
            ));
        }
        // RoPE rotates pairs, so the head size is even; it also sizes Q and K (checked on the
        // tensors below), which is what catches a head count that contradicts the weights.
        if c.head_dim < 2 || !c.head_dim.is_multiple_of(2) || c.head_dim > MAX_WIDTH {
            return Err(key_err(
                file,
                &k("rope.dimension_count"),
                c.head_dim,
                &format!("an even head size in 2..={MAX_WIDTH}"),
            ));
        }
        if !(c.rope_theta.is_finite() && c.rope_theta > 1.0) {
            return Err(key_err(
                file,
                &k("rope.freq_base"),
                c.rope_theta,
                "a finite number > 1 (LLaMA uses 10000, Qwen2.5 1000000)",
            ));
        }
        if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0 && c.rms_norm_eps < 1.0) {
            return Err(key_err(
                file,
                &k("attention.layer_norm_rms_epsilon"),
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
        let p = c.family.prefix();
        let implied_by = format!(
            "{p}.embedding_length = {d}, {p}.feed_forward_length = {ff}, {p}.attention.head_count = {}, \
             {p}.attention.head_count_kv = {}, head size {} ({p}.rope.dimension_count)",
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
            let bias = |n: &str| format!("blk.{i}.{n}.bias");
            if c.family.qkv_bias() {
                expect(&bias("attn_q"), &[qd])?;
                expect(&bias("attn_k"), &[kvd])?;
                expect(&bias("attn_v"), &[kvd])?;
            } else if let Some(extra) = ["attn_q", "attn_k", "attn_v"].iter().map(|n| bias(n)).find(|n| w.contains(n)) {
                // A bias the family does not read would be silently dropped: refuse the file.
                return Err(user_err!(
                    "{}: tensor `{extra}` is a bias, which a `{p}` model does not have (is this a qwen2 model?)",
                    file.display()
                ));
            }
        }
        // Weights of a block past the count would be silently ignored: the count is wrong.
        let n = c.num_layers;
        if BLOCK_TENSORS.iter().any(|t| w.contains(&format!("blk.{n}.{t}.weight"))) {
            return Err(key_err(
                file,
                &c.key("block_count"),
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
