//! `sage eval`: a model's answers to a dataset, scored (ARCHITECTURE.md §6).

use super::{print_json, Ctx};
use crate::data::format::{load_samples, DataFormat};
use crate::data::Sample;
use crate::eval::adpl::AdplReport;
use crate::eval::generate::Evaluator;
use crate::eval::maps::MapReport;
use crate::eval::mmad::MmadReport;
use crate::eval::Generated;
use crate::jsonl_log::AppendLog;
use crate::judge::scores::{request_for, Judge, PluginJudge};
use crate::models::bert::SentenceEncoder;
use crate::user_err;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

pub const LONG_ABOUT: &str = "Answers every question of a dataset with a trained model (greedy) and scores the \
answers. AD-PL and MANTA data: accuracy per level (standard comparison, defect identification, defect diagnosis) \
and their average, Acc-G (all questions of an image pair right), SBERT (MiniLM cosine to the best reference answer) \
and MLE (the judge's type, location and logic scores, 1-5). MMAD data (mmad.json): the MMAD protocol, per subtask \
and source dataset, Anomaly Detection balanced. Data with labels or masks: image and pixel AUROC of the \
training-free anomaly map. --baseline evaluates the same architecture untrained (the zero-shot rows). --answers \
scores answers made elsewhere (JSONL lines {\"id\", \"question\", \"answer\"}) without running a model; \
--save-answers writes this run's answers in that shape. --device cuda answers on the GPU (models::sage_step, bf16, \
KV-cached decoding); the anomaly maps and the image encoder (run once per image, cached) stay on the CPU.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder written by `sage sfe` or `sage edpo`.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The dataset: AD-PL, MANTA or MMAD JSON.
    #[arg(long)]
    data: PathBuf,
    /// The data format [default: guessed from the file].
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    /// Folder image paths are relative to [default: the data file's folder].
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// Judge plugin for the MLE scores (`none` skips them).
    #[arg(long, default_value = "rubric")]
    judge: String,
    /// The judge's config (a JSON object).
    #[arg(long, default_value = "{}")]
    judge_config: String,
    /// 1: show the reference image (one-shot); 0: zero-shot.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    shots: u8,
    /// Evaluate the checkpoint's architecture untrained (or, without --checkpoint, the default one).
    #[arg(long)]
    baseline: bool,
    /// Facts JSONL from `sage facts` [default: the checkpoint's data.facts].
    #[arg(long)]
    facts: Option<PathBuf>,
    /// Evaluate only the first N items (image pairs).
    #[arg(long)]
    max_items: Option<usize>,
    /// Maximum answer tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Score these answers (JSONL: {"id", "question", "answer"}) instead of running a model.
    #[arg(long, conflicts_with_all = ["checkpoint", "baseline"])]
    answers: Option<PathBuf>,
    /// Write the generated answers here (JSONL, the --answers shape).
    #[arg(long)]
    save_answers: Option<PathBuf>,
    /// Write the report (markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// One answer in a file: the sample's id and the question's index.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AnswerLine {
    id: String,
    question: usize,
    answer: String,
}

#[derive(Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: PathBuf,
    pub format: DataFormat,
    pub items: usize,
    pub questions: usize,
    pub shots: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adpl: Option<AdplReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmad: Option<MmadReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub maps: Option<MapReport>,
    pub judge: Option<String>,
    pub seconds: f64,
}

impl EvalReport {
    pub fn to_markdown(&self) -> String {
        let mut s = format!(
            "# sage eval\n\nModel: {}\nData: {} ({:?}, {} items, {} questions, {}-shot)\n\n",
            self.model,
            self.data.display(),
            self.format,
            self.items,
            self.questions,
            self.shots
        );
        if let Some(a) = &self.adpl {
            s.push_str(&a.to_markdown());
            if let Some(j) = &self.judge {
                s.push_str(&format!("MLE judge: {j}.\n"));
            }
        }
        if let Some(m) = &self.mmad {
            s.push_str(&m.to_markdown());
        }
        if let Some(m) = &self.maps {
            let f = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{x:.4}"));
            s.push_str(&format!(
                "\nAnomaly map: image AUROC {} ({} images, {} anomalous); pixel AUROC {} ({} masked images).\n",
                f(m.image_auroc),
                m.images,
                m.anomalous_images,
                f(m.pixel_auroc),
                m.masked_images
            ));
        }
        s.push_str(&format!("\n{:.1} s\n", self.seconds));
        s
    }
}

fn read_answers(path: &PathBuf, samples: &[Sample]) -> Result<Vec<Generated>> {
    let text = std::fs::read_to_string(path).map_err(|e| user_err!("cannot read {}: {e}", path.display()))?;
    let by_id: std::collections::HashMap<&str, usize> =
        samples.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let a: AnswerLine = serde_json::from_str(line).map_err(|e| {
            user_err!("{} line {}: {e} (expected {{\"id\", \"question\", \"answer\"}})", path.display(), n + 1)
        })?;
        let item = *by_id
            .get(a.id.as_str())
            .ok_or_else(|| user_err!("{} line {}: no sample with id `{}` in the data", path.display(), n + 1, a.id))?;
        out.push(Generated { item, question: a.question, answer: a.answer });
    }
    Ok(out)
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let t0 = Instant::now();
    let format = match a.format {
        Some(f) => f,
        None => crate::data::format::guess_format(&a.data)?,
    };
    let mut samples = load_samples(&a.data, Some(format), a.image_root.as_deref())?;
    if let Some(n) = a.max_items {
        if n == 0 {
            return Err(user_err!("--max-items must be at least 1"));
        }
        samples.truncate(n);
    }
    let questions: usize = samples.iter().map(|s| s.questions.len()).sum();
    if questions == 0 {
        return Err(user_err!("{} has no questions to evaluate", a.data.display()));
    }
    let judge_cfg: serde_json::Value =
        serde_json::from_str(&a.judge_config).map_err(|e| user_err!("--judge-config is not JSON: {e}"))?;
    // Open the judge first: a missing plugin should fail before minutes of generation.
    let wants_judge = a.judge != "none" && format != DataFormat::Mmad;
    let mut judge = if wants_judge { Some(PluginJudge::open(&ctx.plugin_dirs, &a.judge, &judge_cfg)?) } else { None };

    let mut evaluator = None;
    let (generated, model) = match &a.answers {
        Some(p) => (read_answers(p, &samples)?, format!("answers from {}", p.display())),
        None => {
            let mut ev = Evaluator::load(a.checkpoint.as_deref(), a.baseline, a.facts.as_deref())?;
            ev.shots = a.shots;
            ev.max_tokens = a.max_tokens;
            if ctx.backend.backend == "cuda" {
                ev.use_gpu(crate::backend::cuda::Gpu::global()?)?;
            }
            let mut save = match &a.save_answers {
                Some(p) => {
                    let _ = std::fs::remove_file(p);
                    Some(AppendLog::<AnswerLine>::open(p)?)
                }
                None => None,
            };
            let pb = crate::util::progress_bar(questions as u64, "eval", ctx.quiet());
            let g = ev.generate(&samples, &pb, &mut |g| {
                if let Some(log) = save.as_mut() {
                    let id = samples[g.item].id.clone();
                    log.append(AnswerLine { id, question: g.question, answer: g.answer.clone() })?;
                }
                Ok(())
            })?;
            pb.finish_and_clear();
            let d = ev.describe.clone();
            evaluator = Some(ev);
            (g, d)
        }
    };

    let (mut adpl, mut mmad) = (None, None);
    if format == DataFormat::Mmad {
        mmad = Some(MmadReport::compute(&samples, &generated)?);
    } else {
        let mut scores = Vec::new();
        if let Some(j) = judge.as_mut() {
            let pb = crate::util::progress_bar(generated.len() as u64, "judge", ctx.quiet());
            for g in &generated {
                let s = &samples[g.item];
                if s.questions.get(g.question).is_some_and(|q| !q.ranked_answers.is_empty()) {
                    let mut req = request_for(s, g.question, 0);
                    req.answer = g.answer.clone();
                    scores
                        .push(j.score(&req).with_context(|| format!("judging item {} question {}", s.id, g.question))?);
                }
                pb.inc(1);
            }
            pb.finish_and_clear();
        }
        let encoder = SentenceEncoder::load(&crate::assets::Asset::MiniLmDir.path()?)?;
        let mut embed = |t: &str| encoder.embed(t);
        adpl =
            Some(AdplReport::compute(&samples, &generated, Some(&mut embed), judge.is_some().then_some(&scores[..]))?);
    }
    let maps = match evaluator.as_mut() {
        Some(ev) if samples.iter().any(|s| s.label.is_some() || s.mask.is_some()) => Some(ev.maps(&samples)?.report()),
        _ => None,
    };
    let report = EvalReport {
        model,
        data: a.data.clone(),
        format,
        items: samples.len(),
        questions,
        shots: a.shots,
        adpl,
        mmad,
        maps,
        judge: judge.as_ref().map(|j| j.name()),
        seconds: t0.elapsed().as_secs_f64(),
    };
    let md = report.to_markdown();
    if let Some(out) = &a.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        crate::util::write_atomic(out, md.as_bytes())?;
        crate::util::write_atomic(&out.with_extension("json"), serde_json::to_string_pretty(&report)?.as_bytes())?;
    }
    if ctx.json {
        return print_json(&report);
    }
    print!("{md}");
    Ok(())
}
