//! `sage plugins`: what was found where, and what was refused and why.

use super::{print_json, Ctx};
use crate::plugin::discover;
use anyhow::Result;

pub const LONG_ABOUT: &str =
    "Searches --plugin-dir folders, then SAGE_PLUGIN_PATH (colon-separated), then the folder of the \
sage binary (where `cargo build` puts the in-tree plugins), loads every plugin library, and lists each plugin's kind, \
name, version and file, and each refused file with the reason (wrong ABI version, not a plugin, missing symbol, \
failed initialisation, shadowed by an earlier plugin of the same name).";

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(ctx: &Ctx, _a: Args) -> Result<()> {
    let d = discover(&ctx.plugin_dirs);
    if ctx.json {
        return print_json(&d);
    }
    println!("searched: {}", d.searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    if d.plugins.is_empty() {
        println!("no plugins found; `cargo build --release` builds the in-tree ones beside the sage binary");
    }
    for p in &d.plugins {
        println!("{:<9} {:<8} {:<7} {}\n{:<26}{}", p.kind, p.name, p.version, p.file.display(), "", p.description);
    }
    for r in &d.refused {
        println!("refused   {}\n{:<10}{}", r.file.display(), "", r.reason);
    }
    Ok(())
}
