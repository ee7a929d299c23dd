//! `sage bench train`: a full training step (forward, backward, AdamW) and generation at LLaMA
//! model shapes with random weights, tokens/s and peak memory. `benches/run_train.sh` runs it
//! beside the HF transformers counterpart (`benches/train_hf.py`, same config, batch and sequence)
//! and writes the report with the ratios to `benches/results/`.
//!
//! Two engines: [`run`] is the CPU step (`TrainableLlama`, f32); [`run_gpu`] is the GPU step
//! (`DeviceLlama` on `CudaOps`: bf16 weights and activations, fp32 masters and moments), whose
//! target is ≥ 1.3× HF transformers tokens/s (ARCHITECTURE.md §9). Both then generate greedily at each
//! `--gen-batch`: the CPU with `TrainableLlama::generate_batch` (prompts prefilled one at a time),
//! the GPU with the KV-cached device decode (`llama_step::decode`: one batched prefill, then one
//! decode step for the whole batch per token).

use crate::models::llama::Sampling;
use crate::models::llama_train::{Finetune, TrainableLlama};
use crate::models::random_init::{preset, RandomLlama};
use crate::train::optim::{AdamW, AdamWConfig};
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
fn load_random(name: &str) -> Result<(TrainableLlama, ParamSet, usize)> {
    let config = preset(name)?;
    reset_peak_rss();
    let mut params = ParamSet::new();
    let weights = RandomLlama { config: config.clone(), seed: 0 };
    let model = TrainableLlama::load(&weights, config, &Finetune::Full, &mut params, &mut SeedRng::new(0, 0))?;
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

pub fn run(cfg: &TrainBench, mut progress: impl FnMut(&str)) -> Result<Vec<ModelResult>> {
    let mut out = Vec::new();
    for name in &cfg.models {
        let (model, mut params, parameters) = load_random(name)?;
        let mut opt = AdamW::new(AdamWConfig::default());
        let vocab = model.vocab_size();
        progress(&format!("{name}: {parameters} parameters, warm-up step"));
        let timed = timed_steps(name, cfg.steps, &mut progress, || {
            params.zero_grad();
            let mut total = 0.0;
            for b in 0..cfg.batch {
                let ids = tokens(b, cfg.seq + 1, vocab);
                let x = model.embed(&params, &ids[..cfg.seq]);
                let (loss, dx) = model.loss(&mut params, &x, cfg.seq, &ids[1..], true)?;
                model.embed_backward(&mut params, &ids[..cfg.seq], &dx.expect("asked for the input gradient"));
                total += loss;
            }
            params.scale_grads(1.0 / cfg.batch as f32);
            opt.step(&mut params, 1e-5);
            Ok(total / cfg.batch as f32)
        })?;
        let generation = timed_generation(
            name,
            cfg,
            vocab,
            &mut progress,
            |_| Ok(()),
            |prompts, max_new| {
                let xs: Vec<Vec<f32>> = prompts.iter().map(|p| model.embed(&params, p)).collect();
                let batch: Vec<(&[f32], usize)> =
                    xs.iter().zip(prompts).map(|(x, p)| (x.as_slice(), p.len())).collect();
                model.generate_batch(&params, &batch, max_new, &[], GREEDY)
            },
            || None,
        )?;
        out.push(ModelResult { generation, ..ModelResult::new(name, parameters, cfg, &timed) });
    }
    Ok(out)
}

/// The GPU engine: the same models, batch, sequences and optimizer as [`run`], each step the
/// device step of `models::llama_step` (timed from launch to the loss read back, which waits for
/// the whole step). Weights are drawn on the host as in [`run`] and copied once.
pub fn run_gpu(
    cfg: &TrainBench,
    gpu: std::sync::Arc<crate::backend::cuda::Gpu>,
    mut progress: impl FnMut(&str),
) -> Result<Vec<ModelResult>> {
    use crate::backend::cuda::step_ops::CudaOps;
    use crate::models::llama_step::DeviceLlama;
    use crate::opset::Buffers;
    let mut out = Vec::new();
    for name in &cfg.models {
        let (model, params, parameters) = load_random(name)?;
        gpu.sync()?;
        gpu.reset_peak_memory();
        let mut dev = DeviceLlama::new(CudaOps::new(gpu.clone()), &model, &params, AdamWConfig::default())?;
        drop(params);
        let seqs: Vec<Vec<u32>> = (0..cfg.batch).map(|b| tokens(b, cfg.seq + 1, model.vocab_size())).collect();
        let inputs: Vec<u32> = seqs.iter().flat_map(|s| s[..cfg.seq].iter().copied()).collect();
        let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
        progress(&format!("{name}: {parameters} parameters on {}, warm-up step", dev.ops.describe()));
        let timed = timed_steps(name, cfg.steps, &mut progress, || dev.train_step(&inputs, &targets, cfg.batch, 1e-5))?;
        let result = ModelResult {
            peak_device_bytes: gpu.peak_memory_bytes(),
            ..ModelResult::new(name, parameters, cfg, &timed)
        };
        let generation = timed_generation(
            name,
            cfg,
            model.vocab_size(),
            &mut progress,
            |prompts| {
                // Warm-up: loads the decode kernels and sizes the allocator's pool.
                dev.generate(prompts, 2, &[], GREEDY)?;
                gpu.sync()?;
                gpu.reset_peak_memory();
                Ok(())
            },
            // Each step reads its logits back, so the clock stops after the last kernel.
            |prompts, max_new| dev.generate(prompts, max_new, &[], GREEDY),
            || gpu.peak_memory_bytes(),
        )?;
        out.push(ModelResult { generation, ..result });
    }
    Ok(out)
}
