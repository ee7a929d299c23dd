//! Backbones by name for the stages: a built-in (`models::backbone`), or an external backbone
//! plugin whose description's `engine` section names the families and files the engine runs
//! ([`Backbone::from_description`]).

use super::{discover, Kind};
use crate::models::backbone::{self, Backbone};
use anyhow::{Context, Result};
use std::path::PathBuf;

/// The backbone called `name`: a built-in, else the backbone plugin of that name found in
/// `plugin_dirs` (then `SAGE_PLUGIN_PATH` and the binary's folder), asked for its description.
pub fn resolve(name: &str, plugin_dirs: &[PathBuf]) -> Result<Backbone> {
    if backbone::builtin(name).is_ok() {
        return Backbone::resolve(name);
    }
    let found = discover(plugin_dirs);
    let info = found.get(Kind::Backbone, name).map_err(|e| {
        let names: Vec<&str> = backbone::BUILTINS.iter().map(|b| b.name).collect();
        crate::user_err!("unknown backbone `{name}`: not built in ({}), and {e:#}", names.join(", "))
    })?;
    let mut inst = info.instantiate(&serde_json::json!({}))?;
    let desc = inst.backbone_describe().with_context(|| format!("describing backbone plugin `{name}`"))?;
    Backbone::from_description(name, &desc)
}
