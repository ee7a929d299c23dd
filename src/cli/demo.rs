//! `sage demo`: the whole method on ELPV in one command, ending with the ablation table (the
//! pipeline is [`crate::demo`]).

use super::{print_json, Ctx};
use crate::demo::profile::{FULL, QUICK};
use crate::demo::run_demo;
use crate::demo::stages::StageEnv;
use anyhow::{Context, Result};
use std::path::PathBuf;

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

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let profile = if a.quick { &QUICK } else { &FULL };
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
            "seconds": o.seconds, "out": o.out,
        }));
    }
    print!("{}", o.markdown);
    Ok(())
}
