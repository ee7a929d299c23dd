//! What the training commands (`sfe`, `edpo`, `grpo`) share: their common arguments, the op set
//! `--device` picks, the summary written into the run folder, and the answer to a `--resume` of a
//! finished run.

use super::{print_json, Ctx};
use crate::stage::FINAL_FILE;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// The arguments every training command takes.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The run description (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// Output folder [default: runs/<config name>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Override train.steps.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=crate::sfe::config::MAX_STEPS))]
    pub steps: Option<u64>,
}

impl RunArgs {
    /// --out, or `runs/<config file stem>`.
    pub fn out_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| {
            let stem = self.config.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
            PathBuf::from("runs").join(stem)
        })
    }
}

/// Evaluates `$body` with `$ops` bound to the op set `--device` picks: the CUDA op set for `cuda`,
/// the host's otherwise. A macro because each stage's `train` is generic over the op set, and a
/// closure cannot be.
macro_rules! with_step_ops {
    ($ctx:expr, |$ops:ident| $body:expr) => {
        if $ctx.backend.backend == "cuda" {
            let gpu = $crate::backend::cuda::Gpu::global()?;
            let $ops = $crate::backend::cuda::step_ops::CudaOps::new(gpu);
            $body
        } else {
            let $ops = $crate::backend::cpu::HostOps;
            $body
        }
    };
}
pub(crate) use with_step_ops;

/// Writes a finished run's summary as `final.json` in `out` (atomically).
pub fn write_final(out: &Path, summary: &serde_json::Value) -> Result<()> {
    crate::util::write_atomic(&out.join(FINAL_FILE), serde_json::to_string_pretty(summary)?.as_bytes())
}

/// `--resume` of a finished run (`stage`: the command): says so, and touches nothing in `out`.
pub fn report_finished(ctx: &Ctx, stage: &str, out: &Path, step: u64) -> Result<()> {
    if ctx.json {
        return print_json(&serde_json::json!({"out": out, "finished": true, "step": step}));
    }
    println!(
        "{stage}: {} is finished (checkpoint at step {step}, {FINAL_FILE} written); nothing to do. Pass a larger \
         --steps to train further",
        out.display()
    );
    Ok(())
}
