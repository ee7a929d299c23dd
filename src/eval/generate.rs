//! The model side of `sage eval`: a trained (or untrained, `--baseline`) SAGE model answers
//! every question of a dataset greedily, and the frozen encoder's patch tokens give each test
//! image its training-free anomaly map.

use super::maps::MapMetrics;
use super::{FirstToken, Generated};
use crate::backend::cpu::HostOps;
use crate::backend::cuda::step_ops::CudaOps;
use crate::data::sample::{Label, Question, Sample};
use crate::facts::FactSet;
use crate::models::efficientnet::PatchTokens;
use crate::models::sage::{Example, FactsMode, Sage, SageConfig, SageModel, SeqPlan};
use crate::models::sampling::Sampling;
use crate::ops::similarity::mincos_topk;
use crate::opset::Buffers;
use crate::stage::checkpoint;
use crate::stage::data::TokenCache;
use crate::train::{streams, ParamSet, SeedRng};
use crate::user_err;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub struct Evaluator {
    pub model: SageModel,
    params: ParamSet,
    pub head: SageConfig,
    facts: FactSet,
    tokens: TokenCache,
    /// 1: the sample's reference image is shown; 0: zero-shot.
    pub shots: u8,
    pub max_tokens: usize,
    /// What was loaded, for the report.
    pub describe: String,
    /// The model on its op set, built at the first answer (or by [`Evaluator::use_gpu`]); the
    /// host copy of the weights in `params` is dropped then.
    answerer: Option<Answerer>,
}

/// One test image's training-free anomaly map on the encoder's patch grid (`1 − s_i`, row-major
/// `h × w`), the patches the model selects (lowest similarity first) and the image score (the
/// map's maximum).
#[derive(Clone, Debug)]
pub struct PairMap {
    pub w: usize,
    pub h: usize,
    pub values: Vec<f32>,
    pub selected: Vec<u32>,
    pub score: f32,
}

/// The model on the op set that answers.
enum Answerer {
    Cpu(Sage<HostOps>),
    Cuda(Sage<CudaOps>),
}

/// The first tokens a question's answer may start with: its option letters, or `Yes` and `No`.
pub fn candidates(q: &Question) -> Vec<&'static str> {
    const LETTERS: [&str; 26] = [
        "A", "B", "C", "D", "E", "F", "G", "H", "I", "J", "K", "L", "M", "N", "O", "P", "Q", "R", "S", "T", "U", "V",
        "W", "X", "Y", "Z",
    ];
    if q.options.is_empty() {
        vec!["Yes", "No"]
    } else {
        LETTERS[..q.options.len().min(26)].to_vec()
    }
}

/// The text of a question as the model sees it: multiple-choice questions list their options
/// (`A. ...`) and ask for the letter.
pub fn prompt(q: &Question) -> String {
    if q.options.is_empty() {
        return q.text.clone();
    }
    let mut s = q.text.clone();
    for (i, o) in q.options.iter().enumerate() {
        s.push_str(&format!("\n{}. {o}", (b'A' + i as u8) as char));
    }
    s.push_str("\nAnswer with the option's letter.");
    s
}

impl Evaluator {
    /// The model of run folder `checkpoint` (an `sfe` or `edpo` run), or with `baseline` the same
    /// architecture untrained (the head freshly initialised, the LLM as released). Without a
    /// checkpoint, `baseline` uses the default head with facts = none.
    /// `backbone`: the untrained model's without a checkpoint; with one, it must be the
    /// checkpoint's.
    pub fn load(
        checkpoint_dir: Option<&Path>,
        baseline: bool,
        facts: Option<&Path>,
        backbone: Option<&str>,
        baseline_weights: crate::models::llama::BaseWeights,
        plugin_dirs: &[std::path::PathBuf],
    ) -> Result<Evaluator> {
        // The base weights as the checkpoint trained them (`llm.base`); an untrained baseline as
        // `baseline_weights` says.
        let (head, finetune, base, seed, facts_path, state) = match checkpoint_dir {
            Some(dir) => {
                let state = checkpoint::read_state(dir)?;
                let c = state.config.clone();
                state.require_backbone_name(dir, backbone)?;
                (c.model.clone(), c.llm.finetune()?, c.llm.base, c.train.seed, c.data.facts.clone(), Some(state))
            }
            None if baseline => (
                SageConfig {
                    facts: FactsMode::None,
                    backbone: backbone.unwrap_or(crate::models::backbone::DEFAULT).to_string(),
                    ..SageConfig::default()
                },
                crate::models::llama::Finetune::Full,
                baseline_weights,
                0,
                None,
                None,
            ),
            None => {
                return Err(user_err!(
                    "give --checkpoint (a `sage sfe`, `sage edpo` or `sage grpo` run folder), or --baseline"
                ))
            }
        };
        let mut params = ParamSet::new();
        let mut rng = SeedRng::new(seed, streams::INIT);
        let bb = crate::plugin::backbones::resolve(&head.backbone, plugin_dirs)?;
        let model = SageModel::on(bb, head.clone(), &finetune, base, &mut params, &mut rng)?;
        let describe = match (checkpoint_dir, &state) {
            (Some(dir), Some(st)) if !baseline => {
                checkpoint::load_weights(dir, st, &mut params, &model.backbone)?;
                let stage = st.stage();
                format!("{} ({stage}, step {}, facts = {:?})", dir.display(), st.step, head.facts)
            }
            _ => format!("untrained baseline (facts = {:?})", head.facts),
        };
        let facts_file = facts.map(Path::to_path_buf).or(facts_path);
        let facts = match (head.facts, facts_file) {
            (FactsMode::None, _) => FactSet::default(),
            (_, Some(p)) => FactSet::load(&p)?,
            (mode, None) => {
                return Err(user_err!(
                    "this model uses facts = {mode:?}: give a facts file from `sage facts` with --facts"
                ))
            }
        };
        Ok(Evaluator {
            model,
            params,
            head,
            facts,
            tokens: TokenCache::default(),
            shots: 1,
            max_tokens: 64,
            describe,
            answerer: None,
        })
    }

    /// Answers on `gpu` from now on (the weights are copied there, frozen); the anomaly maps and
    /// the encoder stay on the CPU.
    pub fn use_gpu(&mut self, gpu: std::sync::Arc<crate::backend::cuda::Gpu>) -> Result<()> {
        anyhow::ensure!(self.answerer.is_none(), "use_gpu must come before the first answer");
        let dev = Sage::new(CudaOps::new(gpu), &self.model, &std::mem::take(&mut self.params), None, None)?;
        self.describe = format!("{} on {}", self.describe, dev.llm.ops.describe());
        self.answerer = Some(Answerer::Cuda(dev));
        Ok(())
    }

    /// Builds the model that answers on the CPU op set, unless [`Evaluator::use_gpu`] put it on
    /// the GPU.
    fn ensure_answerer(&mut self) -> Result<()> {
        if self.answerer.is_none() {
            let cpu = Sage::new(HostOps, &self.model, &std::mem::take(&mut self.params), None, None)?;
            self.answerer = Some(Answerer::Cpu(cpu));
        }
        Ok(())
    }

    fn facts_for(&self, image: &Path) -> Result<Vec<String>> {
        if self.head.facts == FactsMode::None {
            return Ok(vec![]);
        }
        self.facts.get(image).map(|f| f.facts.clone()).ok_or_else(|| {
            user_err!("no facts for {} in the facts file; run `sage facts` on this dataset", image.display())
        })
    }

    fn reference_of<'a>(&self, s: &'a Sample) -> Option<&'a PathBuf> {
        (self.shots > 0).then_some(s.reference_image.as_ref()).flatten()
    }

    /// The patch tokens of a sample's test image and (one-shot) its reference, cached.
    fn pair_tokens(&mut self, s: &Sample) -> Result<(PatchTokens, Option<PatchTokens>)> {
        let test = self.tokens.get(&self.model, &s.test_image)?.clone();
        let reference = match self.reference_of(s).cloned() {
            Some(p) => Some(self.tokens.get(&self.model, &p)?.clone()),
            None => None,
        };
        Ok((test, reference))
    }

    /// Greedy answers to every question of `samples`; `each` sees each answer as it comes.
    pub fn generate(
        &mut self,
        samples: &[Sample],
        pb: &indicatif::ProgressBar,
        each: &mut dyn FnMut(&Generated) -> Result<()>,
    ) -> Result<Vec<Generated>> {
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
        let mut out = Vec::new();
        for (item, s) in samples.iter().enumerate() {
            let facts = self.facts_for(&s.test_image)?;
            let (test, reference) = self.pair_tokens(s)?;
            // All questions about one pair decode together: one weight read per step for all.
            let texts: Vec<String> = s.questions.iter().map(prompt).collect();
            let exs: Vec<Example> = texts
                .iter()
                .map(|text| Example {
                    test: &test,
                    reference: reference.as_ref(),
                    facts: &facts,
                    question: text,
                    answer: None,
                })
                .collect();
            self.ensure_answerer()?;
            let answers = match self.answerer.as_ref().expect("built above") {
                Answerer::Cpu(m) => m.answer_batch(&self.model, &exs, self.max_tokens, greedy),
                Answerer::Cuda(m) => m.answer_batch(&self.model, &exs, self.max_tokens, greedy),
            }
            .with_context(|| format!("answering the questions of item {}", s.id))?;
            for (question, (answer, _)) in answers.into_iter().enumerate() {
                let g = Generated { item, question, answer };
                each(&g)?;
                out.push(g);
                pb.inc(1);
            }
        }
        Ok(out)
    }

    /// Each question's conclusion from one forward pass ([`FirstToken`]): the probabilities of
    /// `Yes`/`No` (or of the option letters) as the answer's first token. `each` sees each record
    /// as it comes.
    pub fn first_tokens(
        &mut self,
        samples: &[Sample],
        pb: &indicatif::ProgressBar,
        each: &mut dyn FnMut(&FirstToken) -> Result<()>,
    ) -> Result<Vec<FirstToken>> {
        let mut out = Vec::new();
        for (item, s) in samples.iter().enumerate() {
            let facts = self.facts_for(&s.test_image)?;
            let (test, reference) = self.pair_tokens(s)?;
            let texts: Vec<String> = s.questions.iter().map(prompt).collect();
            let plans = texts
                .iter()
                .map(|text| {
                    let ex = Example {
                        test: &test,
                        reference: reference.as_ref(),
                        facts: &facts,
                        question: text,
                        answer: None,
                    };
                    self.model.plan(&ex)
                })
                .collect::<Result<Vec<_>>>()?;
            self.ensure_answerer()?;
            // Questions with the same candidates share one forward (an image pair's five Yes/No
            // questions always do).
            let sets: Vec<Vec<&str>> = s.questions.iter().map(candidates).collect();
            let mut records: Vec<Option<FirstToken>> = vec![None; plans.len()];
            for set in sets.iter().collect::<std::collections::BTreeSet<_>>() {
                let idx: Vec<usize> = (0..plans.len()).filter(|&i| &sets[i] == set).collect();
                let ids = set.iter().map(|c| self.single_token(c)).collect::<Result<Vec<u32>>>()?;
                let batch: Vec<SeqPlan> = idx.iter().map(|&i| plans[i].clone()).collect();
                let logp = match self.answerer.as_ref().expect("built above") {
                    Answerer::Cpu(m) => m.first_token_logprobs(&batch, &ids),
                    Answerer::Cuda(m) => m.first_token_logprobs(&batch, &ids),
                }
                .with_context(|| format!("scoring the questions of item {}", s.id))?;
                for (&question, lp) in idx.iter().zip(&logp) {
                    records[question] = Some(FirstToken::from_logprobs(item, question, set, lp));
                }
            }
            for r in records.into_iter().flatten() {
                each(&r)?;
                out.push(r);
                pb.inc(1);
            }
        }
        Ok(out)
    }

    /// The id of `word` when the tokenizer writes it, alone and at the start of an answer, as one
    /// token; first-token scoring needs that.
    fn single_token(&self, word: &str) -> Result<u32> {
        let tok = &self.model.tokenizer;
        let alone = tok.encode(word, false)?;
        let leading = tok.encode(&format!("{word}, because"), false)?;
        match (alone.as_slice(), leading.first()) {
            ([id], Some(first)) if id == first => Ok(*id),
            _ => Err(user_err!(
                "the tokenizer does not write `{word}` as one token at the start of an answer ({alone:?}), so its \
                 conclusion cannot be read from the first token; evaluate without --first-token"
            )),
        }
    }

    /// The training-free anomaly map of every test image against its reference (zero-shot: against
    /// itself): image AUROC where labels exist, pixel AUROC where masks exist.
    /// Also returns each sample's map ([`PairMap`]; `None` for a sample with neither label nor
    /// mask, which is skipped).
    pub fn maps(&mut self, samples: &[Sample]) -> Result<(MapMetrics, Vec<Option<PairMap>>)> {
        let mut m = MapMetrics::new();
        let mut pair_maps = vec![None; samples.len()];
        for (item, s) in samples.iter().enumerate() {
            let anomalous = s.label.map(|l| l == Label::Anomalous);
            if anomalous.is_none() && s.mask.is_none() {
                continue;
            }
            let (test, reference) = self.pair_tokens(s)?;
            let scores = mincos_topk(
                &test.data,
                reference.as_ref().map(|r| r.data.as_slice()),
                test.dim,
                self.head.k,
                self.head.reduce,
            );
            let grid = scores.anomaly_map();
            pair_maps[item] = Some(PairMap {
                w: test.w,
                h: test.h,
                values: grid.clone(),
                selected: scores.topk.clone(),
                score: super::maps::image_score(&grid),
            });
            match &s.mask {
                Some(mask_path) => {
                    let mask = crate::image_io::load(mask_path)?.to_luma8();
                    let (w, h) = (mask.width() as usize, mask.height() as usize);
                    // Nearest-neighbour upsampling of the patch grid to the mask's pixels.
                    let map: Vec<f32> =
                        (0..h * w).map(|i| grid[(i / w) * test.h / h * test.w + (i % w) * test.w / w]).collect();
                    let on: Vec<bool> = mask.as_raw().iter().map(|&v| v > 127).collect();
                    m.add(&map, anomalous, Some(&on))?;
                }
                None => m.add(&grid, anomalous, None)?,
            }
        }
        Ok((m, pair_maps))
    }
}
