//! Checkpoints that survive SIGKILL and resume exactly.
//!
//! A checkpoint is three files in the run folder: `weights-NNNNNN.safetensors` (every trainable
//! parameter, by name), `optim-NNNNNN.safetensors` (AdamW's first and second moments, `m.<name>`
//! and `v.<name>`), and `state.json`, which names them and holds the step, the optimizer step count
//! and the config. Each file is written atomically, the tensors first and `state.json` last: the
//! rename of `state.json` is the commit point, so a crash at any moment leaves the previous
//! checkpoint intact. Files of older steps are removed only after the new state is committed.
//! A checkpoint never holds a NaN or infinity: saving one is refused before anything is written,
//! and loading one is refused as damaged.

use super::config::SfeConfig;
use crate::formats::safetensors::{self as st, SafetensorsFile};
use crate::models::backbone::{Backbone, BackboneRecord};
use crate::tensor::Tensor;
use crate::train::{AdamWState, ParamSet};
use crate::user_err;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "state.json";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps completed.
    pub step: u64,
    pub weights: String,
    pub optim: String,
    pub optim_steps: u64,
    /// The model and stage-1 description: what `infer` and `eval` rebuild the model from.
    pub config: SfeConfig,
    /// Stage 2: the E-DPO section and the SFE run it started from (absent for SFE runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub edpo: Option<serde_json::Value>,
    /// GRPO: its section and the SFE run it started from (absent for SFE and E-DPO runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<serde_json::Value>,
    /// The backbone and the sha256 of its files (absent in checkpoints made before backbones were
    /// recorded: those were all `lite`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<BackboneRecord>,
}

/// Which later stage made a checkpoint, with what it records of its config (stage 1, SFE,
/// records nothing beyond the session's config).
#[derive(Clone, Debug)]
pub enum Mark {
    Edpo(serde_json::Value),
    Grpo(serde_json::Value),
}

impl State {
    /// The stage that made the checkpoint: `sfe`, `edpo` or `grpo`.
    pub fn stage(&self) -> &'static str {
        match (&self.edpo, &self.grpo) {
            (Some(_), _) => "edpo",
            (None, Some(_)) => "grpo",
            (None, None) => "sfe",
        }
    }

    /// Refuses `wanted` (a `--backbone` flag; `None`: no wish) unless it names the backbone this
    /// checkpoint in `dir` was trained on.
    pub fn require_backbone_name(&self, dir: &Path, wanted: Option<&str>) -> Result<()> {
        let trained = &self.config.model.backbone;
        match wanted.filter(|b| b != trained) {
            Some(b) => Err(user_err!(
                "checkpoint {} was trained on backbone `{trained}`, not `{b}`; drop --backbone or pass --backbone {trained}",
                dir.display()
            )),
            None => Ok(()),
        }
    }

    /// Refuses `backbone` unless it is the one this checkpoint in `dir` was made with (name and
    /// file hashes).
    pub fn check_backbone(&self, dir: &Path, backbone: &Backbone) -> Result<()> {
        let what = format!("checkpoint {}", dir.display());
        match &self.backbone {
            Some(saved) => backbone.check_record(saved, &what),
            None if self.config.model.backbone != backbone.name => Err(user_err!(
                "{what} was made with backbone `{}`, not `{}`",
                self.config.model.backbone,
                backbone.name
            )),
            None => Ok(()),
        }
    }
}

pub fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

pub fn exists(dir: &Path) -> bool {
    state_path(dir).exists()
}

pub fn read_state(dir: &Path) -> Result<State> {
    let p = state_path(dir);
    let text = std::fs::read_to_string(&p).map_err(|e| user_err!("cannot read checkpoint {}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| user_err!("{} is not a sage checkpoint state: {e}", p.display()))
}

/// Saves every trainable tensor and the whole SAGE head (stage 2 freezes the fusion attention,
/// but `infer` and `eval` rebuild the head from the checkpoint alone).
pub fn save(
    dir: &Path,
    step: u64,
    params: &ParamSet,
    optim_state: &AdamWState,
    config: &SfeConfig,
    mark: Option<&Mark>,
    backbone: &BackboneRecord,
) -> Result<()> {
    let weights_name = format!("weights-{step:06}.safetensors");
    let optim_name = format!("optim-{step:06}.safetensors");
    let mut weights = BTreeMap::new();
    let mut optim = BTreeMap::new();
    for p in params.iter().filter(|p| p.trainable || p.name.starts_with(crate::models::sage::PARAM_PREFIX)) {
        // Checked before anything is written: the previous checkpoint must stay the newest.
        let moments = optim_state.moments.get(&p.name);
        let tensors =
            [("weight", Some(&p.value)), ("AdamW m", moments.map(|m| &m.m)), ("AdamW v", moments.map(|m| &m.v))];
        for (what, values) in tensors {
            if let Some(i) = values.and_then(|v| first_non_finite(v)) {
                return Err(user_err!(
                    "not saving the checkpoint of step {step} in {}: {what} `{}` [{i}] is {} (not finite); the \
                     previous checkpoint is intact. Lower train.lr or set train.max_grad_norm",
                    dir.display(),
                    p.name,
                    values.expect("found in it")[i]
                ));
            }
        }
        weights.insert(p.name.clone(), Tensor::from_vec(p.value.clone(), &p.shape)?);
        if let Some(m) = optim_state.moments.get(&p.name) {
            optim.insert(format!("m.{}", p.name), Tensor::from_vec(m.m.clone(), &[m.m.len()])?);
            optim.insert(format!("v.{}", p.name), Tensor::from_vec(m.v.clone(), &[m.v.len()])?);
        }
    }
    st::write(&dir.join(&weights_name), &weights, None)?;
    st::write(&dir.join(&optim_name), &optim, None)?;
    let state = State {
        step,
        weights: weights_name.clone(),
        optim: optim_name.clone(),
        optim_steps: optim_state.step,
        config: config.clone(),
        edpo: match mark {
            Some(Mark::Edpo(v)) => Some(v.clone()),
            _ => None,
        },
        grpo: match mark {
            Some(Mark::Grpo(v)) => Some(v.clone()),
            _ => None,
        },
        backbone: Some(backbone.clone()),
    };
    crate::util::write_atomic(&state_path(dir), serde_json::to_string_pretty(&state)?.as_bytes())?;
    // Committed: older tensors can go.
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ours = (name.starts_with("weights-") || name.starts_with("optim-")) && name.ends_with(".safetensors");
        if ours && name != weights_name && name != optim_name {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// Writes the tensors a checkpoint would hold of `params` (the trainable ones and the whole head)
/// to one safetensors file at `path`, atomically: a stage's extra frozen model (GRPO's KL
/// reference after its cold start), read back by [`load_tensors`].
pub fn save_tensors(path: &Path, params: &ParamSet) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for p in params.iter().filter(|p| p.trainable || p.name.starts_with(crate::models::sage::PARAM_PREFIX)) {
        tensors.insert(p.name.clone(), Tensor::from_vec(p.value.clone(), &p.shape)?);
    }
    st::write(path, &tensors, None)
}

/// Loads every tensor of a [`save_tensors`] file into `params` (each must exist there, same size).
pub fn load_tensors(path: &Path, params: &mut ParamSet) -> Result<()> {
    let f = SafetensorsFile::open(path)?;
    for name in f.names() {
        let id = params.id(&name).ok_or_else(|| {
            user_err!(
                "{} holds `{name}`, which this model does not have: was it made with another config?",
                path.display()
            )
        })?;
        let v = f.tensor(&name)?.into_f32s()?;
        if v.len() != params[id].value.len() {
            return Err(user_err!(
                "{}: `{name}` has {} values, the model {}; was it made with another config?",
                path.display(),
                v.len(),
                params[id].value.len()
            ));
        }
        params[id].value = v;
    }
    Ok(())
}

/// Number of decoder blocks (`blk.N.…`) that tensor names reach: one past the highest `N`.
fn block_count<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .filter_map(|n| n.strip_prefix("blk.")?.split('.').next()?.parse::<usize>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Loads the trainable weights of a checkpoint into `params`, and the frozen ones it holds, after
/// checking that `backbone` (the model `params` belongs to) is the checkpoint's.
pub fn load_weights(dir: &Path, state: &State, params: &mut ParamSet, backbone: &Backbone) -> Result<()> {
    state.check_backbone(dir, backbone)?;
    let path = dir.join(&state.weights);
    let f = SafetensorsFile::open(&path)?;
    let names: Vec<String> = params
        .iter()
        .filter(|p| p.trainable || p.name.starts_with(crate::models::sage::PARAM_PREFIX))
        .map(|p| p.name.clone())
        .collect();
    // A checkpoint of a deeper or shallower LLM would load partly, or leave blocks untrained,
    // without a word: the block counts must agree, and every tensor must have a place.
    let in_file = f.names();
    let (file_blocks, model_blocks) =
        (block_count(in_file.iter().map(String::as_str)), block_count(params.iter().map(|p| p.name.as_str())));
    if file_blocks > 0 && file_blocks != model_blocks {
        return Err(user_err!(
            "checkpoint {} holds weights of {file_blocks} LLM blocks, but the base model has {model_blocks} (llama.block_count); load it onto the base model it was trained from",
            path.display()
        ));
    }
    if let Some(extra) = in_file.iter().find(|n| params.id(n).is_none()) {
        return Err(user_err!(
            "checkpoint {} holds `{extra}`, which the model built from this config does not have: was it made with another config?",
            path.display()
        ));
    }
    for name in names {
        let t = f.tensor(&name).with_context(|| {
            format!("checkpoint {} lacks `{name}`: was it made with another config?", dir.display())
        })?;
        let id = params.id(&name).expect("listed above");
        if t.shape() != params[id].shape {
            return Err(user_err!(
                "checkpoint tensor `{name}` has shape {:?}, the model expects {:?}",
                t.shape(),
                params[id].shape
            ));
        }
        let values = t.into_f32s()?;
        refuse_non_finite(dir, &state.weights, &name, &values)?;
        params[id].value = values;
    }
    Ok(())
}

/// Index of the first NaN or infinity in `v`.
fn first_non_finite(v: &[f32]) -> Option<usize> {
    v.iter().position(|x| !x.is_finite())
}

/// A checkpoint tensor with a NaN or infinity is damaged (training never saves one).
fn refuse_non_finite(dir: &Path, file: &str, name: &str, values: &[f32]) -> Result<()> {
    match first_non_finite(values) {
        None => Ok(()),
        Some(i) => Err(user_err!(
            "checkpoint {}: tensor `{name}` [{i}] is {} (not finite): the file is damaged. Resume from an older copy \
             of the run folder, or train again",
            dir.join(file).display(),
            values[i]
        )),
    }
}

/// Restores the weights (into `params`) and the optimizer state for an exact resume.
pub fn restore(dir: &Path, params: &mut ParamSet, backbone: &Backbone) -> Result<(State, AdamWState)> {
    let state = read_state(dir)?;
    load_weights(dir, &state, params, backbone)?;
    let f = SafetensorsFile::open(&dir.join(&state.optim))?;
    let mut moments = BTreeMap::new();
    for p in params.iter().filter(|p| p.trainable) {
        let (m, v) = (format!("m.{}", p.name), format!("v.{}", p.name));
        if let (Ok(m), Ok(v)) = (f.tensor(&m), f.tensor(&v)) {
            let (m, v) = (m.into_f32s()?, v.into_f32s()?);
            refuse_non_finite(dir, &state.optim, &format!("m.{}", p.name), &m)?;
            refuse_non_finite(dir, &state.optim, &format!("v.{}", p.name), &v)?;
            moments.insert(p.name.clone(), crate::train::optim::Moments { m, v });
        }
    }
    let optim = AdamWState { step: state.optim_steps, moments };
    Ok((state, optim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SfeConfig {
        toml::from_str(
            "[data]\ntrain = 'a'\nval = 'b'\n[llm]\nfinetune = 'lora'\n[train]\nsteps = 3\nbatch = 1\nlr = 1e-3\n",
        )
        .unwrap()
    }

    /// A backbone named `name` over two small files in `dir`.
    fn backbone(dir: &Path, name: &str) -> Backbone {
        let (vision, llm) = (dir.join("vision.bin"), dir.join("llm.gguf"));
        for f in [&vision, &llm] {
            if !f.exists() {
                std::fs::write(f, f.display().to_string()).unwrap();
            }
        }
        Backbone {
            name: name.into(),
            vision: crate::models::patch_encoder::EncoderKind::Efficientnet,
            vision_weights: vision,
            size: 224,
            layer: crate::models::patch_encoder::DinoLayer::Last,
            llm,
            llm_family: None,
            hashes: Default::default(),
        }
    }

    #[test]
    fn a_checkpoint_refuses_another_backbone_or_changed_weights_naming_both() {
        let (dir, files) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let lite = backbone(files.path(), "lite");
        let mut params = ParamSet::new();
        params.add("x", &[2], vec![1.0, 2.0], true).unwrap();
        save(dir.path(), 1, &params, &AdamWState::default(), &config(), None, &lite.record().unwrap()).unwrap();
        let state = read_state(dir.path()).unwrap();
        load_weights(dir.path(), &state, &mut params, &lite).unwrap();

        let other = backbone(files.path(), "dino-qwen");
        let err = load_weights(dir.path(), &state, &mut params, &other).unwrap_err();
        let s = format!("{err:#}");
        assert!(crate::error::is_user_error(&err) && s.contains("`lite`") && s.contains("`dino-qwen`"), "{s}");
        let err = restore(dir.path(), &mut params, &other).unwrap_err();
        assert!(format!("{err:#}").contains("made with backbone `lite`, not `dino-qwen`"), "{err:#}");

        // The same name over other bytes: refused, naming the file and both hashes (a backbone
        // hashes its files once, so the changed file is seen by a new one, as by a new process).
        std::fs::write(&lite.llm, b"retrained").unwrap();
        let lite = backbone(files.path(), "lite");
        let err = load_weights(dir.path(), &state, &mut params, &lite).unwrap_err();
        let s = format!("{err:#}");
        assert!(s.contains("llm.gguf") && s.contains(&state.backbone.as_ref().unwrap().llm_sha256), "{s}");
    }

    #[test]
    fn a_non_finite_weight_is_never_saved_nor_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let files = tempfile::tempdir().unwrap();
        let lite = backbone(files.path(), "lite");
        let record = lite.record().unwrap();
        let cfg = config();
        let optim = AdamWState::default();
        let mut params = ParamSet::new();
        let x = params.add("x", &[2], vec![1.0, f32::NAN], true).unwrap();
        let err = save(dir.path(), 3, &params, &optim, &cfg, None, &record).unwrap_err();
        let s = format!("{err:#}");
        assert!(s.contains("step 3") && s.contains("weight `x` [1] is NaN"), "{s}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");

        // A finite checkpoint saves; the same file with an infinity in it is refused as damaged.
        params[x].value = vec![1.0, 2.0];
        save(dir.path(), 3, &params, &optim, &cfg, None, &record).unwrap();
        let state = read_state(dir.path()).unwrap();
        let mut bad = BTreeMap::new();
        bad.insert("x".to_string(), Tensor::from_vec(vec![f32::INFINITY, 2.0], &[2]).unwrap());
        st::write(&dir.path().join(&state.weights), &bad, None).unwrap();
        let err = load_weights(dir.path(), &state, &mut params, &lite).unwrap_err();
        let s = format!("{err:#}");
        assert!(crate::error::is_user_error(&err) && s.contains("`x` [0] is inf") && s.contains("damaged"), "{s}");
    }
}
