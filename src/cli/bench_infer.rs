//! `sage bench infer`: decoding from the GGUF's quantized blocks against the same model
//! dequantized to f32, and llama.cpp on the same file with the same token ids and threads
//! (`benches/llama_cpp_infer.py` through llama-cpp-python), all in one run: prefill tokens/s,
//! greedy decode tokens/s per batch size, the perplexity of a fixed text, the largest logit
//! difference between the two sage paths, and what the weights take in memory.

use super::{print_json, Ctx};
use crate::assets;
use crate::backend::cpu::HostOps;
use crate::models::llama::{BaseWeights, ChatModel, Llama, WeightMemory};
use crate::models::sampling::argmax;
use crate::user_err;
use crate::util::median;
use anyhow::{Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

const LLAMA_CPP_SCRIPT: &str = include_str!("../../benches/llama_cpp_infer.py");
/// The text whose perplexity every path scores (the same token ids for all).
const PPL_TEXT: &str = include_str!("../../benches/ppl_text.txt");
/// The prompt each decoded sequence starts from.
const DECODE_PROMPT: &str = "Describe, in detail, how a solar cell can crack during manufacturing.";

pub struct InferBench {
    pub models: Vec<String>,
    pub weights: Vec<BaseWeights>,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub batches: Vec<usize>,
    pub ppl_tokens: usize,
    pub repeats: usize,
    pub llama_cpp: bool,
}

#[derive(Serialize)]
struct ModeRow {
    weights: BaseWeights,
    load_seconds: f64,
    weight_memory: WeightMemory,
    /// f32 values × 4 + quantized bytes.
    weight_mib: f64,
    rss_mib_after_load: f64,
    ppl: f64,
    prefill_tokens_per_second: f64,
    decode_tokens_per_second: BTreeMap<usize, f64>,
}

#[derive(Serialize)]
struct ModelReport {
    model: String,
    path: PathBuf,
    prompt_tokens: usize,
    ppl_tokens: usize,
    decode_tokens: usize,
    modes: Vec<ModeRow>,
    /// Largest |logit| difference over the perplexity text, quantized against f32, and the
    /// largest |logit| of the f32 path (the scale it is relative to).
    max_abs_logit_diff: Option<f64>,
    max_abs_logit: Option<f64>,
    ppl_relative_diff: Option<f64>,
    llama_cpp: serde_json::Value,
    /// sage (quantized) / llama.cpp.
    ratios: BTreeMap<String, f64>,
}

pub(super) fn resolve(model: &str) -> Result<PathBuf> {
    if model.ends_with(".gguf") || model.contains('/') {
        let p = PathBuf::from(model);
        if !p.exists() {
            return Err(user_err!("--models: {} does not exist", p.display()));
        }
        return Ok(p);
    }
    crate::models::backbone::builtin(model)?.llm_asset.path()
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .map(|kib: f64| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// `n` token ids from `text` (repeated when it is shorter).
fn tokens(m: &ChatModel<HostOps>, text: &str, n: usize) -> Result<Vec<u32>> {
    let one = m.tokenizer.encode(text, false)?;
    if one.is_empty() {
        anyhow::bail!("the benchmark text encodes to no tokens");
    }
    Ok(one.iter().copied().cycle().take(n).collect())
}

pub fn run(ctx: &Ctx, cfg: &InferBench) -> Result<()> {
    if cfg.prompt_tokens == 0 || cfg.ppl_tokens < 2 || cfg.repeats == 0 || cfg.batches.contains(&0) {
        return Err(user_err!("--prompt-tokens, --repeats and --batch must be positive, --ppl-tokens at least 2"));
    }
    let mut reports = Vec::new();
    for name in &cfg.models {
        let path = resolve(name)?;
        reports.push(bench_model(ctx, cfg, name, path)?);
    }
    if ctx.json {
        return print_json(&serde_json::json!({ "threads": ctx.threads, "models": reports }));
    }
    for r in &reports {
        println!("{} ({}), {} threads", r.model, r.path.display(), ctx.threads);
        println!(
            "  {:<10} {:>9} {:>9} {:>10} {:>12}  decode tokens/s by batch",
            "weights", "MiB", "ppl", "load s", "prefill t/s"
        );
        for m in &r.modes {
            let dec: Vec<String> = m.decode_tokens_per_second.iter().map(|(b, t)| format!("b{b} {t:.1}")).collect();
            println!(
                "  {:<10} {:>9.1} {:>9.4} {:>10.2} {:>12.1}  {}",
                format!("{:?}", m.weights).to_lowercase(),
                m.weight_mib,
                m.ppl,
                m.load_seconds,
                m.prefill_tokens_per_second,
                dec.join(", ")
            );
        }
        if let (Some(d), Some(s)) = (r.max_abs_logit_diff, r.max_abs_logit) {
            println!(
                "  quantized vs f32: max |Δlogit| {d:.4} (max |logit| {s:.2}), perplexity {:+.3}%",
                100.0 * r.ppl_relative_diff.unwrap_or(f64::NAN)
            );
        }
        println!("  llama.cpp: {}", r.llama_cpp);
        for (k, v) in &r.ratios {
            println!("  sage/llama.cpp {k}: {v:.3}");
        }
    }
    Ok(())
}

fn bench_model(ctx: &Ctx, cfg: &InferBench, name: &str, path: PathBuf) -> Result<ModelReport> {
    let mut modes = Vec::new();
    let mut logits_by_mode: Vec<(BaseWeights, Vec<f32>)> = Vec::new();
    let (mut prompt, mut ppl_ids, mut decode_prompt) = (Vec::new(), Vec::new(), Vec::new());
    for &w in &cfg.weights {
        let before = rss_mib();
        let t = Instant::now();
        let max_pos = cfg.prompt_tokens.max(cfg.ppl_tokens).max(64 + cfg.decode_tokens) + 8;
        let m = ChatModel::load(HostOps, &path, max_pos, w).with_context(|| format!("loading {}", path.display()))?;
        let load_seconds = t.elapsed().as_secs_f64();
        let rss_after = rss_mib() - before;
        prompt = tokens(&m, PPL_TEXT, cfg.prompt_tokens)?;
        ppl_ids = tokens(&m, PPL_TEXT, cfg.ppl_tokens)?;
        decode_prompt = m.tokenizer.encode(DECODE_PROMPT, false)?;
        let llm = &m.model;
        if ctx.verbose > 0 {
            eprintln!("{name} {w:?}: loaded in {load_seconds:.1} s; scoring, prefill, decode ...");
        }
        let (ppl, logits) = perplexity(llm, &ppl_ids)?;
        let prefill = prefill_tps(llm, &prompt, cfg.repeats)?;
        let mut decode = BTreeMap::new();
        for &b in &cfg.batches {
            decode.insert(b, decode_tps(llm, &decode_prompt, b, cfg.decode_tokens)?);
        }
        let mem = llm.weight_memory();
        modes.push(ModeRow {
            weights: w,
            load_seconds,
            weight_mib: (mem.dense_values * 4 + mem.quant_bytes) as f64 / (1 << 20) as f64,
            weight_memory: mem,
            rss_mib_after_load: rss_after,
            ppl,
            prefill_tokens_per_second: prefill,
            decode_tokens_per_second: decode,
        });
        logits_by_mode.push((w, logits));
    }
    let find = |w: BaseWeights| logits_by_mode.iter().position(|(m, _)| *m == w);
    let (mut max_abs_logit_diff, mut max_abs_logit, mut ppl_relative_diff) = (None, None, None);
    if let (Some(q), Some(f)) = (find(BaseWeights::Quantized), find(BaseWeights::F32)) {
        let (lq, lf) = (&logits_by_mode[q].1, &logits_by_mode[f].1);
        max_abs_logit_diff = Some(lq.iter().zip(lf).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max));
        max_abs_logit = Some(lf.iter().map(|a| a.abs() as f64).fold(0.0, f64::max));
        ppl_relative_diff = Some(modes[q].ppl / modes[f].ppl - 1.0);
    }
    let llama_cpp = if cfg.llama_cpp {
        match llama_cpp(ctx, cfg, &path, &prompt, &ppl_ids, &decode_prompt) {
            Ok(v) => v,
            Err(e) => serde_json::json!({ "unavailable": format!("{e:#}") }),
        }
    } else {
        serde_json::json!({ "unavailable": "not asked for (--llama-cpp)" })
    };
    let mut ratios = BTreeMap::new();
    if let Some(q) = find(BaseWeights::Quantized) {
        let row = &modes[q];
        if let Some(p) = llama_cpp["prefill_tokens_per_second"].as_f64() {
            ratios.insert("prefill".to_string(), row.prefill_tokens_per_second / p);
        }
        for (b, t) in &row.decode_tokens_per_second {
            if let Some(l) = llama_cpp["decode_tokens_per_second"][b.to_string()].as_f64() {
                ratios.insert(format!("decode_batch_{b}"), t / l);
            }
        }
    }
    Ok(ModelReport {
        model: name.to_string(),
        path,
        prompt_tokens: cfg.prompt_tokens,
        ppl_tokens: cfg.ppl_tokens,
        decode_tokens: cfg.decode_tokens,
        modes,
        max_abs_logit_diff,
        max_abs_logit,
        ppl_relative_diff,
        llama_cpp,
        ratios,
    })
}

/// The perplexity of `ids` (each position predicting the next) and the logits `[T, V]`, fed one
/// token per decode step: the path (and, quantized, the int8 kernels) generation uses.
fn perplexity(llm: &Llama<HostOps>, ids: &[u32]) -> Result<(f64, Vec<f32>)> {
    let t = ids.len();
    let mut cache = llm.new_cache(1, t)?;
    let mut logits = Vec::new();
    for &id in ids {
        let h = llm.decode(llm.embed_tokens(&[id])?, &[0], &mut cache)?;
        logits.extend(llm.logits_of_rows(&h, &[0])?);
    }
    let v = llm.config.vocab_size;
    let mut nll = 0.0f64;
    for p in 0..t - 1 {
        let z = &logits[p * v..(p + 1) * v];
        let m = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let lse = m + z.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
        nll += lse - z[ids[p + 1] as usize] as f64;
    }
    Ok(((nll / (t - 1) as f64).exp(), logits))
}

/// Prompt tokens/s of a one-sequence prefill (and its last row's logits), median of `repeats`.
fn prefill_tps(llm: &Llama<HostOps>, ids: &[u32], repeats: usize) -> Result<f64> {
    let mut times = Vec::new();
    for _ in 0..repeats {
        let mut cache = llm.new_cache(1, ids.len())?;
        let t = Instant::now();
        let h = llm.prefill(llm.embed_tokens(ids)?, ids.len(), &[ids.len()], &mut cache)?;
        llm.logits_of_rows(&h, &[ids.len() as u32 - 1])?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(ids.len() as f64 / median(&times))
}

/// Greedy decode tokens/s over `batch` copies of `prompt`: `n` steps, each one token for every
/// sequence (no early stop), timed after the prefill.
fn decode_tps(llm: &Llama<HostOps>, prompt: &[u32], batch: usize, n: usize) -> Result<f64> {
    let t = prompt.len();
    let mut cache = llm.new_cache(batch, t + n)?;
    let ids: Vec<u32> = (0..batch).flat_map(|_| prompt.iter().copied()).collect();
    let h = llm.prefill(llm.embed_tokens(&ids)?, t, &vec![t; batch], &mut cache)?;
    let last: Vec<u32> = (0..batch).map(|b| (b * t + t - 1) as u32).collect();
    let v = llm.config.vocab_size;
    let logits = llm.logits_of_rows(&h, &last)?;
    let mut next: Vec<u32> = logits.chunks_exact(v).map(argmax).collect();
    let seqs: Vec<usize> = (0..batch).collect();
    let rows: Vec<u32> = (0..batch as u32).collect();
    let start = Instant::now();
    for _ in 0..n {
        let h = llm.decode(llm.embed_tokens(&next)?, &seqs, &mut cache)?;
        next = llm.logits_of_rows(&h, &rows)?.chunks_exact(v).map(argmax).collect();
    }
    Ok((batch * n) as f64 / start.elapsed().as_secs_f64())
}

fn llama_cpp(
    ctx: &Ctx,
    cfg: &InferBench,
    path: &std::path::Path,
    prompt: &[u32],
    ppl: &[u32],
    decode_prompt: &[u32],
) -> Result<serde_json::Value> {
    let req = serde_json::json!({
        "model": path, "threads": ctx.threads, "prompt": prompt, "ppl": ppl, "decode_prompt": decode_prompt,
        "decode_tokens": cfg.decode_tokens, "batches": cfg.batches, "repeats": cfg.repeats,
    });
    let mut child = Command::new(assets::python())
        .args(["-c", LLAMA_CPP_SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running python3 (set SAGE_PYTHON to another interpreter)")?;
    child.stdin.take().expect("piped stdin").write_all(req.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{} (pip install llama-cpp-python numpy)", err.lines().last().unwrap_or("python failed"));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).context("parsing the llama.cpp benchmark's output")
}
