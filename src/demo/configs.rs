//! The training stages' configs as the demo writes them: typed values of the stages' own config
//! structs ([`SfeConfig`], [`EdpoRunConfig`]), serialized with `toml`, so a file the demo writes
//! is exactly what `sage sfe --config` / `sage edpo --config` load (the tests check it).

use super::profile::Profile;
use crate::edpo::config::{EdpoData, EdpoModel, EdpoRunConfig, EdpoSection, LossKind};
use crate::edpo::pairs::PairChoice;
use crate::grpo::config::{GrpoData, GrpoRunConfig, GrpoSection};
use crate::models::sage::{FactsMode, SageConfig};
use crate::ops::similarity::Reduce;
use crate::sfe::config::{DataConfig, LlmConfig, SfeConfig, TrainSection};
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;

/// Stage 1 with facts mode `facts` on the demo's data folder `data`.
pub fn sfe_config(p: &Profile, data: &Path, facts: FactsMode) -> SfeConfig {
    sfe_config_on(p, data, &data.join("facts.jsonl"), facts)
}

/// Stage 1 on the `train.json` / `test.json` of folder `split`, with the facts file `facts_file`.
pub fn sfe_config_on(p: &Profile, split: &Path, facts_file: &Path, facts: FactsMode) -> SfeConfig {
    let data = split;
    SfeConfig {
        data: DataConfig {
            train: data.join("train.json"),
            val: data.join("test.json"),
            facts: Some(facts_file.to_path_buf()),
            max_train_items: p.train_items,
            zero_shot: false,
        },
        // A smaller head than the default (k 16, fusion_dim 256, pool 2): minutes on a CPU.
        model: SageConfig {
            backbone: p.backbone.to_string(),
            facts,
            k: 8,
            reduce: Reduce::Nearest,
            fusion_dim: 128,
            fusion_heads: 4,
            image_pool: 4,
            anomaly_channel: false,
            map_cue: p.map_cue,
            map_cue_levels: vec![],
        },
        llm: LlmConfig {
            finetune: "lora".into(),
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_targets: vec!["attn_q".into(), "attn_v".into()],
            // QLoRA: the base stays in the GGUF's blocks (exact dequantized tiles in training,
            // int8 decoding in validation and eval).
            base: crate::models::llama::BaseWeights::Quantized,
        },
        train: train_section(p, p.sfe_steps, p.sfe_batch, p.sfe_lr, 10),
    }
}

/// Stage 2 with `loss` from the SFE run folder `sfe_run`, on the judge scores `sage score` wrote
/// beside the training file.
pub fn edpo_config(p: &Profile, data: &Path, sfe_run: &Path, loss: LossKind) -> EdpoRunConfig {
    EdpoRunConfig {
        sfe: sfe_run.to_path_buf(),
        // Checked against the SFE run's backbone; the default's configs stay as they were.
        model: (p.backbone != crate::models::backbone::DEFAULT).then(|| EdpoModel { backbone: p.backbone.to_string() }),
        data: EdpoData {
            train: data.join("train.json"),
            scores: Some(data.join("train.scores.jsonl")),
            judge: "rubric".into(),
            judge_config: p.judge_config(),
            max_train_items: p.pref_items,
        },
        edpo: EdpoSection {
            loss,
            beta: p.pref.beta,
            eta: 1.0,
            pairs: PairChoice::Both,
            length_normalize: p.pref.length_normalize,
            sft_weight: p.pref.sft_weight,
            balance_conclusions: p.pref.balance_conclusions,
        },
        train: train_section(p, p.edpo_steps, p.edpo_batch, p.edpo_lr, 5),
    }
}

/// GRPO from the SFE run folder `sfe_run` on the demo's ELPV split: the defaults of `[grpo]`
/// (G = 4, 80 tokens, μ = 2) with a quarter of the steps (rounded to whole batches) the format
/// cold start; steps are rounded up to an even count (μ = 2).
pub fn grpo_config(p: &Profile, data: &Path, sfe_run: &Path) -> GrpoRunConfig {
    let steps = p.grpo_steps.div_ceil(2) * 2;
    let grpo =
        GrpoSection { max_new: 80, sft_steps: (steps / 4) / 2 * 2, updates_per_batch: 2, ..GrpoSection::default() };
    GrpoRunConfig {
        sfe: sfe_run.to_path_buf(),
        data: GrpoData {
            train: data.join("train.json"),
            val: Some(data.join("test.json")),
            max_train_items: p.train_items,
        },
        grpo,
        train: train_section(p, steps, 2, 5e-4, 4),
    }
}

/// The schedule: 10% warm-up, cosine to a tenth of `lr`, clipping at 1, no weight decay (the
/// stages' defaults), validation only at the end.
fn train_section(p: &Profile, steps: u64, batch: usize, lr: f32, checkpoint_every: u64) -> TrainSection {
    TrainSection {
        steps,
        batch,
        lr,
        warmup_steps: (steps / 10).max(1),
        min_lr_ratio: 0.1,
        weight_decay: 0.0,
        max_grad_norm: 1.0,
        seed: 0,
        val_every: 0,
        val_questions: p.val_questions,
        checkpoint_every,
    }
}

/// The TOML text of `config`, headed by a comment naming the demo and its profile.
pub fn to_toml<T: Serialize>(p: &Profile, config: &T) -> Result<String> {
    let body = toml::to_string(config).context("writing a demo config as TOML")?;
    Ok(format!("# written by `sage demo` ({} profile)\n{body}", p.name))
}

/// Writes `config` to `path` (atomically).
pub fn write<T: Serialize>(path: &Path, p: &Profile, config: &T) -> Result<()> {
    crate::util::write_atomic(path, to_toml(p, config)?.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::super::profile::{FULL, QUICK, ROWS, SFE_RUNS, STANDARD};
    use super::*;
    use serde::de::DeserializeOwned;
    use std::path::PathBuf;

    /// Writes `value` as the demo does, loads it with the stage's loader and compares the two
    /// (as JSON: the config structs have no `PartialEq`).
    fn round_trip<T: Serialize + DeserializeOwned + crate::config::CheckRanges>(p: &Profile, value: &T) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        write(&path, p, value).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(&format!("# written by `sage demo` ({} profile)\n", p.name)), "{text}");
        let loaded: T = crate::config::load(&path).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        assert_eq!(serde_json::to_value(&loaded).unwrap(), serde_json::to_value(value).unwrap(), "{text}");
    }

    #[test]
    fn every_config_the_demo_writes_loads_with_its_stage_loader_unchanged() {
        let data = Path::new("runs/demo \"x\"/data");
        for p in [&QUICK, &STANDARD, &FULL] {
            for (name, facts) in SFE_RUNS {
                let c = sfe_config(p, data, facts);
                assert_eq!(c.model.facts, facts, "{name}");
                round_trip(p, &c);
            }
            for row in &ROWS {
                if let Some((loss, name)) = row.pref {
                    let c = edpo_config(p, data, &Path::new("runs").join(name), loss);
                    assert_eq!(c.edpo.loss, loss);
                    round_trip(p, &c);
                }
            }
            // GRPO: steps and cold start in whole batches of μ = 2 (the loader refuses others).
            let g = grpo_config(p, data, Path::new("runs/sfe-fused"));
            assert!(g.train.steps >= p.grpo_steps && g.grpo.sft_steps < g.train.steps, "{}", p.name);
            round_trip(p, &g);
        }
    }

    /// The map cue: on in the standard and full profiles, off in quick; every SFE config of a
    /// profile with it asks for the cue (levels left for the run to calibrate) and round-trips;
    /// a choice against the profile's own gets its own folder.
    #[test]
    fn the_map_cue_reaches_every_sfe_config_and_its_own_folder() {
        assert_eq!([STANDARD.map_cue, FULL.map_cue, QUICK.map_cue], [true, true, false]);
        let data = Path::new("runs/demo-standard/data");
        for (_, facts) in SFE_RUNS {
            let c = sfe_config(&STANDARD, data, facts);
            assert!(c.model.map_cue && c.model.map_cue_levels.is_empty());
            assert!(!sfe_config(&QUICK, data, facts).model.map_cue);
            assert!(!sfe_config(&Profile { map_cue: false, ..STANDARD }, data, facts).model.map_cue);
            round_trip(&STANDARD, &c);
        }
        assert_eq!(STANDARD.default_out(), PathBuf::from("runs/demo-standard"));
        assert_eq!(
            Profile { map_cue: false, ..STANDARD }.default_out(),
            PathBuf::from("runs/demo-standard-no-map-cue")
        );
        assert_eq!(QUICK.default_out(), PathBuf::from("runs/demo-quick"));
        assert_eq!(Profile { map_cue: true, ..QUICK }.default_out(), PathBuf::from("runs/demo-quick-map-cue"));
    }

    /// The configs of the committed quick demo (written as text before the demo built typed
    /// values) load to exactly what the demo builds today: same data, model, schedule, loss;
    /// only the base weights' precision moved (f32 then, quantized blocks now).
    #[test]
    fn the_committed_quick_demo_configs_are_what_the_demo_builds() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/results/demo-quick/configs");
        let out = QUICK.default_out();
        let data = out.join("data");
        for (name, facts) in SFE_RUNS {
            let mut loaded: SfeConfig = crate::config::load(&root.join(format!("sfe-{name}.toml"))).unwrap();
            // The committed run predates QLoRA (its configs have no `llm.base`, which reads as
            // f32); the demo now keeps the base quantized (docs/results/demo-quick-qlora). All
            // else stays as it was.
            assert_eq!(loaded.llm.base, crate::models::llama::BaseWeights::F32);
            loaded.llm.base = crate::models::llama::BaseWeights::Quantized;
            let built = sfe_config(&QUICK, &data, facts);
            assert_eq!(serde_json::to_value(&loaded).unwrap(), serde_json::to_value(&built).unwrap(), "sfe-{name}");
        }
        for row in &ROWS {
            if let Some((loss, name)) = row.pref {
                let loaded: EdpoRunConfig = crate::config::load(&root.join(format!("edpo-{name}.toml"))).unwrap();
                let built = edpo_config(&QUICK, &data, &out.join("runs").join(format!("sfe-{}", row.sfe)), loss);
                assert_eq!(
                    serde_json::to_value(&loaded).unwrap(),
                    serde_json::to_value(&built).unwrap(),
                    "edpo-{name}"
                );
            }
        }
    }
}
