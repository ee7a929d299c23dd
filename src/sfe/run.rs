//! The SFE loop: examples in a seeded order, `batch` of them a step on the op set, JSONL logs,
//! periodic validation, atomic checkpoints and exact resume.

use super::checkpoint;
use super::config::SfeConfig;
use super::data::{ExampleRef, Split, TokenCache};
use crate::assets::Asset;
use crate::data::sample::conclusion;
use crate::data::Question;
use crate::facts::FactSet;
use crate::models::efficientnet::PatchTokens;
use crate::models::sampling::Sampling;
use crate::models::sage::FactsMode;
use crate::models::sage::{Example, SageModel};
use crate::models::sage::Sage;
use crate::opset::StepOps;
use crate::train::{guard, streams, ParamSet, SeedRng, Trainer};
use crate::user_err;
use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct Run {
    pub cfg: SfeConfig,
    pub out: PathBuf,
    pub model: SageModel,
    pub params: ParamSet,
    pub(crate) train: Split,
    val: Split,
    facts: FactSet,
    tokens: TokenCache,
    /// The run folder's writer lock (E-DPO's run is built on this one, so it holds its own).
    _writer: crate::lock::WriterLock,
}

/// What one example feeds the model, owned (the token cache lends only one borrow at a time).
pub(crate) struct Inputs {
    test: PatchTokens,
    reference: Option<PatchTokens>,
    facts: Vec<String>,
    pub question: Question,
}

impl Inputs {
    pub(crate) fn example<'a>(&'a self, answer: Option<&'a str>) -> Example<'a> {
        Example {
            test: &self.test,
            reference: self.reference.as_ref(),
            facts: &self.facts,
            question: &self.question.text,
            answer,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ValResult {
    pub questions: usize,
    pub accuracy: f64,
    /// Share of the most common ground-truth conclusion: what always answering it would score.
    pub majority_rate: f64,
    /// Answers that did not start with Yes or No.
    pub unparsed: usize,
}

impl Run {
    /// Builds the model (fresh head, seeded) and loads the data named by the config.
    pub fn new(cfg: SfeConfig, out: &Path) -> Result<Run> {
        let writer = crate::lock::WriterLock::for_dir(out)?;
        let mut params = ParamSet::new();
        let mut rng = SeedRng::new(cfg.train.seed, streams::INIT);
        let finetune = cfg.llm.finetune()?;
        let model = SageModel::new(
            &Asset::EfficientNetPth.path()?,
            &Asset::SmolLm2Gguf.path()?,
            cfg.model.clone(),
            &finetune,
            &mut params,
            &mut rng,
        )?;
        let train = Split::load(&cfg.data.train, cfg.data.max_train_items)?;
        let val = Split::load(&cfg.data.val, 0)?;
        let facts = match (&cfg.data.facts, cfg.model.facts) {
            (Some(p), _) => FactSet::load(p)?,
            (None, FactsMode::None) => FactSet::default(),
            (None, mode) => {
                return Err(user_err!("model.facts = {mode:?} needs data.facts (a JSONL file from `sage facts`)"));
            }
        };
        Ok(Run {
            cfg,
            out: out.to_path_buf(),
            model,
            params,
            train,
            val,
            facts,
            tokens: TokenCache::default(),
            _writer: writer,
        })
    }

    /// The example for global micro-batch index `g`: epochs visit every example once, each
    /// epoch in its own seeded order, so the order is a pure function of `g` (exact resume).
    fn example_at(&self, g: u64) -> ExampleRef {
        self.train.examples[super::data::epoch_pick(self.cfg.train.seed, self.train.examples.len(), g)]
    }

    fn facts_for(&self, image: &Path) -> Result<&[String]> {
        if self.cfg.model.facts == FactsMode::None {
            return Ok(&[]);
        }
        self.facts.get(image).map(|f| f.facts.as_slice()).ok_or_else(|| {
            user_err!("no facts for {} in the facts file; run `sage facts` on this dataset", image.display())
        })
    }

    /// The model inputs of one example: patch tokens (from the cache), facts and the question.
    pub(crate) fn inputs(&mut self, val: bool, e: ExampleRef) -> Result<Inputs> {
        let split = if val { &self.val } else { &self.train };
        let s = &split.samples[e.item];
        let question = split.question(e).clone();
        let (test_path, ref_path) =
            (s.test_image.clone(), if self.cfg.data.zero_shot { None } else { s.reference_image.clone() });
        let facts = self.facts_for(&test_path)?.to_vec();
        let test = self.tokens.get(&self.model, &test_path)?.clone();
        let reference = match &ref_path {
            Some(p) => Some(self.tokens.get(&self.model, p)?.clone()),
            None => None,
        };
        Ok(Inputs { test, reference, facts, question })
    }

    /// Conclusion accuracy on (at most `limit`) validation questions, greedy decoding, answered
    /// by `model` (the run's model on an op set), 16 questions a batch.
    pub fn validate<O: StepOps>(&mut self, limit: usize, model: &Sage<O>) -> Result<ValResult> {
        let mut picks: Vec<ExampleRef> = self.val.examples.clone();
        SeedRng::new(self.cfg.train.seed, streams::SAMPLING).shuffle(&mut picks);
        if limit > 0 {
            picks.truncate(limit);
        }
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
        let (mut right, mut unparsed, mut yes) = (0usize, 0usize, 0usize);
        for chunk in picks.chunks(16) {
            let mut inputs = Vec::with_capacity(chunk.len());
            for e in chunk {
                let i = self.inputs(true, *e)?;
                let q = &i.question;
                let truth = q.answer.as_deref().and_then(conclusion).or_else(|| conclusion(&q.ranked_answers[0]));
                let truth = truth.with_context(|| format!("validation question without a Yes/No truth: {}", q.text))?;
                yes += truth as usize;
                inputs.push((i, truth));
            }
            let exs: Vec<Example> = inputs.iter().map(|(i, _)| i.example(None)).collect();
            let texts: Vec<String> =
                model.answer_batch(&self.model, &exs, 3, greedy)?.into_iter().map(|(t, _)| t).collect();
            for (text, (_, truth)) in texts.iter().zip(&inputs) {
                match conclusion(text) {
                    Some(c) => right += (c == *truth) as usize,
                    None => unparsed += 1,
                }
            }
        }
        let n = picks.len().max(1) as f64;
        Ok(ValResult {
            questions: picks.len(),
            accuracy: right as f64 / n,
            majority_rate: (yes.max(picks.len() - yes)) as f64 / n,
            unparsed,
        })
    }
}

#[derive(Serialize)]
struct StepLog {
    step: u64,
    loss: f32,
    lr: f32,
    grad_norm: f32,
    tokens: usize,
    tokens_per_second: f64,
    seconds: f64,
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

pub struct Outcome {
    pub steps: u64,
    pub final_loss: f32,
    pub val: Option<ValResult>,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
}

/// Where a training run (`sfe` or `edpo`) begins.
pub(crate) struct Start {
    pub trainer: Trainer,
    /// The restored checkpoint's state (`None` for a fresh run).
    pub state: Option<checkpoint::State>,
    /// Optimizer steps already done.
    pub step: u64,
    /// `log.jsonl`, open for appending.
    pub log: std::fs::File,
}

/// A fresh trainer at step 0 (refusing to overwrite a checkpoint), or with `resume` the
/// checkpoint in `out` restored into `params`, its log cut back to the checkpoint's step.
pub(crate) fn start_run(
    out: &Path,
    params: &mut ParamSet,
    tcfg: crate::train::TrainConfig,
    resume: bool,
) -> Result<Start> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let log_path = out.join("log.jsonl");
    let (trainer, state) = if resume {
        if !checkpoint::exists(out) {
            return Err(user_err!("--resume: no checkpoint in {} (run without --resume to start)", out.display()));
        }
        let (state, trainer) = checkpoint::restore(out, params, tcfg)?;
        truncate_log(&log_path, state.step)?;
        (trainer, Some(state))
    } else {
        if checkpoint::exists(out) {
            return Err(user_err!(
                "{} already holds a checkpoint; continue it with --resume, or choose another --out",
                out.display()
            ));
        }
        let _ = std::fs::remove_file(&log_path);
        (Trainer::new(tcfg), None)
    };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    Ok(Start { trainer, step: state.as_ref().map_or(0, |s| s.step), state, log })
}

/// `--resume` continues the same run: the data, model, LLM and optimisation settings must be the
/// saved ones. Only `steps` (to train longer), the validation settings and `checkpoint_every` may
/// change.
fn check_resume_config(out: &Path, state: &checkpoint::State, cfg: &SfeConfig) -> Result<()> {
    if state.edpo.is_some() {
        return Err(user_err!("{} holds an E-DPO checkpoint; resume it with `sage edpo --resume`", out.display()));
    }
    let comparable = |c: &SfeConfig| -> Result<serde_json::Value> {
        let mut v = serde_json::to_value(c)?;
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

/// What every training loop (`sfe`, `edpo`) does once optimizer step `done` is taken: append its
/// log line, advance the progress bar, validate through `validate` every `train.val_every` steps
/// (the final validation is the caller's), and checkpoint through `save` every
/// `train.checkpoint_every` steps and at the last ([`checkpoint_due`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_step(
    run: &mut Run,
    train: &super::config::TrainSection,
    log: &mut std::fs::File,
    pb: &indicatif::ProgressBar,
    line: &impl Serialize,
    loss: f32,
    done: u64,
    validate: impl FnOnce(&mut Run, usize) -> Result<ValResult>,
    save: impl FnOnce(&Run) -> Result<()>,
) -> Result<()> {
    writeln!(log, "{}", serde_json::to_string(line)?)?;
    log.flush()?;
    pb.set_message(format!("loss {loss:.3}"));
    pb.inc(1);
    if train.val_every > 0 && done.is_multiple_of(train.val_every) && done < train.steps {
        let v = validate(run, train.val_questions)?;
        let val = serde_json::json!({"step": done, "val_accuracy": v.accuracy, "val_questions": v.questions});
        writeln!(log, "{val}")?;
        log.flush()?;
    }
    if checkpoint_due(train, done) {
        save(run)?;
    }
    Ok(())
}

/// What the step lines of `log.jsonl` add up to. The log holds one line per step of the run, from
/// whichever process ran it (a resume cuts it back to the checkpoint first), so the run's final
/// figures come from it: a run resumed after its last step still reports its last loss.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct LogTotals {
    pub steps: u64,
    /// The loss of the last step line (`None`: no step logged).
    pub last_loss: Option<f32>,
    pub seconds: f64,
    pub tokens: u64,
}

pub(crate) fn log_totals(path: &Path) -> Result<LogTotals> {
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

/// The final validation (`val`) and the run's summary, after the last step.
fn finish_training(run: &mut Run, val: ValResult) -> Result<Outcome> {
    let t = log_totals(&run.out.join("log.jsonl"))?;
    Ok(Outcome {
        steps: run.cfg.train.steps,
        final_loss: t.last_loss.unwrap_or(f32::NAN),
        val: Some(val),
        step_seconds: t.seconds / t.steps.max(1) as f64,
        tokens_per_second: t.tokens as f64 / t.seconds.max(1e-9),
    })
}

/// The file a finished run's summary is written to; its presence (with the last checkpoint at the
/// final step) marks the run finished.
pub const FINAL_FILE: &str = "final.json";

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

/// [`finished_step`] for `sage sfe --resume`, after checking that `cfg` is the run's config (a
/// finished run is not silently taken for another one).
pub fn finished_sfe(out: &Path, cfg: &SfeConfig) -> Result<Option<u64>> {
    let Some(step) = finished_step(out, cfg.train.steps)? else { return Ok(None) };
    check_resume_config(out, &checkpoint::read_state(out)?, cfg)?;
    Ok(Some(step))
}

/// Whether [`finish_step`] checkpoints after step `done` (a loop that trains on a device copies
/// the weights and optimizer state back to the host first).
pub(crate) fn checkpoint_due(train: &super::config::TrainSection, done: u64) -> bool {
    done.is_multiple_of(train.checkpoint_every.max(1)) || done == train.steps
}

/// The freshly initialised model's validation (`sage sfe --eval-only`), answered on `ops`.
pub fn validate_untrained<O: StepOps>(run: &mut Run, ops: O) -> Result<ValResult> {
    let model = Sage::new(ops, &run.model, &run.params, None, None)?;
    run.validate(run.cfg.train.val_questions, &model)
}

/// Trains from scratch or from the checkpoint in `run.out` (`resume`), every step on the op set
/// `ops` (`HostOps` on the CPU, `CudaOps` on the GPU): examples in a seeded order, `batch` of them
/// a step, the schedule, clipping, logs and checkpoints (the weights and optimizer state are
/// copied back to the host when a checkpoint is due), and validation answered by the same model,
/// so a run may be resumed on either backend.
pub fn train<O: StepOps>(run: &mut Run, ops: O, resume: bool, quiet: bool) -> Result<Outcome> {
    let tcfg = run.cfg.train.trainer_config();
    let Start { mut trainer, step: start, mut log, state } = start_run(&run.out, &mut run.params, tcfg, resume)?;
    if let Some(state) = &state {
        check_resume_config(&run.out, state, &run.cfg)?;
    }
    let mut dev = Sage::new(ops, &run.model, &run.params, Some(tcfg.adamw), tcfg.max_grad_norm)?;
    dev.llm.restore_optimizer(&trainer.opt.state)?;
    if !quiet {
        eprintln!("sfe: training on {}", dev.llm.ops.describe());
    }
    let steps = run.cfg.train.steps;
    let batch = run.cfg.train.batch.max(1) as u64;
    let pb = crate::util::progress_bar(steps, "sfe", quiet);
    pb.set_position(start);
    let mut saved = state.as_ref().map(|s| s.step);
    for step in start..steps {
        let t0 = Instant::now();
        let mut plans = Vec::with_capacity(batch as usize);
        for m in 0..batch {
            let e = run.example_at(step * batch + m);
            let i = run.inputs(false, e)?;
            plans.push(run.model.plan(&i.example(Some(&i.question.ranked_answers[0])))?);
        }
        let tokens: usize = plans.iter().map(|p| p.counted()).sum();
        let lr = tcfg.schedule.lr(dev.llm.steps());
        let (mut loss, grad_norm) = dev.train_step(&plans, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        let done = step + 1;
        if guard::test_poisons(done) {
            loss = f32::NAN;
        }
        guard::check_step(done, loss, grad_norm, saved)?;
        if checkpoint_due(&run.cfg.train, done) {
            dev.llm.download_into(&mut run.params)?;
            trainer.opt.state = dev.llm.optimizer_state()?;
        }
        let line =
            StepLog { step: done, loss, lr, grad_norm, tokens, tokens_per_second: tokens as f64 / secs, seconds: secs };
        let train = run.cfg.train.clone();
        let validate = |r: &mut Run, n| r.validate(n, &dev);
        finish_step(run, &train, &mut log, &pb, &line, loss, done, validate, |r| {
            checkpoint::save(&r.out, done, &r.params, &trainer, &r.cfg, None)
        })?;
        if checkpoint_due(&train, done) {
            saved = Some(done);
        }
    }
    pb.finish_and_clear();
    let val = run.validate(run.cfg.train.val_questions, &dev)?;
    finish_training(run, val)
}
