//! `sage grpo` end to end on a tiny real ELPV set with the real SmolLM2 and EfficientNet
//! weights, from a 2-step `sage sfe` run:
//! - a run SIGKILLed mid-way (inside its GRPO steps) resumes to exactly the uninterrupted log
//!   (losses, rewards, sampled answers) and weights;
//! - the log carries the reward and its parts, the share of uniform groups, the held-out figures
//!   before (at the start and after the format cold start) and after;
//! - `sage eval` reads the GRPO checkpoint; the user errors exit 2 and say what to do.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Setup {
    dir: tempfile::TempDir,
    data: PathBuf,
    sfe: PathBuf,
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let tables = r#"
[model]
facts = "none"
image_pool = 7
[llm]
finetune = "lora"
lora_rank = 4
base = "quantized"
[train]
steps = 2
batch = 1
lr = 1e-3
seed = 5
val_questions = 1
checkpoint_every = 2
"#;
    let (data, sfe) = tiny_sfe_run(dir.path(), 3, "max_train_items = 4", tables);
    Setup { dir, data, sfe }
}

/// Six steps: two of format cold start, then two sampled batches of two updates each (μ = 2), a
/// checkpoint every `every` steps.
fn grpo_config(s: &Setup, name: &str, every: u64) -> PathBuf {
    let cfg = format!(
        r#"
sfe = "{sfe}"
[data]
train = "{d}/train.json"
val = "{d}/test.json"
max_train_items = 4
[grpo]
group = 3
max_new = 6
temperature = 1.0
top_p = 1.0
updates_per_batch = 2
sft_steps = 2
lr_scale = 0.5
uniform = "resample"
# One example of the SFE task beside each update: its draws must resume exactly too.
sfe_anchor = 1
# Six-token answers are all cut off: with the length penalty and answer-only scoring every
# answer would score the same, every group would be skipped and no GRPO update would be tested.
[grpo.reward]
answer_only = false
overlong_buffer = 0
overlong_penalty = 0.0
[train]
steps = 6
batch = 1
lr = 1e-3
seed = 3
val_questions = 2
checkpoint_every = {every}
"#,
        sfe = s.sfe.display(),
        d = s.data.display(),
    );
    let p = s.path(name);
    std::fs::write(&p, cfg).unwrap();
    p
}

/// The step lines of a run's log, each without its timing fields (the only ones a rerun may change).
fn log(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            for k in ["seconds", "tokens_per_second"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

fn state(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap()
}

#[test]
fn sigkill_mid_grpo_then_resume_reproduces_the_uninterrupted_run() {
    let s = setup();
    let (a, b) = (s.path("a"), s.path("b"));
    let cfg = grpo_config(&s, "grpo.toml", 6);
    let out = sage().args(["grpo", "--json", "--config"]).arg(&cfg).arg("--out").arg(&a).output().unwrap();
    ok(&out);
    let summary = stdout_json(&out);
    assert_eq!(summary["steps"], 6);
    assert_eq!(state(&a)["grpo"]["grpo"]["group"], 3, "the checkpoint is marked as GRPO with its config");
    let full = log(&a);
    assert_eq!(full.len(), 6);
    assert_eq!(full[0]["phase"], "sft");
    // Every written truth is longer than the six-token cap, and the cold start's lines say so.
    for line in &full[..2] {
        assert!(line["target_tokens"].as_f64().unwrap() > 6.0, "{line}");
        assert_eq!(line["target_over_cap"], 1.0, "{line}");
    }
    assert!(full[0]["val_start"]["questions"].as_u64().unwrap() > 0, "{}", full[0]);
    assert!(full[2]["val_before"]["interval"].is_array(), "{}", full[2]);
    for (i, line) in full.iter().enumerate().skip(2) {
        assert_eq!(line["phase"], "grpo");
        assert_eq!(line["update"], (i as u64 - 2) % 2 + 1, "{line}");
        for k in ["reward", "reward_format", "reward_class", "uniform_groups"] {
            assert!(line[k].is_number(), "step {}: {k} missing: {line}", i + 1);
        }
        assert!(line["sample_answer"].as_str().unwrap().starts_with("<think>"), "{line}");
        if line["updated"] == true {
            assert!(line["anchor_nll"].as_f64().unwrap() > 0.0, "step {}: the anchor's term: {line}", i + 1);
        }
    }
    assert!(full[2..].iter().any(|l| l["updated"] == true), "no GRPO update was tested");
    // The cold start runs at the schedule's rate (peak 1e-3, no warm-up, cosine to 1e-4 over six
    // steps), the GRPO updates at half of it (`grpo.lr_scale`); the log records the rate applied.
    let schedule = |k: f64| 1e-4 + 9e-4 * 0.5 * (1.0 + (std::f64::consts::PI * k / 6.0).cos());
    for (i, line) in full.iter().enumerate() {
        let want = schedule(i as f64) * if i < 2 { 1.0 } else { 0.5 };
        let lr = line["lr"].as_f64().unwrap();
        assert!((lr - want).abs() < 1e-9, "step {}: lr {lr}, want {want}", i + 1);
    }
    // The second update of a batch trains on the first one's samples.
    assert_eq!(full[2]["sample_answer"], full[3]["sample_answer"]);
    assert_eq!(full[2]["reward"], full[3]["reward"]);
    let after = &summary["val"];
    assert_eq!(after["questions"], full[2]["val_before"]["questions"]);
    assert!(after["mean_reward"].is_number(), "{summary}");

    // The same run checkpointing every 2 steps, SIGKILLed after the step-4 checkpoint with step 5
    // logged: the resume drops step 5's line, samples batch 2 again from the step-4 weights with
    // the same seeds, and must land on the same log and weights.
    let cfg_b = grpo_config(&s, "grpo-b.toml", 2);
    kill_after_checkpoint(&["grpo", "--json"], &cfg_b, &b, 4, 5, Duration::from_secs(600));
    assert_eq!(state(&b)["step"], 4, "killed after the step-6 checkpoint");
    assert_eq!(log(&b), full[..5], "steps 1-5 before the kill");
    let out = sage().args(["grpo", "--config"]).arg(&cfg_b).arg("--out").arg(&b).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--resume"));
    ok(&sage().args(["grpo", "--json", "--resume", "--config"]).arg(&cfg_b).arg("--out").arg(&b).output().unwrap());
    assert_eq!(log(&b), full, "the resumed log differs from the uninterrupted one");
    for kind in ["weights", "optim"] {
        let f = format!("{kind}-000006.safetensors");
        assert!(std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(), "{f} differs");
    }

    // `sage eval` reads the GRPO checkpoint.
    let out = sage()
        .args(["--json", "eval", "--judge", "none", "--max-items", "1", "--max-tokens", "4", "--checkpoint"])
        .arg(&a)
        .arg("--data")
        .arg(s.data.join("test.json"))
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("grpo, step 6"), "{text}");

    // GRPO from a GRPO run is refused: it starts from an SFE run.
    let bad = s.path("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&cfg).unwrap().replace(&s.sfe.display().to_string(), &a.display().to_string()),
    )
    .unwrap();
    let out = sage().args(["grpo", "--config"]).arg(&bad).arg("--out").arg(s.path("c")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("starts from a stage-1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Balanced draws need both labels: on normal pairs only the option is refused, naming it.
    let train: Value = serde_json::from_str(&std::fs::read_to_string(s.data.join("train.json")).unwrap()).unwrap();
    let normal: Vec<&Value> = train.as_array().unwrap().iter().filter(|x| x["label"] == "normal").collect();
    let normal_file = s.data.join("normal.json");
    std::fs::write(&normal_file, serde_json::to_string(&normal).unwrap()).unwrap();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace(
            &format!("train = \"{}/train.json\"", s.data.display()),
            &format!("train = \"{}\"", normal_file.display()),
        )
        .replace("sft_steps = 2", "sft_steps = 2\nbalance = true");
    std::fs::write(&bad, text).unwrap();
    let out = sage().args(["grpo", "--config"]).arg(&bad).arg("--out").arg(s.path("d")).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("grpo.balance = true") && err.contains(" 0 anomalous") && err.contains("normal.json"),
        "{err}"
    );
}

/// With `model.map_cue` in the SFE start, the GRPO prompts name the box the training-free map
/// points at (`map_cue::region`, in the test image's pixels); the run says so with the first one.
/// Held out on the MVTec-layout fixture (masks, so true boxes), every validation logs the
/// localisation reward of the answers and of the map's region taken as the one box.
#[test]
fn with_the_map_cue_the_grpo_prompts_name_the_maps_region() {
    let dir = tempfile::tempdir().unwrap();
    let tables = r#"
[model]
facts = "none"
image_pool = 7
map_cue = true
[llm]
finetune = "lora"
lora_rank = 4
base = "quantized"
[train]
steps = 1
batch = 1
lr = 1e-3
seed = 5
val_questions = 1
checkpoint_every = 1
"#;
    // 20 normal training pairs: enough to calibrate the cue's levels.
    let (data, sfe) = tiny_sfe_run(dir.path(), 12, "", tables);
    let s = Setup { dir, data, sfe };
    let masked = s.path("mvtec");
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mvtec");
    ok(&sage()
        .args(["data", "build", "--source", "mvtec", "--seed", "0", "--root"])
        .arg(&fixture)
        .arg("--out")
        .arg(&masked)
        .output()
        .unwrap());
    let cfg = grpo_config(&s, "grpo.toml", 2);
    let text = std::fs::read_to_string(&cfg).unwrap().replace("steps = 6", "steps = 4");
    let text = text
        .replace(
            &format!("val = \"{}/test.json\"", s.data.display()),
            &format!("val = \"{}/test.json\"", masked.display()),
        )
        .replace("val_questions = 2", "val_questions = 0\nval_every = 2");
    std::fs::write(&cfg, text).unwrap();
    // The held-out tree's images are the repository's fixture, outside the tree's folder.
    let out = sage()
        .args(["grpo", "--json", "--allow-outside-root", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(s.path("run"))
        .output()
        .unwrap();
    ok(&out);
    // After the cold start (step 2) and at the end: the answers' localisation (six-token answers
    // write no box: 0) and the map's region's, above 0 wherever a box is drawn.
    let val = log(&s.path("run")).into_iter().find(|l| l.get("val_accuracy").is_some()).expect("a val_every line");
    let end = &stdout_json(&out)["val"];
    for (loc, map) in [(&val["val_mean_loc"], &val["val_map_loc"]), (&end["mean_loc"], &end["map_loc"])] {
        assert_eq!(loc.as_f64(), Some(0.0), "{val} {end}");
        assert!(map.as_f64().is_some_and(|m| m > 0.0 && m <= 1.0), "{val} {end}");
    }
    // The map's own verdict beside the model's: one right/wrong per held-out image, its accuracy
    // their mean, in the val lines too.
    let map_right: Vec<bool> =
        end["map_right"].as_array().unwrap_or_else(|| panic!("{end}")).iter().map(|r| r.as_bool().unwrap()).collect();
    assert_eq!(map_right.len() as u64, end["questions"].as_u64().unwrap(), "{end}");
    let share = map_right.iter().filter(|&&r| r).count() as f64 / map_right.len() as f64;
    assert!((end["map_accuracy"].as_f64().unwrap() - share).abs() < 1e-12, "{end}");
    assert!(val["val_map_accuracy"].as_f64().is_some_and(|a| (0.0..=1.0).contains(&a)), "{val}");
    // One figure per held-out image with true boxes (the fixture's anomalous test images).
    let held_out: Value = serde_json::from_str(&std::fs::read_to_string(masked.join("test.json")).unwrap()).unwrap();
    let boxed =
        held_out.as_array().unwrap().iter().filter(|s| s["boxes"].as_array().is_some_and(|b| !b.is_empty())).count();
    assert!(boxed > 0 && end["loc_each"].as_array().map(Vec::len) == Some(boxed), "{boxed}: {end}");
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.contains("names the map's region")).unwrap_or_else(|| panic!("{err}"));
    // "Test image: 300x300 pixels. The patch comparison differs most at [x1, y1, x2, y2]."
    let inside =
        line.split("differs most at [").nth(1).and_then(|r| r.split(']').next()).unwrap_or_else(|| panic!("{line}"));
    let b: Vec<f32> = inside.split(", ").map(|v| v.parse().unwrap()).collect();
    assert!(b.len() == 4 && b[0] < b[2] && b[1] < b[3] && b[2] <= 300.0 && b[3] <= 300.0, "{line}");
}
