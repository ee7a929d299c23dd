//! Backbones: a frozen vision encoder (family, weights, input side, which hidden state) and a
//! decoder LLM (a GGUF file: family, weights, tokenizer and chat template in one), which the SAGE
//! head joins with its adapter and fusion attention. Every stage (`facts`, `sfe`, `edpo`, `eval`,
//! `infer`, `demo`) builds its model from a backbone named here; a checkpoint records the name and
//! the hashes of the files, and refuses to go on with another.
//!
//! Built-ins:
//! - `lite`: EfficientNet-Lite0 (two mid-level taps, 14×14 × 152) + SmolLM2-135M-Instruct (Q4_1);
//! - `dino-qwen`: DINOv2 ViT-S/14 at 224 pixels, block 6 (16×16 × 384; the block whose tokens
//!   rank and localise ELPV's anomalies best, see `models::patch_encoder`) +
//!   Qwen2.5-Coder-0.5B-Instruct (Q4_K_M).

use super::patch_encoder::{DinoLayer, EncoderKind, PatchEncoder};
use crate::assets::Asset;
use crate::user_err;
use crate::util::sha256_path;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::OnceLock;

/// The default backbone: what a config without `[model] backbone` runs.
pub const DEFAULT: &str = "lite";

/// A built-in backbone: its name, what it is, and its two assets.
#[derive(Debug)]
pub struct BuiltinBackbone {
    pub name: &'static str,
    pub description: &'static str,
    pub vision: EncoderKind,
    pub vision_asset: Asset,
    /// DINOv2's input side and hidden state (ignored for EfficientNet).
    pub size: u32,
    pub layer: DinoLayer,
    pub llm_asset: Asset,
}

pub const BUILTINS: [BuiltinBackbone; 2] = [
    BuiltinBackbone {
        name: "lite",
        description: "EfficientNet-Lite0 patch features (14x14 x 152) + SmolLM2-135M-Instruct (GGUF Q4_1)",
        vision: EncoderKind::Efficientnet,
        vision_asset: Asset::EfficientNetPth,
        size: 224,
        layer: DinoLayer::Last,
        llm_asset: Asset::SmolLm2Gguf,
    },
    BuiltinBackbone {
        name: "dino-qwen",
        description: "DINOv2 ViT-S/14 block 6 at 224 px (16x16 x 384) + Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M)",
        vision: EncoderKind::Dinov2,
        vision_asset: Asset::Dinov2Onnx,
        size: 224,
        layer: DinoLayer::Block(6),
        llm_asset: Asset::Qwen25Gguf,
    },
];

/// A backbone resolved to files.
#[derive(Clone, Debug)]
pub struct Backbone {
    pub name: String,
    pub vision: EncoderKind,
    pub vision_weights: PathBuf,
    pub size: u32,
    pub layer: DinoLayer,
    /// A GGUF decoder (LLaMA or Qwen2 family) with its tokenizer and chat template, or a
    /// Hugging Face folder of one.
    pub llm: PathBuf,
    /// The LLM family a plugin's description promised (`llama`, `qwen2`), checked against the
    /// file when it loads; `None` for the built-ins.
    pub llm_family: Option<String>,
    /// [`Backbone::record`], computed once: a run records it and checks a checkpoint against it.
    pub(crate) hashes: OnceLock<BackboneRecord>,
}

/// What a checkpoint records of its backbone: the name and each file's sha256.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackboneRecord {
    pub name: String,
    pub vision_sha256: String,
    pub llm_sha256: String,
}

impl Backbone {
    /// A built-in backbone by name, its files from the installed assets.
    pub fn resolve(name: &str) -> Result<Backbone> {
        let b = builtin(name)?;
        Ok(Backbone {
            name: b.name.to_string(),
            vision: b.vision,
            vision_weights: b.vision_asset.path()?,
            size: b.size,
            layer: b.layer,
            llm: b.llm_asset.path()?,
            llm_family: None,
            hashes: OnceLock::new(),
        })
    }

    /// A backbone an external plugin describes: its description's `engine` object names the
    /// families the engine runs and their files,
    ///
    /// ```json
    /// "engine": {
    ///   "vision": {"family": "dinov2", "weights": "DIR or .safetensors or .onnx", "size": 224, "layer": 6},
    ///   "llm": {"family": "qwen2", "weights": "HF folder or .gguf"}
    /// }
    /// ```
    ///
    /// (`family`: `dinov2` or `efficientnet-lite0`; `layer`: a block number or `"last"`; the LLM's
    /// family is checked against the file when it loads). Relative paths are refused.
    pub fn from_description(name: &str, desc: &serde_json::Value) -> Result<Backbone> {
        let e = &desc["engine"];
        if !e.is_object() {
            return Err(user_err!(
                "backbone plugin `{name}` describes no `engine` section (vision and llm families and files), so \
                 sage cannot build a model from it; it can still serve `sage facts` if it generates"
            ));
        }
        let field = |obj: &str, key: &str| -> Result<&serde_json::Value> {
            let v = &e[obj][key];
            if v.is_null() {
                return Err(user_err!("backbone plugin `{name}`: engine.{obj}.{key} is missing"));
            }
            Ok(v)
        };
        let path = |obj: &str| -> Result<PathBuf> {
            let p = PathBuf::from(
                field(obj, "weights")?
                    .as_str()
                    .ok_or_else(|| user_err!("backbone plugin `{name}`: engine.{obj}.weights is not a path"))?,
            );
            if !p.is_absolute() {
                return Err(user_err!(
                    "backbone plugin `{name}`: engine.{obj}.weights `{}` is not absolute",
                    p.display()
                ));
            }
            if !p.exists() {
                return Err(user_err!("backbone plugin `{name}`: engine.{obj}.weights {} does not exist", p.display()));
            }
            Ok(p)
        };
        let vision = match field("vision", "family")?.as_str() {
            Some("dinov2") => EncoderKind::Dinov2,
            Some("efficientnet-lite0") => EncoderKind::Efficientnet,
            other => {
                return Err(user_err!(
                    "backbone plugin `{name}`: engine.vision.family {other:?} is not one the engine runs (dinov2, efficientnet-lite0)"
                ))
            }
        };
        let size = match &e["vision"]["size"] {
            serde_json::Value::Null => 224,
            v => v
                .as_u64()
                .map(|s| s as u32)
                .ok_or_else(|| user_err!("backbone plugin `{name}`: engine.vision.size is not a number"))?,
        };
        let layer = match &e["vision"]["layer"] {
            serde_json::Value::Null => DinoLayer::Last,
            serde_json::Value::Number(n) => DinoLayer::Block(n.as_u64().unwrap_or(0) as usize),
            v => v
                .as_str()
                .unwrap_or("")
                .parse()
                .map_err(|why| user_err!("backbone plugin `{name}`: engine.vision.layer: {why}"))?,
        };
        let llm_family = field("llm", "family")?.as_str().unwrap_or("");
        if !["llama", "qwen2"].contains(&llm_family) {
            return Err(user_err!(
                "backbone plugin `{name}`: engine.llm.family `{llm_family}` is not one the engine runs (llama, qwen2)"
            ));
        }
        Ok(Backbone {
            name: name.to_string(),
            vision,
            vision_weights: path("vision")?,
            size,
            layer,
            llm: path("llm")?,
            llm_family: Some(llm_family.to_string()),
            hashes: OnceLock::new(),
        })
    }

    /// The frozen vision encoder.
    pub fn encoder(&self) -> Result<PatchEncoder> {
        PatchEncoder::load_from(self.vision, &self.vision_weights, Some(self.size), self.layer)
            .with_context(|| format!("loading the vision encoder of backbone `{}`", self.name))
    }

    /// The name and the sha256 of both files (reads them whole: about a second per 500 MB).
    pub fn record(&self) -> Result<BackboneRecord> {
        if let Some(r) = self.hashes.get() {
            return Ok(r.clone());
        }
        let r = BackboneRecord {
            name: self.name.clone(),
            vision_sha256: sha256_path(&self.vision_weights)?,
            llm_sha256: sha256_path(&self.llm)?,
        };
        Ok(self.hashes.get_or_init(|| r).clone())
    }

    /// Refuses to go on from a checkpoint made with another backbone or other weights.
    /// `what` names the checkpoint for the message.
    pub fn check_record(&self, saved: &BackboneRecord, what: &str) -> Result<()> {
        if saved.name != self.name {
            return Err(user_err!(
                "{what} was made with backbone `{}`, not `{}`; use --backbone {} (or [model] backbone = \"{}\"), or start a new run",
                saved.name,
                self.name,
                saved.name,
                saved.name
            ));
        }
        let now = self.record()?;
        for (file, was, is) in [
            (&self.vision_weights, &saved.vision_sha256, &now.vision_sha256),
            (&self.llm, &saved.llm_sha256, &now.llm_sha256),
        ] {
            if was != is {
                return Err(user_err!(
                    "{what} was made with backbone `{}` whose file {} had sha256 {was}; it now has {is}. Restore the \
                     original file (`sage fetch --force`) or start a new run",
                    self.name,
                    file.display()
                ));
            }
        }
        Ok(())
    }
}

/// The built-in named `name`, or an error listing them.
pub fn builtin(name: &str) -> Result<&'static BuiltinBackbone> {
    BUILTINS.iter().find(|b| b.name == name).ok_or_else(|| {
        let names: Vec<&str> = BUILTINS.iter().map(|b| b.name).collect();
        user_err!("unknown backbone `{name}`; the backbones are {}", names.join(", "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_backbones_are_refused_with_the_list() {
        let e = builtin("internvl2").unwrap_err().to_string();
        assert!(e.contains("internvl2") && e.contains("lite") && e.contains("dino-qwen"), "{e}");
        assert_eq!(builtin(DEFAULT).unwrap().llm_asset.describe(), Asset::SmolLm2Gguf.describe());
    }
}
