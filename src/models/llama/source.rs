//! Where a decoder comes from: one GGUF file, or a Hugging Face checkpoint folder
//! (`config.json` + safetensors + `tokenizer.json` + the chat template). Both give the same
//! [`LlmSource`]: the validated config, the weights under the GGUF names the decoder reads
//! ([`HfLlama`] renames and reorders an HF folder's), the tokenizer and the chat template.

use super::config::{Family, LlamaConfig};
use super::weights::halves_to_pairs;
use crate::formats::chat_template::ChatTemplate;
use crate::formats::gguf::Gguf;
use crate::formats::hf::{is_hf_dir, HfCheckpoint};
use crate::formats::tokenizer::TextTokenizer;
use crate::models::WeightSource;
use crate::tensor::Tensor;
use crate::user_err;
use anyhow::Result;
use std::path::Path;

pub struct LlmSource {
    pub config: LlamaConfig,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: TextTokenizer,
    /// `None` when the checkpoint has no chat template.
    pub template: Option<ChatTemplate>,
}

impl LlmSource {
    /// A GGUF file, or a Hugging Face folder (one with a `config.json`).
    pub fn open(path: &Path) -> Result<LlmSource> {
        if is_hf_dir(path) {
            return LlmSource::open_hf(path);
        }
        if path.is_dir() {
            return Err(user_err!(
                "{} is a folder without config.json: give a GGUF file or a Hugging Face checkpoint folder",
                path.display()
            ));
        }
        let g = Gguf::open(path)?;
        let config = LlamaConfig::from_gguf(&g)?;
        let tokenizer = TextTokenizer::from_gguf(&g)?;
        let tok = |key: &str| {
            g.meta_u64(key).ok().and_then(|id| tokenizer.decode(&[id as u32], false).ok()).unwrap_or_default()
        };
        let template = match g.meta_str("tokenizer.chat_template") {
            Ok(src) => {
                Some(ChatTemplate::new(src, &tok("tokenizer.ggml.bos_token_id"), &tok("tokenizer.ggml.eos_token_id"))?)
            }
            Err(_) => None,
        };
        Ok(LlmSource { config, weights: Box::new(g), tokenizer, template })
    }

    fn open_hf(dir: &Path) -> Result<LlmSource> {
        let ck = HfCheckpoint::open(dir)?;
        let config = LlamaConfig::from_hf(&ck)?;
        let tokenizer = TextTokenizer::from_hf(&ck)?;
        let template = match ck.chat_template()? {
            Some(src) => Some(ChatTemplate::new(
                &src,
                &ck.special_token("bos_token")?.unwrap_or_default(),
                &ck.special_token("eos_token")?.unwrap_or_default(),
            )?),
            None => None,
        };
        let weights = HfLlama::new(ck, &config);
        config.validate(dir, &weights)?;
        Ok(LlmSource { config, weights: Box::new(weights), tokenizer, template })
    }
}

impl LlamaConfig {
    /// The hyperparameters of an HF `LlamaForCausalLM` / `Qwen2ForCausalLM` folder. Other
    /// `model_type`s, and options the decoder does not implement (RoPE scaling, sliding windows,
    /// LLaMA attention or MLP biases, activations other than SiLU), are refused by name.
    pub fn from_hf(ck: &HfCheckpoint) -> Result<LlamaConfig> {
        let family = match ck.model_type.as_str() {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            other => {
                return Err(user_err!(
                    "{}: model_type `{other}` is not a decoder this engine runs (llama, qwen2)",
                    ck.dir.display()
                ))
            }
        };
        let c = &ck.config;
        let refuse = |key: &str, why: &str| -> Result<()> {
            let v = &c[key];
            let set = match v {
                serde_json::Value::Null => false,
                serde_json::Value::Bool(b) => *b,
                _ => true,
            };
            if set {
                return Err(user_err!("{}: config.json `{key}` = {v} is not supported ({why})", ck.dir.display()));
            }
            Ok(())
        };
        refuse("rope_scaling", "the decoder's RoPE is unscaled")?;
        refuse("attention_bias", "only Qwen2's q/k/v biases are implemented")?;
        refuse("mlp_bias", "the MLP is bias-free")?;
        refuse("use_sliding_window", "attention is full")?;
        if let Some(act) = c["hidden_act"].as_str().filter(|a| *a != "silu") {
            return Err(user_err!("{}: hidden_act `{act}` is not supported (SwiGLU uses silu)", ck.dir.display()));
        }
        let hidden_size = ck.usize("hidden_size")?;
        let num_heads = ck.usize("num_attention_heads")?;
        if num_heads == 0 {
            return Err(ck.key_err("num_attention_heads", "at least 1"));
        }
        let opt_usize = |key: &str| -> Result<Option<usize>> {
            if c[key].is_null() {
                Ok(None)
            } else {
                ck.usize(key).map(Some)
            }
        };
        Ok(LlamaConfig {
            family,
            vocab_size: ck.usize("vocab_size")?,
            hidden_size,
            intermediate_size: ck.usize("intermediate_size")?,
            num_layers: ck.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads: opt_usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim: opt_usize("head_dim")?.unwrap_or(hidden_size / num_heads),
            rope_theta: ck.f64_opt("rope_theta")?.unwrap_or(10000.0) as f32,
            rms_norm_eps: ck.f64_opt("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            context_length: opt_usize("max_position_embeddings")?.unwrap_or(2048),
        })
    }
}

/// An HF folder's weights under the decoder's GGUF names. HF keeps q and k in rotate-half order;
/// a LLaMA-family model is given them in adjacent-pair order here, as llama.cpp's converter
/// writes LLaMA GGUF files, while a Qwen2 model gets them as stored and its loader reorders them
/// as it does for a Qwen2 GGUF file. A tied head (`tie_word_embeddings`) has no `output.weight`.
pub struct HfLlama {
    ck: HfCheckpoint,
    family: Family,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    tied: bool,
}

impl HfLlama {
    pub fn new(ck: HfCheckpoint, config: &LlamaConfig) -> HfLlama {
        let tied = ck.config["tie_word_embeddings"].as_bool().unwrap_or(false);
        HfLlama {
            ck,
            family: config.family,
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            tied,
        }
    }

    /// The HF name of GGUF tensor `name`.
    fn hf_name(&self, name: &str) -> Option<String> {
        match name {
            "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
            "output_norm.weight" => return Some("model.norm.weight".into()),
            "output.weight" if self.tied => return None,
            "output.weight" => return Some("lm_head.weight".into()),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (module, kind) = rest.rsplit_once('.')?;
        let hf = match module {
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            _ => return None,
        };
        Some(format!("model.layers.{layer}.{hf}.{kind}"))
    }
}

impl WeightSource for HfLlama {
    fn get(&self, name: &str) -> Result<Tensor> {
        let hf = self.hf_name(name).ok_or_else(|| user_err!("{}: no tensor for `{name}`", self.ck.dir.display()))?;
        let t = self.ck.tensor(&hf)?;
        let heads = match name.rsplit_once('.').map(|(m, _)| m.rsplit('.').next().unwrap_or("")) {
            Some("attn_q") => self.heads,
            Some("attn_k") => self.kv_heads,
            _ => return Ok(t),
        };
        if self.family.rope_halves() {
            return Ok(t);
        }
        let shape = t.shape().to_vec();
        let values = t.to_dtype(crate::tensor::DType::F32).into_f32s()?;
        let row = values.len() / (heads * self.head_dim).max(1);
        Tensor::from_vec(halves_to_pairs(&values, self.head_dim, row, false), &shape)
    }
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.hf_name(name).and_then(|hf| self.ck.tensor_shape(&hf))
    }
}
