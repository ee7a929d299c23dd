//! The E-DPO loop: instances in a seeded order, `batch` of them a step, each instance's pairs
//! scored under the policy and the frozen reference, JSONL logs, validation and atomic
//! checkpoints with exact resume (as `sfe`).
//!
//! The answers that appear in a pair run through the policy (keeping activations) and, once, the
//! frozen SFE reference (memoised, since it never changes). The sequence log-probabilities come
//! from the fused log-probability op of the op set; its gradient flows back through the LLM and
//! the head ([`Sage::edpo_step`]).

use super::config::EdpoRunConfig;
use super::pairs::instance_pairs;
use crate::judge::scores::{answer_entropy, load_scores, ScoreCache};
use crate::models::sage::Sage;
use crate::opset::Pair;
use crate::opset::StepOps;
use crate::sfe::checkpoint;
use crate::sfe::data::{epoch_pick, ExampleRef};
use crate::sfe::run::{checkpoint_due, finish_step, finished_step, log_totals, start_run, Run, Start, ValResult};
use crate::train::{guard, ParamSet};
use crate::user_err;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The answers of a step's instances, as [`EdpoRun::batch`] assembles them.
pub struct EdpoBatch {
    pub plans: Vec<crate::models::sage::SeqPlan>,
    /// Each answer's sequence log-probability under the reference.
    pub reference: Vec<f32>,
    pub pairs: Vec<Pair>,
    /// Each answer's weight in the step's loss.
    pub scale: Vec<f32>,
    /// Per instance: (first answer, answers, pairs).
    groups: Vec<(usize, usize, usize)>,
}

impl EdpoBatch {
    /// The step's loss from the pairs' margins: the mean over instances of each instance's mean
    /// `−log σ(d)` over its pairs.
    pub fn loss(&self, margins: &[f32]) -> f32 {
        let mut at = 0;
        let mut sum = 0.0f64;
        for &(_, _, p) in &self.groups {
            let l: f64 = margins[at..at + p].iter().map(|&d| neg_log_sigmoid(d as f64)).sum();
            sum += l / p.max(1) as f64;
            at += p;
        }
        (sum / self.groups.len().max(1) as f64) as f32
    }

    /// Answer tokens scored.
    pub fn tokens(&self) -> usize {
        self.plans.iter().map(|p| p.counted()).sum()
    }
}

/// One question with its ranked answers' judge entropies.
#[derive(Clone, Debug)]
pub struct Instance {
    pub example: ExampleRef,
    pub entropies: Vec<f32>,
}

pub struct EdpoRun {
    pub cfg: EdpoRunConfig,
    pub out: PathBuf,
    /// The policy (model, parameters, data, facts) built as the SFE run was.
    pub base: Run,
    reference: ParamSet,
    pub instances: Vec<Instance>,
    /// `(item, question, answer)` → the reference's sequence log-probability.
    reference_memo: HashMap<(usize, usize, usize), f32>,
}

impl EdpoRun {
    /// Loads the SFE run (policy and frozen reference), freezes the fusion attention and reads
    /// the judge scores of every instance.
    pub fn new(cfg: EdpoRunConfig, out: &Path) -> Result<EdpoRun> {
        let state = checkpoint::read_state(&cfg.sfe).map_err(|e| {
            user_err!("{e:#}\nsfe = {} must be a `sage sfe` run folder (train one first)", cfg.sfe.display())
        })?;
        if state.edpo.is_some() {
            return Err(user_err!(
                "{} is an E-DPO run; the reference must be a stage-1 (`sage sfe`) run",
                cfg.sfe.display()
            ));
        }
        // Before the model loads: a missing score file is the likeliest first-run mistake. The
        // command given writes exactly the file and judge key this run reads.
        let scores_path = cfg.data.scores_path();
        if !scores_path.exists() {
            let judge_config = match &cfg.data.judge_config {
                Some(c) => format!(" --judge-config '{c}'"),
                None => String::new(),
            };
            let max_items = match cfg.data.max_train_items {
                0 => String::new(),
                n => format!(" --max-items {n}"),
            };
            return Err(user_err!(
                "no judge scores at {}; run `sage score --data {} --judge {}{judge_config}{max_items} --out {}` first",
                scores_path.display(),
                cfg.data.train.display(),
                cfg.data.judge,
                scores_path.display()
            ));
        }
        let mut sfe_cfg = state.config.clone();
        sfe_cfg.data.train = cfg.data.train.clone();
        sfe_cfg.data.max_train_items = cfg.data.max_train_items;
        sfe_cfg.train = cfg.train.clone();
        let mut base = Run::new(sfe_cfg, out)?;
        checkpoint::load_weights(&cfg.sfe, &state, &mut base.params)?;
        let mut reference = base.params.clone();
        reference.set_trainable_where(|_| true, false);
        base.params.set_trainable_where(|name| name.starts_with(crate::models::sage::FUSION_PREFIX), false);
        let cache = ScoreCache::open(&scores_path)?;
        let table = load_scores(&cache, &base.train.samples, &cfg.data.judge_key())?;
        let mut instances = Vec::new();
        for &e in &base.train.examples {
            let s = &base.train.samples[e.item];
            if s.questions[e.question].ranked_answers.len() < 2 {
                continue;
            }
            let sc = table.get(&s.id, e.question).context("load_scores covers every ranked answer")?;
            instances.push(Instance { example: e, entropies: sc.iter().map(answer_entropy).collect() });
        }
        if instances.is_empty() {
            return Err(user_err!("{} has no question with two or more ranked answers", cfg.data.train.display()));
        }
        Ok(EdpoRun { cfg, out: out.to_path_buf(), base, reference, instances, reference_memo: HashMap::new() })
    }

    pub fn instance_at(&self, g: u64) -> Instance {
        self.instances[epoch_pick(self.cfg.train.seed, self.instances.len(), g)].clone()
    }

    /// The answers of `instances` as one batch for [`Sage::edpo_step`]: every answer that appears
    /// in a pair, its reference log-probability (memoised; the ones not seen before are computed
    /// on `reference` now), the pairs, and each answer's weight so that the loss op's mean over all
    /// pairs becomes the mean over instances of each instance's pair mean.
    pub fn batch<O: StepOps>(&mut self, instances: &[Instance], reference: &Sage<O>) -> Result<EdpoBatch> {
        let (mut plans, mut refs, mut keys, mut pairs, mut groups) = (vec![], vec![], vec![], vec![], vec![]);
        for inst in instances {
            let chosen = instance_pairs(&inst.entropies, self.cfg.edpo.pairs);
            let mut used: Vec<usize> = chosen.iter().flat_map(|p| [p.chosen, p.rejected]).collect();
            used.sort_unstable();
            used.dedup();
            let first = plans.len();
            let local = |rank: usize| first + used.iter().position(|&u| u == rank).expect("listed");
            let inputs = self.base.inputs(false, inst.example)?;
            for &rank in &used {
                plans.push(self.base.model.plan(&inputs.example(Some(&inputs.question.ranked_answers[rank])))?);
                let key = (inst.example.item, inst.example.question, rank);
                refs.push(self.reference_memo.get(&key).copied());
                keys.push(key);
            }
            pairs.extend(chosen.iter().map(|p| Pair {
                chosen: local(p.chosen),
                rejected: local(p.rejected),
                delta_h: p.delta_h,
            }));
            groups.push((first, used.len(), chosen.len()));
        }
        let missing: Vec<usize> = (0..plans.len()).filter(|&i| refs[i].is_none()).collect();
        if !missing.is_empty() {
            let todo: Vec<_> = missing.iter().map(|&i| plans[i].clone()).collect();
            let got = reference.ops().download_stat(&reference.answer_logprobs(&todo)?)?;
            for (&i, &r) in missing.iter().zip(&got) {
                refs[i] = Some(r);
                self.reference_memo.insert(keys[i], r);
            }
        }
        let total_pairs = pairs.len() as f32;
        let mut scale = vec![0.0f32; plans.len()];
        for &(first, n, p) in &groups {
            scale[first..first + n].fill(total_pairs / (p.max(1) as f32 * instances.len() as f32));
        }
        let reference = refs.into_iter().map(|r| r.expect("filled above")).collect();
        Ok(EdpoBatch { plans, reference, pairs, scale, groups })
    }

    /// The frozen reference model (the SFE weights) on `ops`; its host copy is released.
    pub fn reference_model<O: StepOps>(&mut self, ops: O) -> Result<Sage<O>> {
        Sage::new(ops, &self.base.model, &std::mem::take(&mut self.reference), None, None)
    }

    fn stage_json(&self) -> serde_json::Value {
        stage_json(&self.cfg)
    }
}

/// What a stage-2 checkpoint records of its config: a resume must match it.
fn stage_json(cfg: &EdpoRunConfig) -> serde_json::Value {
    serde_json::json!({"sfe": cfg.sfe, "edpo": cfg.edpo, "data": cfg.data})
}

/// The checkpoint step when the E-DPO run in `out` is finished for `cfg` (see
/// [`finished_step`]), after checking that it is this stage with this config.
pub fn finished_edpo(out: &Path, cfg: &EdpoRunConfig) -> Result<Option<u64>> {
    let Some(step) = finished_step(out, cfg.train.steps)? else { return Ok(None) };
    let state = checkpoint::read_state(out)?;
    check_stage(out, state.edpo.as_ref(), cfg)?;
    Ok(Some(step))
}

/// Refuses a checkpoint of another stage, or of this stage with another sfe run, data or [edpo].
fn check_stage(out: &Path, saved: Option<&serde_json::Value>, cfg: &EdpoRunConfig) -> Result<()> {
    match saved {
        None => Err(user_err!("{} holds an SFE checkpoint, not an E-DPO one", out.display())),
        Some(saved) if *saved != stage_json(cfg) => Err(user_err!(
            "--resume: {} was trained with another sfe run, data or [edpo] section ({saved}); resume with the same config, or start a new --out",
            out.display()
        )),
        Some(_) => Ok(()),
    }
}

/// The run's summary from its log (see [`log_totals`]), after the final validation.
fn finish_training(run: &EdpoRun, val: ValResult) -> Result<Outcome> {
    let t = log_totals(&run.out.join("log.jsonl"))?;
    Ok(Outcome {
        steps: run.cfg.train.steps,
        final_loss: t.last_loss.unwrap_or(f32::NAN),
        val: Some(val),
        step_seconds: t.seconds / t.steps.max(1) as f64,
    })
}

#[derive(Serialize)]
struct StepLog {
    step: u64,
    loss: f32,
    /// Mean margin `d` over the step's pairs.
    margin: f32,
    /// Share of the step's pairs whose margin is positive (the policy prefers the winner by more
    /// than the entropy term asks).
    pair_accuracy: f32,
    lr: f32,
    grad_norm: f32,
    tokens: usize,
    seconds: f64,
}

impl StepLog {
    fn new(step: u64, loss: f32, margins: &[f32], lr: f32, grad_norm: f32, tokens: usize, seconds: f64) -> StepLog {
        let n = margins.len().max(1) as f32;
        StepLog {
            step,
            loss,
            margin: margins.iter().sum::<f32>() / n,
            pair_accuracy: margins.iter().filter(|&&m| m > 0.0).count() as f32 / n,
            lr,
            grad_norm,
            tokens,
            seconds,
        }
    }
}

pub struct Outcome {
    pub steps: u64,
    pub final_loss: f32,
    pub val: Option<ValResult>,
    pub step_seconds: f64,
}

/// Where a run starts: [`start_run`] and the check that a resumed checkpoint is this stage's.
fn start_edpo(run: &mut EdpoRun, resume: bool) -> Result<Start> {
    let tcfg = run.cfg.train.trainer_config();
    let start = start_run(&run.out, &mut run.base.params, tcfg, resume)?;
    if let Some(state) = &start.state {
        check_stage(&run.out, state.edpo.as_ref(), &run.cfg)?;
    }
    Ok(start)
}

/// `−log σ(d)`, stable for any `d`.
fn neg_log_sigmoid(d: f64) -> f64 {
    (-d).max(0.0) + (-d.abs()).exp().ln_1p()
}

/// Trains from the SFE run, or from the checkpoint in `run.out` (`resume`), on the op set `ops`
/// (`HostOps` on the CPU, `CudaOps` for `--device cuda`): the policy and a frozen copy of the SFE
/// model as the reference live on the op set; each step runs all answers of its `batch` instances
/// as one padded batch ([`Sage::edpo_step`]), each instance weighted so that the loss is the mean
/// over instances of each instance's mean over its pairs. The reference log-probability of an
/// answer is computed once and memoised on the host (the only read-back before the optimizer,
/// and only for answers not seen before).
pub fn train<O: StepOps + Clone>(run: &mut EdpoRun, ops: O, resume: bool, quiet: bool) -> Result<Outcome> {
    let tcfg = run.cfg.train.trainer_config();
    let Start { mut trainer, step: start, mut log, state } = start_edpo(run, resume)?;
    let mut saved = state.map(|s| s.step);
    let mut policy = Sage::new(ops.clone(), &run.base.model, &run.base.params, Some(tcfg.adamw), tcfg.max_grad_norm)?;
    policy.llm.restore_optimizer(&trainer.opt.state)?;
    let reference = run.reference_model(ops)?;
    if !quiet {
        eprintln!("edpo: training on {}", policy.llm.ops.describe());
    }
    let steps = run.cfg.train.steps;
    let batch = run.cfg.train.batch.max(1) as u64;
    let stage = run.stage_json();
    let loss_cfg = run.cfg.edpo.loss_config();
    let pb = crate::util::progress_bar(steps, "edpo", quiet);
    pb.set_position(start);
    for step in start..steps {
        let t0 = Instant::now();
        let insts: Vec<Instance> = (0..batch).map(|m| run.instance_at(step * batch + m)).collect();
        let b = run.batch(&insts, &reference)?;
        let lr = tcfg.schedule.lr(policy.llm.steps());
        let (margins, grad_norm) = policy.edpo_step(&b.plans, &b.reference, &b.pairs, &b.scale, loss_cfg, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        let tokens = b.tokens();
        let done = step + 1;
        let loss = if guard::test_poisons(done) { f32::NAN } else { b.loss(&margins) };
        guard::check_step(done, loss, grad_norm, saved)?;
        let line = StepLog::new(done, loss, &margins, lr, grad_norm, tokens, secs);
        if checkpoint_due(&run.cfg.train, done) {
            policy.llm.download_into(&mut run.base.params)?;
            trainer.opt.state = policy.llm.optimizer_state()?;
        }
        let out = &run.out;
        let validate = |b: &mut Run, n| b.validate(n, &policy);
        finish_step(&mut run.base, &run.cfg.train, &mut log, &pb, &line, loss, done, validate, |b| {
            checkpoint::save(out, done, &b.params, &trainer, &b.cfg, Some(&stage))
        })?;
        if checkpoint_due(&run.cfg.train, done) {
            saved = Some(done);
        }
    }
    pb.finish_and_clear();
    let val = run.base.validate(run.cfg.train.val_questions, &policy)?;
    finish_training(run, val)
}
