//! Patch-to-reference cosine similarity: the nearest-neighbour search of the anomaly map and of
//! the SAGE head's patch selection (ARCHITECTURE.md §1, §4). For each test patch `i`, `s_i` reduces
//! `cos(t_i, r_j)` over the reference patches `j`; the K test patches with the lowest `s_i` are the
//! anomaly candidates and `1 − s_i` is the anomaly map. A memory bank is a reference of many
//! images' patches.

use super::Buffers;
use anyhow::Result;

/// How a test patch's similarities to the reference patches become one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduce {
    /// Max over the reference: similarity to the nearest normal patch (PatchCore; the default).
    Nearest,
    /// Min over the reference: Eq. 1 of the paper read literally.
    Min,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PatchScores {
    /// `s_i` per test patch.
    pub similarity: Vec<f32>,
    /// The reference patch that attained `s_i`.
    pub ref_index: Vec<u32>,
    /// The K test patches with the lowest `s_i`, lowest first (ties: the lower index).
    pub topk: Vec<u32>,
}

impl PatchScores {
    /// `1 − s_i`: high where the test patch has no close normal counterpart.
    pub fn anomaly_map(&self) -> Vec<f32> {
        self.similarity.iter().map(|s| 1.0 - s).collect()
    }
}

/// One search: `patches` test rows against `ref_patches` reference rows of `channels` values.
/// Zero-shot (`reference = None` in [`Similarity::mincos_topk`]) compares the test rows with each
/// other, a row never matching itself; `ref_patches` is then ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimilarityShape {
    pub patches: usize,
    pub ref_patches: usize,
    pub channels: usize,
    /// How many lowest-`s` test patches to return (0: none, the map only).
    pub k: usize,
    pub reduce: Reduce,
}

pub trait Similarity: Buffers {
    /// `test [patches, channels]` against `reference [ref_patches, channels]` (`None`: zero-shot).
    /// Rows need not be unit length. The scores come back to the host: they are read there (the
    /// image score, the map, the selected patches).
    fn mincos_topk(&self, test: &Self::Buf, reference: Option<&Self::Buf>, s: SimilarityShape) -> Result<PatchScores>;
}
