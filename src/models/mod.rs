//! One file per architecture, with field names that mirror the checkpoint's tensor tree.

pub mod anomaly_map;
pub mod bert;
pub mod efficientnet;
pub mod imagenet;
pub mod llama;
pub mod llama_step;
pub mod llama_train;
pub mod random_init;
pub mod sage;
pub mod sage_model;
pub mod sage_step;

use crate::tensor::Tensor;
use anyhow::Result;
use std::collections::BTreeMap;

/// Anything that hands out named f32 tensors (a safetensors file, a GGUF file, a loaded map).
pub trait WeightSource {
    fn get(&self, name: &str) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
}

impl WeightSource for crate::formats::safetensors::SafetensorsFile {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        self.names().iter().any(|n| n == name)
    }
}

impl WeightSource for crate::formats::gguf::Gguf {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// A state dict already in memory (e.g. from a legacy `.pth`), with the file it came from.
pub struct StateDict {
    pub path: std::path::PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
}

impl WeightSource for StateDict {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors.get(name).cloned().ok_or_else(|| {
            crate::user_err!("{}: tensor `{name}` is missing (is this the right model?)", self.path.display())
        })
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
