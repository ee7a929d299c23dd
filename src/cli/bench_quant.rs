//! `sage bench quant`: the quantized matrix product's variants side by side on real GGUF
//! tensors — the four-row SIMD kernels (what the models run), the one-row SIMD kernels, the
//! four-row AVX2 build (beside VNNI's on a CPU that has both), the portable kernels, and the
//! dequantized tiles with the f32 GEMM — at each row count, timed in
//! rotation within one run so that the machine's drift hits every variant alike.

use super::{print_json, Ctx};
use crate::formats::gguf::Gguf;
use crate::quant::matmul::{qmatmul_int8_with, qmatmul_tiles, Kernels};
use crate::quant::QMatrix;
use crate::user_err;
use crate::util::median;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

/// One variant's figures at one row count.
#[derive(Serialize)]
struct Timing {
    variant: &'static str,
    milliseconds: f64,
    /// Weight bytes read per second (each product reads the matrix once).
    weight_gb_per_second: f64,
    /// Multiply-adds per second, `rows × out × in / time`.
    gmac_per_second: f64,
    /// `max |y − y_best| / max |y_best|`: how far this variant's output is from the four-row
    /// kernels' (int8 activations for the integer variants; exact weights for the tiles).
    max_relative_difference: f64,
}

#[derive(Serialize)]
struct Case {
    model: String,
    tensor: String,
    qtype: String,
    out: usize,
    cols: usize,
    rows: usize,
    timings: Vec<Timing>,
}

/// The variants by name: the integer path with its kernels, or (`None`) the dequantized tiles.
/// The first is the reference the others' outputs are compared with.
const VARIANTS: [(&str, Option<Kernels>); 5] = [
    ("four-row", Some(Kernels::Best)),
    ("one-row", Some(Kernels::OneRow)),
    ("four-row-avx2", Some(Kernels::Avx2)),
    ("portable", Some(Kernels::Portable)),
    ("tiles", None),
];

fn product(kernels: Option<Kernels>, x: &[f32], rows: usize, w: &QMatrix, y: &mut [f32]) {
    match kernels {
        Some(k) => qmatmul_int8_with(k, x, rows, w, y, false),
        None => qmatmul_tiles(x, rows, w, y, false),
    }
}

/// For each model, the largest tensor of each quantized type in it.
fn tensors(g: &Gguf) -> Vec<(String, QMatrix)> {
    let mut by_type: std::collections::BTreeMap<String, (String, QMatrix)> = Default::default();
    for name in g.tensors.keys() {
        let Some(w) = g.quantized(name) else { continue };
        let key = w.qtype.to_string();
        if by_type.get(&key).is_none_or(|(_, best)| w.nbytes() > best.nbytes()) {
            by_type.insert(key, (name.clone(), w));
        }
    }
    by_type.into_values().collect()
}

pub fn run(ctx: &Ctx, models: &[String], row_counts: &[usize], repeats: usize) -> Result<()> {
    if repeats == 0 || row_counts.contains(&0) {
        return Err(user_err!("--repeats and every --rows entry must be positive"));
    }
    let mut cases = Vec::new();
    for model in models {
        let g = Gguf::open(&super::bench_infer::resolve(model)?)?;
        for (tensor, w) in tensors(&g) {
            for &rows in row_counts {
                let x: Vec<f32> = (0..rows * w.cols).map(|i| ((i * 7919 % 2003) as f32 / 1001.5 - 1.0) * 0.5).collect();
                let mut ys: Vec<Vec<f32>> = VARIANTS.iter().map(|_| vec![0.0; rows * w.rows]).collect();
                let mut times: Vec<Vec<f64>> = vec![Vec::with_capacity(repeats); VARIANTS.len()];
                // One untimed round, then the variants in rotation.
                for round in 0..=repeats {
                    for (v, (_, kernels)) in VARIANTS.iter().enumerate() {
                        let t = Instant::now();
                        product(*kernels, &x, rows, &w, &mut ys[v]);
                        if round > 0 {
                            times[v].push(t.elapsed().as_secs_f64());
                        }
                    }
                }
                let scale = ys[0].iter().fold(0f32, |m, v| m.max(v.abs())).max(f32::MIN_POSITIVE) as f64;
                let timings = VARIANTS
                    .iter()
                    .zip(&times)
                    .zip(&ys)
                    .map(|((&(variant, _), t), y)| {
                        let s = median(t);
                        let diff = y.iter().zip(&ys[0]).fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
                        Timing {
                            variant,
                            milliseconds: s * 1e3,
                            weight_gb_per_second: w.nbytes() as f64 / s / 1e9,
                            gmac_per_second: (rows * w.rows * w.cols) as f64 / s / 1e9,
                            max_relative_difference: diff / scale,
                        }
                    })
                    .collect();
                cases.push(Case {
                    model: model.clone(),
                    tensor: tensor.clone(),
                    qtype: w.qtype.to_string(),
                    out: w.rows,
                    cols: w.cols,
                    rows,
                    timings,
                });
            }
        }
    }
    if ctx.json {
        return print_json(&serde_json::json!({
            "threads": ctx.threads, "isa": crate::quant::isa(), "repeats": repeats, "cases": cases,
        }));
    }
    println!(
        "quantized y = x·Wᵀ, {} threads, kernels {:?}, median of {repeats} (variants timed in rotation); GMAC/s, and × of four-row",
        ctx.threads,
        crate::quant::isa()
    );
    println!(
        "  {:<10} {:<28} {:<5} {:>11} {:>4}  {:>9} {:>16} {:>16} {:>16} {:>16}",
        "model", "tensor", "type", "out×in", "rows", "four-row", "one-row", "four-row avx2", "portable", "tiles"
    );
    for c in &cases {
        let best = c.timings[0].gmac_per_second;
        let other = |i: usize| {
            let g = c.timings[i].gmac_per_second;
            format!("{g:.2} ({:.2}×)", best / g)
        };
        println!(
            "  {:<10} {:<28} {:<5} {:>11} {:>4}  {:>9.2} {:>16} {:>16} {:>16} {:>16}",
            c.model,
            c.tensor,
            c.qtype,
            format!("{}×{}", c.out, c.cols),
            c.rows,
            best,
            other(1),
            other(2),
            other(3),
            other(4)
        );
    }
    Ok(())
}
