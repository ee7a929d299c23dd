//! `benches/report.py` turns the two benchmark outputs into ratios against ARCHITECTURE.md §9's targets.
//! The inputs are synthetic fixtures (tests/fixtures/bench/, device "Synthetic test device"), not
//! measurements: this checks the arithmetic and the verdicts, which the GPU run relies on.

use std::path::Path;
use std::process::Command;

/// Runs `benches/<script>` on two fixtures; returns the JSON report and the markdown.
fn report(script: &str, sage_fixture: &str, other_fixture: &str) -> (serde_json::Value, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fx = root.join("tests/fixtures/bench");
    let dir = tempfile::tempdir().unwrap();
    let stem = dir.path().join("report");
    let out = Command::new(sage::assets::python())
        .arg(root.join("benches").join(script))
        .arg(fx.join(sage_fixture))
        .arg(fx.join(other_fixture))
        .arg("--out")
        .arg(&stem)
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json = serde_json::from_str(&std::fs::read_to_string(stem.with_extension("json")).unwrap()).unwrap();
    (json, std::fs::read_to_string(stem.with_extension("md")).unwrap())
}

#[test]
fn bench_report_computes_ratios_and_verdicts_against_the_targets() {
    let (report, md) = report("report.py", "sage.json", "torch.json");
    let rows = report["comparisons"].as_array().unwrap();
    let find = |op: &str, torch: &str, kind: &str| {
        rows.iter()
            .find(|r| r["op"] == op && r["torch"] == torch && r["kind"] == kind)
            .unwrap_or_else(|| panic!("no {op} vs {torch} ({kind}) row in {rows:#?}"))
    };
    let ratio = |r: &serde_json::Value| r["ratio"].as_f64().unwrap();
    // min-cos: 8 / 2 = 4× eager (target 3: met), 2.5 / 2 = 1.25× compile (target 1.5: missed).
    let r = find("mincos_topk", "eager", "speedup");
    assert!((ratio(r) - 4.0).abs() < 1e-9 && r["met"] == true);
    let r = find("mincos_topk", "compile", "speedup");
    assert!((ratio(r) - 1.25).abs() < 1e-9 && r["met"] == false);
    // fusion: 3 / 1 = 3× eager (target 2). No SDPA row in the fixture: no comparison made up.
    assert!((ratio(find("fusion_attn_fwd_bwd", "eager", "speedup")) - 3.0).abs() < 1e-9);
    assert!(!rows.iter().any(|r| r["op"] == "fusion_attn_fwd_bwd" && r["torch"] == "sdpa"));
    // GEMM: 90 / 100 TFLOP/s = 0.9 (target 0.95: missed).
    let r = find("gemm_bf16", "torch.matmul", "throughput");
    assert!((ratio(r) - 0.9).abs() < 1e-9 && r["met"] == false);
    // E-DPO: 6 / 3 = 2× (met), memory 10 / 20 MiB = 0.5 (target ≤ 0.25: missed).
    assert!((ratio(find("edpo_loss_fwd_bwd", "unfused", "speedup")) - 2.0).abs() < 1e-9);
    let r = find("edpo_loss_fwd_bwd", "unfused", "memory");
    assert!((ratio(r) - 0.5).abs() < 1e-9 && r["met"] == false);
    // Decode attention: each variant against SDPA at its own batch only (0.04 / 0.02 = 2× and
    // 0.02 / 0.004 = 5×), never across batches; information rows, no verdict.
    let decode: Vec<_> = rows.iter().filter(|r| r["op"] == "decode_attn").collect();
    assert_eq!(decode.len(), 4, "{decode:#?}");
    let at =
        |v: &str, b: u64| decode.iter().find(|r| r["sage"] == v && r["shape"]["B"] == b).map(|r| ratio(r)).unwrap();
    assert!((at("v1", 16) - 2.0).abs() < 1e-9 && (at("v2", 1) - 5.0).abs() < 1e-9);
    assert!(decode.iter().all(|r| r["met"].is_null()));
    assert!(md.contains("# Kernel benchmark: Synthetic test device") && md.contains("| **no** |"), "{md}");
}

/// `benches/report_train.py` on synthetic GPU outputs: ratios, the ≥ 1.3× verdict count, device
/// peak memory taken over the process RSS, and generation tokens/s and peak memory side by side
/// (only where both sides measured the batch).
#[test]
fn bench_train_report_takes_device_peaks_and_counts_the_gpu_target() {
    let (report, md) = report("report_train.py", "train_sage_gpu.json", "train_hf_gpu.json");
    let rows = report["comparisons"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    // 81920 / 51200 = 1.6 (met); 20480 / 20480 = 1.0 (missed).
    assert!((rows[0]["train_ratio"].as_f64().unwrap() - 1.6).abs() < 1e-9);
    assert!((rows[1]["train_ratio"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(rows[0]["sage_peak_bytes"].as_u64(), Some(6 << 30), "device peak, not the process RSS");
    assert!(md.contains("(GPU)") && md.contains("met in 1 of 2 comparisons"), "{md}");
    assert!(md.contains("| smollm2-135m | sdpa | 8 × 1024 | 81920.0 | 51200.0 | 1.60 | 6.00 | 8.00 |"), "{md}");
    // Generation: 180 / 90 = 2.0 at batch 1, peaks 1 GiB (sage) and 2 GiB (HF); qwen2 has none.
    assert_eq!(rows[0]["generation"].as_array().unwrap().len(), 1);
    assert!((rows[0]["generation"][0]["ratio"].as_f64().unwrap() - 2.0).abs() < 1e-9);
    assert!(rows[1]["generation"].as_array().unwrap().is_empty());
    assert!(md.contains("| smollm2-135m | sdpa | 1 | 180.0 | 90.0 | 2.00 | 1.00 | 2.00 |"), "{md}");
    assert!(!md.contains("generation was not measured"), "{md}");
}
