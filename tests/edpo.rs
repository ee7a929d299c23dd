//! `sage edpo` end to end on a tiny real ELPV AD-PL set with the real SmolLM2 and EfficientNet
//! weights, starting from a 2-step `sage sfe` run (facts fused, so the frozen fusion attention is
//! in play) and `sage score` rubric scores:
//! - a run SIGKILLed mid-way resumes to exactly the uninterrupted loss curve and weights;
//! - the fusion attention stays frozen, the checkpoint carries it, and `sage infer` answers from it;
//! - `--loss dpo` is η = 0, E-DPO keeps the configured η;
//! - the user errors exit 2 and say what to do;
//! - the gradient the loop accumulates for one instance matches central finite differences of the
//!   same loss on a few trainable scalars (in-process).
//!
//! nextest runs every test in its own process, so each builds its own setup (about 8 s: data,
//! facts, a 2-step SFE run, rubric scores of the 2 items used); the file takes about 75 s on two
//! cores.

mod common;
use common::*;
use sage::backend::cpu::HostOps;
use sage::edpo::config::EdpoRunConfig;
use sage::edpo::pairs::{instance_pairs, PairChoice};
use sage::edpo::run::EdpoRun;
use sage::formats::safetensors::SafetensorsFile;
use sage::models::sage::Sage;
use sage::opset::Buffers;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Items of train.json used everywhere (each has 5 questions with 4 ranked answers).
const ITEMS: usize = 2;
const ETA: f64 = 0.5;

/// A tiny SFE run and the judge scores E-DPO reads.
struct Setup {
    dir: tempfile::TempDir,
    train: PathBuf,
    sfe: PathBuf,
    scores: PathBuf,
}

impl Setup {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Two hand-written fact sentences for every test image of the set (the facts file format of
/// `sage facts`, without running the generator).
fn write_facts(data: &Path, out: &Path) {
    let mut lines = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for f in ["train.json", "test.json"] {
        let items: Vec<Value> = serde_json::from_slice(&std::fs::read(data.join(f)).unwrap()).unwrap();
        for it in items {
            let image = it["test_image"].as_str().unwrap().to_string();
            if seen.insert(image.clone()) {
                let line = serde_json::json!({
                    "image": image, "image_sha256": format!("{:064x}", seen.len()), "category": null,
                    "facts": ["The cell shows dark regions between the busbars.", "The wafer corners are dark."],
                    "prompts": ["What do you see?", "Describe the corners."], "backbone": "handwritten",
                    "generation": {"max_tokens": 16, "temperature": 0.0, "top_p": 1.0, "seed": 0},
                });
                lines.push_str(&format!("{line}\n"));
            }
        }
    }
    std::fs::write(out, lines).unwrap();
}

fn setup() -> Setup {
    let _ = minilm_dir(); // the rubric judge needs it
    let dir = tempfile::tempdir().unwrap();
    // The facts file is written from the built data before the SFE run reads it.
    let facts = dir.path().join("facts.jsonl");
    let tables = r#"
[model]
facts = "fused"
k = 4
image_pool = 7
fusion_dim = 32
fusion_heads = 2
[llm]
finetune = "lora"
lora_rank = 4
[train]
steps = 2
batch = 1
lr = 1e-3
seed = 5
val_questions = 2
checkpoint_every = 2
"#;
    let data_extra = format!("facts = \"{}\"\nmax_train_items = {ITEMS}", facts.display());
    let (data, sfe) = tiny_sfe_run_with(dir.path(), 3, &data_extra, tables, |data| write_facts(data, &facts));
    let train = data.join("train.json");
    let scores = dir.path().join("scores.jsonl");
    let items = ITEMS.to_string();
    let out = sage()
        .args(["score", "--json", "--max-items", &items, "--data"])
        .arg(&train)
        .arg("--out")
        .arg(&scores)
        .output()
        .unwrap();
    ok(&out);
    assert_eq!(stdout_json(&out)["answers"], ITEMS * 5 * 4);
    Setup { dir, train, sfe, scores }
}

/// An E-DPO config over the setup: η = 0.5, β = 0.1, both pairs, batch 1, a checkpoint every step.
fn edpo_config(s: &Setup, name: &str, scores: &Path, steps: u64) -> PathBuf {
    edpo_config_with(s, name, scores, steps, "")
}

/// [`edpo_config`] with `extra` lines appended to its `[edpo]` section.
fn edpo_config_with(s: &Setup, name: &str, scores: &Path, steps: u64, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"
sfe = "{sfe}"
[data]
train = "{train}"
scores = "{scores}"
max_train_items = {ITEMS}
[edpo]
loss = "edpo"
beta = 0.1
eta = {ETA}
pairs = "both"
{extra}
[train]
steps = {steps}
batch = 1
lr = 1e-3
seed = 3
val_questions = 2
checkpoint_every = 1
"#,
        sfe = s.sfe.display(),
        train = s.train.display(),
        scores = scores.display(),
    );
    let p = s.path(name);
    std::fs::write(&p, cfg).unwrap();
    p
}

/// `(step, loss)` of every training line of a run's log.jsonl.
fn losses(run: &Path) -> Vec<(u64, f32)> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()? as f32)))
        .collect()
}

fn state(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("state.json")).unwrap()).unwrap()
}

fn final_json(run: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("final.json")).unwrap()).unwrap()
}

/// The weights file a run's state.json names.
fn weights(run: &Path) -> PathBuf {
    run.join(state(run)["weights"].as_str().unwrap())
}

fn tensor(f: &SafetensorsFile, name: &str) -> Vec<f32> {
    f.tensor(name).unwrap().into_f32s().unwrap()
}

/// Expects exit 2 (a user error, no panic) and every one of `must` in stderr; returns stderr.
fn user_error(out: std::process::Output, must: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    for m in must {
        assert!(err.contains(m), "stderr does not mention {m:?}: {err}");
    }
    err
}

#[test]
fn sigkill_mid_edpo_then_resume_reproduces_the_uninterrupted_run() {
    let s = setup();
    const STEPS: u64 = 4;
    let cfg = edpo_config(&s, "edpo.toml", &s.scores, STEPS);
    let (a, b) = (s.path("a"), s.path("b"));

    let out = sage().args(["edpo", "--json", "--config"]).arg(&cfg).arg("--out").arg(&a).output().unwrap();
    ok(&out);
    let summary = stdout_json(&out);
    assert_eq!(summary["loss"], "edpo");
    assert_eq!(summary["instances"], ITEMS * 5);
    assert!((summary["eta"].as_f64().unwrap() - ETA).abs() < 1e-6, "{summary}");
    assert!((final_json(&a)["eta"].as_f64().unwrap() - ETA).abs() < 1e-6, "E-DPO keeps the configured eta");
    let full = losses(&a);
    assert_eq!(full.iter().map(|l| l.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>());
    assert!(full.iter().all(|l| l.1.is_finite() && l.1 > 0.0), "{full:?}");
    assert_eq!(state(&a)["step"], STEPS);
    assert!(state(&a)["edpo"].is_object(), "the checkpoint is marked as stage 2");

    // Frozen fusion attention: in the checkpoint (infer rebuilds the head from it) and unchanged
    // from the SFE run; the adapter, the projection and the LoRA adapters did train.
    let (sfe_w, a_w) = (SafetensorsFile::open(&weights(&s.sfe)).unwrap(), SafetensorsFile::open(&weights(&a)).unwrap());
    let fusion: Vec<String> = sfe_w.names().into_iter().filter(|n| n.starts_with("sage.fusion.")).collect();
    assert_eq!(fusion.len(), 8, "{fusion:?}");
    for n in &fusion {
        assert_eq!(tensor(&a_w, n), tensor(&sfe_w, n), "{n} changed during E-DPO");
    }
    for n in ["sage.adapter.fc1.weight", "sage.proj_norm.weight", "blk.0.attn_q.lora_b"] {
        assert_ne!(tensor(&a_w, n), tensor(&sfe_w, n), "{n} did not train");
    }

    // The same run checkpointing every 2 steps, SIGKILLed once its step-2 checkpoint is committed
    // and step 3 is logged: the log is ahead of the checkpoint, and the resume must drop step 3's
    // line and redo it.
    let cfg_b = s.path("edpo-b.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg_b, text.replace("checkpoint_every = 1", "checkpoint_every = 2")).unwrap();
    kill_after_checkpoint(&["edpo", "--json"], &cfg_b, &b, 2, 3, Duration::from_secs(300));
    assert_eq!(state(&b)["step"], 2, "killed after the step-4 checkpoint");
    assert_eq!(losses(&b), full[..3], "steps 1-3 before the kill");
    assert!(!b.join("final.json").exists(), "the run finished before the kill");
    assert!(SafetensorsFile::open(&weights(&b)).is_ok());

    // Starting over a checkpoint is refused; --resume continues it.
    let out = sage().args(["edpo", "--config"]).arg(&cfg_b).arg("--out").arg(&b).output().unwrap();
    user_error(out, &["already holds a checkpoint", "--resume"]);
    assert_eq!(losses(&b), full[..3], "the refused start touched the log");
    let out =
        sage().args(["edpo", "--json", "--resume", "--config"]).arg(&cfg_b).arg("--out").arg(&b).output().unwrap();
    ok(&out);
    assert_eq!(losses(&b), full, "the resumed loss curve differs from the uninterrupted one");
    assert_eq!(state(&b)["step"], STEPS);
    let name = |kind: &str| format!("{kind}-{STEPS:06}.safetensors");
    for f in [name("weights"), name("optim")] {
        assert!(std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(), "{f} differs");
    }
    assert_eq!(final_json(&b)["final_loss"], final_json(&a)["final_loss"]);

    // `sage infer` rebuilds the model from the E-DPO checkpoint alone.
    let out = sage()
        .args(["infer", "--json", "--max-tokens", "8", "--fact", "The cell shows dark regions."])
        .args(["--question", "Is there a defect in the test cell?", "--checkpoint"])
        .arg(&a)
        .arg("--test")
        .arg(elpv_image("cell0002.png"))
        .arg("--reference")
        .arg(elpv_image("cell0004.png"))
        .output()
        .unwrap();
    ok(&out);
    let v = stdout_json(&out);
    assert!(!v["answer"].as_str().unwrap().trim().is_empty(), "{v}");
    assert_eq!(v["selected_patches"].as_array().unwrap().len(), 4);
}

#[test]
fn dpo_ablation_has_eta_zero_and_user_errors_exit_2() {
    let s = setup();
    let cfg = edpo_config(&s, "edpo.toml", &s.scores, 1);
    let d = s.path("dpo");
    let out =
        sage().args(["edpo", "--json", "--loss", "dpo", "--config"]).arg(&cfg).arg("--out").arg(&d).output().unwrap();
    ok(&out);
    let f = final_json(&d);
    assert_eq!(f["loss"], "dpo");
    assert_eq!(f["eta"].as_f64(), Some(0.0), "{f}");
    assert_eq!(f["steps"], 1);
    // η = 0 in the loss itself: at step 1 the policy is the reference, so d = 0 and loss = ln 2.
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(d.join("log.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert!(line["margin"].as_f64().unwrap().abs() < 1e-5, "{line}");
    assert!((line["loss"].as_f64().unwrap() - 2f64.ln()).abs() < 1e-5, "{line}");
    let edpo = |args: &[&str], out: &Path| {
        sage().arg("edpo").args(args).arg("--config").arg(&cfg).arg("--out").arg(out).output().unwrap()
    };

    // No score file: the message gives the `sage score` command that writes it.
    let none = s.path("none.scores.jsonl");
    let cfg_none = edpo_config(&s, "none.toml", &none, 1);
    let out = sage().args(["edpo", "--config"]).arg(&cfg_none).arg("--out").arg(s.path("x")).output().unwrap();
    let err = user_error(out, &["sage score", "--out", "none.scores.jsonl", "--max-items 2"]);
    assert!(err.contains(s.train.to_str().unwrap()), "{err}");
    assert!(!s.path("x").exists(), "nothing is written on a user error");

    // Scores of the first item only: the missing ones are counted and `sage score` named.
    let part = s.path("part.scores.jsonl");
    let text = std::fs::read_to_string(&s.scores).unwrap();
    std::fs::write(&part, text.lines().take(20).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let cfg_part = edpo_config(&s, "part.toml", &part, 1);
    let out = sage().args(["edpo", "--config"]).arg(&cfg_part).arg("--out").arg(s.path("y")).output().unwrap();
    user_error(out, &["20 of 40 answers have no score", "sage score"]);

    // `sfe` must be a stage-1 run folder with a checkpoint.
    let empty = s.path("empty");
    std::fs::create_dir(&empty).unwrap();
    for bad in [&empty, &s.path("missing")] {
        let out = edpo(&["--sfe", bad.to_str().unwrap()], &s.path("z"));
        user_error(out, &["must be a `sage sfe` run folder", bad.to_str().unwrap()]);
    }
    let out = edpo(&["--sfe", d.to_str().unwrap()], &s.path("z"));
    user_error(out, &["is an E-DPO run", "stage-1"]);

    // --resume needs an E-DPO checkpoint in --out.
    user_error(edpo(&["--resume"], &s.path("fresh")), &["--resume: no checkpoint"]);
    let sfe_log = std::fs::read(s.sfe.join("log.jsonl")).unwrap();
    user_error(edpo(&["--resume"], &s.sfe), &["holds an SFE checkpoint"]);
    assert!(std::fs::read(s.sfe.join("log.jsonl")).unwrap() == sfe_log, "the SFE run's log was touched");
    assert!(state(&s.sfe)["edpo"].is_null() && state(&s.sfe)["step"] == 2);
    // Without --resume, an existing checkpoint is never overwritten.
    user_error(edpo(&[], &d), &["already holds a checkpoint", "--resume"]);
    assert_eq!(losses(&d).len(), 1);
}

/// The E-DPO gradient of the op-set model on the CPU ops (policy log-probabilities → LM head →
/// LLM with LoRA → SAGE adapter and projection, both pairs of an instance, η term included)
/// against central differences of the same loss, at a point where the policy has already moved
/// away from the reference (one AdamW step on another instance).
#[test]
fn edpo_gradient_matches_central_differences() {
    check_edpo_gradient("");
}

/// As [`edpo_gradient_matches_central_differences`], with the two loss options that change the
/// gradient: length-normalised log-ratios and an SFT term on the chosen answers. α = 0.1 makes
/// the SFT term's gradient per answer (α / (2 chosen · tokens)) about the size of the normalised
/// preference term's (β·σ(−d) / tokens with β = 0.1), so an error in either shows; a larger α
/// adds curvature that the fixed finite-difference steps would mistake for an error.
#[test]
fn edpo_gradient_with_length_normalised_ratios_and_an_sft_term_matches_central_differences() {
    check_edpo_gradient("length_normalize = true\nsft_weight = 0.1");
}

fn check_edpo_gradient(extra: &str) {
    let s = setup();
    let cfg_path = edpo_config_with(&s, "edpo.toml", &s.scores, 4, extra);
    let cfg: EdpoRunConfig = sage::config::load(&cfg_path).unwrap();
    let mut run = EdpoRun::new(cfg, &s.path("gc"), &[]).unwrap();
    let eta = run.cfg.edpo.eta;
    for p in run.session.params.iter().filter(|p| p.name.starts_with("sage.fusion.")) {
        assert!(!p.trainable, "{} is trainable in stage 2", p.name);
    }
    let tcfg = run.cfg.train.trainer_config();
    let loss_cfg = run.cfg.edpo.loss_config();
    let mut policy =
        Sage::new(HostOps, &run.session.model, &run.session.params, Some(tcfg.adamw), tcfg.max_grad_norm).unwrap();
    let reference = run.reference_model(HostOps).unwrap();

    // An instance whose two pairs share an answer (its gradient sums over both pairs) and both
    // have an entropy gap, so every term is exercised.
    let inst = run
        .instances
        .iter()
        .find(|i| {
            let p = instance_pairs(&i.entropies, PairChoice::Both);
            p.len() == 2
                && [p[1].chosen, p[1].rejected].iter().any(|a| [p[0].chosen, p[0].rejected].contains(a))
                && p.iter().all(|p| p.delta_h.abs() > 0.05)
        })
        .cloned()
        .expect("an instance with two pairs that share an answer, both with an entropy gap");
    let pairs = instance_pairs(&inst.entropies, PairChoice::Both);
    eprintln!("instance {:?}, pairs {pairs:?}", inst.example);
    let b = run.batch(std::slice::from_ref(&inst), &reference).unwrap();
    let sft_on = b.terms.nll.is_some();
    assert_eq!((b.terms.length_scale.is_some(), sft_on), (!extra.is_empty(), !extra.is_empty()));
    let loss_at = |policy: &Sage<HostOps>| -> (f32, Vec<f32>) {
        let (m, p, _) =
            policy.edpo_forward_backward(&b.plans, &b.reference, &b.pairs, &b.scale, loss_cfg, &b.terms).unwrap();
        let (m, p) = (policy.ops().download_stat(&m).unwrap(), policy.ops().download_stat(&p).unwrap());
        (b.loss(&m) + b.sft_loss(&p), m)
    };
    // At the start the policy is the reference: every log-ratio is 0 and d = −η|ΔH| (plus the
    // SFT term's value when it is on).
    let (_, p0, _) =
        policy.edpo_forward_backward(&b.plans, &b.reference, &b.pairs, &b.scale, loss_cfg, &b.terms).unwrap();
    let sft0 = b.sft_loss(&policy.ops().download_stat(&p0).unwrap()) as f64;
    assert_eq!(sft0 > 0.0, sft_on);
    let expected = pairs.iter().map(|p| ((eta * p.delta_h.abs()) as f64).exp().ln_1p()).sum::<f64>() / 2.0 + sft0;
    let start = loss_at(&policy).0 as f64;
    assert!((start - expected).abs() < 1e-5, "loss at the reference point {start}, expected {expected}");
    let other = run.instances.iter().find(|i| i.example != inst.example).cloned().unwrap();
    let ob = run.batch(&[other], &reference).unwrap();
    policy.edpo_step(&ob.plans, &ob.reference, &ob.pairs, &ob.scale, loss_cfg, &ob.terms, tcfg.schedule.lr(0)).unwrap();

    let (l0, margins) = loss_at(&policy);
    assert_eq!(margins.len(), 2);
    // Off the reference point: the log-ratio term contributes to each margin.
    for (m, p) in margins.iter().zip(&pairs) {
        assert!((m + eta * p.delta_h.abs()).abs() > 1e-3, "margin {m} is the reference point's");
    }
    let (_, _, grads) =
        policy.edpo_forward_backward(&b.plans, &b.reference, &b.pairs, &b.scale, loss_cfg, &b.terms).unwrap();

    // Largest |gradient| per kind of trainable tensor, and the two largest overall.
    let mut all: Vec<(usize, String, usize, f32)> = vec![];
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        let g = policy.llm.download_grad(g).unwrap();
        let (j, v) = g.iter().enumerate().max_by(|x, y| x.1.abs().total_cmp(&y.1.abs())).unwrap();
        all.push((i, policy.llm.params[i].name.clone(), j, *v));
    }
    assert!(all.iter().all(|(_, n, _, _)| !n.starts_with("sage.fusion.")), "the fusion attention is frozen");
    all.sort_by(|x, y| y.3.abs().total_cmp(&x.3.abs()));
    let mut picks: Vec<(usize, String, usize, f32)> = all.iter().take(2).cloned().collect();
    for kind in [".lora_b", ".lora_a", "sage.adapter.fc1.", "sage.adapter.fc2.", "sage.proj_norm."] {
        let best = all.iter().find(|c| c.1.contains(kind)).unwrap_or_else(|| panic!("no trainable {kind}"));
        if !picks.iter().any(|p| p.1 == best.1) {
            picks.push(best.clone());
        }
    }

    let mut worst = 0.0f32;
    for (i, name, j, g) in &picks {
        assert!(g.abs() > 1e-4, "{name}[{j}] has no gradient to check ({g})");
        let w0 = policy.llm.ops.download(policy.llm.w(*i)).unwrap();
        let v = w0[*j];
        // Central differences at h and h/2, combined by Richardson extrapolation ((4·D(h/2) − D(h))/3
        // cancels the h² term). The first h moves the loss by about 1e-2 of itself: far above the
        // f32 rounding of the forward (about 2e-6 of the loss here). Where the loss is strongly
        // curved along the element (an adapter bias shifts every image row at once) D(h) and
        // D(h/2) disagree; then h shrinks tenfold, up to twice, and the step whose two
        // differences agree best is kept: a wrong gradient agrees with no step.
        let h0 = (1e-2 * l0.max(0.1) / g.abs()).min(1e-1);
        let mut at = |x: f32| {
            let mut w = w0.clone();
            w[*j] = x;
            policy.llm.write_param(*i, &w).unwrap();
            loss_at(&policy).0 as f64
        };
        let mut central = |h: f32| {
            let (vp, vm) = (v + h, v - h);
            (at(vp) - at(vm)) / (vp as f64 - vm as f64)
        };
        let mut best: Option<(f64, f32, f64, f64)> = None;
        for h in [h0, h0 / 10.0, h0 / 100.0] {
            let (d1, d2) = (central(h), central(h / 2.0));
            let spread = (d1 - d2).abs() / d2.abs().max(1e-12);
            if best.is_none_or(|b| spread < b.0) {
                best = Some((spread, h, d1, d2));
            }
            if spread < 2e-2 {
                break;
            }
        }
        let (spread, h, d1, d2) = best.expect("at least one step");
        policy.llm.write_param(*i, &w0).unwrap();
        let fd = (4.0 * d2 - d1) / 3.0;
        // Measured against the span of the three estimates: where rounding noise moves D(h/2)
        // by a percent (a small step), the extrapolation multiplies that noise, and the exact
        // gradient can sit beside D(h) yet a percent off `fd` (seen once, 1.7e-2 off `fd` and
        // 1.5e-3 off D(h)). The span is 4/3 of the kept step's spread, under 2e-2 whenever a
        // step reaches that (every probe so far): a gradient 5% off still lies outside it.
        assert!(spread < 5e-2, "{name}[{j}]: no step gives two central differences within 5% ({d1:.6e}, {d2:.6e})");
        let (lo, hi) = (d1.min(d2).min(fd), d1.max(d2).max(fd));
        let gap =
            if (lo..=hi).contains(&(*g as f64)) { 0.0 } else { (lo - *g as f64).abs().min((hi - *g as f64).abs()) };
        let rel = (gap / (g.abs() as f64)) as f32;
        eprintln!(
            "{name}[{j}]: analytic {g:.6e}, central differences {d1:.6e} (h {h:.2e}), {d2:.6e} (h/2), \
             extrapolated {fd:.6e}: relative error outside their span {rel:.2e}"
        );
        worst = worst.max(rel);
    }
    // Observed ≤ 1e-3 (rounding noise); a gradient 5% off fails by 5×.
    assert!(worst < 1e-2, "the E-DPO gradient disagrees with finite differences (worst relative error {worst:.2e})");
    assert_eq!(loss_at(&policy).0, l0, "the probes left the weights as they were");
}

/// `sage edpo --resume` of a finished run says so and changes no byte; a run killed between its
/// last checkpoint and `final.json` is completed with the last logged loss (not null). Then a
/// non-finite step (the test-only knob `SAGE_TEST_NONFINITE_STEP`, in a child process of its own)
/// stops a new run at that step with nothing of it written.
#[test]
fn edpo_finished_resume_changes_nothing_and_a_non_finite_step_writes_nothing() {
    let s = setup();
    let cfg = edpo_config(&s, "edpo.toml", &s.scores, 2);
    let run = s.path("run");
    let args = |resume: bool| {
        let mut c = sage();
        c.args(["edpo", "--json", "--config"]).arg(&cfg).arg("--out").arg(&run);
        if resume {
            c.arg("--resume");
        }
        c
    };
    let out = args(false).output().unwrap();
    ok(&out);
    let finished = stdout_json(&out);
    let last = *losses(&run).last().unwrap();
    assert_eq!(finished["final_loss"].as_f64().unwrap() as f32, last.1);
    let before = snapshot(&run);
    let again = args(true).output().unwrap();
    ok(&again);
    assert_eq!(stdout_json(&again)["finished"], true);
    assert!(snapshot(&run) == before, "a finished run's files changed on --resume");

    std::fs::remove_file(run.join("final.json")).unwrap();
    ok(&args(true).output().unwrap());
    let completed = final_json(&run);
    assert_eq!(completed["final_loss"].as_f64().map(|l| l as f32), Some(last.1), "{completed}");
    assert_eq!(completed["seconds_per_step"], finished["seconds_per_step"]);

    let poisoned = s.path("poisoned");
    let out = sage()
        .env("SAGE_TEST_NONFINITE_STEP", "1")
        .args(["edpo", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&poisoned)
        .output()
        .unwrap();
    let err = user_error(out, &["stopped at step 1", "no checkpoint was written"]);
    assert!(!err.contains("panicked"), "{err}");
    let files = snapshot(&poisoned);
    assert!(!files.contains_key("state.json") && !files.contains_key("final.json"), "{:?}", files.keys());
    assert!(files.keys().all(|f| !f.ends_with(".safetensors")), "{:?}", files.keys());
    assert!(losses(&poisoned).is_empty(), "no log line for the poisoned step");
}

/// The E-DPO loop stops at a non-finite step 2: a user error naming it, the checkpoint of step 1 untouched, no log line or
/// file for step 2. The knob (`SAGE_TEST_NONFINITE_STEP`) is set only in a child process running
/// this test alone, after its setup (whose `sage sfe` run must not see it).
#[test]
fn edpo_non_finite_step_stops_the_loop() {
    const CHILD: &str = "SAGE_TEST_EDPO_GUARD_CHILD";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "edpo_non_finite_step_stops_the_loop", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
        return;
    }
    let s = setup();
    std::env::set_var("SAGE_TEST_NONFINITE_STEP", "2");
    let cfg_path = edpo_config(&s, "edpo.toml", &s.scores, 3);
    {
        let out = s.path("run");
        let cfg: EdpoRunConfig = sage::config::load(&cfg_path).unwrap();
        let mut run = EdpoRun::new(cfg, &out, &[]).unwrap();
        let result = sage::edpo::run::train(&mut run, HostOps, false, true).map(|_| ());
        let err = result.expect_err("the poisoned step stops the run");
        let msg = format!("{err:#}");
        assert!(sage::error::is_user_error(&err), "{msg}");
        assert!(msg.contains("stopped at step 2") && msg.contains("checkpoint of step 1 is intact"), "{msg}");
        assert_eq!(losses(&out).iter().map(|l| l.0).collect::<Vec<_>>(), vec![1]);
        assert_eq!(state(&out)["step"], 1);
        let files = snapshot(&out);
        assert!(!files.keys().any(|f| f.contains("000002") || f == "final.json"), "{:?}", files.keys());
    }
}
