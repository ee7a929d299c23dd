//! `sage eval`: a model's answers to a dataset, scored (ARCHITECTURE.md §6).

use super::{print_json, Ctx};
use crate::data::format::DataFormat;
use crate::eval::run::{evaluate, AnswerSource, EvalEnv, EvalRequest, JudgeSpec, ModelAnswers};
use crate::user_err;
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str = "Answers every question of a dataset with a trained model (greedy) and scores the \
answers. AD-PL and MANTA data: accuracy per level (standard comparison, defect identification, defect diagnosis) \
and their average, Acc-G (all questions of an image pair right), SBERT (MiniLM cosine to the best reference answer) \
and MLE (the judge's type, location and logic scores, 1-5). MMAD data (mmad.json): the MMAD protocol, per subtask \
and source dataset, Anomaly Detection balanced. Data with labels or masks: image and pixel AUROC of the \
training-free anomaly map. --baseline evaluates the same architecture untrained (the zero-shot rows). --answers \
scores answers made elsewhere (JSONL lines {\"id\", \"question\", \"answer\"}) without running a model; \
--save-answers writes this run's answers in that shape. --first-token reads every conclusion from one forward pass \
(the probabilities of Yes/No or of the option letters as the answer's first token, with no decoding; the \
questions of a pair share one cached prompt prefix), and --generate-items N generates full answers for SBERT and MLE on the first N items only. Every \
AD-PL number comes with a 95% bootstrap interval that resamples image pairs (2000 resamples, fixed seed). --device cuda answers on the GPU (models::sage, bf16, \
KV-cached decoding); the anomaly maps and the image encoder (run once per image, cached) stay on the CPU.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder written by `sage sfe`, `sage edpo` or `sage grpo`.
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
    /// The backbone (`lite`, `dino-qwen`): selects the untrained model of --baseline without
    /// --checkpoint; with --checkpoint it must be the one the checkpoint was trained on.
    #[arg(long)]
    backbone: Option<String>,
    /// The untrained model's base weights with --baseline: `quantized` (the GGUF's blocks, as
    /// generation reads them) or `f32`. A checkpoint is evaluated on the base it trained with
    /// (its `llm.base`).
    #[arg(long, value_enum, default_value = "quantized")]
    weights: crate::models::llama::BaseWeights,
    /// Facts JSONL from `sage facts` [default: the checkpoint's data.facts].
    #[arg(long)]
    facts: Option<PathBuf>,
    /// Evaluate only the first N items (image pairs).
    #[arg(long)]
    max_items: Option<usize>,
    /// With --max-items N: the first N/2 anomalous and the first N/2 normal items, in file
    /// order, instead of the first N (a small subset then has both labels and an image AUROC).
    #[arg(long, requires = "max_items")]
    balanced: bool,
    /// Maximum answer tokens.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Score these answers (JSONL: {"id", "question", "answer"}) instead of running a model.
    #[arg(long, conflicts_with_all = ["checkpoint", "baseline"])]
    answers: Option<PathBuf>,
    /// Write the generated answers here (JSONL, the --answers shape).
    #[arg(long)]
    save_answers: Option<PathBuf>,
    /// Read each conclusion (Yes/No, or the option letter) from one forward pass: the more
    /// probable candidate as the answer's first token, instead of the start of a generated answer.
    /// Also gives each image pair a probability of "anomalous", hence the model's image AUROC.
    #[arg(long)]
    first_token: bool,
    /// Generate full answers (for SBERT and MLE) only for the first N items [default: all].
    #[arg(long)]
    generate_items: Option<usize>,
    /// Write the first-token probabilities here (JSONL, one line per question).
    #[arg(long, requires = "first_token")]
    save_first_token: Option<PathBuf>,
    /// Write the report (markdown) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write one self-contained HTML page here: the summary with intervals, then every image pair
    /// with its images, anomaly map, selected patches, questions and answers (filterable).
    #[arg(long)]
    html: Option<PathBuf>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let config: serde_json::Value =
        serde_json::from_str(&a.judge_config).map_err(|e| user_err!("--judge-config is not JSON: {e}"))?;
    let answers = match a.answers {
        Some(p) => AnswerSource::File(p),
        None => AnswerSource::Model(ModelAnswers {
            checkpoint: a.checkpoint,
            baseline: a.baseline,
            facts: a.facts,
            max_tokens: a.max_tokens,
            save_answers: a.save_answers,
            first_token: a.first_token,
            generate_items: a.generate_items,
            save_first_token: a.save_first_token,
            backbone: a.backbone,
            baseline_weights: a.weights,
        }),
    };
    let req = EvalRequest {
        data: a.data,
        format: a.format,
        image_root: a.image_root,
        max_items: a.max_items,
        balanced: a.balanced,
        shots: a.shots,
        answers,
        judge: (a.judge != "none").then_some(JudgeSpec { name: a.judge, config }),
        out: a.out,
        html: a.html,
    };
    let env = EvalEnv { plugin_dirs: ctx.plugin_dirs.clone(), gpu: ctx.backend.backend == "cuda", quiet: ctx.quiet() };
    let report = evaluate(&req, &env)?;
    if ctx.json {
        return print_json(&report);
    }
    print!("{}", report.to_markdown());
    Ok(())
}
