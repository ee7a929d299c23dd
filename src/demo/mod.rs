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
use table::{TableRow, WallTime};

/// What a finished demo reports.
pub struct DemoOutcome {
    pub profile: Profile,
    pub rows: Vec<TableRow>,
    /// The majority class of the evaluated questions (`{"answer", "rate"}` of an eval report).
    pub majority: Value,
    pub map_image_auroc: Value,
    pub seconds: f64,
    /// When the demo resumed a folder: the recorded times of the stages that ran before it.
    pub earlier_seconds: f64,
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
    // Read before any stage of this invocation records its own time.
    let earlier_seconds = stages::recorded_seconds(&logs);
    let r = Runner { env, logs };

    prepare_data(&r, p, &data)?;

    // Stage 1 and stage 2, each skipped when finished and resumed when interrupted.
    let train = |name: &str, cmd: &str, toml: String| -> Result<PathBuf> {
        let cfg = cfgs.join(format!("{cmd}-{name}.toml"));
        let run_dir = runs.join(format!("{cmd}-{name}"));
        if run_dir.join("final.json").exists() {
            check_finished(cmd, &cfg, &toml, &run_dir)?;
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
    let wall = WallTime { this_run: seconds, earlier_stages: earlier_seconds };
    let markdown = table::markdown(p, &rows, &majority, &map, wall, out);
    crate::util::write_atomic(&out.join("demo.md"), markdown.as_bytes())?;
    Ok(DemoOutcome {
        profile: p.clone(),
        rows,
        majority,
        map_image_auroc: map["image_auroc"].clone(),
        seconds,
        earlier_seconds,
        out: out.to_path_buf(),
        markdown,
    })
}

/// A finished run is reused only if the demo would configure it the same way today: a folder made
/// by another profile, backbone or map-cue choice would otherwise put its rows into this table
/// unnoticed. `cfg` is the `cmd` stage's config the demo wrote when it started the run, `toml`
/// today's. Both are read as the stage's typed config (so a key added since, at its default, is
/// no change), and paths are left out (they all lie in the demo's folder, which may have moved).
fn check_finished(cmd: &str, cfg: &Path, toml: &str, run_dir: &Path) -> Result<()> {
    let before = std::fs::read_to_string(cfg).ok().and_then(|t| typed_table(cmd, &t)).ok_or_else(|| {
        crate::user_err!(
            "{} is finished but its config {} is missing or not a `sage {cmd}` config; use another --out, or delete \
             the run to retrain it",
            run_dir.display(),
            cfg.display()
        )
    })?;
    let today = typed_table(cmd, toml).context("reading the demo's own config")?;
    if before == today {
        return Ok(());
    }
    let changed = diff_lines(&before.to_string(), &today.to_string());
    Err(crate::user_err!(
        "{} was trained with another config than this demo asks for ({}):\n{}\nuse another --out (each profile, \
         backbone and --map-cue choice has its own default folder), or delete {} to retrain it",
        run_dir.display(),
        cfg.display(),
        changed.into_iter().take(6).collect::<Vec<_>>().join("\n"),
        run_dir.display()
    ))
}

/// `text` read as the `cmd` stage's config and written back as a TOML table (defaults filled in),
/// without its paths; `None` when it is not one.
fn typed_table(cmd: &str, text: &str) -> Option<toml::Table> {
    fn via<T: serde::de::DeserializeOwned + serde::Serialize>(text: &str) -> Option<toml::Table> {
        let typed: T = toml::from_str(text).ok()?;
        toml::to_string(&typed).ok()?.parse().ok()
    }
    let table = match cmd {
        "sfe" => via::<crate::sfe::config::SfeConfig>(text),
        "edpo" => via::<crate::edpo::config::EdpoRunConfig>(text),
        "grpo" => via::<crate::grpo::config::GrpoRunConfig>(text),
        _ => text.parse().ok(),
    }?;
    Some(without_paths(table))
}

/// `table` with every string that names a path (has a `/` or `\\` in it) replaced by `<path>`.
fn without_paths(table: toml::Table) -> toml::Table {
    fn walk(v: toml::Value) -> toml::Value {
        match v {
            toml::Value::String(s) if s.contains(['/', '\\']) => toml::Value::String("<path>".into()),
            toml::Value::Table(t) => toml::Value::Table(t.into_iter().map(|(k, v)| (k, walk(v))).collect()),
            toml::Value::Array(a) => toml::Value::Array(a.into_iter().map(walk).collect()),
            other => other,
        }
    }
    table.into_iter().map(|(k, v)| (k, walk(v))).collect()
}

/// The lines of `a` and `b` that the other lacks, as `- line` and `+ line` (config keys are one to
/// a line, so this names the keys that differ).
fn diff_lines(a: &str, b: &str) -> Vec<String> {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let gone = la.iter().filter(|l| !lb.contains(l)).map(|l| format!("- {l}"));
    gone.chain(lb.iter().filter(|l| !la.contains(l)).map(|l| format!("+ {l}"))).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A finished run is reused under the config that made it (moved to another folder, or
    /// written before a key with its default existed) and refused under another, with the key
    /// that changed and the fix in the message.
    #[test]
    fn a_finished_run_is_reused_only_under_the_config_that_made_it() {
        use profile::QUICK;
        let dir = tempfile::tempdir().unwrap();
        let (cfg, run) = (dir.path().join("sfe-none.toml"), dir.path().join("runs/sfe-none"));
        let written = |p: &Profile, data: &str| {
            configs::to_toml(p, &configs::sfe_config(p, Path::new(data), FactsMode::None)).unwrap()
        };
        let made = written(&QUICK, "/old/demo/data");
        assert!(made.contains("map_cue = false\n"), "{made}");
        std::fs::write(&cfg, &made).unwrap();
        check_finished("sfe", &cfg, &made, &run).unwrap();
        check_finished("sfe", &cfg, &written(&QUICK, "runs/demo-quick/data"), &run).unwrap();
        // A config written before the map cue existed reads as the cue off.
        std::fs::write(&cfg, made.replace("map_cue = false\n", "").replace("map_cue_levels = []\n", "")).unwrap();
        check_finished("sfe", &cfg, &made, &run).unwrap();

        let err =
            check_finished("sfe", &cfg, &written(&Profile { map_cue: true, ..QUICK }, "x/data"), &run).unwrap_err();
        let msg = format!("{err:#}");
        assert!(crate::error::is_user_error(&err), "{msg}");
        assert!(msg.contains("- map_cue = false") && msg.contains("+ map_cue = true"), "{msg}");
        assert_eq!(msg.lines().filter(|l| l.starts_with(['-', '+'])).count(), 2, "only the changed key: {msg}");
        assert!(msg.contains("another --out") && msg.contains("sfe-none"), "{msg}");

        std::fs::write(dir.path().join("torn.toml"), "[model\nmap_cue =").unwrap();
        for bad in ["gone.toml", "torn.toml"] {
            let err = check_finished("sfe", &dir.path().join(bad), &made, &run).unwrap_err();
            assert!(format!("{err:#}").contains("missing or not a `sage sfe` config"), "{err:#}");
        }
    }
}
