//! One evaluation, end to end (ARCHITECTURE.md §6): load the samples, get the answers (from the
//! model, or from an answers file), score them (AD-PL/MANTA: accuracy, Acc-G, SBERT and the
//! judge's MLE; MMAD: its protocol), add the anomaly-map AUROC where the data has labels or
//! masks, and assemble the report. `sage eval` maps its flags to an [`EvalRequest`] and calls
//! [`evaluate`].

use super::adpl::AdplReport;
use super::answers::{read_answers, AnswerWriter};
use super::generate::Evaluator;
use super::mmad::MmadReport;
use super::report::EvalReport;
use super::Generated;
use crate::data::format::{guess_format, load_samples, DataFormat};
use crate::data::Sample;
use crate::judge::scores::{request_for, Judge, PluginJudge};
use crate::models::bert::SentenceEncoder;
use crate::user_err;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::time::Instant;

/// What to evaluate, on what data, and where the report goes.
#[derive(Clone, Debug)]
pub struct EvalRequest {
    /// The dataset: AD-PL, MANTA or MMAD JSON.
    pub data: PathBuf,
    /// The data format; `None` guesses it from the file.
    pub format: Option<DataFormat>,
    /// Folder image paths are relative to; `None` is the data file's folder.
    pub image_root: Option<PathBuf>,
    /// Evaluate only the first N items (image pairs); 0 is refused.
    pub max_items: Option<usize>,
    /// 1: the model sees the reference image (one-shot); 0: zero-shot. Also reported.
    pub shots: u8,
    /// Where the answers come from.
    pub answers: AnswerSource,
    /// The judge for the MLE scores; `None` skips them (MMAD data never uses one).
    pub judge: Option<JudgeSpec>,
    /// Write the report here (markdown, and JSON beside it).
    pub out: Option<PathBuf>,
}

/// Where the evaluated answers come from.
#[derive(Clone, Debug)]
pub enum AnswerSource {
    /// A model answers every question greedily.
    Model(ModelAnswers),
    /// An answers file ([`super::answers`]) made elsewhere; no model runs.
    File(PathBuf),
}

#[derive(Clone, Debug)]
pub struct ModelAnswers {
    /// A run folder written by `sage sfe` or `sage edpo`.
    pub checkpoint: Option<PathBuf>,
    /// The checkpoint's architecture untrained (without a checkpoint, the default one).
    pub baseline: bool,
    /// Facts JSONL from `sage facts`; `None` is the checkpoint's data.facts.
    pub facts: Option<PathBuf>,
    /// Maximum answer tokens.
    pub max_tokens: usize,
    /// Write the answers here as they are made (the answers-file shape).
    pub save_answers: Option<PathBuf>,
}

/// A judge plugin and its config (a JSON object).
#[derive(Clone, Debug)]
pub struct JudgeSpec {
    pub name: String,
    pub config: serde_json::Value,
}

/// Where the evaluation runs.
#[derive(Clone, Debug, Default)]
pub struct EvalEnv {
    /// Extra folders to search for the judge plugin.
    pub plugin_dirs: Vec<PathBuf>,
    /// Answer on the GPU (the anomaly maps and the image encoder stay on the CPU).
    pub gpu: bool,
    /// Hide the progress bars.
    pub quiet: bool,
}

/// Runs the evaluation `req` describes and returns its report (also written to `req.out`).
pub fn evaluate(req: &EvalRequest, env: &EvalEnv) -> Result<EvalReport> {
    let t0 = Instant::now();
    let format = match req.format {
        Some(f) => f,
        None => guess_format(&req.data)?,
    };
    let samples = load(req, format)?;
    let questions: usize = samples.iter().map(|s| s.questions.len()).sum();
    if questions == 0 {
        return Err(user_err!("{} has no questions to evaluate", req.data.display()));
    }
    // Open the judge first: a missing plugin should fail before minutes of generation.
    let mut judge = match &req.judge {
        Some(j) if format != DataFormat::Mmad => Some(PluginJudge::open(&env.plugin_dirs, &j.name, &j.config)?),
        _ => None,
    };

    let (generated, model, mut evaluator) = match &req.answers {
        AnswerSource::File(p) => (read_answers(p, &samples)?, format!("answers from {}", p.display()), None),
        AnswerSource::Model(m) => {
            let mut ev = load_model(m, req.shots, env)?;
            let g = generate(&mut ev, m, &samples, questions, env.quiet)?;
            (g, ev.describe.clone(), Some(ev))
        }
    };

    let (mut adpl, mut mmad) = (None, None);
    if format == DataFormat::Mmad {
        mmad = Some(MmadReport::compute(&samples, &generated)?);
    } else {
        adpl = Some(score_adpl(&samples, &generated, judge.as_mut(), env.quiet)?);
    }
    let maps = match evaluator.as_mut() {
        Some(ev) if samples.iter().any(|s| s.label.is_some() || s.mask.is_some()) => Some(ev.maps(&samples)?.report()),
        _ => None,
    };
    let report = EvalReport {
        model,
        data: req.data.clone(),
        format,
        items: samples.len(),
        questions,
        shots: req.shots,
        adpl,
        mmad,
        maps,
        judge: judge.as_ref().map(|j| j.name()),
        seconds: t0.elapsed().as_secs_f64(),
    };
    if let Some(out) = &req.out {
        report.write(out)?;
    }
    Ok(report)
}

/// The samples of `req.data`, cut to `req.max_items`.
fn load(req: &EvalRequest, format: DataFormat) -> Result<Vec<Sample>> {
    let mut samples = load_samples(&req.data, Some(format), req.image_root.as_deref())?;
    if let Some(n) = req.max_items {
        if n == 0 {
            return Err(user_err!("--max-items must be at least 1"));
        }
        samples.truncate(n);
    }
    Ok(samples)
}

fn load_model(m: &ModelAnswers, shots: u8, env: &EvalEnv) -> Result<Evaluator> {
    let mut ev = Evaluator::load(m.checkpoint.as_deref(), m.baseline, m.facts.as_deref())?;
    ev.shots = shots;
    ev.max_tokens = m.max_tokens;
    if env.gpu {
        ev.use_gpu(crate::backend::cuda::Gpu::global()?)?;
    }
    Ok(ev)
}

/// The model's answers to every question, each saved to `m.save_answers` as it comes.
fn generate(
    ev: &mut Evaluator,
    m: &ModelAnswers,
    samples: &[Sample],
    questions: usize,
    quiet: bool,
) -> Result<Vec<Generated>> {
    let mut save = match &m.save_answers {
        Some(p) => Some(AnswerWriter::create(p, samples)?),
        None => None,
    };
    let pb = crate::util::progress_bar(questions as u64, "eval", quiet);
    let g = ev.generate(samples, &pb, &mut |g| match save.as_mut() {
        Some(log) => log.append(g),
        None => Ok(()),
    })?;
    pb.finish_and_clear();
    Ok(g)
}

/// AD-PL/MANTA scores: the judge's MLE scores of every answer to a question with ranked answers
/// (when there is a judge), SBERT against the references, and the accuracies.
fn score_adpl(
    samples: &[Sample],
    generated: &[Generated],
    judge: Option<&mut PluginJudge>,
    quiet: bool,
) -> Result<AdplReport> {
    let judged = judge.is_some();
    let mut scores = Vec::new();
    if let Some(j) = judge {
        let pb = crate::util::progress_bar(generated.len() as u64, "judge", quiet);
        for g in generated {
            let s = &samples[g.item];
            if s.questions.get(g.question).is_some_and(|q| !q.ranked_answers.is_empty()) {
                let mut req = request_for(s, g.question, 0);
                req.answer = g.answer.clone();
                scores.push(j.score(&req).with_context(|| format!("judging item {} question {}", s.id, g.question))?);
            }
            pb.inc(1);
        }
        pb.finish_and_clear();
    }
    let encoder = SentenceEncoder::load(&crate::assets::Asset::MiniLmDir.path()?)?;
    let mut embed = |t: &str| encoder.embed(t);
    AdplReport::compute(samples, generated, Some(&mut embed), judged.then_some(&scores[..]))
}
