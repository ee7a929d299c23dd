//! `sage facts`: short fact sentences about each test image's kind of object, from a backbone
//! that generates text, cached and resumable (see `crate::facts`).

use super::{print_json, Ctx};
use crate::facts::{self, prompts, DataFormat, GenOptions, Job};
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str = "Write short fact sentences about each distinct test image's kind of object, for the \
fusion attention's fact embedding. A backbone plugin that generates text answers questions such as \"What \
does a normal <category> look like?\"; prompts are built from the sample's category only, never from its \
label. Output: JSONL, one line per test image in dataset order: {image, image_sha256, category, facts, prompts, \
backbone, generation}. Every generation goes to an append-only cache beside the output (OUT.cache) as soon as \
it exists, and identical prompts are answered once for all images of a category: a run that is interrupted \
(even killed) is resumed by running the same command again, and the output file is only written, atomically, \
at the end.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Backbone plugin that writes the facts (it must generate text).
    #[arg(long, default_value = "lite")]
    backbone: String,
    /// The data file (AD-PL, MANTA or MMAD).
    #[arg(long)]
    data: PathBuf,
    /// Output JSONL file; its cache is written beside it with `.cache` appended.
    #[arg(long)]
    out: PathBuf,
    /// Fact sentences per image.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=prompts::MAX_SENTENCES as u64))]
    sentences: u64,
    /// The data file's format (default: guessed from the content).
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    /// Folder that relative image paths start from (default: the data file's folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
    /// At most this many distinct test images, in dataset order (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Seed for sampling (the same seed gives the same facts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Maximum new tokens per generation (a sentence cut off here is kept as a fragment).
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Sampling temperature (0 decodes greedily).
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Nucleus sampling mass (with --temperature > 0).
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let job = Job {
        data: a.data,
        format: a.format,
        image_root: a.image_root,
        out: a.out,
        sentences: a.sentences as usize,
        limit: a.limit,
        options: GenOptions {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            system: Some(prompts::SYSTEM.to_string()),
        },
    };
    let images = facts::plan(&job)?;
    let mut backbone = facts::open_backbone(&ctx.plugin_dirs, &a.backbone)?;
    let s = facts::run(&job, &images, &mut backbone, ctx.quiet())?;
    if ctx.json {
        return print_json(&s);
    }
    println!(
        "{}: {} images, {} facts ({} generated, {} cached{}) in {:.1} s",
        s.out.display(),
        s.images,
        s.facts,
        s.generated,
        s.cached,
        if s.dropped > 0 { format!("; {} empty or duplicate generations dropped", s.dropped) } else { String::new() },
        s.seconds
    );
    Ok(())
}
