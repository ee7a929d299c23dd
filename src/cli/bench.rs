//! `sage bench`: throughput measurements. Ratios are measured side by side in one run.

use super::{print_json, Ctx};
use crate::assets::{self, Asset};
use crate::backend::cpu::HostOps;
use crate::backend::DeviceChoice;
use crate::models::llama::ChatModel;
use crate::models::sampling::argmax;
use crate::ops::gemm::{sgemm, MatRef};
use crate::user_err;
use crate::util::median;
use anyhow::{Context, Result};
use serde::Serialize;
use std::process::Command;
use std::time::Instant;

const NUMPY_SCRIPT: &str = include_str!("../../benches/numpy_gemm.py");

pub const LONG_ABOUT: &str = "Throughput measurements; performance claims live here, never in timed tests.\n\n\
`sage bench cpu`: f32 GEMM GFLOP/s against numpy's BLAS in the same run with the same threads, and SmolLM2-135M \
decode tokens/s. On a CPU with AVX-512F the GEMM's large products run sage's AVX-512 kernel; SAGE_GEMM=crate keeps \
them on the gemm crate's AVX2 kernels, for a side-by-side run (it applies to every command, and to `bench encoder`).\n\n\
`sage bench encoder`: the DINOv2 ViT-S/14 encoder's CPU images/s (batch 1) at 224 and 448 pixels beside onnxruntime \
running the original ONNX graph with the same threads (benches/onnxruntime_vit.py; needs onnx and onnxruntime from \
PyPI, else the reference column is empty). The two engines' forwards are interleaved round by round, and the ratio is \
the median of the rounds' ratios with its 95% bootstrap interval.\n\n\
`sage bench infer`: LLM inference on the CPU from the GGUF's quantized blocks (llama.cpp's way) beside the same \
model dequantized to f32 and, with --llama-cpp, llama.cpp itself on the same file with the same token ids and threads \
(benches/llama_cpp_infer.py; needs llama-cpp-python from PyPI): prefill tokens/s, greedy decode tokens/s at each \
--batch, the perplexity of a fixed text, the largest logit difference between the two sage paths, and the weights' \
memory. `bash benches/run_infer.sh` installs llama-cpp-python and writes the report to benches/results/.\n\n\
`sage bench quant`: the quantized matrix product y = x·Wᵀ on the largest tensor of each block type in the GGUF \
files, at each --rows: the four-row SIMD kernels the models run (the AVX-512 VNNI build where the CPU has it, else \
AVX2's), the one-row SIMD kernels, the four-row AVX2 build (the same as the first on a CPU without VNNI), the portable \
kernels, and the dequantized tiles with the f32 GEMM, timed in rotation in one run; GMAC/s, weight GB/s, and each variant's largest \
difference from the four-row output.\n\n\
`sage bench kernels`: the CUDA kernels at the shapes of ARCHITECTURE.md §9 (min-cos top-K v2 and v1, fusion attention \
forward+backward, cuBLASLt bf16 GEMM at 4096³ and 8192³, the fused E-DPO loss forward+backward; for information, \
KV-cached decode attention and depthwise convolution forward+backward), medians of CUDA-event timings and the device \
bytes each op allocates. Needs a GPU; `bash benches/run_kernels.sh` runs it beside the PyTorch references and writes \
the report with the ratios to benches/results/.\n\n\
`sage bench train`: a full fine-tuning step (forward, backward, AdamW) at SmolLM2-135M and Qwen2-0.5B shapes with \
random weights, tokens/s and peak memory, then greedy generation tokens/s at each --gen-batch. On a GPU (taken by \
--device auto when one works, required by --device cuda) it runs the device step in bf16 and generates with the \
KV-cached device decode (one batched prefill, one decode step per token for the whole batch), reporting peak device \
memory for each; on the CPU (--device cpu, or auto without a GPU) it runs in f32 and reports peak RSS. `bash benches/run_train.sh` runs HF transformers beside it and writes the report to benches/results/.";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// f32 GEMM GFLOP/s at 1024³ and 2048³ against numpy's BLAS (same run, same threads), and
    /// SmolLM2-135M decode tokens/s.
    Cpu {
        /// GEMM sizes (square).
        #[arg(long, value_delimiter = ',', default_value = "1024,2048")]
        sizes: Vec<usize>,
        /// Timed repetitions per size (after one warm-up); the median is reported.
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        /// Tokens to decode for the SmolLM2 measurement (0 skips it).
        #[arg(long, default_value_t = 64)]
        decode_tokens: usize,
    },
    /// The DINOv2 encoder's CPU throughput (images/s, batch 1) at each input size, beside
    /// onnxruntime running the original ONNX graph in the same run with the same threads.
    Encoder {
        /// Input sides in pixels (multiples of 14).
        #[arg(long, value_delimiter = ',', default_value = "224,448")]
        sizes: Vec<usize>,
        /// Timed rounds per size (after one warm-up): each round times one sage forward and one
        /// onnxruntime forward back to back, which goes first alternating.
        #[arg(long, default_value_t = 11)]
        repeats: usize,
    },
    /// A training step (forward, backward, AdamW) at SmolLM2-135M and Qwen2-0.5B shapes with
    /// random weights, then greedy generation: tokens/s and peak memory, on the GPU when one works
    /// (else the CPU).
    Train {
        /// Model shapes to measure.
        #[arg(long, value_delimiter = ',', default_value = "smollm2-135m,qwen2-0.5b")]
        models: Vec<String>,
        /// Sequences per training step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Timed training steps (after one warm-up step); the median is reported.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Prompt tokens for the generation measurement.
        #[arg(long, default_value_t = 16)]
        gen_prompt: usize,
        /// New tokens per generated sequence (0 skips generation).
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        /// Generation batch sizes.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        gen_batch: Vec<usize>,
    },
    /// LLM inference on the CPU from the GGUF's quantized blocks beside the same model in f32
    /// and llama.cpp on the same file (same token ids, same threads): prefill and greedy decode
    /// tokens/s per batch size, the perplexity of a fixed text, the logit difference, the
    /// weights' memory.
    Infer {
        /// Backbone names (their LLM) or GGUF paths.
        #[arg(long, value_delimiter = ',', default_value = "lite,dino-qwen")]
        models: Vec<String>,
        /// Weight modes to measure.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "quantized,f32")]
        weights: Vec<crate::models::llama::BaseWeights>,
        /// Prompt tokens for the prefill measurement.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Greedy decode steps per batch size.
        #[arg(long, default_value_t = 32)]
        decode_tokens: usize,
        /// Decode batch sizes (sequences decoded together).
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        batch: Vec<usize>,
        /// Tokens of the fixed text (benches/ppl_text.txt) whose perplexity is scored.
        #[arg(long, default_value_t = 128)]
        ppl_tokens: usize,
        /// Timed prefill repetitions; the median is reported.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also run llama.cpp (llama-cpp-python, benches/llama_cpp_infer.py) on the same file.
        #[arg(long)]
        llama_cpp: bool,
    },
    /// The quantized matrix product's variants side by side on the largest GGUF tensor of each
    /// block type: four-row SIMD kernels (what the models run), one-row SIMD kernels, four-row
    /// AVX2 kernels, portable kernels, dequantized tiles + f32 GEMM; GMAC/s and weight GB/s at
    /// each row count.
    Quant {
        /// Backbone names (their LLM) or GGUF paths.
        #[arg(long, value_delimiter = ',', default_value = "lite,dino-qwen")]
        models: Vec<String>,
        /// Rows of activations (1 = a decode step, 16 = batch-16 decode, 32+ = prefill).
        #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
        rows: Vec<usize>,
        /// Timed rounds (after one untimed); the median is reported.
        #[arg(long, default_value_t = 7)]
        repeats: usize,
    },
    /// The CUDA kernels at ARCHITECTURE.md §9's shapes (needs a GPU).
    Kernels {
        /// Small shapes that check the harness in seconds instead of the §9 ones.
        #[arg(long)]
        quick: bool,
        /// Untimed runs before timing.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Timed runs per case; the median is reported.
        #[arg(long, default_value_t = 20)]
        repeats: usize,
    },
}

#[derive(Serialize)]
struct GemmRow {
    n: usize,
    sage_gflops: f64,
    numpy_gflops: Option<f64>,
    ratio: Option<f64>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    match a.what {
        What::Cpu { sizes, repeats, decode_tokens } => run_cpu(ctx, sizes, repeats, decode_tokens),
        What::Kernels { quick, warmup, repeats } => run_kernels(ctx, quick, warmup, repeats),
        What::Encoder { sizes, repeats } => super::bench_encoder::run(ctx, &sizes, repeats),
        What::Quant { models, rows, repeats } => super::bench_quant::run(ctx, &models, &rows, repeats),
        What::Infer { models, weights, prompt_tokens, decode_tokens, batch, ppl_tokens, repeats, llama_cpp } => {
            let cfg = super::bench_infer::InferBench {
                models,
                weights,
                prompt_tokens,
                decode_tokens,
                batches: batch,
                ppl_tokens,
                repeats,
                llama_cpp,
            };
            super::bench_infer::run(ctx, &cfg)
        }
        What::Train { models, batch, seq, steps, gen_prompt, gen_tokens, gen_batch } => {
            let gen_batches = if gen_tokens == 0 { Vec::new() } else { gen_batch };
            let cfg = super::bench_train::TrainBench { models, batch, seq, steps, gen_prompt, gen_tokens, gen_batches };
            run_train(ctx, &cfg)
        }
    }
}

fn run_train(ctx: &Ctx, cfg: &super::bench_train::TrainBench) -> Result<()> {
    if cfg.batch == 0 || cfg.seq < 2 || cfg.steps == 0 || cfg.gen_prompt == 0 || cfg.gen_batches.contains(&0) {
        return Err(user_err!("--batch, --steps, --gen-prompt and --gen-batch must be positive, and --seq at least 2"));
    }
    if cfg.seq + 1 > 2048 || cfg.gen_prompt + cfg.gen_tokens > 2048 {
        return Err(user_err!("sequences are limited to 2048 positions at these shapes"));
    }
    let quiet = ctx.quiet();
    let report = |msg: &str| {
        if !quiet {
            eprintln!("{msg}");
        }
    };
    // `--device cuda` insists on the GPU; `auto` takes it when one works, else the CPU.
    let gpu = match ctx.device {
        DeviceChoice::Cpu => None,
        DeviceChoice::Cuda => Some(
            crate::backend::cuda::Gpu::global()
                .map_err(|e| user_err!("--device cuda: {e:#}; run with --device cpu"))?,
        ),
        DeviceChoice::Auto => crate::backend::cuda::Gpu::global().ok(),
    };
    let (engine, results) = match &gpu {
        Some(g) => {
            let i = g.info();
            let engine = format!("sage (GPU: {}, bf16 with fp32 master weights)", i.name);
            (engine, super::bench_train::run_gpu(cfg, g.clone(), report)?)
        }
        None => ("sage (CPU, f32)".to_string(), super::bench_train::run(cfg, report)?),
    };
    if ctx.json {
        return print_json(&serde_json::json!({
            "engine": engine, "threads": ctx.threads, "steps": cfg.steps, "results": results,
        }));
    }
    let on_gpu = gpu.is_some();
    let threads = if on_gpu { String::new() } else { format!(", {} threads", ctx.threads) };
    println!("training step (full fine-tune, AdamW), {engine}{threads}, median of {} steps", cfg.steps);
    let gib = |b: Option<u64>| b.map(|b| format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)).unwrap_or("-".into());
    for r in &results {
        let peak = if on_gpu {
            format!("peak device memory {}", gib(r.peak_device_bytes))
        } else {
            format!("peak RSS {}", gib(r.peak_rss_bytes))
        };
        println!(
            "  {:<13} {:>5.0} M params  batch {} × {} tokens: {:>9.2} ms/step  {:>9.1} tokens/s  {peak}",
            r.model,
            r.parameters as f64 / 1e6,
            r.batch,
            r.seq,
            r.step_ms,
            r.train_tokens_per_second,
        );
        for g in &r.generation {
            let peak =
                g.peak_device_bytes.map(|b| format!("  peak device memory {}", gib(Some(b)))).unwrap_or_default();
            println!("      generation batch {:>2}: {:>8.1} new tokens/s{peak}", g.batch, g.tokens_per_second);
        }
    }
    Ok(())
}

fn run_kernels(ctx: &Ctx, quick: bool, warmup: usize, repeats: usize) -> Result<()> {
    use super::bench_kernels::{self, Sizes};
    if repeats == 0 {
        return Err(user_err!("--repeats must be positive"));
    }
    let gpu =
        crate::backend::cuda::Gpu::global().map_err(|e| user_err!("sage bench kernels needs a CUDA GPU: {e:#}"))?;
    let sizes = if quick { Sizes::quick() } else { Sizes::design() };
    let info = gpu.info().clone();
    if !ctx.json {
        println!(
            "{} (sm_{}, {} SMs, driver {}); median of {repeats} after {warmup} warm-up runs",
            info.name, info.arch, info.sm_count, info.driver_version
        );
    }
    let json = ctx.json;
    let cases = bench_kernels::run(&gpu, &sizes, warmup, repeats, |c| {
        if !json {
            let extra = c.tflops.map(|t| format!("  {t:.1} TFLOP/s")).unwrap_or_default();
            println!(
                "  {:<20} {:<9} {:>10.3} ms  {:>9.1} MiB allocated{extra}  {}",
                c.op,
                c.variant,
                c.median_ms,
                c.allocated_bytes as f64 / (1u64 << 20) as f64,
                c.shape
            );
        }
    })?;
    if json {
        return print_json(&serde_json::json!({
            "device": info, "quick": quick, "warmup": warmup, "repeats": repeats, "cases": cases,
        }));
    }
    Ok(())
}

fn run_cpu(ctx: &Ctx, sizes: Vec<usize>, repeats: usize, decode_tokens: usize) -> Result<()> {
    if repeats == 0 || sizes.contains(&0) {
        return Err(user_err!("--repeats and every --sizes entry must be positive"));
    }
    let mut rows = Vec::new();
    for &n in &sizes {
        rows.push(GemmRow { n, sage_gflops: sage_gemm_gflops(n, repeats), numpy_gflops: None, ratio: None });
    }
    let numpy = numpy_gemm(ctx, &sizes, repeats);
    let numpy_note = match &numpy {
        Ok(v) => {
            for r in &mut rows {
                let g = v["results"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["n"].as_u64() == Some(r.n as u64)))
                    .and_then(|x| x["gflops"].as_f64());
                r.numpy_gflops = g;
                r.ratio = g.map(|g| r.sage_gflops / g);
            }
            format!("numpy {} ({})", v["numpy"].as_str().unwrap_or("?"), v["blas"].as_str().unwrap_or("?"))
        }
        Err(e) => format!("numpy unavailable: {e:#}"),
    };
    let decode = if decode_tokens > 0 { Some(decode_tokens_per_sec(decode_tokens)?) } else { None };
    if ctx.json {
        return print_json(&serde_json::json!({
            "threads": ctx.threads, "gemm": rows, "reference": numpy_note,
            "smollm2_decode_tokens_per_second": decode.map(|d| d.0), "decode_tokens": decode_tokens,
            "prefill_tokens_per_second": decode.map(|d| d.1),
        }));
    }
    println!("f32 GEMM, {} threads, median of {repeats} (reference: {numpy_note})", ctx.threads);
    println!("  {:>6}  {:>12}  {:>12}  {:>8}", "n", "sage GF/s", "numpy GF/s", "ratio");
    for r in &rows {
        let f = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
        println!("  {:>6}  {:>12.1}  {:>12}  {:>8}", r.n, r.sage_gflops, f(r.numpy_gflops, 1), f(r.ratio, 3));
    }
    if let Some((tps, prefill)) = decode {
        println!(
            "SmolLM2-135M (Q4_1 weights dequantised to f32): decode {tps:.1} tokens/s, prefill {prefill:.1} tokens/s"
        );
    }
    Ok(())
}

fn sage_gemm_gflops(n: usize, repeats: usize) -> f64 {
    let a: Vec<f32> = (0..n * n).map(|i| ((i * 7919 % 1000) as f32) * 1e-3 - 0.5).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i * 104729 % 1000) as f32) * 1e-3 - 0.5).collect();
    let mut c = vec![0.0f32; n * n];
    sgemm(n, n, n, MatRef::rows(&a, n), MatRef::rows(&b, n), &mut c, false);
    let times: Vec<f64> = (0..repeats)
        .map(|_| {
            let t = Instant::now();
            sgemm(n, n, n, MatRef::rows(&a, n), MatRef::rows(&b, n), &mut c, false);
            t.elapsed().as_secs_f64()
        })
        .collect();
    2.0 * (n as f64).powi(3) / median(&times) / 1e9
}

fn numpy_gemm(ctx: &Ctx, sizes: &[usize], repeats: usize) -> Result<serde_json::Value> {
    let list: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let t = ctx.threads.to_string();
    let out = Command::new(assets::python())
        .args(["-c", NUMPY_SCRIPT, &list.join(","), &repeats.to_string()])
        .env("OPENBLAS_NUM_THREADS", &t)
        .env("OMP_NUM_THREADS", &t)
        .env("MKL_NUM_THREADS", &t)
        .output()
        .context("running python3 (set SAGE_PYTHON to another interpreter)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{} (pip install numpy)", err.lines().last().unwrap_or("python failed"));
    }
    serde_json::from_slice(&out.stdout).context("parsing the numpy benchmark's output")
}

/// (decode tokens/s, prefill tokens/s) for SmolLM2 on a fixed prompt, greedy, no early stop, on
/// the CPU op set.
fn decode_tokens_per_sec(n: usize) -> Result<(f64, f64)> {
    let m = ChatModel::load(HostOps, &Asset::SmolLm2Gguf.path()?, 1024, crate::models::llama::BaseWeights::F32)?;
    let ids = m.tokenizer.encode("Describe, in detail, how a solar cell can crack during manufacturing.", false)?;
    let llm = &m.model;
    let mut cache = llm.new_cache(1, ids.len() + n)?;
    let t = Instant::now();
    let h = llm.prefill(llm.embed_tokens(&ids)?, ids.len(), &[ids.len()], &mut cache)?;
    let mut next = argmax(&llm.logits_of_rows(&h, &[ids.len() as u32 - 1])?);
    let prefill = ids.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for _ in 0..n {
        let h = llm.decode(llm.embed_tokens(&[next])?, &[0], &mut cache)?;
        next = argmax(&llm.logits_of_rows(&h, &[0])?);
    }
    Ok((n as f64 / t.elapsed().as_secs_f64(), prefill))
}
