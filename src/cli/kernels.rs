//! `sage kernels`: compile the CUDA kernels ahead of time into the PTX cache.

use super::{print_json, Ctx};
use crate::backend::cuda::kernels::{self, KernelFile};
use crate::backend::nvrtc::{self, Arch};
use crate::user_err;
use anyhow::Result;

pub const LONG_ABOUT: &str = "The CUDA kernels (kernels/*.cu, embedded in this binary) are compiled to PTX by NVRTC \
13.0 at first use and cached under $SAGE_HOME/kernels-cache, keyed by the source, the shared header kernels/common.cuh, the architecture and the options. \
`sage kernels build` fills that cache ahead of time, with no GPU needed: NVRTC comes from the pinned wheels \
(`sage fetch --cuda`) or SAGE_NVRTC. Copy the cache folder to a GPU machine without NVRTC and the kernels load \
from it (`sage doctor` shows which entries are cached).";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// Compile every kernel for the given architectures into $SAGE_HOME/kernels-cache.
    Build {
        /// Architectures (compute capability × 10): 80 for A100-class (sm_80+), 90 for H100.
        #[arg(long, value_delimiter = ',', default_value = "80,90")]
        arch: Vec<u32>,
    },
}

pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    let What::Build { arch } = a.what;
    if let Some(bad) = arch.iter().find(|&&x| x != 80 && x != 90) {
        return Err(user_err!("--arch {bad}: the kernels are built for 80 (sm_80 and newer) or 90 (sm_90 and newer)"));
    }
    let mut rows = Vec::new();
    for file in kernels::ALL {
        for &a in &arch {
            rows.push(build_one(file, Arch(a))?);
        }
    }
    if ctx.json {
        return print_json(&serde_json::json!({ "cache": nvrtc::cache_dir(), "kernels": rows }));
    }
    println!("PTX cache: {}", nvrtc::cache_dir().display());
    for r in &rows {
        println!(
            "  {:<16} {:<6} {:>8} bytes  {}  {}",
            r["file"].as_str().unwrap_or(""),
            r["arch"].as_str().unwrap_or(""),
            r["bytes"],
            if r["was_cached"].as_bool() == Some(true) { "cached  " } else { "compiled" },
            r["path"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

fn build_one(file: &KernelFile, arch: Arch) -> Result<serde_json::Value> {
    let path = kernels::cache_path(file, arch);
    let was_cached = path.exists();
    let ptx = kernels::ptx(file, arch)?;
    Ok(serde_json::json!({
        "file": file.name, "arch": arch.sm(), "bytes": ptx.len(), "was_cached": was_cached,
        "path": path, "entries": file.entries,
    }))
}
