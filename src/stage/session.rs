//! One training run's model and data, shared by every stage: the SAGE model built from an
//! [`SfeConfig`] (frozen encoder, fresh head, the LLM full or with LoRA) with its parameters on the
//! host, the train and validation splits, the fact sentences, the cache of the encoder's patch
//! tokens, and the run folder (held by one writer). A stage (SFE, E-DPO) trains a copy of the
//! model on an op set and copies the weights back here for checkpoints.

use super::config::SfeConfig;
use super::data::{ExampleRef, Split, TokenCache};
use crate::data::sample::conclusion;
use crate::data::{Question, Sample};
use crate::facts::FactSet;
use crate::models::backbone::BackboneRecord;
use crate::models::efficientnet::PatchTokens;
use crate::models::sage::{Example, FactsMode, Sage, SageModel, SeqPlan};
use crate::models::sampling::Sampling;
use crate::opset::StepOps;
use crate::train::{streams, ParamSet, SeedRng};
use crate::user_err;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub struct Session {
    pub cfg: SfeConfig,
    pub out: PathBuf,
    pub model: SageModel,
    /// The backbone's name and file hashes, for every checkpoint this run saves.
    pub backbone_record: BackboneRecord,
    pub params: ParamSet,
    pub train: Split,
    val: Split,
    facts: FactSet,
    tokens: TokenCache,
    /// The run folder's writer lock: one process writes a run folder at a time.
    _writer: crate::lock::WriterLock,
}

/// What one example feeds the model, owned (the token cache lends only one borrow at a time).
pub struct Inputs {
    test: PatchTokens,
    reference: Option<PatchTokens>,
    facts: Vec<String>,
    pub question: Question,
}

impl Inputs {
    pub fn example<'a>(&'a self, answer: Option<&'a str>) -> Example<'a> {
        Example {
            test: &self.test,
            reference: self.reference.as_ref(),
            facts: &self.facts,
            question: &self.question.text,
            answer,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ValResult {
    pub questions: usize,
    pub accuracy: f64,
    /// The accuracy's 95% Wilson score interval over the questions.
    pub interval: [f64; 2],
    /// Share of the most common ground-truth conclusion: what always answering it would score.
    pub majority_rate: f64,
    /// Answers that did not start with Yes or No (GRPO: without a verdict).
    pub unparsed: usize,
    /// GRPO: the mean reward of the greedy answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_reward: Option<f64>,
    /// GRPO: the mean localisation reward of the greedy answers, over the questions with true
    /// boxes (`None` when none has any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_loc: Option<f64>,
    /// GRPO: each of those questions' localisation reward, in `right`'s order, for paired
    /// comparisons of two validations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub loc_each: Vec<f64>,
    /// GRPO with the map cue: the localisation reward the map's region itself would score as the
    /// answer's one box, over the same questions: what copying the prompt's candidate earns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_loc: Option<f64>,
    /// GRPO with the map cue: the accuracy of the map's own verdict (its score at or above the
    /// cue's middle level) on the same questions: what reading the cue alone earns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_accuracy: Option<f64>,
    /// Whether the map's verdict was right on each question, in `right`'s order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map_right: Vec<bool>,
    /// GRPO: whether each question (in a fixed order) was answered right, for paired comparisons.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub right: Vec<bool>,
}

/// The pairs the map cue's levels are calibrated on: the first normal pairs of the whole training
/// file (at most `CALIBRATION_PAIRS`, in file order), also where `data.max_train_items` trains on
/// fewer — a small run (the quick demo's first 24 items) has too few for the 99th percentile.
fn map_cue_pairs(samples: &[Sample], zero_shot: bool) -> Vec<Sample> {
    let usable =
        |s: &&Sample| s.label == Some(crate::data::Label::Normal) && (zero_shot || s.reference_image.is_some());
    samples.iter().filter(usable).take(crate::models::sage::map_cue::CALIBRATION_PAIRS).cloned().collect()
}

/// The map cue's levels ([`crate::models::sage::map_cue`]) from the map scores of `normal`
/// ([`map_cue_pairs`]).
fn calibrate_map_cue(
    model: &SageModel,
    normal: &[Sample],
    zero_shot: bool,
    tokens: &mut TokenCache,
) -> Result<Vec<f32>> {
    use crate::models::sage::{map_cue, SageHead};
    let pb = crate::util::progress_bar(normal.len() as u64, "map cue", false);
    let mut scores = Vec::with_capacity(normal.len());
    for s in normal {
        let test = tokens.get(model, &s.test_image)?.clone();
        let reference = match (&s.reference_image, zero_shot) {
            (Some(r), false) => Some(tokens.get(model, r)?),
            _ => None,
        };
        scores.push(SageHead::image_score(&model.head.anomaly_scores(&test, reference)?));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let levels = map_cue::calibrate(&scores)?;
    eprintln!("map cue: levels {levels:?} from {} normal training pairs", scores.len());
    Ok(levels)
}

/// The checkpoint state of the SFE run a later stage (`stage`, e.g. "E-DPO") starts from; a run of
/// another stage is refused (its weights are not a stage-1 model).
pub fn sfe_start(sfe: &Path, stage: &str) -> Result<super::checkpoint::State> {
    let state = super::checkpoint::read_state(sfe)
        .map_err(|e| user_err!("{e:#}\nsfe = {} must be a `sage sfe` run folder (train one first)", sfe.display()))?;
    if state.stage() != "sfe" {
        let run = if state.stage() == "grpo" { "a GRPO" } else { "an E-DPO" };
        return Err(user_err!("{} is {run} run; {stage} starts from a stage-1 (`sage sfe`) run", sfe.display()));
    }
    Ok(state)
}

impl Session {
    /// A later stage's session: the SFE run `sfe` (its [`sfe_start`] state) with `cfg` (its config
    /// with the later stage's data and schedule), the SFE weights loaded; and a frozen copy of them
    /// (the stage's reference model).
    pub fn from_sfe(
        sfe: &Path,
        state: &super::checkpoint::State,
        cfg: SfeConfig,
        out: &Path,
        plugin_dirs: &[PathBuf],
    ) -> Result<(Session, ParamSet)> {
        let mut session = Session::new(cfg, out, plugin_dirs)?;
        super::checkpoint::load_weights(sfe, state, &mut session.params, &session.model.backbone)?;
        let mut reference = session.params.clone();
        reference.set_trainable_where(|_| true, false);
        Ok((session, reference))
    }

    /// Builds the model (fresh head, seeded) on the backbone the config names (a built-in, or a
    /// backbone plugin found in `plugin_dirs`) and loads the data named by the config.
    pub fn new(mut cfg: SfeConfig, out: &Path, plugin_dirs: &[PathBuf]) -> Result<Session> {
        let writer = crate::lock::WriterLock::for_dir(out)?;
        let mut params = ParamSet::new();
        let mut rng = SeedRng::new(cfg.train.seed, streams::INIT);
        let finetune = cfg.llm.finetune()?;
        let backbone = crate::plugin::backbones::resolve(&cfg.model.backbone, plugin_dirs)?;
        let mut model = SageModel::on(backbone, cfg.model.clone(), &finetune, cfg.llm.base, &mut params, &mut rng)?;
        let backbone_record = model.backbone.record()?;
        let train_file = crate::data::adpl::load(&cfg.data.train, None)?;
        let calibrate = cfg.model.map_cue && cfg.model.map_cue_levels.is_empty();
        let cue_pairs = if calibrate { map_cue_pairs(&train_file, cfg.data.zero_shot) } else { vec![] };
        let train = Split::from_samples(&cfg.data.train, train_file, cfg.data.max_train_items)?;
        let val = Split::load(&cfg.data.val, 0)?;
        let facts = match (&cfg.data.facts, cfg.model.facts) {
            (Some(p), _) => FactSet::load(p)?,
            (None, FactsMode::None) => FactSet::default(),
            (None, mode) => {
                return Err(user_err!("model.facts = {mode:?} needs data.facts (a JSONL file from `sage facts`)"));
            }
        };
        let mut tokens = TokenCache::default();
        if calibrate {
            // A pure function of the training file and the frozen encoder: a resumed run
            // calibrates the same levels and its config check passes.
            let levels = calibrate_map_cue(&model, &cue_pairs, cfg.data.zero_shot, &mut tokens)
                .map_err(|e| user_err!("calibrating model.map_cue on {}: {e:#}", cfg.data.train.display()))?;
            cfg.model.map_cue_levels = levels.clone();
            model.head.config.map_cue_levels = levels;
        } else if cfg.model.map_cue {
            crate::models::sage::map_cue::check_levels(&cfg.model.map_cue_levels).map_err(|e| user_err!("{e:#}"))?;
        }
        Ok(Session {
            cfg,
            out: out.to_path_buf(),
            model,
            backbone_record,
            params,
            train,
            val,
            facts,
            tokens,
            _writer: writer,
        })
    }

    /// The training split, or (`val`) the validation split.
    pub fn split(&self, val: bool) -> &Split {
        if val {
            &self.val
        } else {
            &self.train
        }
    }

    /// The example for global micro-batch index `g`: epochs visit every example once, each
    /// epoch in its own seeded order, so the order is a pure function of `g` (exact resume).
    pub fn example_at(&self, g: u64) -> ExampleRef {
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
    pub fn inputs(&mut self, val: bool, e: ExampleRef) -> Result<Inputs> {
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

    /// The SFE target of one training example: its question with its best-ranked answer. SFE
    /// trains on these, and GRPO's anchors (`grpo.sfe_anchor`) are the same examples.
    pub fn best_answer_plan(&mut self, e: ExampleRef) -> Result<SeqPlan> {
        let i = self.inputs(false, e)?;
        self.model.plan(&i.example(Some(&i.question.ranked_answers[0])))
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
            interval: crate::metrics::wilson(right, picks.len()),
            majority_rate: (yes.max(picks.len() - yes)) as f64 / n,
            unparsed,
            ..ValResult::default()
        })
    }
}
