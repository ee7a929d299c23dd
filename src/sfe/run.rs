//! The SFE stage: `batch` examples a step (in a seeded order, every epoch its own), the
//! cross-entropy of each one's best-ranked answer, on the op set; the loop, logs, validation and
//! checkpoints are `crate::stage`'s.

use crate::models::sage::Sage;
use crate::opset::StepOps;
use crate::stage::checkpoint::{self, State};
use crate::stage::config::SfeConfig;
use crate::stage::{finished_step, Outcome, Session, Stage, StepOut, ValResult};
use crate::user_err;
use anyhow::Result;
use std::path::Path;

/// The SFE step on the op set.
pub struct Sfe;

impl<O: StepOps> Stage<O> for Sfe {
    const NAME: &'static str = "sfe";

    fn step(&mut self, session: &mut Session, model: &mut Sage<O>, step: u64, lr: f32) -> Result<StepOut> {
        let batch = session.cfg.train.batch.max(1) as u64;
        let mut plans = Vec::with_capacity(batch as usize);
        for m in 0..batch {
            let e = session.example_at(step * batch + m);
            plans.push(session.best_answer_plan(e)?);
        }
        let tokens = plans.iter().map(|p| p.counted()).sum();
        let (loss, grad_norm) = model.train_step(&plans, lr)?;
        Ok(StepOut { loss, grad_norm, tokens, extra: Default::default() })
    }

    fn mark(&self) -> Option<crate::stage::checkpoint::Mark> {
        None
    }

    fn check_resume(&self, session: &Session, state: &State) -> Result<()> {
        check_resume_config(&session.out, state, &session.cfg)
    }
}

/// Trains from scratch or from the checkpoint in `run.out` (`resume`), every step on the op set
/// `ops` (`HostOps` on the CPU, `CudaOps` on the GPU), so a run may be resumed on either backend.
pub fn train<O: StepOps + Clone>(run: &mut Session, ops: O, resume: bool, quiet: bool) -> Result<Outcome> {
    crate::stage::train(&mut Sfe, run, ops, resume, quiet)
}

/// The freshly initialised model's validation (`sage sfe --eval-only`), answered on `ops`.
pub fn validate_untrained<O: StepOps>(run: &mut Session, ops: O) -> Result<ValResult> {
    let model = Sage::new(ops, &run.model, &run.params, None, None)?;
    run.validate(run.cfg.train.val_questions, &model)
}

/// `--resume` continues the same run: the data, model, LLM and optimisation settings must be the
/// saved ones. Only `steps` (to train longer), the validation settings and `checkpoint_every` may
/// change.
fn check_resume_config(out: &Path, state: &State, cfg: &SfeConfig) -> Result<()> {
    if state.stage() != "sfe" {
        return Err(user_err!(
            "{} holds a `sage {stage}` checkpoint; resume it with `sage {stage} --resume`",
            out.display(),
            stage = state.stage()
        ));
    }
    let comparable = |c: &SfeConfig| -> Result<serde_json::Value> {
        let mut c = c.clone();
        // Levels left empty are calibrated when the run starts, from the same data: the saved ones.
        if c.model.map_cue && c.model.map_cue_levels.is_empty() {
            c.model.map_cue_levels = state.config.model.map_cue_levels.clone();
        }
        let mut v = serde_json::to_value(&c)?;
        if let Some(t) = v.get_mut("train").and_then(|t| t.as_object_mut()) {
            for free in ["steps", "val_every", "val_questions", "checkpoint_every"] {
                t.remove(free);
            }
        }
        Ok(v)
    };
    let (saved, now) = (comparable(&state.config)?, comparable(cfg)?);
    if saved != now {
        let diff = first_difference(&saved, &now, String::new()).unwrap_or_default();
        return Err(user_err!(
            "--resume: {} was trained with a different config ({diff}); resume with the same config (only steps, \
             val_every, val_questions and checkpoint_every may change), or start a new --out",
            out.display()
        ));
    }
    Ok(())
}

/// The first key path where two JSON values differ, with both values.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: String) -> Option<String> {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let (va, vb) =
                    (x.get(k).unwrap_or(&serde_json::Value::Null), y.get(k).unwrap_or(&serde_json::Value::Null));
                first_difference(va, vb, if path.is_empty() { k.clone() } else { format!("{path}.{k}") })
            })
        }
        _ if a == b => None,
        _ => Some(format!("{path}: saved {a}, now {b}")),
    }
}

/// [`finished_step`] for `sage sfe --resume`, after checking that `cfg` is the run's config (a
/// finished run is not silently taken for another one).
pub fn finished_sfe(out: &Path, cfg: &SfeConfig) -> Result<Option<u64>> {
    let Some(step) = finished_step(out, cfg.train.steps)? else { return Ok(None) };
    check_resume_config(out, &checkpoint::read_state(out)?, cfg)?;
    Ok(Some(step))
}
