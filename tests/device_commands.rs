//! `--device cuda` reaches the GPU path of `sage infer`, `sage eval` and `sage demo` (the emulated
//! device stands in for a GPU: a stand-in driver that runs the kernels on the CPU). Each command
//! used to be refused at the door although it has a device path.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EMULATED: &str = "sage emulated device (CPU, tests/emu)";

fn on_emulated_device(cmd: &mut assert_cmd::Command, lib: &Path) -> std::process::Output {
    cmd.env("LD_LIBRARY_PATH", common::emu::library_path(lib)).output().unwrap()
}

/// A one-step SFE run on the CPU: enough of a checkpoint for the answering paths.
fn tiny_run(dir: &Path) -> std::path::PathBuf {
    let out =
        sage().args(["data", "build", "--source", "elpv", "--limit", "2", "--seed", "0", "--out"]).arg(dir).output();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cfg = dir.join("sfe.toml");
    std::fs::write(
        &cfg,
        format!(
            "[data]\ntrain = \"{d}/train.json\"\nval = \"{d}/test.json\"\n[model]\nfacts = \"none\"\nk = 4\n\
             image_pool = 7\nfusion_dim = 32\nfusion_heads = 2\n[llm]\nfinetune = \"lora\"\nlora_rank = 4\n\
             [train]\nsteps = 1\nbatch = 1\nlr = 1e-3\nseed = 5\nval_questions = 0\ncheckpoint_every = 1\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let run = dir.join("run");
    let out = sage().args(["--device", "cpu", "sfe", "--json", "--config"]).arg(&cfg).arg("--out").arg(&run).output();
    let out = out.unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    run
}

#[test]
fn infer_and_eval_answer_on_the_device_with_device_cuda() {
    let lib = common::emu::emulated_device();
    let dir = tempfile::tempdir().unwrap();
    let run = tiny_run(dir.path());
    let out = on_emulated_device(
        sage()
            .args(["--device", "cuda", "--json", "infer", "--max-tokens", "2", "--question", "Is there a defect?"])
            .arg("--checkpoint")
            .arg(&run)
            .arg("--test")
            .arg(elpv_image("cell0002.png"))
            .arg("--reference")
            .arg(elpv_image("cell0004.png")),
        &lib,
    );
    assert!(out.status.success(), "infer --device cuda: {}", String::from_utf8_lossy(&out.stderr));
    let device = stdout_json(&out)["device"].as_str().unwrap().to_string();
    assert!(device.starts_with(EMULATED), "infer did not answer on the device: {device}");

    let out = on_emulated_device(
        sage()
            .args(["--device", "cuda", "--json", "eval", "--judge", "none", "--max-items", "1", "--max-tokens", "2"])
            .arg("--checkpoint")
            .arg(&run)
            .arg("--data")
            .arg(dir.path().join("test.json")),
        &lib,
    );
    assert!(out.status.success(), "eval --device cuda: {}", String::from_utf8_lossy(&out.stderr));
    let model = stdout_json(&out)["model"].as_str().unwrap().to_string();
    assert!(model.contains(&format!(" on {EMULATED}")), "eval did not answer on the device: {model}");
}

/// The demo hands `--device cuda` to its model stages: it is stopped once the first one starts
/// (the whole pipeline on the emulated device would take hours).
#[test]
fn demo_runs_its_model_stages_with_device_cuda() {
    let lib = common::emu::emulated_device();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(assert_cmd::cargo::cargo_bin("sage"))
        .args(["--device", "cuda", "demo", "--quick", "--out"])
        .arg(dir.path())
        .env("LD_LIBRARY_PATH", common::emu::library_path(&lib))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let mut seen = Vec::new();
    let mut sfe_line = None;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("▶ sage ") {
            if line.contains(" sfe ") {
                sfe_line = Some(line);
                break;
            }
            seen.push(line);
        }
        if t0.elapsed() > Duration::from_secs(600) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let sfe_line = sfe_line.unwrap_or_else(|| panic!("the demo never reached its SFE stage; stages seen: {seen:#?}"));
    assert!(sfe_line.starts_with("▶ sage --device cuda sfe "), "{sfe_line}");
    // The stages before it stay on the CPU.
    assert!(seen.iter().all(|l| !l.contains("--device cuda")), "{seen:#?}");
}
