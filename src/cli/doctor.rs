//! `sage doctor`: what this machine would use, and why.

use super::{print_json, Ctx};
use crate::assets::{self, Asset, PACKAGES};
use anyhow::Result;
use std::path::Path;

#[derive(clap::Args, Debug)]
pub struct Args {}

fn cpu_features() -> Vec<&'static str> {
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if std::is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if std::is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
    }
    f
}

/// What doctor found for one asset.
enum AssetStatus {
    Missing,
    /// Loads; for a GGUF, what its weights take in memory.
    Ok(Option<WeightMemory>),
    /// Present, but its loader refuses it: the loader's message.
    Invalid(String),
}

/// A GGUF's weights in memory, from its tensor table: with `[llm] base = "quantized"` the
/// quantized tensors stay as their blocks (the others become f32), and every tensor in f32. A
/// quantized token table and LM head are read from their blocks by every stage, training
/// included, so no f32 copy of them is held (ARCHITECTURE.md §15).
#[derive(Clone, Copy, serde::Serialize)]
struct WeightMemory {
    quantized_mib: f64,
    f32_mib: f64,
}

impl WeightMemory {
    fn of(g: &crate::formats::gguf::Gguf) -> WeightMemory {
        let mib = |bytes: usize| bytes as f64 / (1u64 << 20) as f64;
        let (mut quantized, mut dense) = (0usize, 0usize);
        for t in g.tensors.values() {
            let f32_bytes = 4 * t.shape.iter().product::<usize>();
            dense += f32_bytes;
            quantized += if t.ggml_type.quant().is_some() { t.n_bytes } else { f32_bytes };
        }
        WeightMemory { quantized_mib: mib(quantized), f32_mib: mib(dense) }
    }
}

/// Opens a present model asset as its loader does, with the same validation (hyperparameters in
/// range and consistent with the tensors, offsets, pickle limits); data assets only need to exist.
fn check(a: Asset, path: &Path) -> Result<Option<WeightMemory>> {
    use crate::formats::{gguf::Gguf, tokenizer::TextTokenizer};
    use crate::models::{bert, efficientnet::EfficientNetLite, llama::LlamaConfig};
    match a {
        Asset::SmolLm2Gguf | Asset::Qwen25Gguf => {
            let g = Gguf::open(path)?;
            LlamaConfig::from_gguf(&g)?;
            TextTokenizer::from_gguf(&g)?;
            return Ok(Some(WeightMemory::of(&g)));
        }
        Asset::MiniLmDir => bert::open_checked(path).map(|_| ())?,
        Asset::EfficientNetPth => EfficientNetLite::load(path).map(|_| ())?,
        _ => {}
    }
    Ok(None)
}

fn status(a: Asset) -> AssetStatus {
    match a.path() {
        Err(_) => AssetStatus::Missing,
        Ok(p) => match check(a, &p) {
            Ok(memory) => AssetStatus::Ok(memory),
            Err(e) => AssetStatus::Invalid(format!("{e:#}")),
        },
    }
}

pub fn run(ctx: &Ctx, _a: Args) -> Result<()> {
    let statuses: Vec<(Asset, AssetStatus)> = Asset::ALL.iter().map(|&a| (a, status(a))).collect();
    let assets_json: Vec<serde_json::Value> = statuses
        .iter()
        .map(|(a, st)| {
            let (present, valid, problem, memory) = match st {
                AssetStatus::Missing => (false, None, None, None),
                AssetStatus::Ok(memory) => (true, Some(true), None, *memory),
                AssetStatus::Invalid(msg) => (true, Some(false), Some(msg.as_str()), None),
            };
            serde_json::json!({
                "asset": a.describe(), "present": present, "valid": valid, "problem": problem, "path": a.location(),
                "weights_memory": memory,
            })
        })
        .collect();
    let invalid = statuses.iter().filter(|(_, st)| matches!(st, AssetStatus::Invalid(_))).count();
    // The whole report comes first; an asset its loader would refuse then makes doctor fail.
    let verdict = || -> Result<()> {
        if invalid > 0 {
            crate::user_bail!(
                "{invalid} asset(s) are present but invalid (see above); re-download them with `sage fetch --force`"
            );
        }
        Ok(())
    };
    let mut packages: Vec<serde_json::Value> = PACKAGES
        .iter()
        .filter(|p| p.group != assets::Group::Part)
        .map(|p| serde_json::json!({ "package": format!("{}=={}", p.name, p.version), "installed": assets::is_installed(p) }))
        .collect();
    packages.extend(assets::JOINED.iter().map(|j| {
        let parts: Vec<&str> = j.parts.iter().map(|(name, _)| *name).collect();
        serde_json::json!({ "package": j.file, "joined_from": parts, "installed": j.is_installed() })
    }));
    // Each backbone is usable when both its files are present and valid.
    let ready = |a: Asset| statuses.iter().any(|(x, st)| *x == a && matches!(st, AssetStatus::Ok(_)));
    let backbones: Vec<serde_json::Value> = crate::models::backbone::BUILTINS
        .iter()
        .map(|b| {
            serde_json::json!({
                "name": b.name, "description": b.description,
                "vision": b.vision_asset.location(), "llm": b.llm_asset.location(),
                "ready": ready(b.vision_asset) && ready(b.llm_asset),
            })
        })
        .collect();
    let cuda = crate::backend::cuda_status();
    let kernels = kernel_cache_report();
    let report = serde_json::json!({
        "sage_version": env!("CARGO_PKG_VERSION"),
        "rustc": env!("SAGE_RUSTC_VERSION"),
        "target": env!("SAGE_BUILD_TARGET"),
        "profile": env!("SAGE_BUILD_PROFILE"),
        "backend": ctx.backend.backend,
        "backend_reason": ctx.backend.reason,
        "cuda": cuda,
        "kernels_cache": kernels,
        "threads": ctx.threads,
        "cpu_features": cpu_features(),
        "quant_isa": crate::quant::isa(),
        "sage_home": assets::sage_home(),
        "assets": assets_json,
        "backbones": backbones,
        "packages": packages,
    });
    if ctx.json {
        print_json(&report)?;
        return verdict();
    }
    println!(
        "sage {} ({}, {} build, {})",
        env!("CARGO_PKG_VERSION"),
        env!("SAGE_BUILD_TARGET"),
        env!("SAGE_BUILD_PROFILE"),
        env!("SAGE_RUSTC_VERSION")
    );
    println!("backend:  {} — {}", ctx.backend.backend, ctx.backend.reason);
    match cuda["available"].as_bool() {
        Some(true) => {
            let d = &cuda["device"];
            println!(
                "gpu:      {} (compute capability {}.{}, {} SMs, {:.1} GiB, driver {}): the SAGE kernels and cuBLASLt GEMMs run on it",
                d["name"].as_str().unwrap_or("?"),
                d["compute_capability"][0],
                d["compute_capability"][1],
                d["sm_count"],
                d["total_memory_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
                d["driver_version"]
            );
        }
        _ => println!("gpu:      none — {}", cuda["reason"].as_str().unwrap_or("?")),
    }
    println!("kernels:  PTX cache {}", crate::backend::nvrtc::cache_dir().display());
    for k in kernels.as_array().into_iter().flatten() {
        let mark =
            |arch: &str| if k[arch]["cached"].as_bool() == Some(true) { "cached" } else { "compiled on first use" };
        println!("  {:<16} sm_80: {:<22} sm_90: {}", k["file"].as_str().unwrap_or("?"), mark("sm_80"), mark("sm_90"));
    }
    println!(
        "threads:  {} (CPU features: {}; quantized kernels: {:?})",
        ctx.threads,
        cpu_features().join(", "),
        crate::quant::isa()
    );
    println!("SAGE_HOME: {}", assets::sage_home().display());
    println!("assets:");
    for (a, st) in &statuses {
        let mark = match st {
            AssetStatus::Missing => "missing",
            AssetStatus::Ok(_) => "ok",
            AssetStatus::Invalid(_) => "invalid",
        };
        println!("  [{mark}] {:<50} {}", a.describe(), a.location().display());
        match st {
            AssetStatus::Invalid(msg) => println!("      {msg}"),
            AssetStatus::Ok(Some(m)) => println!(
                "      weights in memory: {:.1} MiB from the quantized blocks ([llm] base = \"quantized\"), {:.1} MiB in f32",
                m.quantized_mib, m.f32_mib
            ),
            _ => {}
        }
    }
    println!("backbones:");
    for b in &backbones {
        let mark = if b["ready"].as_bool() == Some(true) { "ready" } else { "missing files" };
        println!("  [{mark}] {:<10} {}", b["name"].as_str().unwrap_or("?"), b["description"].as_str().unwrap_or(""));
    }
    if statuses.iter().any(|(_, st)| matches!(st, AssetStatus::Missing)) {
        println!("run `sage fetch` to download the missing assets");
    }
    verdict()
}

/// For each kernel file and architecture: is its PTX in the on-disk cache (`sage kernels build`)?
fn kernel_cache_report() -> serde_json::Value {
    use crate::backend::cuda::kernels;
    use crate::backend::nvrtc::Arch;
    let rows: Vec<serde_json::Value> = kernels::ALL
        .iter()
        .map(|f| {
            let entry = |a: Arch| {
                let p = kernels::cache_path(f, a);
                serde_json::json!({ "cached": p.exists(), "path": p })
            };
            serde_json::json!({ "file": f.name, "sm_80": entry(Arch::SM80), "sm_90": entry(Arch::SM90) })
        })
        .collect();
    serde_json::Value::Array(rows)
}
