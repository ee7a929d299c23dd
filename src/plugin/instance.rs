//! What callers hold: a plugin and its live instances, the same whether the plugin is built into
//! sage ([`super::builtin`]) or loaded from a library ([`super::loader`]). Both speak the ABI's
//! terms behind [`Calls`] — JSON text in and out, a status and a message on failure — so a
//! built-in keeps exactly the contract a library has, and no caller asks which one it got.

use crate::user_err;
use anyhow::Result;
use sage_plugin_sdk::ffi::{SagePluginV1, SageStatus};
use sage_plugin_sdk::{F32View, F32ViewMut, PluginError, PluginResult};
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Backbone,
    Judge,
    Dataset,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Kind::Backbone => "backbone",
            Kind::Judge => "judge",
            Kind::Dataset => "dataset",
        })
    }
}

/// One instance's functions, in the ABI's terms. Every kind's functions are here; a plugin
/// answers `SAGE_UNSUPPORTED` for those of other kinds.
pub(crate) trait Calls: Send {
    fn backbone_describe(&mut self) -> PluginResult<String>;
    fn backbone_encode_image(&mut self, pixels: F32View, out: F32ViewMut) -> PluginResult<()>;
    fn backbone_generate(&mut self, prompt: &str, options_json: &str) -> PluginResult<String>;
    fn judge_score(&mut self, request_json: &str) -> PluginResult<String>;
    fn dataset_open(&mut self, source: &str) -> PluginResult<i64>;
    fn dataset_get(&mut self, index: i64) -> PluginResult<String>;
}

/// Makes an instance from its JSON config.
pub(crate) type Create = fn(&str) -> PluginResult<Box<dyn Calls>>;

/// How instances of a plugin are made: the built-in's constructor ([`super::builtin`]), or a
/// library's table with the loader's constructor for it ([`super::loader`]); handed in by each,
/// so this interface depends on neither.
#[derive(Clone, Copy)]
pub(crate) enum Factory {
    Builtin(Create),
    /// The library's table (`'static` because libraries are never unloaded) and what calls it.
    Library(&'static SagePluginV1, fn(&'static SagePluginV1, &str) -> PluginResult<Box<dyn Calls>>),
}

/// A plugin that is ready to use: a built-in, or a library that passed every check.
#[derive(Clone, Serialize)]
pub struct PluginInfo {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub description: String,
    /// Compiled into sage (runs on its thread pool; there is no file).
    pub builtin: bool,
    /// The library it was loaded from; `None` for a built-in.
    pub file: Option<PathBuf>,
    #[serde(skip)]
    pub(crate) factory: Factory,
}

impl std::fmt::Debug for PluginInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ({})", self.kind, self.name, self.version, self.origin())
    }
}

impl PluginInfo {
    /// Where it comes from, for messages: `built-in` or the library's path.
    pub fn origin(&self) -> String {
        match &self.file {
            Some(f) => f.display().to_string(),
            None => "built-in".to_string(),
        }
    }

    /// Creates an instance from a JSON config; a refusal names the plugin, its origin and reason.
    pub fn instantiate(&self, config: &serde_json::Value) -> Result<Instance> {
        let config = config.to_string();
        let made = match self.factory {
            Factory::Builtin(create) => create(&config),
            Factory::Library(table, create) => create(table, &config),
        };
        match made {
            Ok(calls) => Ok(Instance { plugin: self.clone(), calls }),
            Err(e) => Err(user_err!(
                "{} plugin `{}` ({}) refused its configuration: {}",
                self.kind,
                self.name,
                self.origin(),
                e.message
            )),
        }
    }
}

/// Why a plugin call failed, with its status, for callers that react to timeouts.
#[derive(Debug)]
pub struct CallError {
    pub status: SageStatus,
    pub message: String,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
impl std::error::Error for CallError {}

/// A live plugin instance; destroyed on drop (a library stays loaded).
pub struct Instance {
    plugin: PluginInfo,
    calls: Box<dyn Calls>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instance of {:?}", self.plugin)
    }
}

impl Instance {
    pub fn plugin(&self) -> &PluginInfo {
        &self.plugin
    }

    /// A failed call as an error naming the plugin. Asking a plugin for something it does not
    /// offer is the user's choice of plugin (a user error); anything else is a [`CallError`].
    fn failed(&self, what: &str, e: PluginError) -> anyhow::Error {
        let p = &self.plugin;
        let message = format!("{} plugin `{}` ({}): {what} failed: {}", p.kind, p.name, p.origin(), e.message);
        if e.status == SageStatus::SAGE_UNSUPPORTED {
            return user_err!("{message}");
        }
        anyhow::Error::new(CallError { status: e.status, message })
    }

    fn json(&self, what: &str, text: &str) -> Result<serde_json::Value> {
        serde_json::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{} plugin `{}` ({}): {what} returned invalid JSON: {e}",
                self.plugin.kind,
                self.plugin.name,
                self.plugin.origin()
            )
        })
    }

    pub fn backbone_describe(&mut self) -> Result<serde_json::Value> {
        let r = self.calls.backbone_describe();
        let text = r.map_err(|e| self.failed("describe", e))?;
        self.json("describe", &text)
    }

    /// `pixels[3, h, w]` → `patches[p, c]` (the caller sizes `patches` from the description).
    pub fn backbone_encode_image(
        &mut self,
        pixels: &[f32],
        hw: (usize, usize),
        patches: &mut [f32],
        pc: (usize, usize),
    ) -> Result<()> {
        anyhow::ensure!(
            pixels.len() == 3 * hw.0 * hw.1 && patches.len() == pc.0 * pc.1,
            "tensor sizes do not match their shapes"
        );
        let pixels = F32View { shape: vec![3, hw.0, hw.1], data: pixels };
        let out = F32ViewMut { shape: vec![pc.0, pc.1], data: patches };
        let r = self.calls.backbone_encode_image(pixels, out);
        r.map_err(|e| self.failed("encode_image", e))
    }

    pub fn backbone_generate(&mut self, prompt: &str, options: &serde_json::Value) -> Result<String> {
        let r = self.calls.backbone_generate(prompt, &options.to_string());
        r.map_err(|e| self.failed("generate", e))
    }

    pub fn judge_score(&mut self, request: &serde_json::Value) -> Result<serde_json::Value> {
        let r = self.calls.judge_score(&request.to_string());
        let text = r.map_err(|e| self.failed("score", e))?;
        self.json("score", &text)
    }

    pub fn dataset_open(&mut self, source: &Path) -> Result<usize> {
        let r = self.calls.dataset_open(&source.to_string_lossy());
        let n = r.map_err(|e| self.failed("open", e))?;
        usize::try_from(n).map_err(|_| anyhow::anyhow!("plugin `{}` reported {n} samples", self.plugin.name))
    }

    pub fn dataset_get(&mut self, index: usize) -> Result<serde_json::Value> {
        let r = self.calls.dataset_get(index as i64);
        let text = r.map_err(|e| self.failed("get", e))?;
        self.json("get", &text)
    }
}
