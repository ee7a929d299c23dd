//! `sage demo`: the whole method on ELPV in one call — data, facts, judge scores, three SFE
//! runs, three preference runs, a GRPO run, seven evaluations and the training-free anomaly map — ending with
//! the ablation table. Every stage is a `sage` subcommand run as a child process
//! ([`stages`]: printed as it starts, so a user can rerun any of them by hand), and every stage
//! resumes: a second demo after an interruption skips what finished and continues what did not.
//!
//! [`profile`] sizes the stages and names the table's rows, [`configs`] builds the training
//! stages' configs as their own typed config structs, [`table`] writes `demo.md`.

pub mod compare;
pub mod configs;
pub mod profile;
pub mod stages;
pub mod table;

use crate::assets::Asset;
use crate::edpo::config::LossKind;
use crate::models::sage::FactsMode;
use anyhow::{Context, Result};
use profile::{Profile, ROWS, SFE_RUNS};
use serde_json::Value;
use stages::{Runner, StageEnv};
use std::path::{Path, PathBuf};
use std::time::Instant;
use table::TableRow;

/// What a finished demo reports.
pub struct DemoOutcome {
    pub profile: Profile,
    pub rows: Vec<TableRow>,
    /// The majority class of the evaluated questions (`{"answer", "rate"}` of an eval report).
    pub majority: Value,
    pub map_image_auroc: Value,
    pub seconds: f64,
    pub out: PathBuf,
    /// `demo.md`'s text.
    pub markdown: String,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().to_string()
}

fn read_json(p: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
}

/// `--max-items N` when `n` is not 0 (all).
fn items(n: usize) -> Vec<String> {
    if n == 0 {
        vec![]
    } else {
        vec!["--max-items".to_string(), n.to_string()]
    }
}

/// Runs (or resumes) the demo of profile `p` in folder `out` and writes `out/demo.md`.
pub fn run_demo(p: &Profile, out: &Path, env: StageEnv) -> Result<DemoOutcome> {
    let t0 = Instant::now();
    // One demo per folder; each stage it starts locks its own cache or run folder below it.
    let _writer = crate::lock::WriterLock::for_dir(out)?;
    let (data, cfgs, logs, runs, evals) =
        (out.join("data"), out.join("configs"), out.join("logs"), out.join("runs"), out.join("eval"));
    for d in [&data, &cfgs, &logs, &runs, &evals] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let r = Runner { env, logs };

    prepare_data(&r, p, &data)?;

    // Stage 1 and stage 2, each skipped when finished and resumed when interrupted.
    let train = |name: &str, cmd: &str, toml: String| -> Result<PathBuf> {
        let cfg = cfgs.join(format!("{cmd}-{name}.toml"));
        let run_dir = runs.join(format!("{cmd}-{name}"));
        if run_dir.join("final.json").exists() {
            return Ok(run_dir);
        }
        crate::util::write_atomic(&cfg, toml.as_bytes())?;
        let mut args = vec![cmd.to_string(), "--config".into(), s(&cfg), "--out".into(), s(&run_dir)];
        if crate::stage::checkpoint::exists(&run_dir) {
            args.push("--resume".into());
        }
        r.sage(&format!("{cmd}-{name}"), &args)?;
        Ok(run_dir)
    };
    let mut sfe_runs = std::collections::BTreeMap::new();
    for (name, facts) in SFE_RUNS {
        let cfg = configs::to_toml(p, &configs::sfe_config(p, &data, facts))?;
        sfe_runs.insert(name, train(name, "sfe", cfg)?);
    }
    let (mut rows, mut majority) = (Vec::new(), Value::Null);
    let (test, facts) = (data.join("test.json"), data.join("facts.jsonl"));
    for row in &ROWS {
        let ckpt = match row.pref {
            None => sfe_runs[row.sfe].clone(),
            Some((loss, name)) => {
                let cfg = configs::to_toml(p, &configs::edpo_config(p, &data, &sfe_runs[row.sfe], loss))?;
                train(name, "edpo", cfg)?
            }
        };
        // The method's row gets the HTML page of its evaluation.
        let html = (row.name == profile::FULL_ROW).then(|| out.join("report.html"));
        let v = evaluate(&r, p, &test, p.eval_items, &facts, &evals, &ckpt, html.as_deref())?;
        // Every row answers the same questions: their majority class is the same.
        majority = v["adpl"]["majority"].clone();
        rows.push(TableRow::from_report(row.name, ckpt, &v));
    }
    // GRPO (multi-stage answers, fine-grained rewards) from the facts-fused SFE run; the row is
    // evaluated like the others, on the AD-PL questions.
    if p.grpo_steps > 0 {
        let cfg = configs::to_toml(p, &configs::grpo_config(p, &data, &sfe_runs["fused"]))?;
        let ckpt = train("fused", "grpo", cfg)?;
        let v = evaluate(&r, p, &test, p.eval_items, &facts, &evals, &ckpt, None)?;
        rows.push(TableRow::from_report(profile::GRPO_ROW, ckpt, &v));
    }
    // Generalisation: the full method trained on one cell kind, tested on the other.
    if p.unseen_eval_items > 0 {
        for u in &profile::UNSEEN_ROWS {
            let split = data.join(u.split);
            score(&r, p, &split.join("train.json"), &format!("score-{}", u.split))?;
            let sfe_cfg = configs::sfe_config_on(p, &split, &facts, FactsMode::Fused);
            let sfe = train(&format!("fused-{}", u.split), "sfe", configs::to_toml(p, &sfe_cfg)?)?;
            let cfg = configs::edpo_config(p, &split, &sfe, LossKind::Edpo);
            let ckpt = train(&format!("fused-edpo-{}", u.split), "edpo", configs::to_toml(p, &cfg)?)?;
            let v = evaluate(&r, p, &split.join("test.json"), p.unseen_eval_items, &facts, &evals, &ckpt, None)?;
            rows.push(TableRow::from_report(u.name, ckpt, &v));
        }
    }

    let map = anomaly_map(&r, out)?;
    let seconds = t0.elapsed().as_secs_f64();
    let markdown = table::markdown(p, &rows, &majority, &map, seconds, out);
    crate::util::write_atomic(&out.join("demo.md"), markdown.as_bytes())?;
    Ok(DemoOutcome {
        profile: p.clone(),
        rows,
        majority,
        map_image_auroc: map["image_auroc"].clone(),
        seconds,
        out: out.to_path_buf(),
        markdown,
    })
}

/// Assets, the ELPV AD-PL split, facts for every image and the judge's scores of the ranked
/// training answers (each stage resumes from its cache).
fn prepare_data(r: &Runner, p: &Profile, data: &Path) -> Result<()> {
    if Asset::ALL.iter().any(|a| a.path().is_err()) {
        r.sage("fetch", &["fetch".into()])?;
    }
    if !data.join("test.json").exists() {
        let dir = s(data);
        let args = ["data", "build", "--source", "elpv", "--out", dir.as_str(), "--seed", "0"];
        r.sage("data-build", &args.map(String::from))?;
    }
    // Facts for every image (validation draws from the whole test split). The lite backbone's
    // prompt depends only on the category, so a handful of generations serve every image.
    let mut facts_all = String::new();
    for split in ["train", "test"] {
        let f = data.join(format!("facts-{split}.jsonl"));
        let mut args =
            vec!["facts".into(), "--data".into(), s(&data.join(format!("{split}.json"))), "--out".into(), s(&f)];
        args.extend(["--backbone".into(), p.backbone.into()]);
        r.sage(&format!("facts-{split}"), &args)?;
        facts_all.push_str(&std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?);
    }
    crate::util::write_atomic(&data.join("facts.jsonl"), facts_all.as_bytes())?;
    score(r, p, &data.join("train.json"), "score")
}

/// The rubric judge's scores of the ranked answers of `train` (cached beside it; resumes).
fn score(r: &Runner, p: &Profile, train: &Path, name: &str) -> Result<()> {
    let mut args = vec!["score".into(), "--data".into(), s(train), "--judge".into(), "rubric".into()];
    if let Some(c) = p.judge_config() {
        args.extend(["--judge-config".into(), c.to_string()]);
    }
    args.extend(items(p.pref_items));
    r.sage(name, &args)
}

/// `sage eval` of checkpoint `ckpt` on the first `eval_items` items (0: all; label-balanced with
/// the profile's `balanced_eval`) of `test` (skipped
/// when its report exists), with the profile's first-token conclusions and generated subset, and
/// the HTML page when `html` is given; its JSON report.
#[allow(clippy::too_many_arguments)]
fn evaluate(
    r: &Runner,
    p: &Profile,
    test: &Path,
    eval_items: usize,
    facts: &Path,
    evals: &Path,
    ckpt: &Path,
    html: Option<&Path>,
) -> Result<Value> {
    let stem = ckpt.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let report = evals.join(format!("{stem}.md"));
    if !report.with_extension("json").exists() {
        let mut args = vec!["eval".into(), "--checkpoint".into(), s(ckpt), "--data".into(), s(test)];
        args.extend(["--facts".into(), s(facts), "--max-tokens".into(), p.max_tokens.to_string()]);
        if let Some(c) = p.judge_config() {
            args.extend(["--judge-config".into(), c.to_string()]);
        }
        args.extend(["--save-answers".into(), s(&report.with_extension("answers.jsonl"))]);
        if p.first_token {
            args.extend(["--first-token".into(), "--save-first-token".into()]);
            args.push(s(&report.with_extension("first-token.jsonl")));
        }
        if let Some(n) = p.generate_items {
            args.extend(["--generate-items".into(), n.to_string()]);
        }
        if let Some(h) = html {
            args.extend(["--html".into(), s(h)]);
        }
        args.extend(["--out".into(), s(&report)]);
        args.extend(items(eval_items));
        if p.balanced_eval && eval_items > 0 {
            args.push("--balanced".into());
        }
        r.sage(&format!("eval-{stem}"), &args)?;
    }
    read_json(&report.with_extension("json"))
}

/// The training-free anomaly map on every ELPV cell (`sage map --eval-elpv --json`, kept as
/// `map-elpv.json`).
fn anomaly_map(r: &Runner, out: &Path) -> Result<Value> {
    let map_json = out.join("map-elpv.json");
    if !map_json.exists() {
        // Under --json every stage gets the flag already.
        let mut args: Vec<String> = if r.env.json { vec![] } else { vec!["--json".into()] };
        args.extend(["map".into(), "--eval-elpv".into()]);
        r.sage("map-elpv", &args)?;
        let text = std::fs::read_to_string(r.log("map-elpv"))?;
        crate::util::write_atomic(&map_json, text.as_bytes())?;
    }
    read_json(&map_json)
}
