//! The GRPO run description (`configs/grpo-*.toml`); unknown keys are refused.

use super::reward::RewardConfig;
use crate::config::{CheckRanges, RangeCheck};
use crate::stage::config::TrainSection;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoRunConfig {
    /// The SFE run the policy starts from; its weights are also the frozen KL reference.
    pub sfe: PathBuf,
    pub data: GrpoData,
    #[serde(default)]
    pub grpo: GrpoSection,
    pub train: TrainSection,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpoData {
    /// Samples (a `sage data build` file): each one's label, defect type and boxes are the truth.
    pub train: PathBuf,
    /// Held-out samples for the verdict accuracy before and after (default: the SFE run's val).
    #[serde(default)]
    pub val: Option<PathBuf>,
    /// At most this many training samples, in file order (0 = all).
    #[serde(default)]
    pub max_train_items: usize,
}

/// Which tokens of an SFE anchor's answer its cross-entropy counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnchorTokens {
    /// Every token of the best-ranked answer (the SFE task's own loss).
    #[default]
    Answer,
    /// Only the answer's first token, its Yes/No conclusion, with the rest of the answer still in
    /// the context: the token that `sage eval --first-token` scores.
    Conclusion,
}

/// What a group with one reward for every answer gets (its advantages would all be zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum UniformGroups {
    /// Sample the group again (new seeds), up to `resample_tries` times, then skip it.
    Resample,
    /// Leave it out of the step (no gradient, no KL); counted in the log.
    Skip,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GrpoSection {
    /// Answers sampled per prompt (G).
    pub group: usize,
    pub temperature: f32,
    pub top_p: f32,
    /// Most tokens per answer.
    pub max_new: usize,
    /// The policy ratio is clipped to [1 − ε, 1 + ε].
    pub epsilon: f32,
    /// Weight of the KL penalty to the frozen start model (k3 estimator).
    pub kl_beta: f32,
    /// Optimizer steps on each batch of sampled groups (μ; 1 = on-policy, the ratio stays 1 and
    /// the clip never acts).
    pub updates_per_batch: u64,
    pub uniform: UniformGroups,
    pub resample_tries: usize,
    /// Supervised steps on the ground truth written in the format before GRPO starts (a format
    /// cold start: a model that never closes a stage gets no format or box reward to learn
    /// from); each on `batch × group` items. 0 = none.
    pub sft_steps: u64,
    /// The GRPO updates' learning rate as a share of the schedule's (`train.lr`, warm-up, cosine);
    /// the cold start keeps the full rate. RL fine-tuning commonly runs below the supervised rate
    /// (in the DRAEM localisation runs of docs/results/grpo a fifth of it kept the held-out
    /// figure from falling, without raising it). Left out of the checkpoint mark at 1 (the
    /// default), so runs from before the key still resume.
    #[serde(skip_serializing_if = "crate::config::is_one")]
    pub lr_scale: f32,
    /// Draw the training pairs by label in turn — normal, anomalous, normal, … — each label in
    /// its own seeded epochs, for the cold start and the sampled batches alike. Without it the
    /// draws follow the file, where a majority label (two thirds of ELPV's training pairs are
    /// normal) is right more often and pulls the verdicts toward itself. On its own it did not
    /// keep a nearly deterministic policy from settling on one verdict (docs/results/grpo,
    /// `elpv-cue-balanced`). Left out of the checkpoint mark when off (the default).
    #[serde(skip_serializing_if = "crate::config::is_false")]
    pub balance: bool,
    /// Examples of the SFE run's own task (a training question and its best-ranked answer, as
    /// `sage sfe` trains on them) added to every update, with the cross-entropy of their answers
    /// as a term of the loss (InstructGPT's "PPO-ptx" mix against the alignment tax): GRPO's
    /// prompts and format are not the questions `sage eval` asks. In the standard profile's
    /// GRPO row it held the SFE task's loss but did not keep the first-token conclusions from
    /// tipping to one answer (docs/results/standard/grpo-row-20261206). 0 = none (the default,
    /// left out of the checkpoint mark). In the cold start they are further targets of its
    /// cross-entropy.
    #[serde(skip_serializing_if = "crate::config::is_zero")]
    pub sfe_anchor: usize,
    /// The anchor term's weight: `w · mean over anchors of (−log p(answer) / its tokens)` is
    /// added to the GRPO loss. Left out of the mark at 1 (the default).
    #[serde(skip_serializing_if = "crate::config::is_one")]
    pub sfe_anchor_weight: f32,
    /// Which of the anchors' answer tokens the term counts: `"answer"` (all, the default, left
    /// out of the mark) or `"conclusion"` (the first, Yes/No, alone). A whole-answer anchor kept
    /// the answers' wording but not the first token's calibration (above); the conclusion alone,
    /// two anchors an update, did not keep it either: under the start at both seeds tried (the
    /// same results folder).
    #[serde(skip_serializing_if = "crate::config::is_zero")]
    pub sfe_anchor_tokens: AnchorTokens,
    pub reward: RewardConfig,
}

impl Default for GrpoSection {
    fn default() -> Self {
        GrpoSection {
            group: 4,
            temperature: 1.0,
            top_p: 0.95,
            max_new: 96,
            epsilon: 0.2,
            kl_beta: 0.04,
            updates_per_batch: 1,
            uniform: UniformGroups::Resample,
            resample_tries: 1,
            sft_steps: 0,
            lr_scale: 1.0,
            balance: false,
            sfe_anchor: 0,
            sfe_anchor_weight: 1.0,
            sfe_anchor_tokens: AnchorTokens::Answer,
            reward: RewardConfig::default(),
        }
    }
}

impl CheckRanges for GrpoRunConfig {
    fn check_ranges(&self, c: &mut RangeCheck) {
        let g = &self.grpo;
        c.int("grpo.group", g.group as u64, 2, 64);
        c.positive_float("grpo.temperature", g.temperature as f64, 10.0);
        c.positive_float("grpo.top_p", g.top_p as f64, 1.0);
        c.int("grpo.max_new", g.max_new as u64, 1, 4096);
        c.float("grpo.epsilon", g.epsilon as f64, 0.0, 1.0);
        c.float("grpo.kl_beta", g.kl_beta as f64, 0.0, 100.0);
        c.int("grpo.updates_per_batch", g.updates_per_batch, 1, 64);
        c.int("grpo.resample_tries", g.resample_tries as u64, 0, 16);
        c.positive_float("grpo.lr_scale", g.lr_scale as f64, 10.0);
        c.int("grpo.sfe_anchor", g.sfe_anchor as u64, 0, 64);
        c.positive_float("grpo.sfe_anchor_weight", g.sfe_anchor_weight as f64, 100.0);
        let r = &g.reward;
        for (key, v) in [
            ("grpo.reward.format_weight", r.format_weight),
            ("grpo.reward.class_weight", r.class_weight),
            ("grpo.reward.loc_weight", r.loc_weight),
        ] {
            c.float(key, v as f64, 0.0, 100.0);
        }
        c.require(
            "grpo.reward",
            r.format_weight + r.class_weight + r.loc_weight > 0.0,
            "at least one reward weight must be positive".into(),
        );
        c.float("grpo.reward.partial_type", r.partial_type as f64, 0.0, 1.0);
        c.float("grpo.reward.count_share", r.count_share as f64, 0.0, 1.0);
        c.float("grpo.reward.overlong_penalty", r.overlong_penalty as f64, 0.0, 10.0);
        c.require(
            "grpo.reward.overlong_buffer",
            r.overlong_buffer <= g.max_new,
            format!("grpo.reward.overlong_buffer ({}) must be at most grpo.max_new ({})", r.overlong_buffer, g.max_new),
        );
        // A resume starts at a checkpoint: a checkpoint inside a batch's μ updates would need the
        // batch's samples, which are drawn with the weights at the batch's first update.
        let mu = g.updates_per_batch.max(1);
        c.require(
            "train.checkpoint_every",
            self.train.checkpoint_every.is_multiple_of(mu)
                && self.train.steps.is_multiple_of(mu)
                && g.sft_steps.is_multiple_of(mu),
            format!(
                "train.checkpoint_every, train.steps and grpo.sft_steps must be multiples of grpo.updates_per_batch ({mu})"
            ),
        );
        c.require(
            "grpo.sft_steps",
            g.sft_steps < self.train.steps,
            format!("grpo.sft_steps ({}) must leave GRPO steps in train.steps ({})", g.sft_steps, self.train.steps),
        );
        self.train.check_ranges(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_config_parses_and_bad_values_are_refused() {
        let cfg: GrpoRunConfig = crate::config::load(std::path::Path::new("configs/grpo-elpv-quick.toml")).unwrap();
        assert!(cfg.grpo.group >= 2);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.toml");
        // The error of a config with this [grpo] section and train.steps.
        let refused = |grpo: &str, steps: u64| {
            let body = format!("sfe = \"s\"\n[data]\ntrain = \"t.json\"\n[grpo]\n{grpo}\n[train]\nsteps = {steps}\nbatch = 1\nlr = 1e-4\n");
            std::fs::write(&p, body).unwrap();
            format!("{:#}", crate::config::load::<GrpoRunConfig>(&p).unwrap_err())
        };
        let e = refused("updates_per_batch = 2", 5);
        assert!(e.contains("multiples of grpo.updates_per_batch"), "{e}");
        let e = refused("max_new = 8", 4);
        assert!(e.contains("grpo.reward.overlong_buffer (16) must be at most grpo.max_new (8)"), "{e}");
        let e = refused("lr_scale = 0.0", 4);
        assert!(e.contains("grpo.lr_scale"), "{e}");
        let e = refused("sfe_anchor = 65", 4);
        assert!(e.contains("grpo.sfe_anchor"), "{e}");
    }

    #[test]
    fn keys_at_their_defaults_are_left_out_of_the_checkpoint_mark() {
        // Checkpoints made before `lr_scale`, `balance` and the SFE anchor existed carry no such
        // keys; at the defaults they must still match the config (a resume, the demo's finished
        // GRPO row).
        let mut g = GrpoSection::default();
        let mark = serde_json::to_value(&g).unwrap();
        for key in ["lr_scale", "balance", "sfe_anchor", "sfe_anchor_weight", "sfe_anchor_tokens"] {
            assert!(mark.get(key).is_none(), "{key}: {mark}");
        }
        g.lr_scale = 0.2;
        g.balance = true;
        g.sfe_anchor = 2;
        g.sfe_anchor_weight = 0.5;
        g.sfe_anchor_tokens = AnchorTokens::Conclusion;
        let mark = serde_json::to_value(&g).unwrap();
        assert_eq!(mark["lr_scale"], 0.2f32 as f64);
        assert_eq!(mark["balance"], true);
        assert_eq!(mark["sfe_anchor"], 2);
        assert_eq!(mark["sfe_anchor_weight"], 0.5);
        assert_eq!(mark["sfe_anchor_tokens"], "conclusion");
    }
}
