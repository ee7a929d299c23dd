//! The training loop every stage runs, written once: the seeded schedule, one optimizer step per
//! iteration on the op set (what a step computes is the stage's, [`Stage::step`]), the numerics
//! guard, JSONL logs, periodic validation, atomic checkpoints and exact resume, on either backend.
//!
//! A run folder holds `log.jsonl` (one line per step, from whichever process ran it; a resume cuts
//! it back to the checkpoint first), the checkpoint files of [`super::checkpoint`], and, once the
//! run is finished, [`FINAL_FILE`].

use super::checkpoint::{self, State};
use super::config::TrainSection;
use super::session::{Session, ValResult};
use crate::models::backbone::Backbone;
use crate::models::sage::Sage;
use crate::opset::StepOps;
use crate::train::{guard, AdamWState, ParamSet};
use crate::user_err;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// What one optimizer step of a stage reports.
pub struct StepOut {
    pub loss: f32,
    /// The global gradient norm before clipping (not finite: the step was skipped).
    pub grad_norm: f32,
    /// Target tokens the step trained on.
    pub tokens: usize,
    /// The stage's own fields of the step's log line (E-DPO: the mean margin, pair accuracy).
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// A training stage: what one optimizer step computes, and how its checkpoints are marked.
pub trait Stage<O: StepOps> {
    /// The stage's name in progress bars and messages (`sfe`, `edpo`).
    const NAME: &'static str;

    /// Builds what the stage needs besides the policy before the first step (E-DPO: the frozen
    /// reference model), on (a handle to) the op set.
    fn prepare(&mut self, _session: &mut Session, _ops: O) -> Result<()> {
        Ok(())
    }

    /// Optimizer step `step` (0-based) of `model` at learning rate `lr`.
    fn step(&mut self, session: &mut Session, model: &mut Sage<O>, step: u64, lr: f32) -> Result<StepOut>;

    /// The share of the schedule's learning rate that optimizer step `step` (0-based) runs at
    /// (GRPO: below 1 past its cold start); the log records the rate applied.
    fn lr_scale(&self, _step: u64) -> f32 {
        1.0
    }

    /// The held-out check run every `train.val_every` steps and at the end (default: the
    /// session's conclusion accuracy on the AD-PL validation questions).
    fn validate(&mut self, session: &mut Session, model: &Sage<O>, limit: usize) -> Result<ValResult> {
        session.validate(limit, model)
    }

    /// What a checkpoint records of the stage beyond the session's config (`None`: stage 1).
    fn mark(&self) -> Option<checkpoint::Mark>;

    /// Refuses to resume `state` when it is another stage's or was made with another config.
    fn check_resume(&self, session: &Session, state: &State) -> Result<()>;
}

/// The summary of a finished run.
pub struct Outcome {
    pub steps: u64,
    pub final_loss: f32,
    pub val: Option<ValResult>,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
}

/// The file a finished run's summary is written to; its presence (with the last checkpoint at the
/// final step) marks the run finished.
pub const FINAL_FILE: &str = "final.json";

/// One line of `log.jsonl` per step.
#[derive(Serialize)]
struct StepLine<'a> {
    step: u64,
    loss: f32,
    lr: f32,
    grad_norm: f32,
    tokens: usize,
    tokens_per_second: f64,
    seconds: f64,
    #[serde(flatten)]
    extra: &'a serde_json::Map<String, serde_json::Value>,
}

/// Trains `session`'s model with `stage` on `ops`, from scratch or (`resume`) from the checkpoint
/// in the run folder: the policy is copied to the op set, its optimizer state restored, and after
/// every step the loop logs, validates every `train.val_every` steps and checkpoints every
/// `train.checkpoint_every` steps and at the last (the weights and moments copied back first).
pub fn train<O: StepOps + Clone, S: Stage<O>>(
    stage: &mut S,
    session: &mut Session,
    ops: O,
    resume: bool,
    quiet: bool,
) -> Result<Outcome> {
    let tcfg = session.cfg.train.trainer_config();
    let out = session.out.clone();
    let Start { optim, step: start, mut log, state } =
        start_run(&out, &mut session.params, &session.model.backbone, resume)?;
    if let Some(state) = &state {
        stage.check_resume(session, state)?;
    }
    stage.prepare(session, ops.clone())?;
    let mut model = Sage::new(ops, &session.model, &session.params, Some(tcfg.adamw), tcfg.max_grad_norm)?;
    model.llm.restore_optimizer(&optim)?;
    if !quiet {
        let mem = model.llm.weight_memory();
        let base = if mem.quant_tensors > 0 {
            format!(
                ", base: {} tensors in quantized blocks ({:.0} MiB)",
                mem.quant_tensors,
                mem.quant_bytes as f64 / 1048576.0
            )
        } else {
            String::new()
        };
        eprintln!("{}: training on {}{base}", S::NAME, model.llm.ops.describe());
    }
    let train = session.cfg.train.clone();
    let pb = crate::util::progress_bar(train.steps, S::NAME, quiet);
    pb.set_position(start);
    let mut saved = state.as_ref().map(|s| s.step);
    let mark = stage.mark();
    for step in start..train.steps {
        let t0 = Instant::now();
        let lr = tcfg.schedule.lr(model.llm.steps()) * stage.lr_scale(step);
        let mut o = stage.step(session, &mut model, step, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        let done = step + 1;
        if guard::test_poisons(done) {
            o.loss = f32::NAN;
        }
        guard::check_step(done, o.loss, o.grad_norm, saved)?;
        let line = StepLine {
            step: done,
            loss: o.loss,
            lr,
            grad_norm: o.grad_norm,
            tokens: o.tokens,
            tokens_per_second: o.tokens as f64 / secs,
            seconds: secs,
            extra: &o.extra,
        };
        writeln!(log, "{}", serde_json::to_string(&line)?)?;
        log.flush()?;
        pb.set_message(format!("loss {:.3}", o.loss));
        pb.inc(1);
        if train.val_every > 0 && done.is_multiple_of(train.val_every) && done < train.steps {
            let v = stage.validate(session, &model, train.val_questions)?;
            let mut val = serde_json::json!({"step": done, "val_accuracy": v.accuracy, "val_questions": v.questions});
            // GRPO's held-out reward figures, where the stage has them.
            for (key, x) in [
                ("val_mean_reward", v.mean_reward),
                ("val_mean_loc", v.mean_loc),
                ("val_map_loc", v.map_loc),
                ("val_map_accuracy", v.map_accuracy),
            ] {
                if let Some(x) = x {
                    val[key] = x.into();
                }
            }
            writeln!(log, "{val}")?;
            log.flush()?;
        }
        if checkpoint_due(&train, done) {
            model.llm.download_into(&mut session.params)?;
            let optim = model.llm.optimizer_state()?;
            checkpoint::save(
                &out,
                done,
                &session.params,
                &optim,
                &session.cfg,
                mark.as_ref(),
                &session.backbone_record,
            )?;
            saved = Some(done);
        }
    }
    pb.finish_and_clear();
    let val = stage.validate(session, &model, train.val_questions)?;
    let t = log_totals(&out.join("log.jsonl"))?;
    Ok(Outcome {
        steps: train.steps,
        final_loss: t.last_loss.unwrap_or(f32::NAN),
        val: Some(val),
        step_seconds: t.seconds / t.steps.max(1) as f64,
        tokens_per_second: t.tokens as f64 / t.seconds.max(1e-9),
    })
}

/// Where a run begins.
struct Start {
    /// The restored optimizer state (empty for a fresh run).
    optim: AdamWState,
    /// The restored checkpoint's state (`None` for a fresh run).
    state: Option<State>,
    /// Optimizer steps already done.
    step: u64,
    /// `log.jsonl`, open for appending.
    log: std::fs::File,
}

/// A fresh start at step 0 (refusing to overwrite a checkpoint), or with `resume` the checkpoint
/// in `out` restored into `params`, its log cut back to the checkpoint's step.
fn start_run(out: &Path, params: &mut ParamSet, backbone: &Backbone, resume: bool) -> Result<Start> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let log_path = out.join("log.jsonl");
    let (optim, state) = if resume {
        if !checkpoint::exists(out) {
            return Err(user_err!("--resume: no checkpoint in {} (run without --resume to start)", out.display()));
        }
        let (state, optim) = checkpoint::restore(out, params, backbone)?;
        truncate_log(&log_path, state.step)?;
        (optim, Some(state))
    } else {
        if checkpoint::exists(out) {
            return Err(user_err!(
                "{} already holds a checkpoint; continue it with --resume, or choose another --out",
                out.display()
            ));
        }
        let _ = std::fs::remove_file(&log_path);
        (AdamWState::default(), None)
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    Ok(Start { optim, step: state.as_ref().map_or(0, |s| s.step), state, log })
}

/// Drops log lines of steps after `step` (written before a crash the checkpoint does not cover).
fn truncate_log(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::util::write_atomic(path, kept.as_bytes())
}

/// Whether the loop checkpoints after step `done`: every `checkpoint_every` steps and at the last.
pub fn checkpoint_due(train: &TrainSection, done: u64) -> bool {
    done.is_multiple_of(train.checkpoint_every.max(1)) || done == train.steps
}

/// What the step lines of `log.jsonl` add up to. The log holds one line per step of the run, from
/// whichever process ran it, so the run's final figures come from it: a run resumed after its last
/// step still reports its last loss.
#[derive(Debug, Default, PartialEq)]
pub struct LogTotals {
    pub steps: u64,
    /// The loss of the last step line (`None`: no step logged).
    pub last_loss: Option<f32>,
    pub seconds: f64,
    pub tokens: u64,
}

pub fn log_totals(path: &Path) -> Result<LogTotals> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut t = LogTotals::default();
    for v in text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
        // Validation lines carry a step but no loss.
        let Some(loss) = v["loss"].as_f64() else { continue };
        t.steps += 1;
        t.last_loss = Some(loss as f32);
        t.seconds += v["seconds"].as_f64().unwrap_or(0.0);
        t.tokens += v["tokens"].as_u64().unwrap_or(0);
    }
    Ok(t)
}

/// The step of the checkpoint in `out` when the run there is finished for `steps` steps: its last
/// checkpoint is at (or past) `steps` and its `final.json` is written. `--resume` then changes
/// nothing. (A run killed between its last checkpoint and `final.json` is not finished: resuming
/// it runs the final validation and writes `final.json`.)
pub fn finished_step(out: &Path, steps: u64) -> Result<Option<u64>> {
    if !checkpoint::exists(out) || !out.join(FINAL_FILE).exists() {
        return Ok(None);
    }
    let state = checkpoint::read_state(out)?;
    Ok((state.step >= steps).then_some(state.step))
}
