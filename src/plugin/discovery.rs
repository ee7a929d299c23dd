//! Finding plugins: the built-ins, then plugin libraries.
//!
//! The built-ins ([`super::builtin`]) come first. Libraries are searched in `--plugin-dir` (in the
//! order given), `SAGE_PLUGIN_PATH` (colon-separated), then the directory of the running `sage`
//! binary (where `cargo build` puts the in-tree external plugins). In explicit directories every
//! shared library is tried, so a stray file is reported; beside the binary only `*sage_plugin_*`
//! libraries are. The first plugin of a given kind and name wins; later ones are refused as
//! shadowed — so a library can never replace a built-in (a judge's name is part of its score
//! cache key, and `rubric` must mean the same judge everywhere). Each library is first loaded in a
//! child process ([`super::probe`]), so one that crashes is refused, not fatal; the ones it
//! accepts are loaded here ([`super::loader`]).

use super::instance::{Kind, PluginInfo};
use super::{builtin, loader, probe};
use crate::user_err;
use anyhow::Result;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// A file that was not accepted, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub file: PathBuf,
    pub reason: String,
}

#[derive(Default, Debug, Serialize)]
pub struct Discovery {
    pub searched: Vec<PathBuf>,
    /// The built-ins first, then the libraries that were accepted.
    pub plugins: Vec<PluginInfo>,
    pub refused: Vec<Refusal>,
}

fn is_shared_library(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("so" | "dylib" | "dll"))
}

/// The directories to search, in order.
pub fn search_dirs(explicit: &[PathBuf]) -> Vec<(PathBuf, bool)> {
    let mut dirs: Vec<(PathBuf, bool)> = explicit.iter().map(|d| (d.clone(), true)).collect();
    if let Some(path) = std::env::var_os("SAGE_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&path).filter(|p| !p.as_os_str().is_empty()).map(|p| (p, true)));
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push((dir, false));
    }
    dirs
}

/// The built-ins and every plugin library found; never fails as a whole (problems become
/// refusals).
pub fn discover(explicit: &[PathBuf]) -> Discovery {
    let mut d = Discovery { plugins: builtin::plugins().collect(), ..Discovery::default() };
    for (dir, explicit) in search_dirs(explicit) {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| is_shared_library(p)).collect(),
            Err(e) => {
                if explicit {
                    d.refused.push(Refusal { file: dir.clone(), reason: format!("cannot read plugin directory: {e}") });
                }
                d.searched.push(dir);
                continue;
            }
        };
        files.sort();
        d.searched.push(dir);
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !explicit && !name.contains("sage_plugin_") {
                continue;
            }
            // A library that crashes or exits while loading is refused after killing only the
            // probe process; the ones it accepts are loaded here.
            match probe::probe(&file).and_then(|()| loader::load(&file)) {
                Ok(p) => {
                    if let Some(first) = d.plugins.iter().find(|q| q.kind == p.kind && q.name == p.name) {
                        let reason = match &first.file {
                            Some(f) => format!("{} `{}` is shadowed by {}", p.kind, p.name, f.display()),
                            None => format!(
                                "{} `{}` is shadowed by the built-in of that name: a library cannot replace a built-in plugin (rename the plugin, or delete the file if an older sage build left it there)",
                                p.kind, p.name
                            ),
                        };
                        d.refused.push(Refusal { file, reason });
                    } else {
                        d.plugins.push(p);
                    }
                }
                Err(reason) => d.refused.push(Refusal { file, reason }),
            }
        }
    }
    d
}

impl Discovery {
    /// The plugin of this kind and name, or a user error listing what there is.
    pub fn get(&self, kind: Kind, name: &str) -> Result<&PluginInfo> {
        self.plugins.iter().find(|p| p.kind == kind && p.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.plugins.iter().filter(|p| p.kind == kind).map(|p| p.name.as_str()).collect();
            let refused: Vec<String> =
                self.refused.iter().map(|r| format!("{} ({})", r.file.display(), r.reason)).collect();
            user_err!(
                "no {kind} plugin named `{name}` (found: {}){}. Build the in-tree external plugins with `cargo build --release`, or add a folder with --plugin-dir / SAGE_PLUGIN_PATH; `sage plugins` lists what was found",
                if have.is_empty() { "none".to_string() } else { have.join(", ") },
                if refused.is_empty() { String::new() } else { format!("; refused: {}", refused.join("; ")) }
            )
        })
    }
}
