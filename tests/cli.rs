//! Commands that need no model: doctor, fetch idempotence, help texts.

mod common;
use common::*;

#[test]
fn doctor_json_names_the_backend_and_why() {
    let out = sage().args(["doctor", "--json"]).output().unwrap();
    assert!(out.status.success());
    let v = stdout_json(&out);
    assert_eq!(v["backend"], "cpu");
    assert!(v["backend_reason"].as_str().unwrap().contains("--device auto"));
    assert!(v["threads"].as_u64().unwrap() >= 1);
    assert_eq!(v["assets"].as_array().unwrap().len(), sage::assets::Asset::ALL.len());
    // No GPU in CI: the CUDA status says why, and the kernel cache lists every kernel file.
    if v["cuda"]["available"] == false {
        assert!(!v["cuda"]["reason"].as_str().unwrap().is_empty());
    }
    assert_eq!(v["kernels_cache"].as_array().unwrap().len(), sage::backend::cuda::kernels::ALL.len());
    // Each present GGUF says what its weights take in memory, kept as blocks and in f32: the
    // figures `sage bench infer` measures on the loaded model (SmolLM2 Q4_1: 92.1 and 513.1 MiB).
    let smollm2 = sage::assets::Asset::SmolLm2Gguf.describe();
    let entry = v["assets"].as_array().unwrap().iter().find(|a| a["asset"] == smollm2).unwrap();
    if entry["present"] == true {
        let m = &entry["weights_memory"];
        let (q, f) = (m["quantized_mib"].as_f64().unwrap(), m["f32_mib"].as_f64().unwrap());
        assert!((q - 92.1).abs() < 0.1 && (f - 513.1).abs() < 0.1, "SmolLM2 weights: {q} / {f} MiB");
    }
}

/// Without a working GPU, the GPU commands refuse with the reason instead of falling back.
#[test]
fn gpu_commands_without_a_gpu_say_why() {
    if sage::backend::cuda::Gpu::global().is_ok() {
        println!("skipped: this machine has a working GPU");
        return;
    }
    let out = sage().args(["bench", "kernels", "--quick"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a user error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs a CUDA GPU"));
    let out = sage().args(["--device", "cuda", "doctor"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device cuda"));
    // The GPU training benchmark refuses too, naming the way back to the CPU engine.
    let out = sage().args(["--device", "cuda", "bench", "train", "--models", "smollm2-135m"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a user error");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device cpu"));
}

#[test]
fn kernels_build_fills_the_ptx_cache_that_doctor_reports() {
    let _ = sage::assets::cuda_toolchain().expect("the CUDA wheels (sage fetch --cuda)");
    let out = sage().args(["kernels", "build", "--arch", "90", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let ks = v["kernels"].as_array().unwrap();
    assert_eq!(ks.len(), sage::backend::cuda::kernels::ALL.len());
    for k in ks {
        let ptx = std::fs::read_to_string(k["path"].as_str().unwrap()).unwrap();
        assert!(ptx.contains(".target sm_90") && ptx.contains(".version 9.0"), "{}", k["file"]);
        for e in k["entries"].as_array().unwrap() {
            assert!(ptx.contains(&format!(".entry {}(", e.as_str().unwrap())), "{} lacks {e}", k["file"]);
        }
    }
    let d = stdout_json(&sage().args(["doctor", "--json"]).output().unwrap());
    assert!(d["kernels_cache"].as_array().unwrap().iter().all(|k| k["sm_90"]["cached"] == true), "{d}");
    let bad = sage().args(["kernels", "build", "--arch", "75"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn bench_train_reports_tokens_per_second_and_memory() {
    let out = sage()
        .args(["bench", "train", "--json", "--models", "smollm2-135m", "--seq", "8", "--steps", "1"])
        .args(["--gen-prompt", "4", "--gen-tokens", "2", "--gen-batch", "1,2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let r = &v["results"][0];
    assert_eq!(r["parameters"], 134_515_008, "SmolLM2-135M's parameter count");
    assert!(r["train_tokens_per_second"].as_f64().unwrap() > 0.0);
    // Random init: the first loss is near ln(vocabulary) = 10.8.
    let l = r["loss_first"].as_f64().unwrap();
    assert!((9.0..12.0).contains(&l), "{l}");
    assert_eq!(r["generation"].as_array().unwrap().len(), 2);
    assert_eq!(r["generation"][1]["new_tokens"], 2);
    let bad = sage().args(["bench", "train", "--models", "gpt-5"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

/// `bench infer` on SmolLM2 at toy sizes: both weight modes, the quantized one a fraction of the
/// f32 one's memory with a perplexity near it (the int8 activations' rounding); llama.cpp is
/// reported unavailable when not asked for.
#[test]
fn bench_infer_reports_both_weight_modes() {
    let out = sage()
        .args(["--json", "bench", "infer", "--models", "lite", "--prompt-tokens", "8", "--decode-tokens", "2"])
        .args(["--batch", "1,2", "--ppl-tokens", "24", "--repeats", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let m = &v["models"][0];
    let modes = m["modes"].as_array().unwrap();
    assert_eq!(modes.len(), 2);
    let (q, f) = (&modes[0], &modes[1]);
    assert_eq!((q["weights"].as_str(), f["weights"].as_str()), (Some("quantized"), Some("f32")));
    assert!(q["weight_mib"].as_f64().unwrap() < 0.25 * f["weight_mib"].as_f64().unwrap(), "{m}");
    assert_eq!(q["weight_memory"]["quant_tensors"], 30 * 7 + 1, "SmolLM2: every linear layer and the tied head");
    let rel = m["ppl_relative_diff"].as_f64().unwrap();
    assert!(rel.abs() < 0.05, "perplexity {rel:+} relative to f32");
    assert!(q["decode_tokens_per_second"]["2"].as_f64().unwrap() > 0.0);
    assert!(m["llama_cpp"]["unavailable"].is_string());
}

/// `bench quant` on SmolLM2's two block types at 1 and 5 rows (the four-row kernel and a
/// one-row remainder): every variant timed, and the outputs agree — the integer variants within
/// the int8 activations' rounding of one another, the exact tiles within it of them.
#[test]
fn bench_quant_times_every_variant_and_they_agree() {
    let out = sage()
        .args(["--json", "bench", "quant", "--models", "lite", "--rows", "1,5", "--repeats", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let cases = v["cases"].as_array().unwrap();
    let types: std::collections::BTreeSet<&str> = cases.iter().map(|c| c["qtype"].as_str().unwrap()).collect();
    assert_eq!(types, ["Q4_1", "Q8_0"].into_iter().collect(), "SmolLM2's block types");
    assert_eq!(cases.len(), 4);
    for c in cases {
        let t = c["timings"].as_array().unwrap();
        let names: Vec<&str> = t.iter().map(|x| x["variant"].as_str().unwrap()).collect();
        assert_eq!(names, ["four-row", "one-row", "four-row-avx2", "portable", "tiles"]);
        // The AVX2 build gives the models' kernels (VNNI's, or the same AVX2 ones) bit for bit.
        assert_eq!(t[2]["max_relative_difference"].as_f64(), Some(0.0), "{c}");
        for x in t {
            assert!(x["gmac_per_second"].as_f64().unwrap() > 0.0, "{c}");
            let d = x["max_relative_difference"].as_f64().unwrap();
            let bound = if x["variant"] == "tiles" { 2e-2 } else { 1e-4 };
            assert!(d <= bound, "{} {} at {} rows: {d} from the four-row output", c["tensor"], x["variant"], c["rows"]);
        }
    }
}

/// `generate --weights` picks the path and says so; the quantized model holds its table and head
/// only as blocks.
#[test]
fn generate_reports_its_weights() {
    for w in ["quantized", "f32"] {
        let out = sage()
            .args(["--json", "generate", "--prompt", "Say hi.", "--max-tokens", "3", "--weights", w])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v = stdout_json(&out);
        assert_eq!(v["weights"], w);
        let dense = v["weight_memory"]["dense_values"].as_u64().unwrap();
        if w == "quantized" {
            // Norms only: 30 blocks × 2 × 576 + 576.
            assert_eq!(dense, 61 * 576, "{v}");
        } else {
            assert_eq!(dense, 134_515_008);
        }
    }
}

#[test]
fn fetch_is_idempotent_once_assets_are_present() {
    let _ = smollm2_gguf(); // fails with "run sage fetch" if absent
    let out = sage().args(["fetch", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    assert!(v["packages"].as_array().unwrap().iter().all(|p| p["status"] == "present"), "{v}");
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "fetch", "generate", "embed", "classify", "map", "convert", "doctor", "plugins", "sfe", "infer", "bench",
        "data", "facts", "score", "edpo", "grpo", "eval", "demo", "kernels",
    ] {
        let out = sage().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help failed");
        assert!(String::from_utf8_lossy(&out.stdout).contains("Usage: sage"), "{sub}");
    }
}

/// `--help` shows each subcommand's long explanation, not only its one-line summary.
#[test]
fn long_help_explains_the_training_and_evaluation_commands() {
    for (sub, phrase) in [
        ("sfe", "best-ranked answer"),
        ("edpo", "frozen SFE model"),
        ("grpo", "Hungarian algorithm"),
        ("eval", "Acc-G"),
        ("demo", "ablation table"),
        ("score", "resume"),
        ("infer", "selected patches"),
    ] {
        let out = sage().args([sub, "--help"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(text.contains(phrase), "`sage {sub} --help` lacks {phrase:?}: {text}");
    }
}

#[test]
fn bench_cpu_reports_gemm_and_decode_in_json() {
    let _ = smollm2_gguf();
    let out = sage()
        .args(["bench", "cpu", "--json", "--sizes", "64,96", "--repeats", "2", "--decode-tokens", "3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    let rows = v["gemm"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["sage_gflops"].as_f64().unwrap() > 0.0));
    assert!(v["smollm2_decode_tokens_per_second"].as_f64().unwrap() > 0.0);
}
