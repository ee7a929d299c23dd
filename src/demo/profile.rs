//! How big the demo is (the `--quick` and full profiles) and which runs make which row of the
//! ablation table.

use crate::edpo::config::LossKind;
use crate::models::sage::FactsMode;
use serde::Serialize;
use std::path::PathBuf;

/// How big each stage is.
#[derive(Clone, Debug, Serialize)]
pub struct Profile {
    pub name: &'static str,
    /// Training items (image pairs; 5 questions each; 0 = all).
    pub train_items: usize,
    pub sfe_steps: u64,
    pub sfe_batch: usize,
    pub sfe_lr: f32,
    pub edpo_steps: u64,
    pub edpo_batch: usize,
    pub edpo_lr: f32,
    /// Evaluated test items (0 = all).
    pub eval_items: usize,
    pub max_tokens: usize,
    /// Validation questions at the end of each training run.
    pub val_questions: usize,
}

/// Sized for two CPU cores (minutes): a smoke test of the pipeline, not of the method.
pub const QUICK: Profile = Profile {
    name: "quick",
    train_items: 24,
    sfe_steps: 40,
    sfe_batch: 4,
    sfe_lr: 2e-3,
    edpo_steps: 15,
    edpo_batch: 2,
    edpo_lr: 5e-4,
    eval_items: 10,
    max_tokens: 32,
    val_questions: 10,
};

/// Every item, for a GPU.
pub const FULL: Profile = Profile {
    name: "full",
    train_items: 0,
    sfe_steps: 2000,
    sfe_batch: 8,
    sfe_lr: 1e-3,
    edpo_steps: 500,
    edpo_batch: 4,
    edpo_lr: 2e-4,
    eval_items: 0,
    max_tokens: 96,
    val_questions: 200,
};

impl Profile {
    /// The working folder when none is given: `runs/demo-quick` or `runs/demo`.
    pub fn default_out(&self) -> PathBuf {
        PathBuf::from(if self.name == QUICK.name { "runs/demo-quick" } else { "runs/demo" })
    }
}

/// The three SFE runs: their names (`sfe-<name>` folders and configs) and facts modes.
pub const SFE_RUNS: [(&str, FactsMode); 3] =
    [("none", FactsMode::None), ("hard", FactsMode::Hard), ("fused", FactsMode::Fused)];

/// One row of the ablation table: which SFE run, and which preference run (loss, run name) on
/// top of it.
pub struct Row {
    pub name: &'static str,
    pub sfe: &'static str,
    pub pref: Option<(LossKind, &'static str)>,
}

pub const ROWS: [Row; 6] = [
    Row { name: "Baseline", sfe: "none", pref: None },
    Row { name: "+Fact[Hard]", sfe: "hard", pref: None },
    Row { name: "+Fact[FE]", sfe: "fused", pref: None },
    Row { name: "+DPO", sfe: "none", pref: Some((LossKind::Dpo, "none-dpo")) },
    Row { name: "SFE+DPO", sfe: "fused", pref: Some((LossKind::Dpo, "fused-dpo")) },
    Row { name: "Full (E-DPO)", sfe: "fused", pref: Some((LossKind::Edpo, "fused-edpo")) },
];
