//! The GRPO loop on the shared trainer: each batch of prompts is answered `G` times by the policy
//! (sampled, batched KV-cached decode), every answer is parsed and rewarded, advantages are the
//! rewards relative to their group, and `updates_per_batch` optimizer steps follow on the clipped
//! ratio and a k3 KL penalty to the frozen SFE model.
//!
//! The ratio is per answer (sequence level, on the answer's mean per-token log-ratio, as GSPO
//! does) rather than per token: the op set's fused log-probability backward takes one weight per
//! sequence, and a sequence ratio needs nothing more. The k3 KL is taken on the same mean
//! log-ratio. A resume starts at a checkpoint, which the config places at a batch boundary, so
//! the batch's samples are drawn again from the restored weights with the same seeds.

use super::config::{AnchorTokens, GrpoRunConfig, UniformGroups};
use super::format::{parse, prompt, written_truth, Parsed, ANSWER_PREFIX};
use super::reward::{loc_reward, overlong_penalty, reward, Length, Reward, RewardConfig, Truth};
use crate::data::sample::Label;
use crate::models::sage::{Sage, SageHead, SeqPlan};
use crate::models::sampling::Sampling;
use crate::opset::StepOps;
use crate::stage::checkpoint::{self, Mark, State};
use crate::stage::data::{alternate_pick, epoch_pick, ExampleRef};
use crate::stage::{finished_step, Inputs, Outcome, Session, Stage, StepOut, ValResult};
use crate::train::{streams, ParamSet, SeedRng};
use crate::user_err;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// One prompt: a sample with a label, its test image's size (for the GRPO question, written when
/// the item is used: [`item_inputs`]) and its truth.
#[derive(Clone, Debug)]
pub struct Item {
    pub example: ExampleRef,
    pub width: u32,
    pub height: u32,
    pub truth: Truth,
}

pub struct GrpoRun {
    pub cfg: GrpoRunConfig,
    pub session: Session,
    reference: ParamSet,
    pub items: Vec<Item>,
    pub val_items: Vec<Item>,
}

/// The labelled samples of a split as GRPO items (the first question of each sample carries the
/// image pair; its text is replaced by the GRPO prompt).
fn items_of(session: &Session, val: bool) -> Result<Vec<Item>> {
    let split = session.split(val);
    let mut seen = std::collections::HashSet::new();
    let mut items = Vec::new();
    for &e in &split.examples {
        if !seen.insert(e.item) {
            continue;
        }
        let s = &split.samples[e.item];
        let Some(label) = s.label else { continue };
        let (width, height) = image::image_dimensions(&s.test_image)
            .map_err(|err| user_err!("cannot read the size of {}: {err}", s.test_image.display()))?;
        let truth = Truth {
            anomalous: label == Label::Anomalous,
            defect_type: s.defect_type.clone().filter(|_| label == Label::Anomalous),
            boxes: s.boxes.clone(),
        };
        items.push(Item { example: e, width, height, truth });
    }
    Ok(items)
}

/// The training item of global draw `g` in the seeded stream `seed`: with `grpo.balance`, normal
/// and anomalous items in turn (`GrpoRun::new` refuses the option when a label has none),
/// otherwise one seeded order over all.
fn item_at(items: &[Item], balance: bool, seed: u64, g: u64) -> &Item {
    if balance {
        let side = |a: bool| (0..items.len()).filter(|&i| items[i].truth.anomalous == a).collect::<Vec<_>>();
        if let Some(i) = alternate_pick(seed, &side(false), &side(true), g) {
            return &items[i];
        }
    }
    &items[epoch_pick(seed, items.len(), g)]
}

impl GrpoRun {
    /// Loads the SFE run (policy and frozen reference) and the labelled samples.
    pub fn new(cfg: GrpoRunConfig, out: &Path, plugin_dirs: &[PathBuf]) -> Result<GrpoRun> {
        let state = crate::stage::sfe_start(&cfg.sfe, "GRPO")?;
        let mut sfe_cfg = state.config.clone();
        sfe_cfg.data.train = cfg.data.train.clone();
        sfe_cfg.data.max_train_items = cfg.data.max_train_items;
        if let Some(v) = &cfg.data.val {
            sfe_cfg.data.val = v.clone();
        }
        sfe_cfg.train = cfg.train.clone();
        let (mut session, reference) = Session::from_sfe(&cfg.sfe, &state, sfe_cfg, out, plugin_dirs)?;
        let items = items_of(&session, false)?;
        if items.is_empty() {
            return Err(user_err!(
                "{} has no sample with a label (normal or anomalous): GRPO rewards verdicts against labels",
                cfg.data.train.display()
            ));
        }
        let anomalous = items.iter().filter(|it| it.truth.anomalous).count();
        if cfg.grpo.balance && (anomalous == 0 || anomalous == items.len()) {
            return Err(user_err!(
                "grpo.balance = true draws normal and anomalous pairs in turn, but {} has {} normal and {anomalous} \
                 anomalous labelled samples: set grpo.balance = false, or train on samples of both labels",
                cfg.data.train.display(),
                items.len() - anomalous
            ));
        }
        // Held-out items in a seeded order: `val_questions` takes a sample of both labels, not the
        // file's first (often one-label) run.
        let mut val_items = items_of(&session, true)?;
        SeedRng::new(cfg.train.seed, streams::SAMPLING).shuffle(&mut val_items);
        if session.model.head.config.map_cue {
            let first = item_inputs(&mut session, false, &items[0])?.0.question.text;
            let first = first.split(" Reply as").next().unwrap_or_default();
            eprintln!("grpo: with the map cue each prompt names the map's region; the first: \"{first}\"");
        }
        Ok(GrpoRun { cfg, session, reference, items, val_items })
    }
}

/// What a GRPO checkpoint records of its config: a resume must match it.
fn stage_json(cfg: &GrpoRunConfig) -> serde_json::Value {
    serde_json::json!({"sfe": cfg.sfe, "grpo": cfg.grpo, "data": cfg.data})
}

/// The checkpoint step when the GRPO run in `out` is finished for `cfg`.
pub fn finished_grpo(out: &Path, cfg: &GrpoRunConfig) -> Result<Option<u64>> {
    let Some(step) = finished_step(out, cfg.train.steps)? else { return Ok(None) };
    check_stage(out, &checkpoint::read_state(out)?, cfg)?;
    Ok(Some(step))
}

fn check_stage(out: &Path, state: &State, cfg: &GrpoRunConfig) -> Result<()> {
    match &state.grpo {
        None => Err(user_err!("{} holds a `sage {}` checkpoint, not a GRPO one", out.display(), state.stage())),
        Some(saved) if *saved != stage_json(cfg) => Err(user_err!(
            "--resume: {} was trained with another sfe run, data or [grpo] section ({saved}); resume with the same \
             config, or start a new --out",
            out.display()
        )),
        Some(_) => Ok(()),
    }
}

/// The answers of one batch of prompts, sampled once and trained on `updates_per_batch` times.
struct Rollout {
    /// The kept groups' answers (prompt and sampled ids), group after group.
    plans: Vec<SeqPlan>,
    advantages: Vec<f32>,
    /// Each kept answer's log-probability under the frozen reference.
    reference: Vec<f32>,
    /// Under the policy that sampled them (set by the first update).
    old: Option<Vec<f32>>,
    /// The batch's log fields (rewards over every answer, kept or not).
    stats: serde_json::Map<String, serde_json::Value>,
}

/// The step's loss on the answers' log-probabilities and its gradient (see the module's note):
/// per answer `i` with `n_i` tokens, `ρ = exp((log π − log π_old)/n_i)`, the clipped surrogate
/// `min(ρA, clip(ρ, 1 ± ε)A)`, `δ = (log π_ref − log π)/n_i`, `k3 = e^δ − δ − 1`; the loss is the
/// mean over answers of `−surrogate + β·k3`. Returns the loss, `∂loss/∂log π`, the mean k3 and the
/// share of answers whose ratio was clipped.
pub fn grpo_loss(
    policy: &[f32],
    old: &[f32],
    reference: &[f32],
    advantages: &[f32],
    tokens: &[usize],
    epsilon: f32,
    beta: f32,
) -> (f32, Vec<f32>, f32, f32) {
    let n = policy.len().max(1) as f64;
    let (mut loss, mut kl_sum, mut clipped) = (0.0f64, 0.0f64, 0usize);
    let mut grad = Vec::with_capacity(policy.len());
    for i in 0..policy.len() {
        let t = tokens[i].max(1) as f64;
        let a = advantages[i] as f64;
        let rho = ((policy[i] as f64 - old[i] as f64) / t).exp();
        let eps = epsilon as f64;
        let (unclipped, clip) = (rho * a, rho.clamp(1.0 - eps, 1.0 + eps) * a);
        // The min takes the unclipped branch unless clipping lowers the objective; inside the
        // clip range the two agree and the gradient is the unclipped one.
        let d_surrogate = if unclipped <= clip { a * rho / t } else { 0.0 };
        clipped += (unclipped > clip) as usize;
        let delta = (reference[i] as f64 - policy[i] as f64) / t;
        let k3 = delta.exp() - delta - 1.0;
        let d_k3 = (1.0 - delta.exp()) / t;
        loss += -unclipped.min(clip) + beta as f64 * k3;
        kl_sum += k3;
        grad.push(((-d_surrogate + beta as f64 * d_k3) / n) as f32);
    }
    ((loss / n) as f32, grad, (kl_sum / n) as f32, clipped as f32 / n as f32)
}

/// The anchor term (`grpo.sfe_anchor`) and its gradient: `w · mean_i(−log p_i / n_i)` over the
/// anchors' answer log-probabilities `logp` with `n_i` answer tokens each.
pub fn anchor_loss(logp: &[f32], tokens: &[usize], weight: f32) -> (f32, Vec<f32>) {
    let n = logp.len().max(1) as f64;
    let w = weight as f64;
    let loss = logp.iter().zip(tokens).map(|(&l, &t)| -(l as f64) / t.max(1) as f64).sum::<f64>() * w / n;
    let grad = tokens.iter().map(|&t| (-w / (n * t.max(1) as f64)) as f32).collect();
    (loss as f32, grad)
}

/// Group-relative advantages: `(r − mean) / (std + 1e-4)` with the group's population std.
pub fn advantages(rewards: &[f32]) -> Vec<f32> {
    let n = rewards.len().max(1) as f64;
    let mean = rewards.iter().map(|&r| r as f64).sum::<f64>() / n;
    let std = (rewards.iter().map(|&r| (r as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    rewards.iter().map(|&r| ((r as f64 - mean) / (std + 1e-4)) as f32).collect()
}

/// Whether every reward of a group is the same (no advantage to learn from).
fn uniform(rewards: &[f32]) -> bool {
    rewards.iter().all(|&r| (r - rewards[0]).abs() < 1e-6)
}

/// A seed for the samples of step `step`, try `attempt`, group `group`, fixed by the run's seed.
fn sample_seed(seed: u64, step: u64, attempt: usize, group: usize) -> u64 {
    let mut z = seed ^ 0x6772_706f ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z ^= (attempt as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ (group as u64).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The GRPO step on the op set.
struct Grpo<'r, O: StepOps> {
    cfg: &'r GrpoRunConfig,
    items: &'r [Item],
    val_items: &'r [Item],
    reference_params: &'r mut ParamSet,
    reference: Option<Sage<O>>,
    rollout: Option<Rollout>,
    /// The op set, for the reference rebuilt after the cold start.
    ops: Option<O>,
}

/// The KL reference of a run with a cold start: the policy as GRPO began (the SFE model would
/// pull the answers back out of the format it was just taught), kept for a resume.
pub const REFERENCE_FILE: &str = "grpo-reference.safetensors";

/// What the map cue tells of an item: the region the prompt names and the map's own verdict.
#[derive(Clone, Copy, Debug)]
struct MapCue {
    region: [f32; 4],
    /// The image score at or above the cue's middle level ("larger than most normal images"):
    /// the verdict a reader of the cue alone would give, the baseline of the held-out accuracy.
    anomalous: bool,
}

/// The inputs of an item with the GRPO prompt as its question; with the map cue, the prompt
/// names the region the map points at, drawn at the cue's level for "larger than most normal
/// images", and the cue is returned with the inputs (`None` without the cue).
fn item_inputs(session: &mut Session, val: bool, item: &Item) -> Result<(Inputs, Option<MapCue>)> {
    let mut inputs = session.inputs(val, item.example)?;
    let head = &session.model.head;
    let cue = match (head.config.map_cue, head.config.map_cue_levels.get(1)) {
        (true, Some(&level)) => {
            let ex = inputs.example(None);
            let map = head.anomaly_scores(ex.test, ex.reference)?;
            let region =
                crate::models::sage::map_cue::region(&map, (ex.test.h, ex.test.w), level, item.width, item.height)?;
            Some(MapCue { region, anomalous: SageHead::image_score(&map) >= level })
        }
        _ => None,
    };
    inputs.question.text = prompt(item.width, item.height, cue.map(|c| c.region));
    Ok((inputs, cue))
}

/// One sampled or greedy answer.
struct Answer {
    /// Its ids, the [`ANSWER_PREFIX`]'s included.
    ids: Vec<u32>,
    /// Its text, the prefix included.
    text: String,
    /// Its length against the cap it was drawn under.
    length: Length,
}

impl Answer {
    /// The parsed answer and its reward (the length penalty included) against `truth`.
    fn score(&self, truth: &Truth, cfg: &RewardConfig) -> (Parsed, Reward) {
        let p = parse(&self.text);
        let r = reward(&p, truth, cfg).less_overlong(overlong_penalty(self.length, cfg));
        (p, r)
    }
}

/// An answer to each of `plans` (one row each, sharing the decode steps), each begun with the
/// [`ANSWER_PREFIX`], whose ids are `prefix`.
fn answer_rows<O: StepOps>(
    session: &Session,
    model: &Sage<O>,
    plans: &[SeqPlan],
    prefix: &[u32],
    sampling: Sampling,
    max_new: usize,
) -> Result<Vec<Answer>> {
    let ids = model.generate(plans, max_new, &session.model.tokenizer.stop_ids, sampling)?;
    ids.into_iter()
        .map(|ids| {
            let text = format!("{ANSWER_PREFIX}{}", session.model.tokenizer.decode(&ids, true)?);
            let length = Length { generated: ids.len(), stopped: ids.len() < max_new, max_new };
            Ok(Answer { ids: [prefix, &ids].concat(), text, length })
        })
        .collect()
}

/// The ids of [`ANSWER_PREFIX`], which every answer's plan starts its answer with.
fn prefix_ids(session: &Session) -> Result<Vec<u32>> {
    session.model.tokenizer.encode(ANSWER_PREFIX, false)
}

impl<O: StepOps> Grpo<'_, O> {
    /// Samples, rewards and keeps the groups of the batch of step `step`.
    fn rollout(&mut self, session: &mut Session, model: &Sage<O>, step: u64) -> Result<Rollout> {
        let g = &self.cfg.grpo;
        let batch = self.cfg.train.batch.max(1) as u64;
        let first = step / g.updates_per_batch.max(1) * batch;
        let (mut plans, mut advs) = (Vec::new(), Vec::new());
        let (mut all, mut uniform_groups, mut resampled, mut answer_tokens, mut unparsed, mut cut_off) =
            (Vec::<Reward>::new(), 0usize, 0usize, 0usize, 0usize, 0usize);
        let mut problems: std::collections::BTreeMap<String, usize> = Default::default();
        let mut example_text = String::new();
        let prefix = prefix_ids(session)?;
        for m in 0..batch {
            let item = item_at(self.items, g.balance, self.cfg.train.seed, first + m);
            let (inputs, _) = item_inputs(session, false, item)?;
            let ex = inputs.example(None);
            // One prompt plan, decoded as G rows.
            let prompt = session.model.plan_generated(&ex, &prefix, false)?;
            let rows = vec![prompt; g.group];
            let mut attempt = 0;
            let (answers, rewards, totals) = loop {
                let sampling = Sampling {
                    temperature: g.temperature,
                    top_p: g.top_p,
                    seed: sample_seed(self.cfg.train.seed, step, attempt, m as usize),
                };
                let answers = answer_rows(session, model, &rows, &prefix, sampling, g.max_new)?;
                let (parsed, rewards): (Vec<Parsed>, Vec<Reward>) =
                    answers.iter().map(|a| a.score(&item.truth, &g.reward)).unzip();
                let totals: Vec<f32> = rewards.iter().map(|r| r.total).collect();
                let again = uniform(&totals) && g.uniform == UniformGroups::Resample && attempt < g.resample_tries;
                if !again {
                    for p in &parsed {
                        unparsed += p.verdict.is_none() as usize;
                        for q in &p.problems {
                            // The quoted text varies: count by the kind before it.
                            let kind = q.split('`').next().unwrap_or(q).trim().to_string();
                            *problems.entry(kind).or_default() += 1;
                        }
                    }
                    break (answers, rewards, totals);
                }
                resampled += 1;
                attempt += 1;
            };
            all.extend(&rewards);
            if m == 0 {
                example_text = answers[0].text.clone();
            }
            answer_tokens += answers.iter().map(|a| a.ids.len()).sum::<usize>();
            cut_off += answers.iter().filter(|a| !a.length.stopped).count();
            if uniform(&totals) {
                uniform_groups += 1;
                continue;
            }
            for a in &answers {
                plans.push(session.model.plan_generated(&ex, &a.ids, a.length.stopped)?);
            }
            advs.extend(advantages(&totals));
        }
        let reference = if plans.is_empty() {
            Vec::new()
        } else {
            let r = self.reference.as_ref().expect("prepared before the first step");
            r.ops().download_stat(&r.answer_logprobs(&plans)?)?
        };
        let n = all.len().max(1) as f64;
        let mean = |f: &dyn Fn(&Reward) -> Option<f32>| -> serde_json::Value {
            let v: Vec<f64> = all.iter().filter_map(f).map(|x| x as f64).collect();
            if v.is_empty() {
                serde_json::Value::Null
            } else {
                (v.iter().sum::<f64>() / v.len() as f64).into()
            }
        };
        let mut stats = serde_json::Map::new();
        stats.insert("reward".into(), mean(&|r| Some(r.total)));
        stats.insert("reward_format".into(), mean(&|r| Some(r.format)));
        stats.insert("reward_class".into(), mean(&|r| Some(r.class)));
        stats.insert("reward_loc".into(), mean(&|r| r.loc));
        stats.insert("overlong_penalty".into(), mean(&|r| Some(r.overlong)));
        stats.insert("uniform_groups".into(), (uniform_groups as f64 / batch as f64).into());
        stats.insert("resampled_groups".into(), resampled.into());
        stats.insert("answer_tokens".into(), (answer_tokens as f64 / n).into());
        stats.insert("cut_off".into(), (cut_off as f64 / n).into());
        stats.insert("unparsed_verdicts".into(), (unparsed as f64 / n).into());
        stats.insert("parse_problems".into(), serde_json::to_value(&problems)?);
        stats.insert("sample_answer".into(), example_text.into());
        Ok(Rollout { plans, advantages: advs, reference, old: None, stats })
    }

    /// The `grpo.sfe_anchor` examples of step `step` (none when 0): training questions of the SFE
    /// task with their best-ranked answers, in their own seeded order over the training split.
    fn anchor_plans(&self, session: &mut Session, step: u64) -> Result<Vec<SeqPlan>> {
        let k = self.cfg.grpo.sfe_anchor as u64;
        let mut plans = Vec::with_capacity(k as usize);
        for m in 0..k {
            let examples = &session.split(false).examples;
            let e = examples[epoch_pick(self.cfg.train.seed ^ 0x616e_6368, examples.len(), step * k + m)];
            let plan = session.best_answer_plan(e)?;
            plans.push(match self.cfg.grpo.sfe_anchor_tokens {
                AnchorTokens::Answer => plan,
                AnchorTokens::Conclusion => plan.first_target_only(),
            });
        }
        Ok(plans)
    }

    /// A cold-start step: the cross-entropy of the ground truth written in the format, on the
    /// `batch × group` items of the step (the same sequence count as a GRPO step).
    fn sft_step(
        &mut self,
        session: &mut Session,
        model: &mut Sage<O>,
        step: u64,
        lr: f32,
        mut extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<StepOut> {
        let n = (self.cfg.train.batch.max(1) * self.cfg.grpo.group) as u64;
        let mut plans = Vec::with_capacity(n as usize);
        for m in 0..n {
            // Its own seeded order (GRPO's batches start again at the first item).
            let item = item_at(self.items, self.cfg.grpo.balance, self.cfg.train.seed ^ 0x5f7, step * n + m);
            let (inputs, cue) = item_inputs(session, false, item)?;
            let t = &item.truth;
            let target = written_truth(t.anomalous, t.defect_type.as_deref(), &t.boxes, cue.map(|c| c.region));
            plans.push(session.model.plan(&inputs.example(Some(&target)))?);
        }
        let formatted = plans.len();
        plans.extend(self.anchor_plans(session, step)?);
        let (loss, grad_norm) = model.train_step(&plans, lr)?;
        let trained = plans.iter().map(|p| p.counted()).sum();
        let plans = &plans[..formatted];
        extra.insert("phase".into(), "sft".into());
        // A target longer than the sampling cap teaches answers that GRPO then cuts off (and its
        // overlong penalty charges): the share says when `grpo.max_new` is too small. Counted as
        // generation counts them, without the prefilled prefix the target starts with.
        let counted: Vec<usize> = plans.iter().map(|p| p.counted()).collect();
        let prefix = prefix_ids(session)?.len();
        let answer: Vec<usize> = counted.iter().map(|c| c.saturating_sub(prefix)).collect();
        let over = answer.iter().filter(|&&c| c > self.cfg.grpo.max_new).count();
        extra.insert("target_tokens".into(), (answer.iter().sum::<usize>() as f64 / n as f64).into());
        extra.insert("target_over_cap".into(), (over as f64 / n as f64).into());
        Ok(StepOut { loss, grad_norm, tokens: trained, extra })
    }

    /// Verdict accuracy (greedy answers to the GRPO prompt) and mean reward on the held-out items.
    fn held_out(&self, session: &mut Session, model: &Sage<O>, limit: usize) -> Result<ValResult> {
        let items: Vec<&Item> = self.val_items.iter().take(if limit == 0 { usize::MAX } else { limit }).collect();
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
        let (mut right, mut unparsed, mut anomalous, mut reward_sum) = (Vec::new(), 0usize, 0usize, 0.0f64);
        let (mut locs, mut map_locs, mut map_right) = (Vec::new(), Vec::new(), Vec::new());
        let count_share = self.cfg.grpo.reward.count_share;
        let prefix = prefix_ids(session)?;
        for chunk in items.chunks(16) {
            let mut plans = Vec::with_capacity(chunk.len());
            let mut cues = Vec::with_capacity(chunk.len());
            for it in chunk {
                let (inputs, cue) = item_inputs(session, true, it)?;
                plans.push(session.model.plan_generated(&inputs.example(None), &prefix, false)?);
                cues.push(cue);
            }
            let answers = answer_rows(session, model, &plans, &prefix, greedy, self.cfg.grpo.max_new)?;
            for ((answer, item), cue) in answers.iter().zip(chunk).zip(cues) {
                // The verdict is read leniently (wherever the answer states it): the accuracy
                // measures what the model says, the reward what it is trained toward.
                let (p, r) = answer.score(&item.truth, &self.cfg.grpo.reward);
                unparsed += p.verdict.is_none() as usize;
                anomalous += item.truth.anomalous as usize;
                right.push(p.verdict == Some(item.truth.anomalous));
                reward_sum += r.total as f64;
                locs.extend(r.loc.map(f64::from));
                if let Some(cue) = cue {
                    map_locs.extend(loc_reward(&[cue.region], &item.truth.boxes, count_share).map(f64::from));
                    map_right.push(cue.anomalous == item.truth.anomalous);
                }
            }
        }
        let mean = |v: &[f64]| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let n = right.len();
        let k = right.iter().filter(|&&r| r).count();
        Ok(ValResult {
            questions: n,
            accuracy: k as f64 / n.max(1) as f64,
            interval: crate::metrics::wilson(k, n),
            majority_rate: anomalous.max(n - anomalous) as f64 / n.max(1) as f64,
            unparsed,
            mean_reward: Some(reward_sum / n.max(1) as f64),
            mean_loc: mean(&locs),
            map_loc: mean(&map_locs),
            loc_each: locs,
            map_accuracy: (!map_right.is_empty())
                .then(|| map_right.iter().filter(|&&r| r).count() as f64 / map_right.len() as f64),
            map_right,
            right,
        })
    }
}

impl<O: StepOps + Clone> Stage<O> for Grpo<'_, O> {
    const NAME: &'static str = "grpo";

    fn prepare(&mut self, session: &mut Session, ops: O) -> Result<()> {
        let mut params = std::mem::take(self.reference_params);
        // A checkpoint exists here only when resuming (a fresh start refuses one); past the cold
        // start, the reference is the one written when GRPO began.
        let sft = self.cfg.grpo.sft_steps;
        let resumed = if checkpoint::exists(&session.out) { checkpoint::read_state(&session.out)?.step } else { 0 };
        if sft > 0 && resumed > sft {
            let path = session.out.join(REFERENCE_FILE);
            checkpoint::load_tensors(&path, &mut params).map_err(|e| {
                user_err!("{e:#}\n--resume: {} is the run's KL reference, written when GRPO began; it is missing or damaged, so start a new --out", path.display())
            })?;
        }
        self.reference = Some(Sage::new(ops.clone(), &session.model, &params, None, None)?);
        self.ops = Some(ops);
        Ok(())
    }

    fn step(&mut self, session: &mut Session, model: &mut Sage<O>, step: u64, lr: f32) -> Result<StepOut> {
        let mu = self.cfg.grpo.updates_per_batch.max(1);
        let sft = self.cfg.grpo.sft_steps;
        let mut extra = serde_json::Map::new();
        if step == 0 && sft > 0 {
            let v = self.held_out(session, model, self.cfg.train.val_questions)?;
            extra.insert("val_start".into(), serde_json::to_value(&v)?);
        }
        if step < sft {
            return self.sft_step(session, model, step, lr, extra);
        }
        // GRPO's own update index: its sampled batches and their seeded order count from 0.
        let update = step - sft;
        if update == 0 {
            // The start model's held-out figures (after any cold start), logged with the first
            // GRPO step: "before" for the run's "after" in final.json, on the same items in the
            // same order.
            let v = self.held_out(session, model, self.cfg.train.val_questions)?;
            extra.insert("val_before".into(), serde_json::to_value(&v)?);
            if sft > 0 {
                let mut params = session.params.clone();
                model.llm.download_into(&mut params)?;
                checkpoint::save_tensors(&session.out.join(REFERENCE_FILE), &params)?;
                params.set_trainable_where(|_| true, false);
                let ops = self.ops.clone().expect("prepared before the first step");
                self.reference = Some(Sage::new(ops, &session.model, &params, None, None)?);
            }
        }
        if update.is_multiple_of(mu) || self.rollout.is_none() {
            self.rollout = Some(self.rollout(session, model, update)?);
        }
        let r = self.rollout.as_mut().expect("sampled above");
        extra.extend(r.stats.clone());
        extra.insert("phase".into(), "grpo".into());
        extra.insert("update".into(), (update % mu + 1).into());
        if r.plans.is_empty() {
            // Every group was uniform: nothing to learn from, no optimizer step.
            extra.insert("updated".into(), false.into());
            return Ok(StepOut { loss: 0.0, grad_norm: 0.0, tokens: 0, extra });
        }
        let anchors = self.anchor_plans(session, step)?;
        let r = self.rollout.as_mut().expect("sampled above");
        let sampled = r.plans.len();
        let plans: Vec<SeqPlan> = r.plans.iter().chain(&anchors).cloned().collect();
        // Each sequence's count of answer tokens (its log-probability covers those only).
        let tokens: Vec<usize> = plans.iter().map(|p| p.counted()).collect();
        let g = &self.cfg.grpo;
        let (old, reference, adv) = (&r.old, &r.reference, &r.advantages);
        let mut diag = (0.0f32, 0.0f32, None);
        let (policy, loss, grad_norm) = model.sequence_step(
            &plans,
            |all| {
                let (policy, anchored) = all.split_at(sampled);
                let old = old.as_deref().unwrap_or(policy);
                let (mut loss, mut grad, kl, clip) =
                    grpo_loss(policy, old, reference, adv, &tokens[..sampled], g.epsilon, g.kl_beta);
                if !anchored.is_empty() {
                    let (a_loss, a_grad) = anchor_loss(anchored, &tokens[sampled..], g.sfe_anchor_weight);
                    loss += a_loss;
                    grad.extend(a_grad);
                    diag.2 = Some(a_loss / g.sfe_anchor_weight);
                }
                diag.0 = kl;
                diag.1 = clip;
                Ok((loss, grad))
            },
            lr,
        )?;
        if r.old.is_none() {
            r.old = Some(policy[..sampled].to_vec());
        }
        extra.insert("updated".into(), true.into());
        extra.insert("kl".into(), diag.0.into());
        extra.insert("clip_fraction".into(), diag.1.into());
        if let Some(nll) = diag.2 {
            // The anchors' mean per-token cross-entropy, unweighted: whether the SFE task holds.
            extra.insert("anchor_nll".into(), nll.into());
        }
        Ok(StepOut { loss, grad_norm, tokens: tokens.iter().sum(), extra })
    }

    fn lr_scale(&self, step: u64) -> f32 {
        if step < self.cfg.grpo.sft_steps {
            1.0
        } else {
            self.cfg.grpo.lr_scale
        }
    }

    fn validate(&mut self, session: &mut Session, model: &Sage<O>, limit: usize) -> Result<ValResult> {
        self.held_out(session, model, limit)
    }

    fn mark(&self) -> Option<Mark> {
        Some(Mark::Grpo(stage_json(self.cfg)))
    }

    fn check_resume(&self, session: &Session, state: &State) -> Result<()> {
        check_stage(&session.out, state, self.cfg)
    }
}

/// Trains from the SFE run, or from the checkpoint in the run folder (`resume`), on `ops`.
pub fn train<O: StepOps + Clone>(run: &mut GrpoRun, ops: O, resume: bool, quiet: bool) -> Result<Outcome> {
    let GrpoRun { cfg, session, reference, items, val_items } = run;
    if val_items.is_empty() {
        return Err(user_err!("the validation samples have no label: give data.val with labelled samples"))
            .context("GRPO reports held-out verdict accuracy before and after");
    }
    let mut stage = Grpo {
        cfg,
        items,
        val_items,
        reference_params: reference,
        reference: None::<Sage<O>>,
        rollout: None,
        ops: None,
    };
    crate::stage::train(&mut stage, session, ops, resume, quiet)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_relative_to_the_group() {
        let a = advantages(&[1.0, 0.0, 0.0, 1.0]);
        assert!(a.iter().zip([1.0, -1.0, -1.0, 1.0]).all(|(x, y)| (x - y).abs() < 1e-3), "{a:?}");
        assert!(advantages(&[0.5, 0.5]).iter().all(|&x| x == 0.0));
        assert!(uniform(&[0.3, 0.3, 0.3]) && !uniform(&[0.3, 0.31]));
    }

    #[test]
    fn the_anchor_term_is_the_weighted_mean_per_token_cross_entropy() {
        // Two anchors: log p = −6 over 3 tokens (2 nats a token), −2 over 4 (0.5 a token);
        // weight 0.5: 0.5 · (2 + 0.5) / 2 = 0.625, and ∂/∂log p_i = −0.5 / (2 · n_i).
        let (loss, grad) = anchor_loss(&[-6.0, -2.0], &[3, 4], 0.5);
        assert!((loss - 0.625).abs() < 1e-6, "{loss}");
        assert!((grad[0] + 0.5 / 6.0).abs() < 1e-7 && (grad[1] + 0.5 / 8.0).abs() < 1e-7, "{grad:?}");
        let (loss, grad) = anchor_loss(&[], &[], 1.0);
        assert_eq!((loss, grad.len()), (0.0, 0));
    }

    #[test]
    fn balanced_draws_alternate_labels_and_visit_each_item_of_a_label_every_epoch() {
        // Items 0..10: the first seven normal, the last three anomalous.
        let items: Vec<Item> = (0..10)
            .map(|i| Item {
                example: ExampleRef { item: i, question: 0 },
                width: 8,
                height: 8,
                truth: Truth { anomalous: i >= 7, defect_type: None, boxes: Vec::new() },
            })
            .collect();
        let drawn: Vec<usize> = (0..14).map(|g| item_at(&items, true, 3, g).example.item).collect();
        for (g, &i) in drawn.iter().enumerate() {
            assert_eq!(items[i].truth.anomalous, g % 2 == 1, "draw {g} took item {i}: {drawn:?}");
        }
        // The seven normal items once each in draws 0, 2, …, 12; the three anomalous ones once
        // in draws 1, 3, 5.
        let mut normal: Vec<usize> = drawn.iter().step_by(2).copied().collect();
        normal.sort_unstable();
        assert_eq!(normal, (0..7).collect::<Vec<_>>());
        let mut anomalous: Vec<usize> = drawn[1..6].iter().step_by(2).copied().collect();
        anomalous.sort_unstable();
        assert_eq!(anomalous, vec![7, 8, 9]);
        // Off: one seeded order over all ten, each once per epoch.
        let mut plain: Vec<usize> = (0..10).map(|g| item_at(&items, false, 3, g).example.item).collect();
        plain.sort_unstable();
        assert_eq!(plain, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn grpo_loss_gradient_matches_finite_differences_and_the_clip_acts() {
        let (old, reference) = ([-10.0f32, -12.0, -8.0], [-10.5f32, -11.0, -9.0]);
        let (adv, tokens) = ([1.0f32, -1.0, 0.5], [4usize, 5, 2]);
        // Away from the clip boundary: policies within and beyond the clip range.
        let policy = [-9.7f32, -12.3, -6.0];
        let (_, grad, _, clip) = grpo_loss(&policy, &old, &reference, &adv, &tokens, 0.2, 0.1);
        assert!((clip - 1.0 / 3.0).abs() < 1e-6, "answer 3's ratio e^(2/2) > 1.2 with A > 0 is clipped");
        // The clipped answer keeps only the KL's gradient.
        let d = (reference[2] as f64 - policy[2] as f64) / 2.0;
        assert!((grad[2] as f64 - 0.1 * (1.0 - d.exp()) / 2.0 / 3.0).abs() < 1e-7, "{}", grad[2]);
        for i in 0..3 {
            let h = 1e-3f32;
            let at = |x: f32| {
                let mut p = policy;
                p[i] = x;
                grpo_loss(&p, &old, &reference, &adv, &tokens, 0.2, 0.1).0 as f64
            };
            let fd = (at(policy[i] + h) - at(policy[i] - h)) / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() < 1e-4, "answer {i}: {fd} vs {}", grad[i]);
        }
        // On policy (ratio 1) with no KL the gradient is −A/(n·tokens): the policy gradient.
        let (_, g, kl, _) = grpo_loss(&old, &old, &old, &adv, &tokens, 0.2, 0.0);
        assert_eq!(kl, 0.0);
        for i in 0..3 {
            assert!((g[i] + adv[i] / 3.0 / tokens[i] as f32).abs() < 1e-7);
        }
    }
}
