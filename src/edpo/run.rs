//! The E-DPO loop: instances in a seeded order, each instance's pairs scored under the policy
//! and the frozen reference, one backward per answer, an optimizer step every `batch`
//! instances, JSONL logs, validation and atomic checkpoints with exact resume (as `sfe`).
//!
//! Per instance the answers that appear in a pair are each run once through the policy (keeping
//! activations) and once through the frozen SFE reference (no gradients; memoised, since it never
//! changes). The sequence log-probabilities come from the answer rows' hidden states and the LM
//! head through [`ops::edpo`](crate::ops::edpo), the CPU reference of the fused CUDA loss; its
//! gradient with respect to those hidden states then flows back through the LLM and the head.

use super::config::EdpoRunConfig;
use super::pairs::instance_pairs;
use crate::judge::scores::{answer_entropy, load_scores, ScoreCache};
use crate::models::sage_step::DeviceSage;
use crate::ops::edpo::{edpo_loss, logprob_backward, Pair};
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

/// What one instance contributed to a step.
pub struct InstanceOut {
    /// Mean over the instance's pairs of `−log σ(d)`.
    pub loss: f32,
    /// `d` of each pair.
    pub margins: Vec<f32>,
    /// Answer tokens scored under the policy.
    pub tokens: usize,
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

    fn instance_at(&self, g: u64) -> Instance {
        self.instances[epoch_pick(self.cfg.train.seed, self.instances.len(), g)].clone()
    }

    /// Loss of one instance's pairs, accumulating its gradients into the trainable parameters
    /// (`base.params[..].grad`).
    pub fn train_instance(&mut self, inst: &Instance) -> Result<InstanceOut> {
        self.instance_pass(inst, true)
    }

    /// The same loss as [`EdpoRun::train_instance`], computed by the same forward, without
    /// touching any gradient (finite-difference checks of the gradient).
    pub fn instance_loss(&mut self, inst: &Instance) -> Result<f32> {
        Ok(self.instance_pass(inst, false)?.loss)
    }

    fn instance_pass(&mut self, inst: &Instance, backward: bool) -> Result<InstanceOut> {
        let pairs = instance_pairs(&inst.entropies, self.cfg.edpo.pairs);
        let mut used: Vec<usize> = pairs.iter().flat_map(|p| [p.chosen, p.rejected]).collect();
        used.sort_unstable();
        used.dedup();
        let local = |rank: usize| used.iter().position(|&u| u == rank).expect("listed");
        let local_pairs: Vec<Pair> = pairs
            .iter()
            .map(|p| Pair { chosen: local(p.chosen), rejected: local(p.rejected), delta_h: p.delta_h })
            .collect();
        let inputs = self.base.inputs(false, inst.example)?;
        let model = &self.base.model;
        let d = model.llm.hidden_size();
        let head = model.llm.output;
        let (mut policy, mut reference, mut passes, mut lses) = (vec![], vec![], vec![], vec![]);
        let mut tokens = 0;
        for &rank in &used {
            let ex = inputs.example(Some(&inputs.question.ranked_answers[rank]));
            let key = (inst.example.item, inst.example.question, rank);
            let rho = match self.reference_memo.get(&key) {
                Some(&r) => r,
                None => {
                    let p = model.answer_forward(&self.reference, &ex, false)?;
                    let r = model.answer_logprobs(&self.reference, &p).logp.iter().sum();
                    self.reference_memo.insert(key, r);
                    r
                }
            };
            let pass = model.answer_forward(&self.base.params, &ex, true)?;
            let tl = model.answer_logprobs(&self.base.params, &pass);
            tokens += pass.answer_targets.len();
            policy.push(tl.logp.iter().sum::<f32>());
            reference.push(rho);
            if backward {
                lses.push(tl.lse);
                passes.push(pass);
            }
        }
        let loss = edpo_loss(&policy, &reference, &local_pairs, self.cfg.edpo.loss_config());
        for (k, pass) in passes.iter().enumerate() {
            let g = loss.grad_policy[k];
            if g == 0.0 {
                continue;
            }
            let grad_token = vec![g; pass.answer_targets.len()];
            let trainable_head = self.base.params[head].trainable;
            let (dh, dw) = logprob_backward(
                &pass.answer_hidden,
                &self.base.params[head].value,
                d,
                &pass.answer_targets,
                &lses[k],
                &grad_token,
                trainable_head,
            );
            if let Some(dw) = dw {
                self.base.params[head].grad.iter_mut().zip(&dw).for_each(|(a, b)| *a += b);
            }
            self.base.model.answer_backward(&mut self.base.params, pass, &dh)?;
        }
        Ok(InstanceOut { loss: loss.loss, margins: loss.margins, tokens })
    }

    pub fn validate(&mut self, limit: usize) -> Result<ValResult> {
        self.base.validate(limit)
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

/// [`train`] with every step on a device op set (`CudaOps` for `--device cuda`; the CPU reference
/// ops in the tests): the policy and a frozen copy of the SFE model as the reference live on the
/// device; each step runs all answers of its `batch` instances as one padded batch
/// ([`DeviceSage::edpo_step`]), each instance weighted as the CPU loop's mean of instance means.
/// The reference log-probability of an answer is computed once and memoised on the host, as on
/// the CPU (the only read-back before the optimizer, and only for answers not seen before). Same
/// order, logs, validation and checkpoints as [`train`].
pub fn train_on<O: StepOps + Clone>(run: &mut EdpoRun, ops: O, resume: bool, quiet: bool) -> Result<Outcome> {
    let tcfg = run.cfg.train.trainer_config();
    let Start { mut trainer, step: start, mut log, state } = start_edpo(run, resume)?;
    let mut saved = state.map(|s| s.step);
    let model = &run.base.model;
    let mut policy = DeviceSage::new(ops.clone(), model, &run.base.params, tcfg.adamw, tcfg.max_grad_norm)?;
    policy.llm.restore_optimizer(&trainer.opt.state)?;
    let reference = DeviceSage::new(ops, model, &run.reference, tcfg.adamw, None)?;
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
        let (mut plans, mut refs, mut keys, mut pairs, mut groups) = (vec![], vec![], vec![], vec![], vec![]);
        for m in 0..batch {
            let inst = run.instance_at(step * batch + m);
            let chosen = instance_pairs(&inst.entropies, run.cfg.edpo.pairs);
            let mut used: Vec<usize> = chosen.iter().flat_map(|p| [p.chosen, p.rejected]).collect();
            used.sort_unstable();
            used.dedup();
            let first = plans.len();
            let local = |rank: usize| first + used.iter().position(|&u| u == rank).expect("listed");
            let inputs = run.base.inputs(false, inst.example)?;
            for &rank in &used {
                plans.push(run.base.model.plan(&inputs.example(Some(&inputs.question.ranked_answers[rank])))?);
                let key = (inst.example.item, inst.example.question, rank);
                refs.push(run.reference_memo.get(&key).copied());
                keys.push(key);
            }
            pairs.extend(chosen.iter().map(|p| Pair {
                chosen: local(p.chosen),
                rejected: local(p.rejected),
                delta_h: p.delta_h,
            }));
            groups.push((first, used.len(), chosen.len()));
        }
        // Reference log-probabilities of the answers not seen before, on the frozen copy.
        let missing: Vec<usize> = (0..plans.len()).filter(|&i| refs[i].is_none()).collect();
        if !missing.is_empty() {
            let todo: Vec<_> = missing.iter().map(|&i| plans[i].clone()).collect();
            let got = reference.ops().download_stat(&reference.answer_logprobs(&todo)?)?;
            for (&i, &r) in missing.iter().zip(&got) {
                refs[i] = Some(r);
                run.reference_memo.insert(keys[i], r);
            }
        }
        let refs: Vec<f32> = refs.into_iter().map(|r| r.expect("filled above")).collect();
        // The CPU loop averages each instance's pair mean over the batch; the loss op averages over
        // all pairs: weigh each instance's answers by P / (P_i · batch).
        let total_pairs = pairs.len() as f32;
        let mut scale = vec![0.0f32; plans.len()];
        for &(first, n, p) in &groups {
            scale[first..first + n].fill(total_pairs / (p.max(1) as f32 * batch as f32));
        }
        let tokens: usize = plans.iter().map(|p| p.counted()).sum();
        let lr = tcfg.schedule.lr(policy.llm.steps());
        let (margins, grad_norm) = policy.edpo_step(&plans, &refs, &pairs, &scale, loss_cfg, lr)?;
        let secs = t0.elapsed().as_secs_f64();
        let mut at = 0;
        let mut loss_sum = 0.0f64;
        for &(_, _, p) in &groups {
            let l: f64 = margins[at..at + p].iter().map(|&d| neg_log_sigmoid(d as f64)).sum();
            loss_sum += l / p.max(1) as f64;
            at += p;
        }
        let done = step + 1;
        let loss = if guard::test_poisons(done) { f32::NAN } else { (loss_sum / batch as f64) as f32 };
        guard::check_step(done, loss, grad_norm, saved)?;
        let line = StepLog::new(done, loss, &margins, lr, grad_norm, tokens, secs);
        if checkpoint_due(&run.cfg.train, done) {
            policy.llm.download_into(&mut run.base.params)?;
            trainer.opt.state = policy.llm.optimizer_state()?;
        }
        let out = &run.out;
        let validate = |b: &mut Run, n| b.validate_on(n, Some(&policy));
        finish_step(&mut run.base, &run.cfg.train, &mut log, &pb, &line, loss, done, validate, |b| {
            checkpoint::save(out, done, &b.params, &trainer, &b.cfg, Some(&stage))
        })?;
        if checkpoint_due(&run.cfg.train, done) {
            saved = Some(done);
        }
    }
    pb.finish_and_clear();
    let val = run.base.validate_on(run.cfg.train.val_questions, Some(&policy))?;
    finish_training(run, val)
}

/// Trains from the SFE run, or from the checkpoint in `run.out` (`resume`).
pub fn train(run: &mut EdpoRun, resume: bool, quiet: bool) -> Result<Outcome> {
    let Start { mut trainer, step: start, mut log, state } = start_edpo(run, resume)?;
    let mut saved = state.map(|s| s.step);
    let steps = run.cfg.train.steps;
    let batch = run.cfg.train.batch.max(1) as u64;
    let stage = run.stage_json();
    let pb = crate::util::progress_bar(steps, "edpo", quiet);
    pb.set_position(start);
    for step in start..steps {
        let t0 = Instant::now();
        let (mut loss_sum, mut tokens, mut margins) = (0.0f32, 0usize, Vec::new());
        let mut report = None;
        for m in 0..batch {
            let inst = run.instance_at(step * batch + m);
            let o = run.train_instance(&inst)?;
            loss_sum += o.loss;
            tokens += o.tokens;
            margins.extend(o.margins);
            if m + 1 == batch && guard::test_poisons(step + 1) {
                guard::poison_gradient(&mut run.base.params);
            }
            report = trainer.micro_step(&mut run.base.params);
        }
        let report = report.expect("the last micro-batch of a step steps the optimizer");
        let secs = t0.elapsed().as_secs_f64();
        let loss = loss_sum / batch as f32;
        guard::check_step(step + 1, loss, report.grad_norm, saved)?;
        let line = StepLog::new(step + 1, loss, &margins, report.lr, report.grad_norm, tokens, secs);
        let out = &run.out;
        finish_step(&mut run.base, &run.cfg.train, &mut log, &pb, &line, loss, step + 1, Run::validate, |b| {
            checkpoint::save(out, step + 1, &b.params, &trainer, &b.cfg, Some(&stage))
        })?;
        if checkpoint_due(&run.cfg.train, step + 1) {
            saved = Some(step + 1);
        }
    }
    pb.finish_and_clear();
    let val = run.validate(run.cfg.train.val_questions)?;
    finish_training(run, val)
}
