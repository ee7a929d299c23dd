//! The built-in backbones (`models::backbone`: `lite`, `dino-qwen`) as backbone plugins: the
//! description, image encoding and text generation (for `sage facts`) through the same plugin
//! interface an external backbone implements. Neither is a pretrained VLM: the adapter between
//! the frozen encoder and the LLM is learned by `sage sfe`.
//!
//! Config (JSON): `vision` and `llm` paths (default: the backbone's assets), `max_positions`
//! (2048).

use crate::backend::cpu::HostOps;
use crate::formats::chat_template::Message;
use crate::formats::gguf::Gguf;
use crate::models::backbone::{self, BuiltinBackbone};
use crate::models::llama::{ChatModel, LlamaConfig};
use crate::models::patch_encoder::{EncoderKind, PatchEncoder};
use crate::models::sampling::Sampling;
use sage_plugin_sdk::{F32View, F32ViewMut, Plugin, PluginError, PluginResult};
use serde::Deserialize;
use std::marker::PhantomData;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    vision: Option<PathBuf>,
    #[serde(default)]
    llm: Option<PathBuf>,
    #[serde(default = "default_positions")]
    max_positions: usize,
}

fn default_positions() -> usize {
    2048
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateOptions {
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default)]
    temperature: f32,
    #[serde(default = "default_top_p")]
    top_p: f32,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    system: Option<String>,
}

fn default_max_tokens() -> usize {
    128
}
fn default_top_p() -> f32 {
    0.9
}

/// Which built-in a [`Builtin`] plugin is.
pub trait Named: Send + 'static {
    const NAME: &'static str;
}

pub struct Lite;
impl Named for Lite {
    const NAME: &'static str = "lite";
}

pub struct DinoQwen;
impl Named for DinoQwen {
    const NAME: &'static str = "dino-qwen";
}

pub struct Builtin<N: Named> {
    spec: &'static BuiltinBackbone,
    vision_path: PathBuf,
    llm: PathBuf,
    max_positions: usize,
    vision: Option<PatchEncoder>,
    chat: Option<ChatModel<HostOps>>,
    _name: PhantomData<N>,
}

fn io(e: anyhow::Error) -> PluginError {
    PluginError::io(format!("{e:#}"))
}

impl<N: Named> Builtin<N> {
    fn encoder(&mut self) -> PluginResult<&PatchEncoder> {
        if self.vision.is_none() {
            let s = self.spec;
            let enc = PatchEncoder::load_from(s.vision, &self.vision_path, Some(s.size), s.layer).map_err(io)?;
            self.vision = Some(enc);
        }
        Ok(self.vision.as_ref().expect("loaded above"))
    }
}

impl<N: Named> Plugin for Builtin<N> {
    fn create(config_json: &str) -> PluginResult<Self> {
        let cfg: Config = serde_json::from_str(config_json).map_err(|e| {
            PluginError::invalid(format!("bad {} backbone config: {e} (keys: vision, llm, max_positions)", N::NAME))
        })?;
        let spec = backbone::builtin(N::NAME).map_err(io)?;
        let vision_path = match cfg.vision {
            Some(p) => p,
            None => spec.vision_asset.path().map_err(io)?,
        };
        let llm = match cfg.llm {
            Some(p) => p,
            None => spec.llm_asset.path().map_err(io)?,
        };
        Ok(Builtin {
            spec,
            vision_path,
            llm,
            max_positions: cfg.max_positions,
            vision: None,
            chat: None,
            _name: PhantomData,
        })
    }

    fn backbone_describe(&mut self) -> PluginResult<String> {
        let g = Gguf::open(&self.llm).map_err(io)?;
        let llm = LlamaConfig::from_gguf(&g).map_err(io)?;
        let template = g.meta_str("tokenizer.chat_template").unwrap_or("").to_string();
        let (family, taps) = match self.spec.vision {
            EncoderKind::Efficientnet => {
                ("efficientnet-lite0", serde_json::json!(crate::models::efficientnet::PATCH_TAPS))
            }
            EncoderKind::Dinov2 => ("dinov2-vits14", serde_json::json!(format!("{:?}", self.spec.layer))),
        };
        let enc = self.encoder()?;
        let p = enc.preprocess();
        let ((gh, gw), dim) = (enc.grid(), enc.dim());
        Ok(serde_json::json!({
            "name": N::NAME,
            "vision_encoder": {
                "family": family,
                "weights": self.vision_path,
                "frozen": true,
                "taps": taps,
                "patch_grid": [gh, gw],
                "patch_dim": dim,
            },
            "image_preprocess": {
                "size": p.crop, "resize_shorter": p.resize_shorter, "channels": "rgb", "scale": "0-255",
                "mean": p.mean, "std": p.std,
            },
            "adapter": { "in": dim, "out": llm.hidden_size },
            "llm": {
                "family": llm.family, "weights": self.llm, "format": "gguf", "config": llm,
                "tensor_names": {
                    "embedding": "token_embd.weight", "output_norm": "output_norm.weight",
                    "output": "output.weight (tied to token_embd.weight when absent)",
                    "block": "blk.{i}.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}.weight",
                },
            },
            "tokenizer": { "source": "gguf", "path": self.llm },
            "chat_template": template,
            "generates": true,
        })
        .to_string())
    }

    fn backbone_encode_image(&mut self, pixels: F32View, out: F32ViewMut) -> PluginResult<()> {
        let enc = self.encoder()?;
        let size = enc.preprocess().crop as usize;
        if pixels.shape != [3, size, size] {
            return Err(PluginError::invalid(format!("pixels must be [3, {size}, {size}], got {:?}", pixels.shape)));
        }
        let ((gh, gw), dim) = (enc.grid(), enc.dim());
        if out.shape != [gh * gw, dim] {
            return Err(PluginError::invalid(format!("patches_out must be [{}, {dim}], got {:?}", gh * gw, out.shape)));
        }
        let t = enc.tokens_chw(pixels.data).map_err(io)?;
        out.data.copy_from_slice(&t.data);
        Ok(())
    }

    fn backbone_generate(&mut self, prompt: &str, options_json: &str) -> PluginResult<String> {
        let o: GenerateOptions = serde_json::from_str(options_json).map_err(|e| {
            PluginError::invalid(format!(
                "bad generate options: {e} (keys: max_tokens, temperature, top_p, seed, system)"
            ))
        })?;
        if self.chat.is_none() {
            self.chat = Some(
                ChatModel::load(HostOps, &self.llm, self.max_positions, crate::models::llama::BaseWeights::Quantized)
                    .map_err(io)?,
            );
        }
        let chat = self.chat.as_ref().expect("loaded above");
        let mut messages = Vec::new();
        if let Some(s) = &o.system {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", prompt));
        let sampling = Sampling { temperature: o.temperature, top_p: o.top_p, seed: o.seed };
        let g = chat.chat(&messages, o.max_tokens, sampling, |_| {}).map_err(io)?;
        Ok(g.text)
    }
}
