//! Hugging Face checkpoint folders: `config.json`, the weights in one `model.safetensors` or in
//! shards listed by `model.safetensors.index.json`, and for language models `tokenizer.json` and
//! `tokenizer_config.json` (the chat template there or in `chat_template.jinja`). This module
//! reads the folder; which architectures run is the models' business (`models::llama::hf`,
//! `models::dinov2`), and each refuses an unknown `model_type` by name.

use super::safetensors::SafetensorsFile;
use crate::tensor::Tensor;
use crate::user_err;
use anyhow::Result;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub struct HfCheckpoint {
    pub dir: PathBuf,
    /// `config.json`, parsed.
    pub config: serde_json::Value,
    /// `config.json`'s `model_type` (`llama`, `qwen2`, `dinov2`, ...).
    pub model_type: String,
    shards: Vec<SafetensorsFile>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
}

/// Whether `path` is a folder with a `config.json` (a Hugging Face checkpoint).
pub fn is_hf_dir(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

impl HfCheckpoint {
    pub fn open(dir: &Path) -> Result<HfCheckpoint> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| {
            user_err!("cannot read {}: {e} (a Hugging Face checkpoint folder has a config.json)", config_path.display())
        })?;
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| user_err!("{} is not JSON: {e}", config_path.display()))?;
        let model_type = config["model_type"]
            .as_str()
            .ok_or_else(|| user_err!("{}: no `model_type` string", config_path.display()))?
            .to_string();
        let (single, index_path) = (dir.join("model.safetensors"), dir.join("model.safetensors.index.json"));
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| user_err!("cannot read {}: {e}", index_path.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| user_err!("{} is not JSON: {e}", index_path.display()))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| user_err!("{}: no `weight_map` object", index_path.display()))?;
            let mut files: BTreeMap<String, usize> = BTreeMap::new();
            for (name, file) in map {
                let file = file
                    .as_str()
                    .ok_or_else(|| user_err!("{}: weight_map[`{name}`] is not a file name", index_path.display()))?;
                if file.contains('/') || file.contains("..") {
                    return Err(user_err!(
                        "{}: shard `{file}` is not a file name in the checkpoint folder",
                        index_path.display()
                    ));
                }
                let next = files.len();
                let i = *files.entry(file.to_string()).or_insert(next);
                index.insert(name.clone(), i);
            }
            let mut ordered: Vec<(&String, &usize)> = files.iter().collect();
            ordered.sort_by_key(|(_, &i)| i);
            for (file, _) in ordered {
                shards.push(SafetensorsFile::open(&dir.join(file))?);
            }
            // The index must say where each tensor is, and the shard must hold it.
            for (name, &i) in &index {
                if shards[i].tensor_shape(name).is_none() {
                    return Err(user_err!(
                        "{}: `{name}` is listed in {}, but that shard does not hold it",
                        index_path.display(),
                        map[name]
                    ));
                }
            }
        } else if single.is_file() {
            let f = SafetensorsFile::open(&single)?;
            for name in f.names() {
                index.insert(name, 0);
            }
            shards.push(f);
        } else {
            return Err(user_err!(
                "{}: no model.safetensors nor model.safetensors.index.json (PyTorch .bin weights are not read; \
                 re-save with safe_serialization=True)",
                dir.display()
            ));
        }
        Ok(HfCheckpoint { dir: dir.to_path_buf(), config, model_type, shards, index })
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.index.keys().cloned().collect();
        v.sort();
        v
    }

    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        match self.index.get(name) {
            Some(&i) => self.shards[i].tensor(name),
            None => Err(user_err!("{}: tensor `{name}` is missing (is this the right model?)", self.dir.display())),
        }
    }

    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).and_then(|&i| self.shards[i].tensor_shape(name))
    }

    /// A `config.json` key as an unsigned integer, or an error naming the key.
    pub fn usize(&self, key: &str) -> Result<usize> {
        self.config[key].as_u64().map(|v| v as usize).ok_or_else(|| self.key_err(key, "an unsigned integer"))
    }

    /// An optional `config.json` number (absent or null: `None`).
    pub fn f64_opt(&self, key: &str) -> Result<Option<f64>> {
        match &self.config[key] {
            serde_json::Value::Null => Ok(None),
            v => v.as_f64().map(Some).ok_or_else(|| self.key_err(key, "a number")),
        }
    }

    pub fn key_err(&self, key: &str, expected: &str) -> anyhow::Error {
        user_err!(
            "{}: config.json key `{key}` = {} is not {expected}",
            self.dir.display(),
            self.config.get(key).map(|v| v.to_string()).unwrap_or_else(|| "(absent)".into())
        )
    }

    /// The chat template: `tokenizer_config.json`'s `chat_template` (a string, or the `default`
    /// entry of a list of named templates), else `chat_template.jinja`.
    pub fn chat_template(&self) -> Result<Option<String>> {
        let tc = self.tokenizer_config()?;
        match &tc["chat_template"] {
            serde_json::Value::String(s) => return Ok(Some(s.clone())),
            serde_json::Value::Array(list) => {
                if let Some(t) = list.iter().find(|t| t["name"] == "default").and_then(|t| t["template"].as_str()) {
                    return Ok(Some(t.to_string()));
                }
            }
            _ => {}
        }
        let jinja = self.dir.join("chat_template.jinja");
        if jinja.is_file() {
            return Ok(Some(
                std::fs::read_to_string(&jinja).map_err(|e| user_err!("cannot read {}: {e}", jinja.display()))?,
            ));
        }
        Ok(None)
    }

    /// `tokenizer_config.json` (an empty object when absent).
    pub fn tokenizer_config(&self) -> Result<serde_json::Value> {
        let p = self.dir.join("tokenizer_config.json");
        if !p.is_file() {
            return Ok(serde_json::json!({}));
        }
        let text = std::fs::read_to_string(&p).map_err(|e| user_err!("cannot read {}: {e}", p.display()))?;
        serde_json::from_str(&text).map_err(|e| user_err!("{} is not JSON: {e}", p.display()))
    }

    /// A special token of `tokenizer_config.json` (`bos_token`, `eos_token`) as text: a string,
    /// or an added-token object's `content`.
    pub fn special_token(&self, key: &str) -> Result<Option<String>> {
        let tc = self.tokenizer_config()?;
        Ok(match &tc[key] {
            serde_json::Value::String(s) => Some(s.clone()),
            v => v["content"].as_str().map(str::to_string),
        })
    }
}
