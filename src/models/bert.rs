//! BERT encoder (MiniLM-L6: d 384, 6 layers, 12 heads) with mean pooling and L2 normalisation,
//! as sentence-transformers' all-MiniLM-L6-v2 computes sentence embeddings.

use super::WeightSource;
use crate::formats::safetensors::SafetensorsFile;
use crate::formats::tokenizer::{sentence_max_len, TextTokenizer};
use crate::ops::attention::{attention, AttnShape, Mask};
use crate::ops::{self, embedding, layer_norm, linear};
use crate::tensor::Tensor;
use crate::user_err;
use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Checked against the word embeddings when given.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Only `absolute` position embeddings are implemented.
    #[serde(default)]
    pub position_embedding_type: Option<String>,
}

fn default_eps() -> f64 {
    1e-12
}

/// Bounds no BERT reaches, which keep every size computed from the config sane.
const MAX_LAYERS: usize = 256;
const MAX_WIDTH: usize = 1 << 16;
const MAX_POSITIONS: usize = 1 << 16;

impl BertConfig {
    /// Every hyperparameter of `config` (from `config_path`) in range and consistent with the
    /// tensors of `w` (from `weights_path`). Errors name the file, the key and the range. Runs
    /// before any weight is read: the attention op divides and indexes by these numbers.
    pub fn validate(&self, config_path: &Path, weights_path: &Path, w: &dyn WeightSource) -> Result<()> {
        let bad = |key: &str, v: &dyn std::fmt::Display, expected: &str| {
            user_err!("{}: `{key}` = {v} is out of range; expected {expected}", config_path.display())
        };
        let range = |key: &str, v: usize, lo: usize, hi: usize| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(bad(key, &v, &format!("{lo}..={hi}")))
            }
        };
        range("hidden_size", self.hidden_size, 1, MAX_WIDTH)?;
        range("num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)?;
        range("intermediate_size", self.intermediate_size, 1, MAX_WIDTH * 8)?;
        range("max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)?;
        range("num_attention_heads", self.num_attention_heads, 1, self.hidden_size)?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "hidden_size",
                &self.hidden_size,
                &format!("a multiple of num_attention_heads = {}", self.num_attention_heads),
            ));
        }
        let eps = self.layer_norm_eps;
        if !(eps.is_finite() && eps > 0.0 && eps < 1.0) {
            return Err(bad("layer_norm_eps", &eps, "a finite number in (0, 1), typically 1e-12"));
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "gelu") {
            return Err(bad("hidden_act", &format!("{act:?}"), "\"gelu\" (the only activation implemented)"));
        }
        if let Some(kind) = self.position_embedding_type.as_deref().filter(|k| *k != "absolute") {
            return Err(bad("position_embedding_type", &format!("{kind:?}"), "\"absolute\""));
        }
        self.check_tensors(config_path, weights_path, w)
    }

    fn check_tensors(&self, config_path: &Path, weights_path: &Path, w: &dyn WeightSource) -> Result<()> {
        let (d, ff) = (self.hidden_size, self.intermediate_size);
        let shape_of = |name: &str| {
            w.shape(name).ok_or_else(|| {
                user_err!(
                    "{}: tensor `{name}` is missing (is this a BERT model with {} layers?)",
                    weights_path.display(),
                    self.num_hidden_layers
                )
            })
        };
        let mismatch = |name: &str, got: &[usize], want: &str| {
            user_err!(
                "{}: tensor `{name}` has shape {got:?}, but {} (hidden_size = {d}, intermediate_size = {ff}) implies {want}",
                weights_path.display(),
                config_path.display()
            )
        };
        let expect = |name: &str, shape: &[usize]| -> Result<()> {
            let got = shape_of(name)?;
            if got != shape {
                return Err(mismatch(name, &got, &format!("{shape:?}")));
            }
            Ok(())
        };
        // Embedding tables: any number of rows (positions: enough for max_position_embeddings).
        let table = |name: &str, min_rows: usize| -> Result<usize> {
            let got = shape_of(name)?;
            if got.len() != 2 || got[1] != d || got[0] < min_rows {
                return Err(mismatch(name, &got, &format!("[≥{min_rows}, {d}]")));
            }
            Ok(got[0])
        };
        let vocab = table("embeddings.word_embeddings.weight", 1)?;
        if let Some(v) = self.vocab_size.filter(|&v| v != vocab) {
            return Err(user_err!(
                "{}: `vocab_size` = {v} contradicts `embeddings.word_embeddings.weight` in {}, which has {vocab} rows",
                config_path.display(),
                weights_path.display()
            ));
        }
        table("embeddings.position_embeddings.weight", self.max_position_embeddings)?;
        table("embeddings.token_type_embeddings.weight", 1)?;
        let norm = |p: &str| -> Result<()> {
            expect(&format!("{p}.weight"), &[d])?;
            expect(&format!("{p}.bias"), &[d])
        };
        let dense = |p: &str, out_f: usize, in_f: usize| -> Result<()> {
            expect(&format!("{p}.weight"), &[out_f, in_f])?;
            expect(&format!("{p}.bias"), &[out_f])
        };
        norm("embeddings.LayerNorm")?;
        for i in 0..self.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            for n in ["query", "key", "value"] {
                dense(&format!("{p}.attention.self.{n}"), d, d)?;
            }
            dense(&format!("{p}.attention.output.dense"), d, d)?;
            norm(&format!("{p}.attention.output.LayerNorm"))?;
            dense(&format!("{p}.intermediate.dense"), ff, d)?;
            dense(&format!("{p}.output.dense"), d, ff)?;
            norm(&format!("{p}.output.LayerNorm"))?;
        }
        // A layer past the count would be silently ignored: the count is wrong.
        let n = self.num_hidden_layers;
        if w.contains(&format!("encoder.layer.{n}.attention.self.query.weight")) {
            return Err(user_err!(
                "{}: `num_hidden_layers` = {n}, but {} holds weights of encoder.layer.{n}; expected the number of layers in the weights",
                config_path.display(),
                weights_path.display()
            ));
        }
        Ok(())
    }
}

struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn load(w: &dyn WeightSource, p: &str) -> Result<Self> {
        Ok(Linear { weight: w.get(&format!("{p}.weight"))?, bias: w.get(&format!("{p}.bias"))? })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, Some(&self.bias))
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(w: &dyn WeightSource, p: &str) -> Result<Self> {
        Ok(LayerNorm { weight: w.get(&format!("{p}.weight"))?, bias: w.get(&format!("{p}.bias"))? })
    }
}

/// `encoder.layer.N`
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output_dense: Linear,
    attention_output_layer_norm: LayerNorm,
    intermediate_dense: Linear,
    output_dense: Linear,
    output_layer_norm: LayerNorm,
}

pub struct Bert {
    pub config: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_layer_norm: LayerNorm,
    layers: Vec<BertLayer>,
}

impl Bert {
    pub fn from_weights(config: BertConfig, w: &dyn WeightSource) -> Result<Self> {
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("encoder.layer.{i}");
                Ok(BertLayer {
                    query: Linear::load(w, &format!("{p}.attention.self.query"))?,
                    key: Linear::load(w, &format!("{p}.attention.self.key"))?,
                    value: Linear::load(w, &format!("{p}.attention.self.value"))?,
                    attention_output_dense: Linear::load(w, &format!("{p}.attention.output.dense"))?,
                    attention_output_layer_norm: LayerNorm::load(w, &format!("{p}.attention.output.LayerNorm"))?,
                    intermediate_dense: Linear::load(w, &format!("{p}.intermediate.dense"))?,
                    output_dense: Linear::load(w, &format!("{p}.output.dense"))?,
                    output_layer_norm: LayerNorm::load(w, &format!("{p}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Bert {
            word_embeddings: w.get("embeddings.word_embeddings.weight")?,
            position_embeddings: w.get("embeddings.position_embeddings.weight")?,
            token_type_embeddings: w.get("embeddings.token_type_embeddings.weight")?,
            embeddings_layer_norm: LayerNorm::load(w, "embeddings.LayerNorm")?,
            layers,
            config,
        })
    }

    /// Hidden states `[T, d]` for one sequence of token ids.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let c = &self.config;
        let t = ids.len();
        if t > c.max_position_embeddings {
            anyhow::bail!("sequence of {t} tokens exceeds the model's {} positions", c.max_position_embeddings);
        }
        let eps = c.layer_norm_eps as f32;
        let positions: Vec<u32> = (0..t as u32).collect();
        let mut x = embedding(&self.word_embeddings, ids)?;
        x = ops::add(&x, &embedding(&self.position_embeddings, &positions)?)?;
        x = ops::add(&x, &embedding(&self.token_type_embeddings, &vec![0; t])?)?;
        let ln = &self.embeddings_layer_norm;
        x = layer_norm(&x, &ln.weight, &ln.bias, eps)?;
        let heads = c.num_attention_heads;
        let shape = AttnShape { heads, kv_heads: heads, head_dim: c.hidden_size / heads };
        for l in &self.layers {
            let (q, k, v) = (l.query.forward(&x)?, l.key.forward(&x)?, l.value.forward(&x)?);
            let mut ctx = vec![0.0; t * c.hidden_size];
            attention(q.f32s()?, k.f32s()?, v.f32s()?, shape, Mask::Keys(None), &mut ctx);
            let attn = l.attention_output_dense.forward(&Tensor::from_vec(ctx, &[t, c.hidden_size])?)?;
            let n = &l.attention_output_layer_norm;
            x = layer_norm(&ops::add(&attn, &x)?, &n.weight, &n.bias, eps)?;
            let h = ops::gelu(&l.intermediate_dense.forward(&x)?)?;
            let o = l.output_dense.forward(&h)?;
            let n = &l.output_layer_norm;
            x = layer_norm(&ops::add(&o, &x)?, &n.weight, &n.bias, eps)?;
        }
        Ok(x)
    }
}

/// The config of a sentence-transformers folder and its weights file, validated against each
/// other ([`BertConfig::validate`]) without reading any weight: what `sage doctor` checks.
pub fn open_checked(dir: &Path) -> Result<(BertConfig, SafetensorsFile)> {
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .map_err(|e| user_err!("cannot read {}: {e}; run `sage fetch`", cfg_path.display()))?;
    let config: BertConfig =
        serde_json::from_str(&cfg_text).map_err(|e| user_err!("{} is not a BERT config: {e}", cfg_path.display()))?;
    let weights_path = dir.join("model.safetensors");
    let weights = SafetensorsFile::open(&weights_path)?;
    config.validate(&cfg_path, &weights_path, &weights)?;
    Ok((config, weights))
}

/// A sentence encoder: tokenizer + BERT + mean pooling + L2 normalisation.
pub struct SentenceEncoder {
    pub tokenizer: TextTokenizer,
    pub model: Bert,
}

impl SentenceEncoder {
    /// Loads a sentence-transformers folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn load(dir: &Path) -> Result<Self> {
        let (config, weights) = open_checked(dir)?;
        let max_len =
            sentence_max_len(dir)?.unwrap_or(config.max_position_embeddings).min(config.max_position_embeddings);
        let tokenizer = TextTokenizer::from_json_file(&dir.join("tokenizer.json"), max_len)?;
        let model = Bert::from_weights(config, &weights)
            .with_context(|| format!("loading BERT weights from {}", dir.display()))?;
        Ok(SentenceEncoder { tokenizer, model })
    }

    /// Unit-length sentence embedding.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>> {
        let ids = self.tokenizer.encode(text, true)?;
        let h = self.model.forward(&ids)?;
        let mut pooled = ops::pool::mean_rows(h.f32s()?, self.model.config.hidden_size);
        ops::norm::l2_normalize_slice(&mut pooled);
        Ok(pooled)
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb).max(1e-12)
}
