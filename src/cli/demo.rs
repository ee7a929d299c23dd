//! `sage demo`: the whole method on ELPV in one command — data, facts, judge scores, three SFE
//! runs, three preference runs, six evaluations and the training-free anomaly map — ending with
//! the ablation table. Every stage is a `sage` subcommand run as a child process (printed as it
//! starts, so a user can rerun any of them by hand), and every stage resumes: a second
//! `sage demo` after an interruption skips what finished and continues what did not.

use super::{print_json, Ctx};
use crate::assets::Asset;
use crate::user_err;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

pub const LONG_ABOUT: &str = "Runs the whole pipeline on the ELPV solar-cell data (fetched from PyPI): `fetch` -> \
`data build` -> `facts` -> `score` (rubric judge) -> `sfe` x3 (facts none / hard / fused) -> `edpo` x3 (DPO from \
the baseline, DPO and E-DPO from the fused SFE run) -> `eval` x6 -> `map --eval-elpv`, and prints the ablation table \
(Baseline; +Fact[Hard]; +Fact[FE]; +DPO; SFE+DPO; Full with E-DPO) with accuracy, Acc-G, SBERT and MLE, plus the \
training-free anomaly-map AUROC. --quick is sized for two CPU cores (about 20 minutes: a small slice of the data, \
tens of steps; its numbers are a smoke test of the pipeline, not of the method); without it the full profile trains \
on every item and is meant for a GPU: with --device cuda the sfe, edpo and eval stages run on it (the other stages \
on the CPU). Everything goes under --out, with each stage's config, log and report; rerunning resumes.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The two-CPU-core profile (minutes) instead of the full one.
    #[arg(long)]
    quick: bool,
    /// Working folder [default: runs/demo-quick or runs/demo].
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How big each stage is.
#[derive(Clone, Debug, Serialize)]
struct Profile {
    name: &'static str,
    /// Training items (image pairs; 5 questions each; 0 = all).
    train_items: usize,
    sfe_steps: u64,
    sfe_batch: usize,
    sfe_lr: f32,
    edpo_steps: u64,
    edpo_batch: usize,
    edpo_lr: f32,
    /// Evaluated test items (0 = all).
    eval_items: usize,
    max_tokens: usize,
    /// Validation questions at the end of each training run.
    val_questions: usize,
}

const QUICK: Profile = Profile {
    name: "quick",
    train_items: 24,
    sfe_steps: 40,
    sfe_batch: 4,
    sfe_lr: 2e-3,
    edpo_steps: 15,
    edpo_batch: 2,
    edpo_lr: 5e-4,
    eval_items: 10,
    max_tokens: 32,
    val_questions: 10,
};

const FULL: Profile = Profile {
    name: "full",
    train_items: 0,
    sfe_steps: 2000,
    sfe_batch: 8,
    sfe_lr: 1e-3,
    edpo_steps: 500,
    edpo_batch: 4,
    edpo_lr: 2e-4,
    eval_items: 0,
    max_tokens: 96,
    val_questions: 200,
};

/// One row of the ablation table: which SFE run, and which preference run on top of it.
struct Row {
    name: &'static str,
    sfe: &'static str,
    pref: Option<(&'static str, &'static str)>,
}

const ROWS: [Row; 6] = [
    Row { name: "Baseline", sfe: "none", pref: None },
    Row { name: "+Fact[Hard]", sfe: "hard", pref: None },
    Row { name: "+Fact[FE]", sfe: "fused", pref: None },
    Row { name: "+DPO", sfe: "none", pref: Some(("dpo", "none-dpo")) },
    Row { name: "SFE+DPO", sfe: "fused", pref: Some(("dpo", "fused-dpo")) },
    Row { name: "Full (E-DPO)", sfe: "fused", pref: Some(("edpo", "fused-edpo")) },
];

struct Runner<'a> {
    exe: PathBuf,
    ctx: &'a Ctx,
    logs: PathBuf,
}

impl Runner<'_> {
    /// Runs `sage <args>`: progress on the terminal, stdout into `logs/<name>.txt`.
    fn sage(&self, name: &str, args: &[String]) -> Result<()> {
        // The model stages follow --device cuda; the others (fetch, data, facts, score, map) run
        // on the CPU. The echoed line carries the flag too, so it reruns the stage as it ran.
        let on_gpu = self.ctx.backend.backend == "cuda"
            && matches!(args.first().map(String::as_str), Some("sfe" | "edpo" | "eval"));
        let mut shown = vec!["sage".to_string()];
        if on_gpu {
            shown.extend(["--device".to_string(), "cuda".to_string()]);
        }
        shown.extend(args.iter().cloned());
        if !self.ctx.json {
            eprintln!("▶ {}", shown.join(" "));
        }
        let mut cmd = Command::new(&self.exe);
        cmd.args(["--threads", &self.ctx.threads.to_string()]);
        for d in &self.ctx.plugin_dirs {
            cmd.arg("--plugin-dir").arg(d);
        }
        if self.ctx.json {
            cmd.arg("--json");
        }
        cmd.args(&shown[1..]);
        let log = self.logs.join(format!("{name}.txt"));
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let status = cmd.stdout(out).status().with_context(|| format!("starting {}", self.exe.display()))?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(user_err!(
                "stage `{name}` failed ({status}); its output is in {}{}\nrerun `sage demo` with the same --out to resume",
                log.display(),
                if tail.trim().is_empty() { String::new() } else { format!(":\n{}", tail.trim_end()) }
            ));
        }
        Ok(())
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

fn toml_path(p: &Path) -> String {
    serde_json::to_string(&s(p)).expect("a string")
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

fn sfe_config(p: &Profile, data: &Path, facts: &str) -> String {
    format!(
        r#"# written by `sage demo` ({profile} profile)
[data]
train = {train}
val = {val}
facts = {facts_file}
max_train_items = {items}

[model]
facts = "{facts}"
k = 8
reduce = "nearest"
fusion_dim = 128
fusion_heads = 4
image_pool = 4

[llm]
finetune = "lora"
lora_rank = 8
lora_alpha = 16.0
lora_targets = ["attn_q", "attn_v"]

[train]
steps = {steps}
batch = {batch}
lr = {lr:e}
warmup_steps = {warm}
seed = 0
val_questions = {val_q}
checkpoint_every = 10
"#,
        profile = p.name,
        train = toml_path(&data.join("train.json")),
        val = toml_path(&data.join("test.json")),
        facts_file = toml_path(&data.join("facts.jsonl")),
        items = p.train_items,
        steps = p.sfe_steps,
        batch = p.sfe_batch,
        lr = p.sfe_lr,
        warm = (p.sfe_steps / 10).max(1),
        val_q = p.val_questions,
    )
}

fn edpo_config(p: &Profile, data: &Path, sfe_run: &Path, loss: &str) -> String {
    format!(
        r#"# written by `sage demo` ({profile} profile)
sfe = {sfe}

[data]
train = {train}
scores = {scores}
judge = "rubric"
max_train_items = {items}

[edpo]
loss = "{loss}"
beta = 0.1
eta = 1.0
pairs = "both"

[train]
steps = {steps}
batch = {batch}
lr = {lr:e}
warmup_steps = {warm}
seed = 0
val_questions = {val_q}
checkpoint_every = 5
"#,
        profile = p.name,
        sfe = toml_path(sfe_run),
        train = toml_path(&data.join("train.json")),
        scores = toml_path(&data.join("train.scores.jsonl")),
        items = p.train_items,
        steps = p.edpo_steps,
        batch = p.edpo_batch,
        lr = p.edpo_lr,
        warm = (p.edpo_steps / 10).max(1),
        val_q = p.val_questions,
    )
}

#[derive(Serialize)]
struct TableRow {
    row: String,
    checkpoint: PathBuf,
    accuracy: Option<f64>,
    acc_g: Option<f64>,
    sbert: Option<f64>,
    mle: Option<f64>,
    questions: usize,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let t0 = Instant::now();
    let p = if a.quick { QUICK } else { FULL };
    let out = a.out.unwrap_or_else(|| PathBuf::from(if a.quick { "runs/demo-quick" } else { "runs/demo" }));
    // One demo per folder; each stage it starts locks its own cache or run folder below it.
    let _writer = crate::lock::WriterLock::for_dir(&out)?;
    let (data, cfgs, logs, runs, evals) =
        (out.join("data"), out.join("configs"), out.join("logs"), out.join("runs"), out.join("eval"));
    for d in [&data, &cfgs, &logs, &runs, &evals] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let r = Runner { exe: std::env::current_exe().context("locating the sage binary")?, ctx, logs };
    let items = |flag: &str, n: usize| if n == 0 { vec![] } else { vec![flag.to_string(), n.to_string()] };

    // Assets and data.
    if Asset::ALL.iter().any(|a| a.path().is_err()) {
        r.sage("fetch", &["fetch".into()])?;
    }
    if !data.join("test.json").exists() {
        r.sage(
            "data-build",
            &[
                "data".into(),
                "build".into(),
                "--source".into(),
                "elpv".into(),
                "--out".into(),
                s(&data),
                "--seed".into(),
                "0".into(),
            ],
        )?;
    }
    // Facts for every image (validation draws from the whole test split). The lite backbone's
    // prompt depends only on the category, so a handful of generations serve every image.
    let mut facts_all = String::new();
    for split in ["train", "test"] {
        let f = data.join(format!("facts-{split}.jsonl"));
        let args = vec!["facts".into(), "--data".into(), s(&data.join(format!("{split}.json"))), "--out".into(), s(&f)];
        r.sage(&format!("facts-{split}"), &args)?;
        facts_all.push_str(&std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?);
    }
    crate::util::write_atomic(&data.join("facts.jsonl"), facts_all.as_bytes())?;
    // Judge scores of the ranked training answers (resumes from its cache).
    let mut args =
        vec!["score".into(), "--data".into(), s(&data.join("train.json")), "--judge".into(), "rubric".into()];
    args.extend(items("--max-items", p.train_items));
    r.sage("score", &args)?;

    // Stage 1 and stage 2, each skipped when finished and resumed when interrupted.
    let train = |name: &str, cmd: &str, cfg_text: String| -> Result<PathBuf> {
        let cfg = cfgs.join(format!("{cmd}-{name}.toml"));
        let run_dir = runs.join(format!("{cmd}-{name}"));
        if run_dir.join("final.json").exists() {
            return Ok(run_dir);
        }
        crate::util::write_atomic(&cfg, cfg_text.as_bytes())?;
        let mut args = vec![cmd.to_string(), "--config".into(), s(&cfg), "--out".into(), s(&run_dir)];
        if crate::sfe::checkpoint::exists(&run_dir) {
            args.push("--resume".into());
        }
        r.sage(&format!("{cmd}-{name}"), &args)?;
        Ok(run_dir)
    };
    let mut sfe_runs = std::collections::BTreeMap::new();
    for facts in ["none", "hard", "fused"] {
        sfe_runs.insert(facts, train(facts, "sfe", sfe_config(&p, &data, facts))?);
    }
    let (mut rows, mut majority) = (Vec::new(), Value::Null);
    for row in &ROWS {
        let ckpt = match row.pref {
            None => sfe_runs[row.sfe].clone(),
            Some((loss, name)) => train(name, "edpo", edpo_config(&p, &data, &sfe_runs[row.sfe], loss))?,
        };
        let stem = ckpt.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let report = evals.join(format!("{stem}.md"));
        if !report.with_extension("json").exists() {
            let mut args = vec![
                "eval".into(),
                "--checkpoint".into(),
                s(&ckpt),
                "--data".into(),
                s(&data.join("test.json")),
                "--facts".into(),
                s(&data.join("facts.jsonl")),
                "--max-tokens".into(),
                p.max_tokens.to_string(),
                "--save-answers".into(),
                s(&report.with_extension("answers.jsonl")),
                "--out".into(),
                s(&report),
            ];
            args.extend(items("--max-items", p.eval_items));
            r.sage(&format!("eval-{stem}"), &args)?;
        }
        let v = read_json(&report.with_extension("json"))?;
        let ad = &v["adpl"];
        // Every row answers the same questions: their majority class is the same.
        majority = ad["majority"].clone();
        rows.push(TableRow {
            row: row.name.to_string(),
            checkpoint: ckpt,
            accuracy: ad["average"].as_f64(),
            acc_g: ad["acc_g"]["accuracy"].as_f64(),
            sbert: ad["sbert"]["mean"].as_f64(),
            mle: ad["mle"]["mean"].as_f64(),
            questions: v["questions"].as_u64().unwrap_or(0) as usize,
        });
    }

    // The training-free anomaly map on every ELPV cell.
    let map_json = out.join("map-elpv.json");
    if !map_json.exists() {
        let mut args: Vec<String> = if ctx.json { vec![] } else { vec!["--json".into()] };
        args.extend(["map".into(), "--eval-elpv".into()]);
        r.sage("map-elpv", &args)?;
        let text = std::fs::read_to_string(r.logs.join("map-elpv.txt"))?;
        crate::util::write_atomic(&map_json, text.as_bytes())?;
    }
    let map = read_json(&map_json)?;

    let secs = t0.elapsed().as_secs_f64();
    let pct = |v: Option<f64>| v.map_or("—".to_string(), |x| format!("{:.1}", 100.0 * x));
    let num = |v: Option<f64>, d: usize| v.map_or("—".to_string(), |x| format!("{x:.d$}"));
    let mut md = format!(
        "# sage demo ({} profile)\n\nELPV, SmolLM2-135M-Instruct + EfficientNet-Lite0 (`lite`), LoRA r8; {} training items, \
         {} evaluated questions ({} test items), rubric judge. Accuracy is the mean of the three levels' conclusion \
         accuracies.\n\n| Row | Accuracy (%) | Acc-G (%) | SBERT | MLE |\n|---|---|---|---|---|\n",
        p.name,
        if p.train_items == 0 { "all".to_string() } else { p.train_items.to_string() },
        rows[0].questions,
        if p.eval_items == 0 { "all".to_string() } else { p.eval_items.to_string() },
    );
    for t in &rows {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            t.row,
            pct(t.accuracy),
            pct(t.acc_g),
            num(t.sbert, 3),
            num(t.mle, 2)
        ));
    }
    md.push_str(&format!(
        "\nMajority class of the evaluated questions: {} {}%.\nTraining-free anomaly map (all {} ELPV cells): image AUROC {}.\n\nWall time: {:.1} min. Reports, answers, configs and logs: {}\n",
        majority["answer"].as_str().unwrap_or("—"),
        pct(majority["rate"].as_f64()),
        map["cells"].as_u64().unwrap_or(0),
        num(map["image_auroc"].as_f64(), 4),
        secs / 60.0,
        out.display()
    ));
    crate::util::write_atomic(&out.join("demo.md"), md.as_bytes())?;
    if ctx.json {
        return print_json(&serde_json::json!({
            "profile": p, "rows": rows, "majority": majority, "map_image_auroc": map["image_auroc"],
            "seconds": secs, "out": out,
        }));
    }
    print!("{md}");
    Ok(())
}
