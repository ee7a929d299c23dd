//! The training-free anomaly map of ARCHITECTURE.md §1: patch tokens of the test and reference
//! images from a frozen encoder (EfficientNet-Lite0 by default, or DINOv2: `PatchEncoder`),
//! `1 − max cosine` of each test patch to the reference patches, and the map's maximum as the
//! image score.

use super::efficientnet::PatchTokens;
use super::patch_encoder::PatchEncoder;
use crate::ops::similarity::{mincos_topk, PatchScores, Reduce};
use anyhow::Result;
use image::DynamicImage;

pub struct AnomalyMapper {
    pub encoder: PatchEncoder,
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

impl AnomalyMapper {
    pub fn tokens(&self, img: &DynamicImage) -> Result<PatchTokens> {
        Ok(self.encoder.tokens(&[img])?.remove(0))
    }

    /// Scores test tokens against reference tokens (`None`: zero-shot, the test against itself).
    pub fn compare(&self, test: &PatchTokens, reference: Option<&PatchTokens>) -> Result<AnomalyMap> {
        if let Some(r) = reference {
            anyhow::ensure!(r.dim == test.dim, "token widths differ: {} vs {}", test.dim, r.dim);
        }
        let patches = mincos_topk(&test.data, reference.map(|r| r.data.as_slice()), test.dim, self.k, self.reduce);
        let map = patches.anomaly_map();
        let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        Ok(AnomalyMap { grid_h: test.h, grid_w: test.w, map, score, patches })
    }
}
