//! The training-free anomaly map of ARCHITECTURE.md §1: patch tokens of the test and reference
//! images from a frozen encoder (EfficientNet-Lite0 by default, or DINOv2: `PatchEncoder`),
//! `1 − max cosine` of each test patch to the reference patches, and the map's maximum as the
//! image score.

use super::efficientnet::PatchTokens;
use super::patch_encoder::PatchEncoder;
use crate::backend::cpu::HostOps;
use crate::opset::{PatchScores, Reduce, SimilarityShape, StepOps};
use anyhow::Result;
use image::DynamicImage;

/// The encoder and the search run on the same op set (on the GPU: the encoder's kernels, then the
/// fused min-cosine kernel).
pub struct AnomalyMapper<O: StepOps = HostOps> {
    pub encoder: PatchEncoder<O>,
    pub reduce: Reduce,
    pub k: usize,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AnomalyMap {
    pub grid_h: usize,
    pub grid_w: usize,
    /// `1 − s_i` per patch, row-major on the grid.
    pub map: Vec<f32>,
    /// The map's maximum: the image-level anomaly score.
    pub score: f32,
    #[serde(flatten)]
    pub patches: PatchScores,
}

impl<O: StepOps> AnomalyMapper<O> {
    pub fn tokens(&self, img: &DynamicImage) -> Result<PatchTokens> {
        Ok(self.encoder.tokens(&[img])?.remove(0))
    }

    /// Scores test tokens against reference tokens (`None`: zero-shot, the test against itself).
    pub fn compare(&self, test: &PatchTokens, reference: Option<&PatchTokens>) -> Result<AnomalyMap> {
        if let Some(r) = reference {
            anyhow::ensure!(r.dim == test.dim, "token widths differ: {} vs {}", test.dim, r.dim);
        }
        let ops = self.encoder.ops();
        let shape = SimilarityShape {
            patches: test.data.len() / test.dim.max(1),
            ref_patches: reference.map_or(0, |r| r.data.len() / r.dim.max(1)),
            channels: test.dim,
            k: self.k,
            reduce: self.reduce,
        };
        let reference = reference.map(|r| ops.upload(&r.data)).transpose()?;
        let patches = ops.mincos_topk(&ops.upload(&test.data)?, reference.as_ref(), shape)?;
        let map = patches.anomaly_map();
        let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        Ok(AnomalyMap { grid_h: test.h, grid_w: test.w, map, score, patches })
    }
}
