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
    assert_eq!(v["assets"].as_array().unwrap().len(), 5);
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
        "data", "facts", "score", "edpo", "eval", "demo",
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
