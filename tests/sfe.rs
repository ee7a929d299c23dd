//! `sage sfe` and `sage infer` end to end on a small ELPV AD-PL set with the real SmolLM2 and
//! EfficientNet weights: a run killed with SIGKILL resumes to exactly the loss curve of an
//! uninterrupted run, checkpoints are never left corrupt, and a checkpoint answers questions.

mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn build_data(dir: &Path) {
    let out = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "3", "--seed", "0", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn config(dir: &Path, steps: u64) -> std::path::PathBuf {
    let cfg = format!(
        r#"
[data]
train = "{d}/train.json"
val = "{d}/test.json"
[model]
facts = "none"
k = 4
image_pool = 7
fusion_dim = 32
fusion_heads = 2
[llm]
finetune = "lora"
lora_rank = 4
[train]
steps = {steps}
batch = 1
lr = 1e-3
seed = 5
val_questions = 2
checkpoint_every = 2
"#,
        d = dir.display()
    );
    let p = dir.join("sfe.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

fn losses(run: &Path) -> Vec<(u64, f32)> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()? as f32)))
        .collect()
}

#[test]
fn sigkill_then_resume_continues_the_loss_curve_exactly() {
    let dir = tempfile::tempdir().unwrap();
    build_data(dir.path());
    let cfg = config(dir.path(), 6);

    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let out = sage().args(["sfe", "--json", "--config"]).arg(&cfg).arg("--out").arg(&a).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let full = losses(&a);
    assert_eq!(full.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);

    // Start the same run, SIGKILL it once its first checkpoint is committed.
    let bin = assert_cmd::cargo::cargo_bin("sage");
    let mut child = std::process::Command::new(&bin)
        .args(["sfe", "--json", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&b)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !b.join("state.json").exists() {
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(700)); // land somewhere inside a later step
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // Whatever moment it died at, the committed checkpoint is whole.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("state.json")).unwrap()).unwrap();
    let step = state["step"].as_u64().unwrap();
    assert!((2..6).contains(&step), "killed at step {step}");
    assert!(sage::formats::safetensors::SafetensorsFile::open(&b.join(state["weights"].as_str().unwrap())).is_ok());

    // A fresh start into the same folder is refused; --resume continues.
    let out = sage().args(["sfe", "--config"]).arg(&cfg).arg("--out").arg(&b).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    // --resume with another learning rate is refused, naming the key; the checkpoint is untouched.
    let other = dir.path().join("other-lr.toml");
    std::fs::write(&other, std::fs::read_to_string(&cfg).unwrap().replace("lr = 1e-3", "lr = 2e-3")).unwrap();
    let out = sage().args(["sfe", "--resume", "--config"]).arg(&other).arg("--out").arg(&b).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.lr") && err.contains("different config"), "{err}");
    let out = sage().args(["sfe", "--json", "--resume", "--config"]).arg(&cfg).arg("--out").arg(&b).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resumed = losses(&b);
    assert_eq!(resumed, full, "the resumed loss curve differs from the uninterrupted one");
}

#[test]
fn infer_answers_from_a_checkpoint_and_config_errors_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    build_data(dir.path());
    let cfg = config(dir.path(), 2);
    let run = dir.path().join("run");
    let out = sage().args(["sfe", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let map = dir.path().join("map.png");
    let out = sage()
        .args([
            "infer",
            "--json",
            "--max-tokens",
            "12",
            "--question",
            "Is there a defect in the test cell?",
            "--checkpoint",
        ])
        .arg(&run)
        .arg("--test")
        .arg(elpv_image("cell0002.png"))
        .arg("--reference")
        .arg(elpv_image("cell0004.png"))
        .arg("--map")
        .arg(&map)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    assert!(!v["answer"].as_str().unwrap().is_empty());
    assert_eq!(v["selected_patches"].as_array().unwrap().len(), 4);
    assert!(map.exists());

    // `sage eval` answers every question of the first item (its questions decode as one batch),
    // and a second run gives the same answers.
    let eval = |name: &str| {
        let answers = dir.path().join(name);
        let out = sage()
            .args(["eval", "--json", "--judge", "none", "--max-items", "1", "--max-tokens", "6", "--checkpoint"])
            .arg(&run)
            .arg("--data")
            .arg(dir.path().join("test.json"))
            .arg("--save-answers")
            .arg(&answers)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(answers).unwrap()
    };
    let first = eval("a1.jsonl");
    let lines: Vec<serde_json::Value> = first.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(lines.len() >= 2, "one answer per question: {first}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["question"], i, "{first}");
        assert!(l["answer"].is_string());
    }
    assert_eq!(eval("a2.jsonl"), first, "eval is deterministic");

    // First-token conclusions on two items, a full answer for the first only, and the HTML page.
    let (ft, html) = (dir.path().join("ft.jsonl"), dir.path().join("page/report.html"));
    let out = sage()
        .args(["eval", "--json", "--judge", "none", "--max-items", "2", "--max-tokens", "6", "--first-token"])
        .args(["--generate-items", "1", "--checkpoint"])
        .arg(&run)
        .arg("--data")
        .arg(dir.path().join("test.json"))
        .arg("--save-first-token")
        .arg(&ft)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = &report["adpl"];
    assert_eq!(a["conclusions"], "first_token");
    let questions = report["questions"].as_u64().unwrap() as usize;
    assert_eq!(a["overall"]["total"].as_u64().unwrap() as usize, questions);
    assert_eq!(a["generated"].as_u64().unwrap() as usize, a["pairs"][0]["right"].as_array().unwrap().len());
    assert!(a["intervals"]["metrics"]["average"]["lo"].is_number(), "{a}");
    let records: Vec<serde_json::Value> =
        std::fs::read_to_string(&ft).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), questions);
    for r in &records {
        assert_eq!(r["candidates"], serde_json::json!(["Yes", "No"]));
        let p: f64 = r["probs"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).sum();
        assert!((p - 1.0).abs() < 1e-9 && r["mass"].as_f64().unwrap() <= 1.0 + 1e-9, "{r}");
    }
    let page = std::fs::read_to_string(&html).unwrap();
    assert_eq!(page.matches("<article class=\"pair\"").count(), 2, "one card per pair");
    assert!(page.contains("data:image/") && !page.contains("http://") && !page.contains("https://"));

    std::fs::write(
        dir.path().join("bad.toml"),
        std::fs::read_to_string(&cfg).unwrap().replace("lora_rank", "lora_rnk"),
    )
    .unwrap();
    let out = sage().args(["sfe", "--config"]).arg(dir.path().join("bad.toml")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lora_rnk"));

    // An unknown backbone is refused with the list; a checkpoint refuses another backbone by name.
    std::fs::write(
        dir.path().join("bad.toml"),
        std::fs::read_to_string(&cfg).unwrap().replace("[model]\n", "[model]\nbackbone = \"internvl2\"\n"),
    )
    .unwrap();
    let out = sage()
        .args(["sfe", "--config"])
        .arg(dir.path().join("bad.toml"))
        .arg("--out")
        .arg(dir.path().join("r2"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unknown backbone `internvl2`") && err.contains("dino-qwen"), "{err}");
    let out = sage()
        .args(["infer", "--backbone", "dino-qwen", "--question", "Is it normal?", "--checkpoint"])
        .arg(&run)
        .arg("--test")
        .arg(elpv_image("cell0002.png"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("trained on backbone `lite`, not `dino-qwen`"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["backbone"]["name"], "lite", "the checkpoint records its backbone");
    assert_eq!(state["backbone"]["llm_sha256"].as_str().unwrap().len(), 64, "and the hashes of its files");
}

/// Exact resume: a run stopped after its second step (the test knob `SAGE_TEST_NONFINITE_STEP`
/// makes step 3 non-finite, which stops the run with the checkpoint of step 2 intact) and then
/// resumed logs the same three steps, loss and gradient norm for loss and norm, as a run that was
/// never stopped, and ends with the same checkpoint files and validation.
#[test]
fn a_run_stopped_and_resumed_equals_one_never_stopped() {
    let dir = tempfile::tempdir().unwrap();
    build_data(dir.path());
    let cfg = config(dir.path(), 3);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("batch = 1", "batch = 2");
    std::fs::write(&cfg, text).unwrap();
    let (straight, resumed) = (dir.path().join("straight"), dir.path().join("resumed"));
    let run = |out: &Path, resume: bool, knob: Option<&str>| {
        let mut cmd = sage();
        cmd.args(["sfe", "--json", "--config"]).arg(&cfg).arg("--out").arg(out);
        if resume {
            cmd.arg("--resume");
        }
        if let Some(k) = knob {
            cmd.env("SAGE_TEST_NONFINITE_STEP", k);
        }
        cmd.output().unwrap()
    };
    let a = run(&straight, false, None);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let stopped = run(&resumed, false, Some("3"));
    assert_eq!(stopped.status.code(), Some(2), "{}", String::from_utf8_lossy(&stopped.stderr));
    assert_eq!(losses(&resumed).len(), 2, "stopped after step 2");
    let b = run(&resumed, true, None);
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let log = |p: &Path| -> Vec<(u64, f64, f64)> {
        std::fs::read_to_string(p.join("log.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?, v["grad_norm"].as_f64()?)))
            .collect()
    };
    assert_eq!(log(&straight).len(), 3);
    assert_eq!(log(&straight), log(&resumed), "the resumed run's steps are the uninterrupted run's");
    let names = |p: &Path| -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(names(&straight), names(&resumed), "the same checkpoint files");
    assert_eq!(stdout_json(&a)["val"], stdout_json(&b)["val"]);
}

/// `--resume` of a finished run says so and changes no byte; a run killed between its last
/// checkpoint and `final.json` is completed with the last logged loss (not null).
#[test]
fn resume_of_a_finished_run_changes_nothing_and_an_unfinished_one_completes() {
    let dir = tempfile::tempdir().unwrap();
    build_data(dir.path());
    let cfg = config(dir.path(), 2);
    let run = dir.path().join("run");
    let out = sage().args(["sfe", "--json", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let finished = stdout_json(&out);
    let last = *losses(&run).last().unwrap();
    assert_eq!(last.0, 2);
    assert_eq!(finished["final_loss"].as_f64().unwrap() as f32, last.1);
    let before = snapshot(&run);

    let again = sage().args(["sfe", "--resume", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    let said = String::from_utf8_lossy(&again.stdout);
    assert!(said.contains("is finished") && said.contains("step 2"), "{said}");
    assert!(snapshot(&run) == before, "a finished run's files changed on --resume");

    // Killed after the last checkpoint, before final.json: --resume completes it.
    std::fs::remove_file(run.join("final.json")).unwrap();
    let out = sage().args(["sfe", "--json", "--resume", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let completed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("final.json")).unwrap()).unwrap();
    assert_eq!(completed["final_loss"].as_f64().map(|l| l as f32), Some(last.1), "{completed}");
    for key in ["seconds_per_step", "tokens_per_second"] {
        assert_eq!(completed[key], finished[key], "{key} comes from the log");
    }
    assert_eq!(completed["val"], finished["val"]);
    assert_eq!(losses(&run), losses_of(&before), "the log is as it was");
}

fn losses_of(files: &std::collections::BTreeMap<String, Vec<u8>>) -> Vec<(u64, f32)> {
    String::from_utf8_lossy(&files["log.jsonl"])
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()? as f32)))
        .collect()
}

/// A non-finite step stops the training loop at that step: a user error naming it, no log line, no checkpoint for it, and
/// every saved weight finite. The test-only knob `SAGE_TEST_NONFINITE_STEP` makes step 2
/// non-finite; it is set only in a child process running this test alone, so no other test in
/// this binary sees it.
#[test]
fn non_finite_step_stops_training_before_anything_is_written() {
    const KNOB: &str = "SAGE_TEST_NONFINITE_STEP";
    if std::env::var_os(KNOB).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "non_finite_step_stops_training_before_anything_is_written", "--nocapture"])
            .env(KNOB, "2")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    build_data(dir.path());
    let cfg_path = config(dir.path(), 3);
    let text = std::fs::read_to_string(&cfg_path).unwrap().replace("checkpoint_every = 2", "checkpoint_every = 1");
    std::fs::write(&cfg_path, text).unwrap();
    {
        let out = dir.path().join("run");
        let cfg: sage::sfe::config::SfeConfig = sage::config::load(&cfg_path).unwrap();
        let mut run = sage::stage::Session::new(cfg, &out, &[]).unwrap();
        let result = sage::sfe::run::train(&mut run, sage::backend::cpu::HostOps, false, true);
        let err = result.err().expect("the poisoned step stops the run");
        let msg = format!("{err:#}");
        assert!(sage::error::is_user_error(&err), "{msg}");
        assert!(msg.contains("stopped at step 2") && msg.contains("checkpoint of step 1 is intact"), "{msg}");
        assert_eq!(losses(&out).iter().map(|l| l.0).collect::<Vec<_>>(), vec![1], "no log line for step 2");
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("state.json")).unwrap()).unwrap();
        assert_eq!(state["step"], 1);
        let files = snapshot(&out);
        assert!(!files.keys().any(|f| f.contains("000002") || f == "final.json"), "{:?}", files.keys());
        let weights =
            sage::formats::safetensors::SafetensorsFile::open(&out.join("weights-000001.safetensors")).unwrap();
        for name in weights.names() {
            let v = weights.tensor(&name).unwrap().into_f32s().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{name} holds a non-finite value");
        }
    }
}

#[test]
fn a_run_folder_another_process_holds_is_refused_at_once_naming_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    build_data(dir.path());
    let cfg = config(dir.path(), 2);
    let run = dir.path().join("run");
    // This test process plays the first writer (the lock is the OS's, so any process will do).
    let held = sage::lock::WriterLock::for_dir(&run).unwrap();
    let t0 = Instant::now();
    let out = sage().args(["sfe", "--config"]).arg(&cfg).arg("--out").arg(&run).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("PID {}", std::process::id())) && err.contains(".sage.lock"), "{err}");
    assert!(t0.elapsed() < Duration::from_secs(10), "refused after {:?}, not at once", t0.elapsed());
    let written: Vec<_> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(written, [".sage.lock"], "the refused run wrote into the folder");
    drop(held);
}

/// `model.map_cue`: the SFE run calibrates the cue's levels on its training file's normal pairs
/// (20 here, also when it trains on fewer items), saves them in the checkpoint's config, and `--resume` with the levels still empty in
/// the config file passes the config check; too few normal pairs, or levels of the wrong shape,
/// are refused naming the key.
#[test]
fn the_map_cue_is_calibrated_when_the_run_starts_and_a_resume_accepts_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "12", "--seed", "0", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let with_cue = |steps: u64, levels: &str| {
        let text = std::fs::read_to_string(config(&data, steps)).unwrap();
        let p = dir.path().join("cue.toml");
        std::fs::write(&p, text.replace("[model]\n", &format!("[model]\nmap_cue = true\n{levels}"))).unwrap();
        p
    };
    let run = dir.path().join("run");
    let out = sage().args(["sfe", "--config"]).arg(with_cue(2, "")).arg("--out").arg(&run).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("from 20 normal training pairs"));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap();
    let levels: Vec<f64> = state["config"]["model"]["map_cue_levels"]
        .as_array()
        .unwrap_or_else(|| panic!("no levels saved: {state}"))
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert!(levels.len() == 3 && levels.windows(2).all(|w| w[0] <= w[1]) && levels[0] > 0.0, "{levels:?}");

    // Trained on 4 items, calibrated on the whole file: the same levels.
    let small = dir.path().join("small");
    let cfg = with_cue(1, "");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("[data]\n", "[data]\nmax_train_items = 4\n");
    std::fs::write(&cfg, text).unwrap();
    let out = sage().args(["sfe", "--config"]).arg(&cfg).arg("--out").arg(&small).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("from 20 normal training pairs"), "{out:?}");
    let small_state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(small.join("state.json")).unwrap()).unwrap();
    assert_eq!(small_state["config"]["model"]["map_cue_levels"], state["config"]["model"]["map_cue_levels"]);

    let resumed =
        sage().args(["sfe", "--resume", "--config"]).arg(with_cue(3, "")).arg("--out").arg(&run).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(losses(&run).last().unwrap().0, 3);

    let bad = sage()
        .args(["sfe", "--config"])
        .arg(with_cue(1, "map_cue_levels = [0.5, 0.2, 0.9]\n"))
        .arg("--out")
        .arg(dir.path().join("bad"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("model.map_cue_levels") && err.contains("ascending"), "{err}");

    build_data(dir.path());
    let text =
        std::fs::read_to_string(config(dir.path(), 1)).unwrap().replace("[model]\n", "[model]\nmap_cue = true\n");
    std::fs::write(dir.path().join("few.toml"), text).unwrap();
    let few = sage()
        .args(["sfe", "--config"])
        .arg(dir.path().join("few.toml"))
        .arg("--out")
        .arg(dir.path().join("few"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&few.stderr);
    assert!(!few.status.success() && err.contains("normal pairs") && err.contains("map_cue_levels"), "{err}");
}
