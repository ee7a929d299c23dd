//! `sage plugins`: what was found where, and what was refused and why.

use super::{print_json, Ctx};
use crate::plugin::discover;
use anyhow::Result;

pub const LONG_ABOUT: &str =
    "Lists the plugins built into sage (the lite backbone, the rubric judge, the dataset readers), then searches \
--plugin-dir folders, SAGE_PLUGIN_PATH (colon-separated) and the folder of the sage binary (where `cargo build` puts \
the in-tree external plugins), loads every plugin library, and lists each plugin's kind, name, version and file \
(`built-in` for the built-ins), and each refused file with the reason (wrong ABI version, not a plugin, missing \
symbol, failed initialisation, shadowed by a built-in or an earlier plugin of the same kind and name).";

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(ctx: &Ctx, _a: Args) -> Result<()> {
    let d = discover(&ctx.plugin_dirs);
    if ctx.json {
        return print_json(&d);
    }
    println!("searched: {}", d.searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    for p in &d.plugins {
        println!("{:<9} {:<8} {:<7} {}\n{:<26}{}", p.kind, p.name, p.version, p.origin(), "", p.description);
    }
    if d.plugins.iter().all(|p| p.builtin) {
        println!("no plugin libraries found; `cargo build --release` builds the in-tree external ones beside the sage binary");
    }
    for r in &d.refused {
        println!("refused   {}\n{:<10}{}", r.file.display(), "", r.reason);
    }
    Ok(())
}
