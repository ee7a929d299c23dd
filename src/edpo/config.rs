//! The E-DPO run description (`configs/edpo-*.toml`); unknown keys are refused.

use super::pairs::PairChoice;
use crate::config::{CheckRanges, RangeCheck};
use crate::stage::config::TrainSection;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdpoRunConfig {
    /// The `sage sfe` run folder: the policy starts from it and it stays frozen as π_ref. The
    /// model, facts and validation data are that run's.
    pub sfe: PathBuf,
    /// Optional `[model] backbone = "..."`: the backbone this run expects, checked against the SFE
    /// run's (the model itself is always the SFE run's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<EdpoModel>,
    pub data: EdpoData,
    #[serde(default)]
    pub edpo: EdpoSection,
    pub train: TrainSection,
}

/// `[model]` of an E-DPO config.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdpoModel {
    pub backbone: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdpoData {
    /// AD-PL file whose ranked answers form the pairs.
    pub train: PathBuf,
    /// The judge's scores of those answers (`sage score`); default `<train stem>.scores.jsonl`.
    #[serde(default)]
    pub scores: Option<PathBuf>,
    /// Whose scores to use: the judge plugin's name.
    #[serde(default = "default_judge")]
    pub judge: String,
    /// The judge's config, as given to `sage score --judge-config` (scores are cached per config).
    #[serde(default)]
    pub judge_config: Option<serde_json::Value>,
    /// Use at most this many training items (0 = all).
    #[serde(default)]
    pub max_train_items: usize,
}

fn default_judge() -> String {
    "rubric".into()
}

/// `edpo`: entropy-aware DPO; `dpo`: plain DPO (η = 0), the ablation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    Edpo,
    Dpo,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdpoSection {
    #[serde(default = "default_loss")]
    pub loss: LossKind,
    /// DPO's inverse temperature on the log-ratio difference.
    #[serde(default = "default_beta")]
    pub beta: f32,
    /// Weight of the entropy gap `|H(a_w) − H(a_l)|` subtracted from the margin (ignored by `dpo`).
    #[serde(default = "default_eta")]
    pub eta: f32,
    #[serde(default = "default_pairs")]
    pub pairs: PairChoice,
    /// Divide each answer's log-probabilities by its token count inside the margin
    /// (length-normalised log-ratios, as SimPO does); false is the paper's summed form.
    #[serde(default, skip_serializing_if = "crate::config::is_false")]
    pub length_normalize: bool,
    /// Weight α of an SFT term on the chosen answers: α times their mean per-token negative
    /// log-likelihood is added to the loss (TRL's `rpo_alpha`, which SAGE's public training
    /// script sets); 0 is the paper's loss.
    #[serde(default, skip_serializing_if = "crate::config::is_zero")]
    pub sft_weight: f32,
    /// Draw instances alternately from those whose best answer concludes Yes and those whose
    /// best answer concludes No, so every step sees both conclusions equally often; false draws
    /// from all instances in one seeded order.
    #[serde(default, skip_serializing_if = "crate::config::is_false")]
    pub balance_conclusions: bool,
}

fn default_loss() -> LossKind {
    LossKind::Edpo
}
fn default_beta() -> f32 {
    0.1
}
fn default_eta() -> f32 {
    1.0
}
fn default_pairs() -> PairChoice {
    PairChoice::Both
}

impl Default for EdpoSection {
    fn default() -> Self {
        EdpoSection {
            loss: default_loss(),
            beta: default_beta(),
            eta: default_eta(),
            pairs: default_pairs(),
            length_normalize: false,
            sft_weight: 0.0,
            balance_conclusions: false,
        }
    }
}

impl EdpoSection {
    /// The loss constants: `dpo` forces η = 0.
    pub fn loss_config(&self) -> crate::ops::edpo::EdpoConfig {
        let eta = match self.loss {
            LossKind::Edpo => self.eta,
            LossKind::Dpo => 0.0,
        };
        crate::ops::edpo::EdpoConfig { beta: self.beta, eta }
    }
}

impl EdpoData {
    pub fn scores_path(&self) -> PathBuf {
        self.scores.clone().unwrap_or_else(|| crate::score::default_cache_path(&self.train))
    }

    /// The key the judge's scores are cached under.
    pub fn judge_key(&self) -> String {
        let cfg = self.judge_config.clone().unwrap_or_else(|| serde_json::json!({}));
        crate::score::judge_key(&self.judge, &cfg)
    }
}

impl CheckRanges for EdpoRunConfig {
    fn check_ranges(&self, c: &mut RangeCheck) {
        // β scales a log-probability ratio and η an entropy gap (at most ln 3 nats) inside a
        // sigmoid: beyond 100 either saturates it and the gradient vanishes.
        c.positive_float("edpo.beta", self.edpo.beta as f64, 100.0);
        c.float("edpo.eta", self.edpo.eta as f64, 0.0, 100.0);
        c.float("edpo.sft_weight", self.edpo.sft_weight as f64, 0.0, 100.0);
        self.train.check_ranges(c);
    }
}
