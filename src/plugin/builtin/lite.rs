//! Backbone `lite` (built in), the embedded default: EfficientNet-Lite0 patch features (14×14 ×
//! 152) → adapter → SmolLM2-135M-Instruct, all from $SAGE_HOME. It is not a pretrained VLM: the
//! adapter is learned by `sage sfe`. Offers text generation (for `sage facts`) through the same
//! plugin interface.
//!
//! Config (JSON): `efficientnet` and `llm` paths (default: the assets), `max_positions` (2048).

use crate::assets::Asset;
use crate::backend::cpu::HostOps;
use crate::formats::chat_template::Message;
use crate::formats::gguf::Gguf;
use crate::models::efficientnet::{EfficientNetLite, PATCH_TAPS, PREPROCESS_FULL};
use crate::models::llama::{ChatModel, LlamaConfig};
use crate::models::sampling::Sampling;
use sage_plugin_sdk::{F32View, F32ViewMut, Plugin, PluginError, PluginResult};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    efficientnet: Option<PathBuf>,
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

/// Patch grid and width of the vision features (see crate::models::efficientnet).
const GRID: usize = 14;
const PATCH_DIM: usize = 152;

pub struct Lite {
    efficientnet: PathBuf,
    llm: PathBuf,
    max_positions: usize,
    vision: Option<EfficientNetLite>,
    chat: Option<ChatModel<HostOps>>,
}

fn io(e: anyhow::Error) -> PluginError {
    PluginError::io(format!("{e:#}"))
}

impl Plugin for Lite {
    fn create(config_json: &str) -> PluginResult<Self> {
        let cfg: Config = serde_json::from_str(config_json).map_err(|e| {
            PluginError::invalid(format!("bad lite backbone config: {e} (keys: efficientnet, llm, max_positions)"))
        })?;
        let efficientnet = match cfg.efficientnet {
            Some(p) => p,
            None => Asset::EfficientNetPth.path().map_err(io)?,
        };
        let llm = match cfg.llm {
            Some(p) => p,
            None => Asset::SmolLm2Gguf.path().map_err(io)?,
        };
        Ok(Lite { efficientnet, llm, max_positions: cfg.max_positions, vision: None, chat: None })
    }

    fn backbone_describe(&mut self) -> PluginResult<String> {
        let g = Gguf::open(&self.llm).map_err(io)?;
        let llm = LlamaConfig::from_gguf(&g).map_err(io)?;
        let template = g.meta_str("tokenizer.chat_template").unwrap_or("").to_string();
        let p = PREPROCESS_FULL;
        Ok(serde_json::json!({
            "name": "lite",
            "vision_encoder": {
                "family": "efficientnet-lite0",
                "weights": self.efficientnet,
                "frozen": true,
                "taps": PATCH_TAPS,
                "patch_grid": [GRID, GRID],
                "patch_dim": PATCH_DIM,
            },
            "image_preprocess": {
                "size": p.crop, "resize_shorter": p.resize_shorter, "channels": "rgb", "scale": "0-255",
                "mean": p.mean, "std": p.std,
            },
            "adapter": { "in": PATCH_DIM, "out": llm.hidden_size },
            "llm": {
                "family": "llama", "weights": self.llm, "format": "gguf", "config": llm,
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
        let size = p_size();
        if pixels.shape != [3, size, size] {
            return Err(PluginError::invalid(format!("pixels must be [3, {size}, {size}], got {:?}", pixels.shape)));
        }
        if out.shape != [GRID * GRID, PATCH_DIM] {
            return Err(PluginError::invalid(format!(
                "patches_out must be [{}, {PATCH_DIM}], got {:?}",
                GRID * GRID,
                out.shape
            )));
        }
        if self.vision.is_none() {
            self.vision = Some(EfficientNetLite::load(&self.efficientnet).map_err(io)?);
        }
        let t = self.vision.as_ref().expect("loaded above").patch_tokens(pixels.data, size);
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
            self.chat = Some(ChatModel::load(HostOps, &self.llm, self.max_positions).map_err(io)?);
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

fn p_size() -> usize {
    PREPROCESS_FULL.crop as usize
}
