//! `sage demo`: the whole method on ELPV in one command, ending with the ablation table (the
//! pipeline is [`crate::demo`]).

use super::{print_json, Ctx};
use crate::demo::profile::{Profile, QUICK};
use crate::demo::run_demo;
use crate::demo::stages::StageEnv;
use anyhow::{Context, Result};
use std::path::PathBuf;

pub const LONG_ABOUT: &str = "Runs the whole pipeline on the ELPV solar-cell data (fetched from PyPI): `fetch` -> \
`data build` -> `facts` -> `score` (rubric judge) -> `sfe` x3 (facts none / hard / fused) -> `edpo` x3 (DPO from \
the baseline, DPO and E-DPO from the fused SFE run) -> `grpo` (from the fused SFE run) -> `eval` x7 -> `map --eval-elpv`, and prints the ablation table \
(Baseline; +Fact[Hard]; +Fact[FE]; +DPO; SFE+DPO; Full with E-DPO; SFE+GRPO) with accuracy, Acc-G, SBERT and MLE, plus the \
training-free anomaly-map AUROC. --quick is sized for two CPU cores (about 20 minutes: a small slice of the data, \
tens of steps; its numbers are a smoke test of the pipeline, not of the method). --profile standard evaluates on the \
whole ELPV test split (466 image pairs) with first-token conclusions, gives every number a 95% bootstrap interval \
over image pairs, compares rows pairwise (paired bootstrap, McNemar), adds the model's image AUROC beside the map's \
and two unseen-kind rows, and writes report.html. The standard and full profiles state the training-free map's \
score in every prompt (the map cue; --map-cue off for the paper's prompt). Without --quick or --profile, the full profile trains on every item and is \
meant for a GPU: with --device cuda the sfe, edpo and eval stages run on it (the other stages \
on the CPU). Everything goes under --out, with each stage's config, log and report; rerunning resumes (the \
table's wall time then adds the stage times of the earlier invocations, kept in logs/stage-times.jsonl).";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// How big the run is: `quick` (a smoke test, minutes on two CPU cores), `standard` (the
    /// whole ELPV test split with 95% intervals, paired comparisons and the unseen-kind rows;
    /// sized for two CPU cores within two hours on the `lite` backbone; on `dino-qwen` each stage
    /// takes about 2 to 3.5 times as long — an SFE step 8.7 to 17 s against 3.9 to 9, an
    /// evaluation 14 min against 6 — so several hours) or `full` (every item, for a GPU).
    #[arg(long, value_parser = ["quick", "standard", "full"], default_value = "full")]
    profile: String,
    /// The same as `--profile quick`.
    #[arg(long, conflicts_with = "profile")]
    quick: bool,
    /// Working folder [default: runs/demo-quick, runs/demo-standard or runs/demo, with
    /// `-<backbone>` after it for a backbone other than lite].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The backbone every stage runs: `lite` (EfficientNet-Lite0 + SmolLM2-135M) or `dino-qwen`
    /// (DINOv2 ViT-S/14 + Qwen2.5-Coder-0.5B); `sage doctor` lists them.
    #[arg(long, default_value = crate::models::backbone::DEFAULT)]
    backbone: String,
    /// Whether every SFE run (and so every row) states the training-free map's image score in
    /// its prompt as a phrase, its levels calibrated on the training split's normal pairs
    /// (`model.map_cue`, docs/ARCHITECTURE.md §1) [default: on for standard and full, off for
    /// quick; `--map-cue` alone: on]. `off` is the paper's prompt. Against the profile's own
    /// choice the default folder gets `-map-cue` or `-no-map-cue` after its name.
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"], num_args = 0..=1, default_missing_value = "on")]
    map_cue: Option<String>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let named = if a.quick { &QUICK } else { Profile::named(&a.profile).expect("clap checked the name") };
    let map_cue = a.map_cue.map_or(named.map_cue, |v| v == "on");
    let profile = &Profile { backbone: crate::models::backbone::builtin(&a.backbone)?.name, map_cue, ..named.clone() };
    let out = a.out.unwrap_or_else(|| profile.default_out());
    let env = StageEnv {
        exe: std::env::current_exe().context("locating the sage binary")?,
        threads: ctx.threads,
        plugin_dirs: ctx.plugin_dirs.clone(),
        json: ctx.json,
        gpu: ctx.backend.backend == "cuda",
    };
    let o = run_demo(profile, &out, env)?;
    if ctx.json {
        return print_json(&serde_json::json!({
            "profile": o.profile, "rows": o.rows, "majority": o.majority, "map_image_auroc": o.map_image_auroc,
            "seconds": o.seconds, "earlier_seconds": o.earlier_seconds, "out": o.out,
        }));
    }
    print!("{}", o.markdown);
    Ok(())
}
