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
    /// The backbone every stage runs (`models::backbone`; `sage demo --backbone`).
    pub backbone: &'static str,
    /// Every SFE run states the training-free map's score in its prompt (`model.map_cue`;
    /// `sage demo --map-cue on|off`); later stages inherit it from their SFE start. On in the
    /// standard and full profiles: the one start model measured whose preference rows gain on it.
    pub map_cue: bool,
    /// Training items (image pairs; 5 questions each; 0 = all).
    pub train_items: usize,
    pub sfe_steps: u64,
    pub sfe_batch: usize,
    pub sfe_lr: f32,
    pub edpo_steps: u64,
    pub edpo_batch: usize,
    pub edpo_lr: f32,
    /// Steps of the SFE+GRPO row (`sage grpo` from the facts-fused SFE run: a quarter of them the
    /// format cold start, the rest GRPO updates, two per sampled batch); 0 = no such row.
    pub grpo_steps: u64,
    /// Evaluated test items (0 = all).
    pub eval_items: usize,
    /// With `eval_items`: half anomalous and half normal items (`sage eval --balanced`) instead
    /// of the first ones (ELPV's test split lists its defective cells first).
    pub balanced_eval: bool,
    pub max_tokens: usize,
    /// Validation questions at the end of each training run.
    pub val_questions: usize,
    /// Read every conclusion from one forward pass (`sage eval --first-token`) instead of from
    /// a generated answer.
    pub first_token: bool,
    /// With `first_token`: generate full answers (SBERT, MLE) for the first N evaluated items
    /// only (`None`: all).
    pub generate_items: Option<usize>,
    /// The preference stages' loss beyond β and η.
    pub pref: PrefOptions,
    /// Rows trained on one cell kind and tested on the other (the unseen-kind splits), with
    /// this many test items each (0: none of these rows).
    pub unseen_eval_items: usize,
    /// The rubric judge with its hedge rule (`{"graded": true}`), for E-DPO's entropies and MLE.
    pub graded_judge: bool,
    /// Training items the judge scores and the preference stages draw from (0 = all).
    pub pref_items: usize,
}

/// The preference loss's options (`[edpo]` of the stage config) a profile sets.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PrefOptions {
    pub beta: f32,
    pub length_normalize: bool,
    pub sft_weight: f32,
    pub balance_conclusions: bool,
}

/// The paper's preference loss: summed log-probabilities, no SFT term, instances as they come.
pub const PAPER_PREF: PrefOptions =
    PrefOptions { beta: 0.1, length_normalize: false, sft_weight: 0.0, balance_conclusions: false };

/// Sized for two CPU cores (minutes): a smoke test of the pipeline, not of the method. The
/// paper's prompt (no map cue): its committed run and timings stay what they show.
pub const QUICK: Profile = Profile {
    name: "quick",
    backbone: crate::models::backbone::DEFAULT,
    map_cue: false,
    train_items: 24,
    sfe_steps: 40,
    sfe_batch: 4,
    sfe_lr: 2e-3,
    edpo_steps: 15,
    edpo_batch: 2,
    edpo_lr: 5e-4,
    grpo_steps: 8,
    eval_items: 10,
    balanced_eval: true,
    max_tokens: 32,
    val_questions: 10,
    first_token: false,
    generate_items: None,
    pref: PAPER_PREF,
    unseen_eval_items: 0,
    graded_judge: false,
    pref_items: 24,
};

/// Every item, for a GPU. With the map cue, as the standard profile.
pub const FULL: Profile = Profile {
    name: "full",
    backbone: crate::models::backbone::DEFAULT,
    map_cue: true,
    train_items: 0,
    sfe_steps: 2000,
    sfe_batch: 8,
    sfe_lr: 1e-3,
    edpo_steps: 500,
    edpo_batch: 4,
    edpo_lr: 2e-4,
    grpo_steps: 200,
    eval_items: 0,
    balanced_eval: false,
    max_tokens: 96,
    val_questions: 200,
    first_token: true,
    generate_items: Some(100),
    pref: STANDARD_PREF,
    unseen_eval_items: 0,
    graded_judge: true,
    pref_items: 0,
};

/// The preference loss of the standard and full profiles: the paper's loss (summed log-ratios,
/// β 0.1, pairs as they come) plus an SFT term on the chosen answer (SAGE's `rpo_alpha`), the one
/// form that kept its start at both sizes measured. Quick-size sweep (docs/results/pref-sweep):
/// +2.9 points [−0.1, +5.8] over its SFE start, 45 % Yes (truth 53 %). Standard size
/// (docs/results/standard/pref-sft): −1.5 [−4.0, +0.9] (DPO) and −2.0 [−4.4, +0.3] (E-DPO), 35 %
/// Yes (truth 45 %), where the length-normalised, balanced loss without the SFT term, the former
/// default, collapsed to 0.6 % Yes and −4.8 [−7.2, −2.4]. The whole standard table rerun with
/// this form on the quantized base (docs/results/standard/rerun-20261204) no longer collapses (33 %
/// Yes) but falls below its start, −7.9 [−10.9, −4.8]. With the map cue (`--map-cue`, a start
/// model that uses the image pair) the same loss gains on its start: +1.1 [+0.1, +2.2] (DPO) and
/// +1.3 [+0.3, +2.2] (E-DPO), 45 % Yes (docs/results/standard/map-cue).
pub const STANDARD_PREF: PrefOptions =
    PrefOptions { beta: 0.1, length_normalize: false, sft_weight: 1.0, balance_conclusions: false };

/// The two-core CPU machine within two hours, by the step and evaluation times measured for
/// docs/results/pref-sweep (SFE ≈ 6.5 s a step at batch 4, 15 s with pasted facts; a preference
/// step ≈ 11 s at batch 2; a first-token pair ≈ 0.55 s): the whole ELPV test split (466 image pairs,
/// 2,330 questions) with first-token conclusions, full answers for SBERT and MLE on its first 20
/// pairs, and the unseen-kind rows on 100 pairs each. Run end to end in 105.9 min as it is
/// (docs/results/standard/default-20261205); 107.6 min with the preference loss that preceded
/// [`STANDARD_PREF`] and without the map cue (docs/results/standard).
///
/// The map cue is on: without it the start model answers with a Yes rate it cannot tie to the
/// image pair (model AUROC 0.50) and every preference row falls below its start (−7.9 points
/// [−10.9, −4.8], docs/results/standard/rerun-20261204); with it every preference row gains on
/// its start (docs/results/standard/map-cue). `--map-cue off` runs the paper's prompt.
pub const STANDARD: Profile = Profile {
    name: "standard",
    map_cue: true,
    train_items: 0,
    sfe_steps: 80,
    edpo_steps: 30,
    edpo_lr: 1e-4,
    grpo_steps: 24,
    eval_items: 0,
    // The unseen-kind rows keep their first 100 test items, as in the committed run.
    balanced_eval: false,
    max_tokens: 48,
    first_token: true,
    generate_items: Some(20),
    pref: STANDARD_PREF,
    unseen_eval_items: 100,
    graded_judge: true,
    pref_items: 200,
    ..QUICK
};

impl Profile {
    /// The judge config the profile scores with (`--judge-config`, `[data] judge_config`).
    pub fn judge_config(&self) -> Option<serde_json::Value> {
        self.graded_judge.then(|| serde_json::json!({"graded": true}))
    }

    /// The working folder when none is given: `runs/demo-quick`, `runs/demo-standard` or
    /// `runs/demo`, with `-<backbone>` after it for a backbone other than the default, and
    /// `-map-cue` or `-no-map-cue` where the cue is not the profile's own choice (so a folder of
    /// one form is not resumed with the other).
    pub fn default_out(&self) -> PathBuf {
        let base = match self.name {
            "quick" => "runs/demo-quick",
            "standard" => "runs/demo-standard",
            _ => "runs/demo",
        };
        let mut out = base.to_string();
        if self.backbone != crate::models::backbone::DEFAULT {
            out += &format!("-{}", self.backbone);
        }
        match (self.map_cue, Self::named(self.name).map(|p| p.map_cue)) {
            (true, Some(false)) => out += "-map-cue",
            (false, Some(true)) => out += "-no-map-cue",
            _ => {}
        }
        PathBuf::from(out)
    }

    /// The profile called `name` (`quick`, `standard` or `full`).
    pub fn named(name: &str) -> Option<&'static Profile> {
        [&QUICK, &STANDARD, &FULL].into_iter().find(|p| p.name == name)
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

/// The row of the whole method (its evaluation gets the HTML page).
pub const FULL_ROW: &str = "Full (E-DPO)";

/// The GRPO row (after [`ROWS`], before the unseen-kind rows).
pub const GRPO_ROW: &str = "SFE+GRPO";

/// A generalisation row: the full method (fused facts, E-DPO) trained on the `train.json` of
/// the data subfolder `split` and tested on its `test.json`, a cell kind it never saw.
pub struct UnseenRow {
    pub name: &'static str,
    pub split: &'static str,
}

pub const UNSEEN_ROWS: [UnseenRow; 2] = [
    UnseenRow { name: "Full, unseen poly (trained on mono)", split: "unseen-poly" },
    UnseenRow { name: "Full, unseen mono (trained on poly)", split: "unseen-mono" },
];

pub const ROWS: [Row; 6] = [
    Row { name: "Baseline", sfe: "none", pref: None },
    Row { name: "+Fact[Hard]", sfe: "hard", pref: None },
    Row { name: "+Fact[FE]", sfe: "fused", pref: None },
    Row { name: "+DPO", sfe: "none", pref: Some((LossKind::Dpo, "none-dpo")) },
    Row { name: "SFE+DPO", sfe: "fused", pref: Some((LossKind::Dpo, "fused-dpo")) },
    Row { name: "Full (E-DPO)", sfe: "fused", pref: Some((LossKind::Edpo, "fused-edpo")) },
];
