//! `sage score`: MLE judge scores for every ranked answer of an AD-PL file, cached and resumable
//! (see `crate::score`).

use super::{print_json, Ctx};
use crate::data::adpl;
use crate::score::{default_cache_path, score_dataset, PluginJudge, ScoreCache};
use crate::user_err;
use crate::util::progress_bar;
use anyhow::Result;
use std::path::PathBuf;

/// `sage score --help`'s text (attached to the subcommand in `cli/mod.rs`: the variant's doc
/// comment would otherwise hide an `Args` long_about).
pub(super) const LONG_ABOUT: &str =
    "Score every ranked answer of an AD-PL file with a judge plugin on SAGE's MLE criteria: \
defect type, location and logic, 1-5 each (their mean is the MLE score). These scores drive E-DPO's pair choice \
and entropy margin. Each judge request carries the question, the answer, the best-ranked answer as reference and \
the ground truth (conclusion, defect type, category); images are not read.\n\n\
Every score is appended to a JSONL cache (--out) the moment it arrives, keyed by instance (item id and question \
index), answer rank, the answer text's sha256 and the judge (plugin name and a hash of --judge-config). A run \
that stops for any reason (Ctrl-C, a kill, a judge timeout) is resumed by running the same command again: saved \
scores are reused, never asked again, and only the in-flight answer is lost. A changed answer text or judge \
config is scored afresh; several judges can share one file.\n\n\
Prints the number of instances and answers, how many were scored now and how many reused from the cache, and \
the mean of each criterion, of the MLE score and of the score entropy H per rank position (rank 1 is the best \
answer: a good judge gives it the highest scores).";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The AD-PL file (as written by `sage data build`).
    #[arg(long)]
    data: PathBuf,
    /// Judge plugin (`sage plugins` lists them): `rubric` is offline and deterministic, `openai`
    /// asks an OpenAI-compatible endpoint.
    #[arg(long, default_value = "rubric")]
    judge: String,
    /// The judge's config, a JSON object (e.g. '{"model": "gpt-4o", "api_key_env": "OPENAI_API_KEY"}'
    /// for openai). Part of the cache key.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    judge_config: String,
    /// The score cache, JSONL (default: <data file stem>.scores.jsonl beside the data file).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Score only the first N items of the file.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_items: Option<u64>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let config: serde_json::Value = serde_json::from_str(&a.judge_config)
        .map_err(|e| user_err!("--judge-config is not valid JSON: {e}: {}", a.judge_config))?;
    if !config.is_object() {
        return Err(user_err!("--judge-config must be a JSON object, got {}", a.judge_config));
    }
    let mut samples = adpl::load(&a.data, None)?;
    if let Some(n) = a.max_items {
        samples.truncate(n as usize);
    }
    // The cache first: it takes the writer lock, so a second run on it refuses before it loads
    // a judge.
    let out = a.out.unwrap_or_else(|| default_cache_path(&a.data));
    let mut cache = ScoreCache::open(&out)?;
    let mut judge = PluginJudge::open(&ctx.plugin_dirs, &a.judge, &config)?;
    if let Some(note) = cache.loaded().note(&out, "those answers are scored again") {
        eprintln!("{note}");
    }
    let pb = progress_bar(0, "score", ctx.quiet());
    let s = score_dataset(&samples, &mut judge, &mut cache, &pb)?;
    if ctx.json {
        return print_json(&s);
    }
    println!(
        "judge {}: {} items, {} instances, {} answers: {} scored now, {} reused from the cache ({:.1} s)",
        s.judge, s.items, s.instances, s.answers, s.scored, s.reused, s.seconds
    );
    println!("{:>4} {:>7} {:>5} {:>8} {:>5} {:>5} {:>5}", "rank", "answers", "type", "location", "logic", "MLE", "H");
    for r in &s.by_rank {
        println!(
            "{:>4} {:>7} {:>5.2} {:>8.2} {:>5.2} {:>5.2} {:>5.3}",
            r.rank, r.answers, r.type_, r.location, r.logic, r.mle, r.entropy
        );
    }
    println!("cache: {}", s.cache.display());
    Ok(())
}
