//! SFE examples: every question of every AD-PL item, its best answer as the target, the item's
//! images as (cached) patch tokens, and the test image's fact sentences.

use crate::data::{adpl, Sample};
use crate::models::efficientnet::PatchTokens;
use crate::models::sage::SageModel;
use crate::train::{streams, SeedRng};
use crate::user_err;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// (item, question) indices into a sample list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExampleRef {
    pub item: usize,
    pub question: usize,
}

pub struct Split {
    pub samples: Vec<Sample>,
    pub examples: Vec<ExampleRef>,
}

impl Split {
    pub fn load(path: &Path, max_items: usize) -> Result<Split> {
        Split::from_samples(path, adpl::load(path, None)?, max_items)
    }

    /// The split of `samples`, read from `path` (named in errors), cut to its first `max_items`
    /// (0: all).
    pub fn from_samples(path: &Path, mut samples: Vec<Sample>, max_items: usize) -> Result<Split> {
        if max_items > 0 {
            samples.truncate(max_items);
        }
        let examples = samples
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.questions
                    .iter()
                    .enumerate()
                    .filter(|(_, q)| !q.ranked_answers.is_empty())
                    .map(move |(j, _)| ExampleRef { item: i, question: j })
            })
            .collect::<Vec<_>>();
        if examples.is_empty() {
            return Err(user_err!("{} has no questions with ranked answers", path.display()));
        }
        Ok(Split { samples, examples })
    }

    pub fn question(&self, e: ExampleRef) -> &crate::data::Question {
        &self.samples[e.item].questions[e.question]
    }
}

/// The index (into `0..n`) that global micro-batch `g` visits: every epoch visits each index
/// once, in its own seeded order, so the order is a pure function of `g` (exact resume).
pub fn epoch_pick(seed: u64, n: usize, g: u64) -> usize {
    let epoch = g / n as u64;
    let mut order: Vec<usize> = (0..n).collect();
    SeedRng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15), streams::DATA).shuffle(&mut order);
    order[(g % n as u64) as usize]
}

/// The index that global draw `g` visits when draws alternate between two sides (indices into
/// one list): even draws from `first`, odd ones from `second`, each side in its own seeded epochs
/// (an exact-resume order like [`epoch_pick`]'s). `None` when a side is empty.
pub fn alternate_pick(seed: u64, first: &[usize], second: &[usize], g: u64) -> Option<usize> {
    if first.is_empty() || second.is_empty() {
        return None;
    }
    let (side, seed) = if g.is_multiple_of(2) { (first, seed) } else { (second, seed ^ 0x5eed) };
    Some(side[epoch_pick(seed, side.len(), g / 2)])
}

/// Patch tokens per image path, computed once by the frozen encoder.
#[derive(Default)]
pub struct TokenCache {
    map: HashMap<PathBuf, PatchTokens>,
}

impl TokenCache {
    pub fn get(&mut self, model: &SageModel, path: &Path) -> Result<&PatchTokens> {
        if !self.map.contains_key(path) {
            let t = model.patch_tokens(path).with_context(|| format!("encoding {}", path.display()))?;
            self.map.insert(path.to_path_buf(), t);
        }
        Ok(&self.map[path])
    }
}
