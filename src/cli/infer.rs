//! `sage infer`: one question about one image pair, from a trained checkpoint.

use super::{print_json, Ctx};
use crate::backend::cuda::step_ops::CudaOps;
use crate::facts::FactSet;
use crate::image_io;
use crate::models::sage::FactsMode;
use crate::models::sage::{Example, Sage, SageModel};
use crate::models::sampling::Sampling;
use crate::opset::Buffers;
use crate::stage::checkpoint;
use crate::train::{streams, ParamSet, SeedRng};
use crate::user_err;
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str =
    "Loads a run folder written by `sage sfe` or `sage edpo` (its config, and its trainable weights on top of the \
pinned EfficientNet-Lite0 and SmolLM2 assets), encodes the test and reference images, and answers the question \
greedily; the answer starts with its conclusion (Yes/No). Prints the selected patches (the K test patches least \
similar to the reference, which feed the fusion attention) and, with --map, writes the anomaly map. A checkpoint \
trained with facts = hard or fused needs fact sentences: --facts (a `sage facts` file) or --fact. --device cuda \
answers on the GPU (models::sage on CudaOps, bf16).";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder written by `sage sfe` (its state.json and weights).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The test image.
    #[arg(long)]
    test: PathBuf,
    /// A normal reference image of the same kind (omit for zero-shot).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// The question, e.g. "Is there any defect in the test cell compared with the reference?"
    #[arg(long)]
    question: String,
    /// Facts JSONL from `sage facts` (the test image's line is used).
    #[arg(long)]
    facts: Option<PathBuf>,
    /// A fact sentence (repeatable); used instead of --facts.
    #[arg(long = "fact")]
    fact: Vec<String>,
    /// Write the anomaly map (1 − max cosine to the reference) over the test image to this PNG.
    #[arg(long)]
    map: Option<PathBuf>,
    /// The backbone the checkpoint must have been trained on [default: the checkpoint's].
    #[arg(long)]
    backbone: Option<String>,
    /// Maximum number of answer tokens.
    #[arg(long, default_value_t = 96)]
    max_tokens: usize,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let state = checkpoint::read_state(&a.checkpoint)?;
    let cfg = state.config.clone();
    state.require_backbone_name(&a.checkpoint, a.backbone.as_deref())?;
    let mut params = ParamSet::new();
    let mut rng = SeedRng::new(cfg.train.seed, streams::INIT);
    let backbone = crate::plugin::backbones::resolve(&cfg.model.backbone, &ctx.plugin_dirs)?;
    let model = SageModel::on(backbone, cfg.model.clone(), &cfg.llm.finetune()?, cfg.llm.base, &mut params, &mut rng)?;
    checkpoint::load_weights(&a.checkpoint, &state, &mut params, &model.backbone)?;
    let facts: Vec<String> = if !a.fact.is_empty() {
        a.fact.clone()
    } else if let Some(f) = &a.facts {
        let all = FactSet::load(f)?;
        let key = a.test.canonicalize().unwrap_or_else(|_| a.test.clone());
        all.get(&key).or_else(|| all.get(&a.test)).map(|f| f.facts.clone()).unwrap_or_default()
    } else {
        vec![]
    };
    if cfg.model.facts != FactsMode::None && facts.is_empty() {
        return Err(user_err!(
            "this checkpoint uses facts = {:?}: give fact sentences with --fact or a facts file (from `sage facts`) with --facts",
            cfg.model.facts
        ));
    }
    let test = model.patch_tokens(&a.test)?;
    let reference = match &a.reference {
        Some(p) => Some(model.patch_tokens(p)?),
        None => None,
    };
    let ex = Example { test: &test, reference: reference.as_ref(), facts: &facts, question: &a.question, answer: None };
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
    // `device` names what answered, so a script can tell the GPU path from the CPU one.
    let (device, (answer, selection)) = if ctx.backend.backend == "cuda" {
        let gpu = crate::backend::cuda::Gpu::global()?;
        let dev = Sage::new(CudaOps::new(gpu), &model, &params, None, None)?;
        (dev.llm.ops.describe(), dev.answer_batch(&model, &[ex], a.max_tokens, greedy)?.remove(0))
    } else {
        let cpu = Sage::new(crate::backend::cpu::HostOps, &model, &params, None, None)?;
        drop(params);
        ("cpu".to_string(), cpu.answer_batch(&model, &[ex], a.max_tokens, greedy)?.remove(0))
    };
    let scores = crate::ops::similarity::mincos_topk(
        &test.data,
        reference.as_ref().map(|r| r.data.as_slice()),
        test.dim,
        cfg.model.k,
        cfg.model.reduce,
    );
    let patches: Vec<u32> = selection.as_ref().map(|s| s.patches.clone()).unwrap_or(scores.topk.clone());
    if let Some(out) = &a.map {
        let map = scores.anomaly_map();
        let (lo, hi) = map.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
        let png = image_io::overlay_heatmap(&image_io::load(&a.test)?, &map, test.h, test.w, lo, hi, 0.45);
        image_io::save_atomic(&png, out)?;
    }
    let grid_w = test.w;
    let cells: Vec<[usize; 2]> = patches.iter().map(|&p| [p as usize / grid_w, p as usize % grid_w]).collect();
    if ctx.json {
        return print_json(&serde_json::json!({
            "answer": answer, "conclusion": crate::data::sample::conclusion(&answer).map(crate::data::sample::yes_no),
            "selected_patches": patches, "selected_cells": cells, "grid": [test.h, test.w], "facts": facts, "map": a.map,
            "device": device,
        }));
    }
    println!("{answer}");
    println!("selected patches (row, col on the {}×{} grid): {:?}", test.h, test.w, cells);
    if let Some(m) = &a.map {
        println!("anomaly map: {}", m.display());
    }
    Ok(())
}
