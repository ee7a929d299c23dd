//! `sage compare`: two evaluations of the same image pairs, metric by metric (ARCHITECTURE.md §6).

use super::{print_json, Ctx};
use crate::eval::intervals::{compare_reports, comparison_markdown};
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str = "Compares two `sage eval` reports made on the same data (the .json files --out \
writes beside the markdown): for every metric (accuracy per level and their mean, Acc-G, SBERT, MLE, the model's \
and the map's image AUROC) each row's value, the difference A - B with its 95% paired bootstrap interval (the same \
resampled image pairs for both rows, 2000 resamples, fixed seed), and, for accuracies, McNemar's exact test on the \
conclusions both rows scored. A difference whose interval excludes 0 is marked `*`.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Row A: a `sage eval` JSON report.
    a: PathBuf,
    /// Row B: a report on the same data.
    b: PathBuf,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let rows = compare_reports(&a.a, &a.b)?;
    if ctx.json {
        return print_json(&rows);
    }
    println!("A = {}\nB = {}\n", a.a.display(), a.b.display());
    print!("{}", comparison_markdown(&rows));
    Ok(())
}
