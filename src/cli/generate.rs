//! `sage generate`: chat with a backbone's LLM (SmolLM2-135M-Instruct by default) on the CPU engine.

use super::{print_json, Ctx};
use crate::backend::cpu::HostOps;
use crate::formats::chat_template::Message;
use crate::models::llama::{BaseWeights, ChatModel};
use crate::models::sampling::Sampling;
use crate::user_err;
use anyhow::Result;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The user message.
    #[arg(long)]
    prompt: String,
    /// An optional system message (the model's template supplies a default).
    #[arg(long)]
    system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 decodes greedily; above 0 samples with this temperature and --top-p.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    /// Seed for sampling (runs with the same seed give the same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The backbone whose LLM answers: `lite` (SmolLM2-135M-Instruct) or `dino-qwen`
    /// (Qwen2.5-Coder-0.5B-Instruct).
    #[arg(long, default_value = crate::models::backbone::DEFAULT)]
    backbone: String,
    /// A GGUF model (LLaMA or Qwen2 family, with a chat template) instead of the backbone's.
    #[arg(long)]
    model: Option<PathBuf>,
    /// `quantized` multiplies straight from the GGUF's quantized blocks (llama.cpp's way: less
    /// memory, faster decode); `f32` dequantizes every tensor at load, for comparison.
    #[arg(long, value_enum, default_value = "quantized")]
    weights: BaseWeights,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    if !(0.0..=1.0).contains(&a.top_p) || a.top_p == 0.0 {
        return Err(user_err!("--top-p must be in (0, 1], got {}", a.top_p));
    }
    if a.temperature < 0.0 {
        return Err(user_err!("--temperature must be ≥ 0, got {}", a.temperature));
    }
    let path = match a.model {
        Some(p) => p,
        None => crate::models::backbone::builtin(&a.backbone)?.llm_asset.path()?,
    };
    let model = ChatModel::load(HostOps, &path, 4096, a.weights)?;
    let mut messages = Vec::new();
    if let Some(s) = &a.system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", &a.prompt));
    let sampling = Sampling { temperature: a.temperature, top_p: a.top_p, seed: a.seed };
    let stream = !ctx.json;
    let g = model.chat(&messages, a.max_tokens, sampling, |piece| {
        if stream {
            print!("{piece}");
            let _ = std::io::stdout().flush();
        }
    })?;
    let tps = g.tokens.len() as f64 / g.decode_secs.max(1e-9);
    if ctx.json {
        print_json(&serde_json::json!({
            "text": g.text,
            "prompt_tokens": g.prompt_tokens,
            "new_tokens": g.tokens.len(),
            "prefill_seconds": g.prefill_secs,
            "decode_tokens_per_second": tps,
            "weights": a.weights,
            "weight_memory": model.model.weight_memory(),
        }))?;
    } else {
        println!();
        if ctx.verbose > 0 {
            eprintln!("{} prompt tokens, {} new tokens, {:.1} tokens/s", g.prompt_tokens, g.tokens.len(), tps);
        }
    }
    Ok(())
}
