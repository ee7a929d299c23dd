//! One evaluation, end to end (ARCHITECTURE.md §6): load the samples, get the answers (from the
//! model, or from an answers file), score them (AD-PL/MANTA: accuracy, Acc-G, SBERT and the
//! judge's MLE; MMAD: its protocol), add the anomaly-map AUROC where the data has labels or
//! masks, and assemble the report. `sage eval` maps its flags to an [`EvalRequest`] and calls
//! [`evaluate`].

use super::adpl::AdplReport;
use super::answers::{read_answers, AnswerWriter};
use super::generate::Evaluator;
use super::intervals::AdplIntervals;
use super::mmad::MmadReport;
use super::report::EvalReport;
use super::{FirstToken, Generated};
use crate::data::format::{guess_format, load_samples, DataFormat};
use crate::data::Sample;
use crate::jsonl_log::AppendLog;
use crate::models::bert::SentenceEncoder;
use crate::score::{request_for, Judge, PluginJudge};
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
    /// With `max_items`: the first N/2 anomalous and the first N/2 normal items (in file order)
    /// instead of the first N, so that a small subset has both labels.
    pub balanced: bool,
    /// 1: the model sees the reference image (one-shot); 0: zero-shot. Also reported.
    pub shots: u8,
    /// Where the answers come from.
    pub answers: AnswerSource,
    /// The judge for the MLE scores; `None` skips them (MMAD data never uses one).
    pub judge: Option<JudgeSpec>,
    /// Write the report here (markdown, and JSON beside it).
    pub out: Option<PathBuf>,
    /// Write one self-contained HTML page of the evaluation here (AD-PL/MANTA data).
    pub html: Option<PathBuf>,
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
    /// Read every conclusion from one forward pass ([`super::FirstToken`]) instead of from a
    /// generated answer.
    pub first_token: bool,
    /// Generate full answers (SBERT, MLE) only for the first N items; `None`: every item.
    pub generate_items: Option<usize>,
    /// Write the first-token records here (JSONL), as they are made.
    pub save_first_token: Option<PathBuf>,
    /// The backbone: selects it for a baseline without a checkpoint; with a checkpoint it must be
    /// the checkpoint's (`None`: the checkpoint's, or the default).
    pub backbone: Option<String>,
    /// The base weights of the untrained model of `baseline` (a checkpoint keeps its own).
    pub baseline_weights: crate::models::llama::BaseWeights,
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

    let (mut generated, mut first, model, mut evaluator) = match &req.answers {
        AnswerSource::File(p) => (read_answers(p, &samples)?, None, format!("answers from {}", p.display()), None),
        AnswerSource::Model(m) => {
            let mut ev = load_model(m, req.shots, env)?;
            let first = match m.first_token {
                true => Some(first_tokens(&mut ev, m, &samples, env.quiet)?),
                false => None,
            };
            // Full answers on the first `generate_items` pairs (a prefix: the indices agree).
            let n = m.generate_items.unwrap_or(samples.len()).min(samples.len());
            let g = generate(&mut ev, m, &samples[..n], env.quiet)?;
            (g, first, ev.describe.clone(), Some(ev))
        }
    };

    let (mut adpl, mut mmad) = (None, None);
    let map_scores = match evaluator.as_mut() {
        Some(ev) if samples.iter().any(|s| s.label.is_some() || s.mask.is_some()) => Some(ev.maps(&samples)?),
        _ => None,
    };
    if format == DataFormat::Mmad {
        // A first-token letter is the answer MMAD's protocol parses.
        if let Some(f) = first.take() {
            generated =
                f.iter().map(|f| Generated { item: f.item, question: f.question, answer: f.choice().into() }).collect();
        }
        mmad = Some(MmadReport::compute(&samples, &generated)?);
    } else {
        let mut r = score_adpl(&samples, &generated, first.as_deref(), judge.as_mut(), env.quiet)?;
        if let Some((_, maps)) = &map_scores {
            for (p, m) in r.pairs.iter_mut().zip(maps) {
                p.map_score = m.as_ref().map(|m| f64::from(m.score));
            }
        }
        r.intervals = Some(AdplIntervals::compute(&r.pairs));
        adpl = Some(r);
    }
    if let (Some(path), Some(a)) = (&req.html, &adpl) {
        let maps = map_scores.as_ref().map(|(_, m)| m.as_slice());
        let page = super::page::page(&req.data, &samples, a, &generated, first.as_deref(), maps);
        super::html::write(&page, path)?;
    }
    let maps = map_scores.map(|(m, _)| m.report());
    let report = EvalReport {
        model,
        data: req.data.clone(),
        format,
        items: samples.len(),
        subset: subset(req, &samples),
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

/// The samples of `req.data`, cut to `req.max_items` (label-balanced with `req.balanced`).
fn load(req: &EvalRequest, format: DataFormat) -> Result<Vec<Sample>> {
    let samples = load_samples(&req.data, Some(format), req.image_root.as_deref())?;
    match req.max_items {
        Some(0) => Err(user_err!("--max-items must be at least 1")),
        Some(n) if req.balanced => balanced_subset(samples, n, &req.data),
        Some(n) => Ok(samples.into_iter().take(n).collect()),
        None if req.balanced => Err(user_err!("--balanced chooses among --max-items N items; give --max-items")),
        None => Ok(samples),
    }
}

/// How the report names the evaluated items when `--max-items` chose them.
fn subset(req: &EvalRequest, samples: &[Sample]) -> Option<String> {
    use crate::data::sample::Label;
    req.max_items?;
    if !req.balanced {
        return Some(format!("first {}", samples.len()));
    }
    let anomalous = samples.iter().filter(|s| s.label == Some(Label::Anomalous)).count();
    Some(format!("first {anomalous} anomalous and first {} normal", samples.len() - anomalous))
}

/// The first ⌈n/2⌉ anomalous and the first ⌊n/2⌋ normal samples, in file order; when one label
/// has too few, the other fills the rest. A file's first items are often all of one label (ELPV's
/// test split lists its defective cells first), which leaves a small subset's image AUROC
/// undefined and its accuracy a question-form prior.
fn balanced_subset(samples: Vec<Sample>, n: usize, path: &std::path::Path) -> Result<Vec<Sample>> {
    use crate::data::sample::Label;
    if let Some(s) = samples.iter().find(|s| s.label.is_none()) {
        return Err(user_err!(
            "{}: item `{}` has no label, so --balanced cannot choose by label; drop --balanced or label every item",
            path.display(),
            s.id
        ));
    }
    let count = |l: Label| samples.iter().filter(|s| s.label == Some(l)).count();
    let (anomalous, normal) = (count(Label::Anomalous), count(Label::Normal));
    // Half each, unless the normal items are too few to fill their half.
    let want_a = n.div_ceil(2).max(n.saturating_sub(normal)).min(anomalous);
    let want_n = n.saturating_sub(want_a).min(normal);
    let (mut a, mut m) = (0, 0);
    Ok(samples
        .into_iter()
        .filter(|s| {
            let (taken, want) = if s.label == Some(Label::Anomalous) { (&mut a, want_a) } else { (&mut m, want_n) };
            *taken += 1;
            *taken <= want
        })
        .collect())
}

fn load_model(m: &ModelAnswers, shots: u8, env: &EvalEnv) -> Result<Evaluator> {
    let mut ev = Evaluator::load(
        m.checkpoint.as_deref(),
        m.baseline,
        m.facts.as_deref(),
        m.backbone.as_deref(),
        m.baseline_weights,
        &env.plugin_dirs,
    )?;
    ev.shots = shots;
    ev.max_tokens = m.max_tokens;
    if env.gpu {
        ev.use_gpu(crate::backend::cuda::Gpu::global()?)?;
    }
    Ok(ev)
}

/// Every question's first-token conclusion, each saved to `m.save_first_token` as it comes.
fn first_tokens(ev: &mut Evaluator, m: &ModelAnswers, samples: &[Sample], quiet: bool) -> Result<Vec<FirstToken>> {
    let mut save = match &m.save_first_token {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(AppendLog::<FirstToken>::open(p)?)
        }
        None => None,
    };
    let questions: usize = samples.iter().map(|s| s.questions.len()).sum();
    let pb = crate::util::progress_bar(questions as u64, "first token", quiet);
    let f = ev.first_tokens(samples, &pb, &mut |r| match save.as_mut() {
        Some(log) => log.append(r.clone()).map(|_| ()),
        None => Ok(()),
    })?;
    pb.finish_and_clear();
    Ok(f)
}

/// The model's answers to every question of `samples`, each saved to `m.save_answers` as it
/// comes.
fn generate(ev: &mut Evaluator, m: &ModelAnswers, samples: &[Sample], quiet: bool) -> Result<Vec<Generated>> {
    let questions: usize = samples.iter().map(|s| s.questions.len()).sum();
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
    first: Option<&[FirstToken]>,
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
    AdplReport::compute(samples, generated, first, Some(&mut embed), judged.then_some(&scores[..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sample::Label;

    fn samples(labels: &str) -> Vec<Sample> {
        labels
            .chars()
            .enumerate()
            .map(|(i, c)| {
                let label = match c {
                    'a' => Some(Label::Anomalous),
                    'n' => Some(Label::Normal),
                    _ => None,
                };
                serde_json::from_value::<Sample>(serde_json::json!({"id": format!("{i}{c}"), "test_image": "t.png"}))
                    .map(|s| Sample { label, ..s })
                    .unwrap()
            })
            .collect()
    }

    fn ids(s: &[Sample]) -> String {
        s.iter().map(|s| s.id.as_str()).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn a_balanced_subset_takes_the_first_of_each_label_in_file_order() {
        let p = std::path::Path::new("d.json");
        // Five anomalous items first, as in ELPV's test split, then normal ones.
        assert_eq!(ids(&balanced_subset(samples("aaaaannnn"), 4, p).unwrap()), "0a 1a 5n 6n");
        // An odd N gives the extra item to the anomalous side.
        assert_eq!(ids(&balanced_subset(samples("nanana"), 3, p).unwrap()), "0n 1a 3a");
        // One label short: the other fills the rest.
        assert_eq!(ids(&balanced_subset(samples("naaaa"), 4, p).unwrap()), "0n 1a 2a 3a");
        assert_eq!(ids(&balanced_subset(samples("an"), 5, p).unwrap()), "0a 1n");
        let err = balanced_subset(samples("an?"), 2, p).unwrap_err().to_string();
        assert!(err.contains("d.json") && err.contains("`2?`") && err.contains("no label"), "{err}");
    }

    /// The report says which items were evaluated when `--max-items` chose them.
    #[test]
    fn the_report_names_the_subset_it_evaluated() {
        let req = |max_items, balanced| EvalRequest {
            data: "d.json".into(),
            format: None,
            image_root: None,
            max_items,
            balanced,
            shots: 1,
            answers: AnswerSource::File("a.jsonl".into()),
            judge: None,
            out: None,
            html: None,
        };
        let chosen = balanced_subset(samples("aaaaannnn"), 5, std::path::Path::new("d.json")).unwrap();
        assert_eq!(subset(&req(None, false), &samples("aan")), None);
        assert_eq!(subset(&req(Some(3), false), &samples("aan")).as_deref(), Some("first 3"));
        let named = subset(&req(Some(5), true), &chosen);
        assert_eq!(named.as_deref(), Some("first 3 anomalous and first 2 normal"));
        let report = EvalReport {
            model: "m".into(),
            data: "d.json".into(),
            format: DataFormat::Adpl,
            items: 5,
            subset: named,
            questions: 0,
            shots: 1,
            adpl: None,
            mmad: None,
            maps: None,
            judge: None,
            seconds: 0.0,
        };
        let md = report.to_markdown();
        assert!(md.contains("(Adpl, 5 items: the first 3 anomalous and first 2 normal, 0 questions, 1-shot)"), "{md}");
    }
}
