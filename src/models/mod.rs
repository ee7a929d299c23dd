//! One file per architecture, with field names that mirror the checkpoint's tensor tree.

pub mod anomaly_map;
pub mod backbone;
pub mod bert;
pub mod dinov2;
pub mod efficientnet;
pub mod foreground;
pub mod imagenet;
pub mod llama;
pub mod memory_bank;
pub mod patch_encoder;
pub mod random_init;
pub mod reference_views;
pub mod sage;
pub mod sampling;

use crate::tensor::Tensor;
use anyhow::Result;
use std::collections::BTreeMap;

/// Anything that hands out named f32 tensors (a safetensors file, a GGUF file, a loaded map).
pub trait WeightSource {
    fn get(&self, name: &str) -> Result<Tensor>;
    fn contains(&self, name: &str) -> bool;
    /// The tensor's shape, `None` when absent. Validation asks this for every tensor before any
    /// is read, so file-backed sources answer it from the header without touching the data.
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.get(name).ok().map(|t| t.shape().to_vec())
    }
    /// A 2-D tensor's quantized blocks, when the source stores it quantized (a GGUF file);
    /// `None` otherwise, and the caller reads f32 with [`WeightSource::get`].
    fn quantized(&self, _name: &str) -> Option<crate::quant::QMatrix> {
        None
    }
}

use crate::formats::safetensors::SafetensorsFile;

impl WeightSource for SafetensorsFile {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensor_shape(name)
    }
}

impl WeightSource for crate::formats::hf::HfCheckpoint {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensor_shape(name).is_some()
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensor_shape(name)
    }
}

impl WeightSource for crate::formats::gguf::Gguf {
    fn get(&self, name: &str) -> Result<Tensor> {
        self.tensor(name)
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape.clone())
    }
    fn quantized(&self, name: &str) -> Option<crate::quant::QMatrix> {
        crate::formats::gguf::Gguf::quantized(self, name)
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
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|t| t.shape().to_vec())
    }
}
