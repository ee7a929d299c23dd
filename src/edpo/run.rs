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
use crate::models::sage::{PrefTerms, Sage};
use crate::opset::Pair;
use crate::opset::StepOps;
use crate::score::{answer_entropy, load_scores, ScoreCache};
use crate::stage::checkpoint::{self, State};
use crate::stage::data::{alternate_pick, epoch_pick, ExampleRef};
use crate::stage::{finished_step, Outcome, Session, Stage, StepOut};
use crate::train::ParamSet;
use crate::user_err;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

/// The answers of `instances` as one batch for [`Sage::edpo_step`]: every answer that appears
/// in a pair, its reference log-probability (memoised; the ones not seen before are computed
/// on `reference` now), the pairs, and each answer's weight so that the loss op's mean over all
/// pairs becomes the mean over instances of each instance's pair mean.
pub fn assemble<O: StepOps>(
    cfg: &EdpoRunConfig,
    session: &mut Session,
    memo: &mut Memo,
    instances: &[Instance],
    reference: &Sage<O>,
) -> Result<EdpoBatch> {
    let (mut plans, mut refs, mut keys, mut pairs, mut groups) = (vec![], vec![], vec![], vec![], vec![]);
    for inst in instances {
        let chosen = instance_pairs(&inst.entropies, cfg.edpo.pairs);
        let mut used: Vec<usize> = chosen.iter().flat_map(|p| [p.chosen, p.rejected]).collect();
        used.sort_unstable();
        used.dedup();
        let first = plans.len();
        let local = |rank: usize| first + used.iter().position(|&u| u == rank).expect("listed");
        let inputs = session.inputs(false, inst.example)?;
        for &rank in &used {
            plans.push(session.model.plan(&inputs.example(Some(&inputs.question.ranked_answers[rank])))?);
            let key = (inst.example.item, inst.example.question, rank);
            refs.push(memo.get(&key).copied());
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
            memo.insert(keys[i], r);
        }
    }
    let total_pairs = pairs.len() as f32;
    let mut scale = vec![0.0f32; plans.len()];
    for &(first, n, p) in &groups {
        scale[first..first + n].fill(total_pairs / (p.max(1) as f32 * instances.len() as f32));
    }
    let reference = refs.into_iter().map(|r| r.expect("filled above")).collect();
    let terms = pref_terms(cfg, &plans, &pairs, &groups);
    Ok(EdpoBatch { plans, reference, pairs, scale, groups, terms })
}

/// The optional loss terms of `cfg.edpo` for a batch: `1/tokens` per answer when log-ratios are
/// length-normalised, and the SFT weights `c_i = α / (instances · chosen answers of the instance ·
/// tokens_i)` on each instance's distinct chosen answers (so the term is α times the mean over
/// instances of their chosen answers' mean per-token NLL).
fn pref_terms(
    cfg: &EdpoRunConfig,
    plans: &[crate::models::sage::SeqPlan],
    pairs: &[Pair],
    groups: &[(usize, usize, usize)],
) -> PrefTerms {
    let tokens = |i: usize| plans[i].counted().max(1) as f32;
    let length_scale = cfg.edpo.length_normalize.then(|| (0..plans.len()).map(|i| 1.0 / tokens(i)).collect());
    let nll = (cfg.edpo.sft_weight > 0.0).then(|| {
        let mut c = vec![0.0f32; plans.len()];
        let mut at = 0;
        for &(_, _, p) in groups {
            let mut chosen: Vec<usize> = pairs[at..at + p].iter().map(|q| q.chosen).collect();
            chosen.sort_unstable();
            chosen.dedup();
            for &i in &chosen {
                c[i] = cfg.edpo.sft_weight / (groups.len() * chosen.len()) as f32 / tokens(i);
            }
            at += p;
        }
        c
    });
    PrefTerms { length_scale, nll }
}

/// The answers of a step's instances, as [`assemble`] makes them.
pub struct EdpoBatch {
    pub plans: Vec<crate::models::sage::SeqPlan>,
    /// Each answer's sequence log-probability under the reference.
    pub reference: Vec<f32>,
    pub pairs: Vec<Pair>,
    /// Each answer's weight in the step's loss.
    pub scale: Vec<f32>,
    /// Per instance: (first answer, answers, pairs).
    groups: Vec<(usize, usize, usize)>,
    /// The loss terms beyond the paper's that `[edpo]` turns on.
    pub terms: PrefTerms,
}

impl EdpoBatch {
    /// The step's preference loss from the pairs' margins: the mean over instances of each
    /// instance's mean `−log σ(d)` over its pairs.
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

    /// The SFT term's value `Σ c_i·(−log π(a_i))` from the policy's sequence log-probabilities
    /// (0 when the term is off).
    pub fn sft_loss(&self, policy: &[f32]) -> f32 {
        self.terms.nll.as_ref().map_or(0.0, |c| c.iter().zip(policy).map(|(c, p)| -(c * p) as f64).sum::<f64>() as f32)
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
    /// The best answer's conclusion (Yes = true), when it starts with one.
    pub yes: Option<bool>,
}

pub struct EdpoRun {
    pub cfg: EdpoRunConfig,
    /// The policy (model, parameters, data, facts) built as the SFE run was.
    pub session: Session,
    reference: ParamSet,
    pub instances: Vec<Instance>,
    /// `(item, question, answer)` → the reference's sequence log-probability.
    reference_memo: Memo,
}

/// `(item, question, answer)` → the reference's sequence log-probability.
pub type Memo = HashMap<(usize, usize, usize), f32>;

impl EdpoRun {
    /// Loads the SFE run (policy and frozen reference), freezes the fusion attention and reads
    /// the judge scores of every instance.
    pub fn new(cfg: EdpoRunConfig, out: &Path, plugin_dirs: &[std::path::PathBuf]) -> Result<EdpoRun> {
        let state = crate::stage::sfe_start(&cfg.sfe, "E-DPO")?;
        if let Some(m) = cfg.model.as_ref().filter(|m| m.backbone != state.config.model.backbone) {
            return Err(user_err!(
                "[model] backbone = \"{}\", but the SFE run {} was trained on backbone `{}`; set [model] backbone = \"{}\" \
                 (or drop the key), or point sfe at a run of backbone `{}`",
                m.backbone,
                cfg.sfe.display(),
                state.config.model.backbone,
                state.config.model.backbone,
                m.backbone
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
        let (mut session, reference) = Session::from_sfe(&cfg.sfe, &state, sfe_cfg, out, plugin_dirs)?;
        session.params.set_trainable_where(|name| name.starts_with(crate::models::sage::FUSION_PREFIX), false);
        let cache = ScoreCache::open(&scores_path)?;
        let table = load_scores(&cache, &session.train.samples, &cfg.data.judge_key())?;
        let mut instances = Vec::new();
        for &e in &session.train.examples {
            let s = &session.train.samples[e.item];
            if s.questions[e.question].ranked_answers.len() < 2 {
                continue;
            }
            let sc = table.get(&s.id, e.question).context("load_scores covers every ranked answer")?;
            let yes = crate::data::sample::conclusion(&s.questions[e.question].ranked_answers[0]);
            instances.push(Instance { example: e, entropies: sc.iter().map(answer_entropy).collect(), yes });
        }
        if instances.is_empty() {
            return Err(user_err!("{} has no question with two or more ranked answers", cfg.data.train.display()));
        }
        Ok(EdpoRun { cfg, session, reference, instances, reference_memo: HashMap::new() })
    }

    pub fn instance_at(&self, g: u64) -> Instance {
        instance_at(&self.cfg, &self.instances, g)
    }

    /// The answers of `instances` as one batch for [`Sage::edpo_step`] ([`assemble`]).
    pub fn batch<O: StepOps>(&mut self, instances: &[Instance], reference: &Sage<O>) -> Result<EdpoBatch> {
        assemble(&self.cfg, &mut self.session, &mut self.reference_memo, instances, reference)
    }

    /// The frozen reference model (the SFE weights) on `ops`; its host copy is released.
    pub fn reference_model<O: StepOps>(&mut self, ops: O) -> Result<Sage<O>> {
        Sage::new(ops, &self.session.model, &std::mem::take(&mut self.reference), None, None)
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
        None => {
            let holds = match checkpoint::read_state(out)?.stage() {
                "grpo" => "a GRPO",
                _ => "an SFE",
            };
            Err(user_err!("{} holds {holds} checkpoint, not an E-DPO one", out.display()))
        }
        Some(saved) if *saved != stage_json(cfg) => Err(user_err!(
            "--resume: {} was trained with another sfe run, data or [edpo] section ({saved}); resume with the same config, or start a new --out",
            out.display()
        )),
        Some(_) => Ok(()),
    }
}

/// The E-DPO step on the op set: every answer of the step's instances as one padded batch, the
/// reference log-probabilities from the frozen SFE model (built in [`Stage::prepare`]).
struct Edpo<'r, O: StepOps> {
    cfg: &'r EdpoRunConfig,
    instances: &'r [Instance],
    memo: &'r mut Memo,
    reference_params: &'r mut ParamSet,
    reference: Option<Sage<O>>,
}

impl<O: StepOps> Stage<O> for Edpo<'_, O> {
    const NAME: &'static str = "edpo";

    fn prepare(&mut self, session: &mut Session, ops: O) -> Result<()> {
        // The reference is frozen: once on the op set, its host copy is not needed.
        let params = std::mem::take(self.reference_params);
        self.reference = Some(Sage::new(ops, &session.model, &params, None, None)?);
        Ok(())
    }

    fn step(&mut self, session: &mut Session, model: &mut Sage<O>, step: u64, lr: f32) -> Result<StepOut> {
        let batch = self.cfg.train.batch.max(1) as u64;
        let insts: Vec<Instance> =
            (0..batch).map(|m| instance_at(self.cfg, self.instances, step * batch + m)).collect();
        let reference = self.reference.as_ref().expect("prepared before the first step");
        let b = assemble(self.cfg, session, self.memo, &insts, reference)?;
        let loss_cfg = self.cfg.edpo.loss_config();
        let (margins, policy, grad_norm) =
            model.edpo_step(&b.plans, &b.reference, &b.pairs, &b.scale, loss_cfg, &b.terms, lr)?;
        let n = margins.len().max(1) as f32;
        let mut extra = serde_json::Map::new();
        let sft = b.sft_loss(&policy);
        if b.terms.nll.is_some() {
            extra.insert("sft_loss".into(), sft.into());
        }
        // How far the chosen and rejected answers moved from the reference (mean per pair of
        // log π − log π_ref, summed over tokens): DPO can raise the margin by lowering both.
        let moved = |f: fn(&Pair) -> usize| {
            b.pairs.iter().map(|p| (policy[f(p)] - b.reference[f(p)]) as f64).sum::<f64>() / n as f64
        };
        extra.insert("chosen_logratio".into(), moved(|p| p.chosen).into());
        extra.insert("rejected_logratio".into(), moved(|p| p.rejected).into());
        extra.insert("margin".into(), (margins.iter().sum::<f32>() / n).into());
        // Share of the step's pairs whose margin is positive (the policy prefers the winner by
        // more than the entropy term asks).
        extra.insert("pair_accuracy".into(), (margins.iter().filter(|&&m| m > 0.0).count() as f32 / n).into());
        Ok(StepOut { loss: b.loss(&margins) + sft, grad_norm, tokens: b.tokens(), extra })
    }

    fn mark(&self) -> Option<checkpoint::Mark> {
        Some(checkpoint::Mark::Edpo(stage_json(self.cfg)))
    }

    fn check_resume(&self, session: &Session, state: &State) -> Result<()> {
        check_stage(&session.out, state.edpo.as_ref(), self.cfg)
    }
}

/// The instance of global micro-batch index `g`: every epoch visits each once, in its own seeded
/// order.
/// With `balance_conclusions`, even indices draw from the instances whose best answer says Yes and
/// odd ones from those that say No, each side in its own seeded epoch order (when one side is
/// empty, from all instances).
fn instance_at(cfg: &EdpoRunConfig, instances: &[Instance], g: u64) -> Instance {
    if cfg.edpo.balance_conclusions {
        let side = |yes: bool| (0..instances.len()).filter(|&i| instances[i].yes == Some(yes)).collect::<Vec<_>>();
        if let Some(i) = alternate_pick(cfg.train.seed, &side(true), &side(false), g) {
            return instances[i].clone();
        }
    }
    instances[epoch_pick(cfg.train.seed, instances.len(), g)].clone()
}

/// `−log σ(d)`, stable for any `d`.
fn neg_log_sigmoid(d: f64) -> f64 {
    (-d).max(0.0) + (-d.abs()).exp().ln_1p()
}

/// Trains from the SFE run, or from the checkpoint in the run folder (`resume`), on the op set
/// `ops` (`HostOps` on the CPU, `CudaOps` for `--device cuda`): the policy and a frozen copy of the
/// SFE model as the reference live on the op set; each step runs all answers of its `batch`
/// instances as one padded batch ([`Sage::edpo_step`]). The reference log-probability of an
/// answer is computed once and memoised on the host.
pub fn train<O: StepOps + Clone>(run: &mut EdpoRun, ops: O, resume: bool, quiet: bool) -> Result<Outcome> {
    let EdpoRun { cfg, session, reference, instances, reference_memo } = run;
    let mut stage =
        Edpo { cfg, instances, memo: reference_memo, reference_params: reference, reference: None::<Sage<O>> };
    crate::stage::train(&mut stage, session, ops, resume, quiet)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(balance: bool) -> EdpoRunConfig {
        let text = format!(
            "sfe = \"s\"\n[data]\ntrain = \"t.json\"\n[edpo]\nbalance_conclusions = {balance}\n[train]\nsteps = 1\nbatch = 1\n\
             lr = 1e-4\nseed = 7\n"
        );
        toml::from_str(&text).unwrap()
    }

    /// Instances 0..10, whose best answers say Yes for the first 8 and No for the last 2.
    fn instances() -> Vec<Instance> {
        (0..10)
            .map(|i| Instance {
                example: ExampleRef { item: i, question: 0 },
                entropies: vec![1.0, 0.5],
                yes: Some(i < 8),
            })
            .collect()
    }

    #[test]
    fn balanced_instances_alternate_conclusions_and_visit_each_side_every_epoch() {
        let (cfg, inst) = (config(true), instances());
        let drawn: Vec<usize> = (0..16).map(|g| instance_at(&cfg, &inst, g).example.item).collect();
        for (g, &i) in drawn.iter().enumerate() {
            assert_eq!(inst[i].yes, Some(g % 2 == 0), "draw {g} took instance {i}: {drawn:?}");
        }
        // The 8 Yes instances once each in draws 0, 2, ..., 14; the 2 No ones once per two odd draws.
        let mut yes: Vec<usize> = drawn.iter().step_by(2).copied().collect();
        yes.sort_unstable();
        assert_eq!(yes, (0..8).collect::<Vec<_>>());
        let mut no: Vec<usize> = drawn[1..5].iter().step_by(2).copied().collect();
        no.sort_unstable();
        assert_eq!(no, vec![8, 9]);
        // Unbalanced: one seeded order over all ten, 8 Yes to 2 No per epoch.
        let plain: Vec<usize> = (0..10).map(|g| instance_at(&config(false), &inst, g).example.item).collect();
        assert_eq!(plain.iter().filter(|&&i| i < 8).count(), 8);
        // With one side empty, balancing falls back to the plain order.
        let all_yes: Vec<Instance> = inst.iter().map(|i| Instance { yes: Some(true), ..i.clone() }).collect();
        let fallback: Vec<usize> = (0..10).map(|g| instance_at(&cfg, &all_yes, g).example.item).collect();
        assert_eq!(fallback, plain);
    }
}
