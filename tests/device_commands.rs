//! `--device cuda` reaches the GPU path of `sage infer`, `sage eval` and `sage demo` (the emulated
//! device stands in for a GPU: a stand-in driver that runs the kernels on the CPU). Each command
//! used to be refused at the door although it has a device path.

mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EMULATED: &str = "sage emulated device (CPU, tests/emu)";

fn on_emulated_device(cmd: &mut assert_cmd::Command, lib: &Path) -> std::process::Output {
    cmd.env("LD_LIBRARY_PATH", common::emu::library_path(lib)).output().unwrap()
}

/// A one-step SFE run on the CPU over two ELPV pairs: enough of a checkpoint for the answering
/// paths. Returns the data folder and the run.
fn tiny_run(dir: &Path) -> (PathBuf, PathBuf) {
    let tables = "[model]\nfacts = \"none\"\nk = 4\nimage_pool = 7\nfusion_dim = 32\nfusion_heads = 2\n\
                  [llm]\nfinetune = \"lora\"\nlora_rank = 4\n\
                  [train]\nsteps = 1\nbatch = 1\nlr = 1e-3\nseed = 5\nval_questions = 0\ncheckpoint_every = 1\n";
    tiny_sfe_run(dir, 2, "", tables)
}

#[test]
fn infer_and_eval_answer_on_the_device_with_device_cuda() {
    let lib = common::emu::emulated_device();
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = tiny_run(dir.path());
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
            .arg(data.join("test.json")),
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

/// `sage grpo --device cuda` trains on the device: a format cold-start step (supervised, no
/// sampling: its loss is the CPU run's to bf16 precision) and a GRPO step (sampled groups on the
/// device's batched decode, rewards, the clipped update with its KL), validation before and after.
/// Ignored by default: the emulated device runs the kernels one thread at a time on the CPU, and
/// these two steps take about 20 minutes on two cores; run it with
/// `cargo nextest run --release --run-ignored all -E 'test(grpo_trains_on_the_device)'`.
#[test]
#[ignore = "about 20 minutes on the emulated device"]
fn grpo_trains_on_the_device_with_device_cuda() {
    let lib = common::emu::emulated_device();
    let dir = tempfile::tempdir().unwrap();
    let (data, run) = tiny_run(dir.path());
    let cfg = dir.path().join("grpo.toml");
    std::fs::write(
        &cfg,
        format!(
            "sfe = \"{run}\"\n[data]\ntrain = \"{d}/train.json\"\nval = \"{d}/test.json\"\nmax_train_items = 2\n\
             [grpo]\ngroup = 3\nmax_new = 8\nsft_steps = 1\nresample_tries = 3\n\
             [grpo.reward]\nanswer_only = false\noverlong_buffer = 0\noverlong_penalty = 0.0\n\
             [train]\nsteps = 2\nbatch = 1\nlr = 1e-3\nseed = 1\nval_questions = 1\ncheckpoint_every = 1\n",
            run = run.display(),
            d = data.display()
        ),
    )
    .unwrap();
    let (cpu, gpu) = (dir.path().join("grpo-cpu"), dir.path().join("grpo-gpu"));
    let out = sage().args(["--device", "cpu", "grpo", "--json", "--config"]).arg(&cfg).arg("--out").arg(&cpu).output();
    let out = out.unwrap();
    assert!(out.status.success(), "grpo on the CPU: {}", String::from_utf8_lossy(&out.stderr));
    // Without --json: the line naming the op set goes to stderr.
    let out = on_emulated_device(
        sage().args(["--device", "cuda", "grpo", "--config"]).arg(&cfg).arg("--out").arg(&gpu),
        &lib,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "grpo --device cuda: {stderr}");
    assert!(stderr.contains(&format!("grpo: training on {EMULATED}")), "grpo did not train on the device: {stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(gpu.join("final.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 2, "{summary}");
    let lines = |run: &Path| -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(run.join("log.jsonl")).unwrap();
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    };
    let (c, g) = (lines(&cpu), lines(&gpu));
    assert_eq!((c.len(), g.len()), (2, 2));
    let (lc, lg) = (c[0]["loss"].as_f64().unwrap(), g[0]["loss"].as_f64().unwrap());
    // bf16 weights and activations on the device, f32 on the CPU.
    assert!((lc - lg).abs() <= 0.03 * lc.abs(), "cold-start loss: CPU {lc}, device {lg}");
    assert_eq!(g[1]["phase"], "grpo");
    for k in ["reward", "reward_format", "reward_class", "uniform_groups", "loss"] {
        assert!(g[1][k].as_f64().is_some_and(f64::is_finite), "{k}: {}", g[1]);
    }
    // Eight-token answers of a tiny model may all score alike; then the group was sampled again
    // three times before it was skipped. Otherwise the update ran on the device.
    if g[1]["updated"] == true {
        assert!(
            g[1]["kl"].as_f64().is_some_and(f64::is_finite) && g[1]["grad_norm"].as_f64().unwrap() > 0.0,
            "{}",
            g[1]
        );
    } else {
        assert_eq!(
            (g[1]["resampled_groups"].as_u64(), g[1]["uniform_groups"].as_f64()),
            (Some(3), Some(1.0)),
            "{}",
            g[1]
        );
    }
    assert!(g[1]["sample_answer"].as_str().unwrap().starts_with("<think>"), "{}", g[1]);
    assert!(gpu.join("weights-000002.safetensors").exists());
}

/// `sage map --device cuda`: DINOv2 and the memory-bank search (the fused min-cosine kernel,
/// through the op set) run on the device, for one pair, `--eval` on the MVTec-layout fixture with
/// a one-reference bank, and the ELPV few-shot protocol with a coreset bank; each against the same
/// command on the CPU. At 112 px (8×8 patches) the emulated device takes seconds. Tolerances: the
/// device's encoder runs in bf16 (patch tokens at cosine ≥ 0.9998 to the CPU's, tests/dinov2.rs),
/// which moved the pair's map by 0.005 at most when this test was written; 0.02 is allowed.
#[test]
fn map_runs_on_the_device_with_device_cuda() {
    let lib = common::emu::emulated_device();
    let fixture = common::emu::root().join("tests/fixtures/mvtec");
    let both = |args: &[&str]| -> (serde_json::Value, serde_json::Value) {
        let mut cpu = sage();
        let cpu = cpu.args(["--device", "cpu", "--json", "map", "--encoder", "dinov2", "--size", "112"]).args(args);
        let cpu = cpu.output().unwrap();
        assert!(cpu.status.success(), "map {args:?} on the CPU: {}", String::from_utf8_lossy(&cpu.stderr));
        let mut dev = sage();
        let dev = dev.args(["--device", "cuda", "--json", "map", "--encoder", "dinov2", "--size", "112"]).args(args);
        let dev = on_emulated_device(dev, &lib);
        assert!(dev.status.success(), "map {args:?} --device cuda: {}", String::from_utf8_lossy(&dev.stderr));
        let (c, d) = (stdout_json(&cpu), stdout_json(&dev));
        assert!(d["device"].as_str().unwrap().starts_with(EMULATED), "map {args:?} did not run on the device: {d}");
        assert_eq!(c["device"], "cpu reference ops (f32)");
        (c, d)
    };
    let near = |what: &str, a: &serde_json::Value, b: &serde_json::Value, tol: f64| {
        let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
        assert!((a - b).abs() <= tol, "{what}: CPU {a}, device {b}");
    };

    let (test, reference) =
        (fixture.join("bottle/test/broken_large/000.png"), fixture.join("bottle/train/good/000.png"));
    let (c, d) = both(&["--test", test.to_str().unwrap(), "--reference", reference.to_str().unwrap()]);
    let (cm, dm) = (c["result"]["map"].as_array().unwrap(), d["result"]["map"].as_array().unwrap());
    assert_eq!(cm.len(), 64);
    for (i, (a, b)) in cm.iter().zip(dm).enumerate() {
        near(&format!("map[{i}]"), a, b, 0.02);
    }
    near("image score", &c["result"]["score"], &d["result"]["score"], 0.02);

    let (c, d) = both(&["--eval", "--data", fixture.to_str().unwrap(), "--shots", "1", "--mask-side", "64"]);
    assert_eq!(c["overall"]["images"], d["overall"]["images"]);
    for key in ["image_auroc", "pixel_auroc", "pro"] {
        near(key, &c["overall"][key], &d["overall"][key], 0.02);
    }

    let (c, d) = both(&["--eval-elpv", "--shots", "1,full", "--limit", "3"]);
    let (cr, dr) = (c["rows"].as_array().unwrap(), d["rows"].as_array().unwrap());
    assert_eq!((cr.len(), dr.len()), (2, 2));
    for (a, b) in cr.iter().zip(dr) {
        assert_eq!(a["bank_patches"], b["bank_patches"], "bank sizes");
        assert!(b["image_auroc"]["estimate"].as_f64().is_some_and(f64::is_finite), "{b}");
    }
}
