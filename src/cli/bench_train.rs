//! `sage bench train`: a full training step (forward, backward, AdamW) and generation at LLaMA
//! model shapes with random weights, tokens/s and peak memory. `benches/run_train.sh` runs it
//! beside the HF transformers counterpart (`benches/train_hf.py`, same config, batch and sequence)
//! and writes the report with the ratios to `benches/results/`.
//!
//! One model, two op sets: [`run`] steps `models::llama::Llama` on the CPU (`HostOps`, f32);
//! [`run_gpu`] on `CudaOps` (bf16 weights and activations, fp32 masters and moments), whose target
//! is ≥ 1.3× HF transformers tokens/s (ARCHITECTURE.md §9). Both then generate greedily at each
//! `--gen-batch` with the KV-cached decode (one batched prefill, then one decode step for the
//! whole batch per token).

use crate::backend::cpu::HostOps;
use crate::models::llama::{Finetune, Llama, LlamaParams};
use crate::models::random_init::{preset, RandomLlama};
use crate::models::sampling::Sampling;
use crate::opset::StepOps;
use crate::train::optim::AdamWConfig;
use crate::train::param::ParamSet;
use crate::train::rng::SeedRng;
use crate::util::median;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct TrainBench {
    pub models: Vec<String>,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub gen_prompt: usize,
    pub gen_tokens: usize,
    pub gen_batches: Vec<usize>,
}

#[derive(Serialize, Debug)]
pub struct ModelResult {
    pub model: String,
    pub parameters: usize,
    pub batch: usize,
    pub seq: usize,
    pub step_ms: f64,
    pub train_tokens_per_second: f64,
    /// Peak resident memory of the process while this model loaded, trained and generated
    /// (VmHWM, reset before the model is built).
    pub peak_rss_bytes: Option<u64>,
    /// GPU engine: peak device memory in use from loading the weights to the last step (the
    /// allocator pool's high-water mark).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_bytes: Option<u64>,
    pub loss_first: f32,
    pub loss_last: f32,
    pub generation: Vec<GenResult>,
}

#[derive(Serialize, Debug)]
pub struct GenResult {
    pub batch: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    /// New tokens of all sequences per second (prefill included; the decode steps run the whole
    /// batch through each layer at once).
    pub tokens_per_second: f64,
    /// GPU engine: peak device memory during this generation (weights, optimizer state still held,
    /// KV cache and activations), the pool's high-water mark reset before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_device_bytes: Option<u64>,
}

/// Resets the kernel's peak-RSS counter for this process (`/proc/self/clear_refs`, value 5).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// VmHWM from `/proc/self/status`, in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Token ids for sequence `b` (deterministic, inside the vocabulary).
fn tokens(b: usize, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((b * 7919 + i * 104_729 + 17) % vocab) as u32).collect()
}

/// A model at `name`'s shape with random weights, its parameters and their count (the peak-RSS
/// counter reset first, so it covers loading).
fn load_random(name: &str) -> Result<(LlamaParams, ParamSet, usize)> {
    let config = preset(name)?;
    reset_peak_rss();
    let mut params = ParamSet::new();
    let weights = RandomLlama { config: config.clone(), seed: 0 };
    let model = LlamaParams::load(&weights, config, &Finetune::Full, &mut params, &mut SeedRng::new(0, 0))?;
    let parameters = params.iter().map(|p| p.numel()).sum();
    Ok((model, params, parameters))
}

/// Losses and step time of one model, the same for both engines.
struct Timed {
    loss_first: f32,
    loss_last: f32,
    step_s: f64,
}

/// One warm-up step, then `steps` timed ones; the median time.
fn timed_steps(
    name: &str,
    steps: usize,
    progress: &mut impl FnMut(&str),
    mut step: impl FnMut() -> Result<f32>,
) -> Result<Timed> {
    let loss_first = step()?;
    let (mut times, mut loss_last) = (Vec::new(), loss_first);
    for i in 0..steps {
        let t = Instant::now();
        loss_last = step()?;
        times.push(t.elapsed().as_secs_f64());
        progress(&format!("{name}: step {}/{steps} {:.1} ms, loss {loss_last:.4}", i + 1, times[i] * 1e3));
    }
    Ok(Timed { loss_first, loss_last, step_s: median(&times) })
}

impl ModelResult {
    fn new(name: &str, parameters: usize, cfg: &TrainBench, t: &Timed) -> ModelResult {
        ModelResult {
            model: name.to_string(),
            parameters,
            batch: cfg.batch,
            seq: cfg.seq,
            step_ms: t.step_s * 1e3,
            train_tokens_per_second: (cfg.batch * cfg.seq) as f64 / t.step_s,
            peak_rss_bytes: peak_rss(),
            peak_device_bytes: None,
            loss_first: t.loss_first,
            loss_last: t.loss_last,
            generation: Vec::new(),
        }
    }
}

const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };

/// Greedy generation of `--gen-tokens` after `--gen-prompt` tokens at each `--gen-batch`, the same
/// prompts for both engines: `prepare` runs untimed before each batch, `generate(prompts,
/// max_new)` is timed, and `peak` reads the engine's memory high-water mark after it.
#[allow(clippy::too_many_arguments)]
fn timed_generation(
    name: &str,
    cfg: &TrainBench,
    vocab: usize,
    progress: &mut impl FnMut(&str),
    mut prepare: impl FnMut(&[Vec<u32>]) -> Result<()>,
    mut generate: impl FnMut(&[Vec<u32>], usize) -> Result<Vec<Vec<u32>>>,
    peak: impl Fn() -> Option<u64>,
) -> Result<Vec<GenResult>> {
    let mut out = Vec::new();
    for &gb in &cfg.gen_batches {
        let prompts: Vec<Vec<u32>> = (0..gb).map(|b| tokens(b + 1000, cfg.gen_prompt, vocab)).collect();
        prepare(&prompts)?;
        let t = Instant::now();
        let new: usize = generate(&prompts, cfg.gen_tokens)?.iter().map(Vec::len).sum();
        let tps = new as f64 / t.elapsed().as_secs_f64();
        progress(&format!("{name}: generation batch {gb}: {tps:.1} tokens/s"));
        out.push(GenResult {
            batch: gb,
            prompt_tokens: cfg.gen_prompt,
            new_tokens: new / gb.max(1),
            tokens_per_second: tps,
            peak_device_bytes: peak(),
        });
    }
    Ok(out)
}

/// The CPU engine: [`run_on`] with the host op set; memory is the process's peak RSS.
pub fn run(cfg: &TrainBench, progress: impl FnMut(&str)) -> Result<Vec<ModelResult>> {
    run_on(cfg, progress, || HostOps, || Ok(()), || None)
}

/// Each model on the op set `make_ops` builds: `steps` full steps (forward, backward, AdamW; a
/// step's clock stops when its loss is read back, which waits for the whole step), then greedy
/// generation at each `--gen-batch`. `reset_peak` and `peak` reset and read the op set's memory
/// high-water mark (the device's; `None` on the CPU, where the process's RSS is reported).
/// Weights are drawn on the host and copied once; the host copy is dropped before the first step.
fn run_on<O: StepOps>(
    cfg: &TrainBench,
    mut progress: impl FnMut(&str),
    make_ops: impl Fn() -> O,
    reset_peak: impl Fn() -> Result<()>,
    peak: impl Fn() -> Option<u64>,
) -> Result<Vec<ModelResult>> {
    let mut out = Vec::new();
    for name in &cfg.models {
        let (model, params, parameters) = load_random(name)?;
        reset_peak()?;
        let mut llm = Llama::new(make_ops(), &model, &params, Some(AdamWConfig::default()))?;
        drop(params);
        let vocab = model.vocab_size();
        let seqs: Vec<Vec<u32>> = (0..cfg.batch).map(|b| tokens(b, cfg.seq + 1, vocab)).collect();
        let inputs: Vec<u32> = seqs.iter().flat_map(|s| s[..cfg.seq].iter().copied()).collect();
        let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
        progress(&format!("{name}: {parameters} parameters on {}, warm-up step", llm.ops.describe()));
        let timed = timed_steps(name, cfg.steps, &mut progress, || llm.train_step(&inputs, &targets, cfg.batch, 1e-5))?;
        let result = ModelResult { peak_device_bytes: peak(), ..ModelResult::new(name, parameters, cfg, &timed) };
        let generation = timed_generation(
            name,
            cfg,
            vocab,
            &mut progress,
            |prompts| {
                // Warm-up: loads the decode kernels and sizes a device allocator's pool.
                llm.generate(prompts, 2, &[], GREEDY)?;
                reset_peak()
            },
            // Each step reads its logits back, so the clock stops after the last op.
            |prompts, max_new| llm.generate(prompts, max_new, &[], GREEDY),
            &peak,
        )?;
        out.push(ModelResult { generation, ..result });
    }
    Ok(out)
}

/// The GPU engine: [`run_on`] with `CudaOps`; memory is the device allocator's high-water mark.
pub fn run_gpu(
    cfg: &TrainBench,
    gpu: std::sync::Arc<crate::backend::cuda::Gpu>,
    progress: impl FnMut(&str),
) -> Result<Vec<ModelResult>> {
    use crate::backend::cuda::step_ops::CudaOps;
    let reset = || -> Result<()> {
        gpu.sync()?;
        gpu.reset_peak_memory();
        Ok(())
    };
    run_on(cfg, progress, || CudaOps::new(gpu.clone()), reset, || gpu.peak_memory_bytes())
}
