//! `sage data`: build an AD-PL preference dataset, synthesise anomalies with masks, check a data
//! file, count what is in one.

use super::{print_json, Ctx};
use crate::assets::Asset;
use crate::data::build::{self, Source};
use crate::data::format::{guess_format, load_samples, DataFormat};
use crate::data::problems::Report;
use crate::data::synth::{self, Method};
use crate::data::{adpl, manta, mmad, stats, Sample};
use crate::user_err;
use anyhow::Result;

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Subcommand, Debug)]
enum Cmd {
    /// Build an AD-PL preference dataset (5 questions × 4 ranked answers per image pair).
    #[command(
        long_about = "Build an AD-PL preference dataset. Each test image is paired with a normal reference of the same \
kind and gets 5 questions (2 standard comparison, 2 defect identification, 1 defect diagnosis), each with 4 answers \
ranked best first: right and precise, right and vague, right but hedged with a wrong detail, wrong. Writes \
train.json and test.json (a random split stratified by category and label), and unseen-type splits in sub-folders: \
ELPV unseen-poly/ (train on mono, test on poly) and unseen-mono/; MVTec unseen-<category>/ (leave one category \
out). Image paths are written absolute. Deterministic under --seed."
    )]
    Build(BuildArgs),
    /// Synthetic anomalies with masks (CutPaste, DRAEM, NSA) from a data set's normal images.
    #[command(long_about = SYNTH_LONG_ABOUT)]
    Synth(SynthArgs),
    /// Validate an AD-PL, MANTA or MMAD file and list every problem (exit 2 when any).
    Check(CheckArgs),
    /// Count items and questions per level, label, category and split.
    Stats(StatsArgs),
}

#[derive(clap::Args, Debug)]
struct BuildArgs {
    /// Where the images come from.
    #[arg(long, value_enum)]
    source: Source,
    /// The dataset folder (default for elpv: the installed ELPV package; required for mvtec).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Seed for references, split and wording.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write TRL preference pairs (`*.trl.jsonl`: prompt, images, chosen, rejected).
    #[arg(long)]
    export_trl: bool,
    /// Use at most this many images of each category and label, in file order (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Share of each category-and-label group in the random split's test set.
    #[arg(long, default_value_t = 0.2)]
    test_fraction: f64,
    /// mvtec: categories to hold out, one split each, comma-separated (default: every category).
    #[arg(long, value_delimiter = ',')]
    holdout: Vec<String>,
}

const SYNTH_LONG_ABOUT: &str =
    "Synthetic anomalies with pixel masks, drawn from the normal images of ELPV (categories: \
the cell types mono and poly) or an MVTec-layout folder (<category>/train/good and test/good). Each category's \
normals are shuffled under --seed and shared out ([split] in --config): references to train/good, held-out normals \
to test/good, the rest are sources, each giving --per-image anomalies. Methods: cutpaste (a jittered rectangle of \
the image pasted elsewhere; mask = the pasted footprint), draem (a thresholded Perlin-noise region filled with a \
texture taken from another category's normal image; mask = the region), nsa (a patch of another normal image of \
the category, Poisson-blended; mask = the pixels the blend visibly changed). Pixels outside a mask are the \
source's exactly. Writes OUT/<category>/{train/good,test/good,test/<method>,ground_truth/<method>} (the MVTec \
layout `sage data build --source mvtec --root OUT` reads) and OUT/<category>/synth-<method>.json (every sample's \
source, drawn parameters and mask boxes). Another --method into the same OUT adds its folders and leaves \
train/good and test/good as they were. Deterministic under --seed. Parameters: configs/synth.toml.";

#[derive(clap::Args, Debug)]
struct SynthArgs {
    /// Where the normal images come from.
    #[arg(long, value_enum)]
    source: Source,
    /// The dataset folder (default for elpv: the installed ELPV package; required for mvtec).
    #[arg(long)]
    root: Option<PathBuf>,
    /// Output folder (MVTec layout); must not overlap --root.
    #[arg(long)]
    out: PathBuf,
    /// The recipe.
    #[arg(long, value_enum)]
    method: Method,
    /// Anomalies drawn from each source image.
    #[arg(long, default_value_t = 1)]
    per_image: usize,
    /// Seed for the split and every sample.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// TOML with [split], [accept], [cutpaste], [draem], [nsa] (default: configs/synth.toml's values).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Use at most this many source images per category (0 = all); the split is unchanged.
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Also write a PNG grid of the first samples: source beside anomaly, mask contour in red.
    #[arg(long)]
    contact_sheet: Option<PathBuf>,
    /// Samples on the contact sheet.
    #[arg(long, default_value_t = 16)]
    sheet_count: usize,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The file's format.
    #[arg(long, value_enum)]
    format: DataFormat,
    /// The data file.
    path: PathBuf,
    /// Folder that relative image paths start from (default: the file's folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct StatsArgs {
    /// The data file.
    path: PathBuf,
    /// The file's format (default: guessed from the content).
    #[arg(long, value_enum)]
    format: Option<DataFormat>,
    /// Folder that relative image paths start from (default: the file's folder).
    #[arg(long)]
    image_root: Option<PathBuf>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    match a.command {
        Cmd::Build(b) => run_build(ctx, b),
        Cmd::Synth(a) => run_synth(ctx, a),
        Cmd::Check(c) => run_check(ctx, c),
        Cmd::Stats(s) => run_stats(ctx, s),
    }
}

/// `--root`, or for ELPV the installed package's folder.
fn source_root(root: Option<PathBuf>, source: Source) -> Result<PathBuf> {
    match (root, source) {
        (Some(r), _) => Ok(r),
        (None, Source::Elpv) => Asset::ElpvDir.path(),
        (None, Source::Mvtec) => Err(user_err!("--source mvtec needs --root <folder of MVTec AD categories>")),
    }
}

fn run_build(ctx: &Ctx, a: BuildArgs) -> Result<()> {
    let root = source_root(a.root, a.source)?;
    let opts = build::Options {
        source: a.source,
        root,
        out: a.out,
        seed: a.seed,
        export_trl: a.export_trl,
        limit: a.limit,
        test_fraction: a.test_fraction,
        holdout: a.holdout,
    };
    let t0 = std::time::Instant::now();
    let s = build::build(&opts, ctx.quiet())?;
    if ctx.json {
        return print_json(&s);
    }
    let skipped = s.skipped_ambiguous.map(|n| format!("; {n} ambiguous cells skipped")).unwrap_or_default();
    println!(
        "AD-PL from {} (seed {}): {} image pairs ({} normal, {} anomalous{skipped}), {} questions",
        s.root.display(),
        s.seed,
        s.samples,
        s.normal,
        s.anomalous,
        s.questions
    );
    let w = s.files.iter().map(|f| f.path.display().to_string().chars().count()).max().unwrap_or(0);
    for f in &s.files {
        let trl = f.trl_pairs.map(|n| format!("  {n:>6} TRL pairs")).unwrap_or_default();
        println!(
            "  {:<w$}  {:>6} items  {:>6} normal  {:>6} anomalous{trl}",
            f.path.display().to_string(),
            f.items,
            f.normal,
            f.anomalous
        );
    }
    println!("written in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_synth(ctx: &Ctx, a: SynthArgs) -> Result<()> {
    let root = source_root(a.root, a.source)?;
    let opts = synth::Options {
        source: a.source,
        root,
        out: a.out,
        method: a.method,
        per_image: a.per_image,
        seed: a.seed,
        config: a.config,
        limit: a.limit,
        contact_sheet: a.contact_sheet,
        sheet_count: a.sheet_count,
    };
    let t0 = std::time::Instant::now();
    let s = synth::run(&opts, ctx.quiet())?;
    if ctx.json {
        return print_json(&s);
    }
    println!(
        "{} anomalies from {} (seed {}) into {}: {} kept, {} skipped",
        s.method.name(),
        s.root.display(),
        s.seed,
        s.out.display(),
        s.samples,
        s.skipped
    );
    for c in &s.categories {
        println!(
            "  {:<12} {:>5} normals: {:>5} train/good {:>5} test/good {:>5} sources -> {:>5} samples ({} skipped)  {}",
            c.category,
            c.normals,
            c.train_good,
            c.test_good,
            c.sources,
            c.samples,
            c.skipped,
            c.manifest.display()
        );
    }
    if let Some(p) = &s.contact_sheet {
        println!("contact sheet: {}", p.display());
    }
    println!("written in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_check(ctx: &Ctx, a: CheckArgs) -> Result<()> {
    let root = a.image_root.as_deref();
    let report: Report = match a.format {
        DataFormat::Adpl => adpl::check(&a.path, root),
        DataFormat::Manta => manta::check(&a.path, root),
        DataFormat::Mmad => mmad::check(&a.path, root),
    };
    if ctx.json {
        print_json(&report)?;
        if !report.ok {
            return Err(user_err!("{}: {} problems (listed on stdout)", a.path.display(), report.problems.len()));
        }
        return Ok(());
    }
    if !report.ok {
        return Err(report.to_error(None));
    }
    println!("ok: {} items", report.items);
    Ok(())
}

/// The format a file's content looks like: an object is MMAD; an array whose first item has
/// `domain` is MANTA; any other array AD-PL.
fn run_stats(ctx: &Ctx, a: StatsArgs) -> Result<()> {
    let format = match a.format {
        Some(f) => f,
        None => guess_format(&a.path)?,
    };
    let root = a.image_root.as_deref();
    let samples: Vec<Sample> = load_samples(&a.path, Some(format), root)?;
    let st = stats::compute(&samples);
    if ctx.json {
        let mut v = serde_json::to_value(&st)?;
        v["path"] = serde_json::json!(a.path);
        v["format"] = serde_json::json!(format!("{format:?}").to_lowercase());
        return print_json(&v);
    }
    println!("{} ({})", a.path.display(), format!("{format:?}").to_lowercase());
    print!("{}", st.render());
    Ok(())
}
