//! Finding and loading plugin libraries.
//!
//! Search order: `--plugin-dir` (in the order given), `SAGE_PLUGIN_PATH` (colon-separated), then
//! the directory of the running `sage` binary (where `cargo build` puts the in-tree plugins).
//! In explicit directories every shared library is tried, so a stray file is reported; beside
//! the binary only `*sage_plugin_*` libraries are. The first plugin of a given kind and name
//! wins; later ones are refused as shadowed. Libraries are never unloaded. Each library is first
//! loaded in a child process ([`super::probe`]), so one that crashes is refused, not fatal.

use super::host;
use crate::user_err;
use anyhow::Result;
use sage_plugin_sdk::ffi::*;
use serde::Serialize;
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Backbone,
    Judge,
    Dataset,
}

impl Kind {
    fn from_ffi(k: SageKind) -> Option<Kind> {
        match k {
            SageKind::SAGE_KIND_BACKBONE => Some(Kind::Backbone),
            SageKind::SAGE_KIND_JUDGE => Some(Kind::Judge),
            SageKind::SAGE_KIND_DATASET => Some(Kind::Dataset),
            _ => None,
        }
    }
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

/// A plugin that passed every check. The table is `'static`: the library is never unloaded.
#[derive(Clone, Serialize)]
pub struct LoadedPlugin {
    pub kind: Kind,
    pub name: String,
    pub version: String,
    pub description: String,
    pub file: PathBuf,
    #[serde(skip)]
    table: &'static SagePluginV1,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {} ({})", self.kind, self.name, self.version, self.file.display())
    }
}

/// A file that was not accepted, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Refusal {
    pub file: PathBuf,
    pub reason: String,
}

#[derive(Default, Debug, Serialize)]
pub struct Discovery {
    pub searched: Vec<PathBuf>,
    pub plugins: Vec<LoadedPlugin>,
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

/// Finds and loads every plugin; never fails as a whole (problems become refusals).
pub fn discover(explicit: &[PathBuf]) -> Discovery {
    let mut d = Discovery::default();
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
            match super::probe::probe(&file).and_then(|()| load(&file)) {
                Ok(p) => {
                    if let Some(first) = d.plugins.iter().find(|q| q.kind == p.kind && q.name == p.name) {
                        let reason = format!("{} `{}` is shadowed by {}", p.kind, p.name, first.file.display());
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

unsafe fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        CStr::from_ptr(p).to_str().ok().map(str::to_owned)
    }
}

/// Loads one library and validates its table; the error is the refusal reason.
pub fn load(file: &Path) -> Result<LoadedPlugin, String> {
    // SAFETY: loading a library runs its initialisers; that is the contract of a plugin system.
    let lib = unsafe { libloading::Library::new(file) }.map_err(|e| format!("not a loadable shared library: {e}"))?;
    let lib: &'static libloading::Library = Box::leak(Box::new(lib)); // never unloaded
                                                                      // SAFETY: the symbol's type is fixed by the ABI header.
    let entry: libloading::Symbol<SagePluginEntryFn> = unsafe { lib.get(b"sage_plugin_entry\0") }.map_err(|_| {
        "no `sage_plugin_entry` symbol: not a sage plugin (see plugins/include/sage_plugin.h)".to_string()
    })?;
    let entry = (*entry).ok_or("`sage_plugin_entry` is a null symbol")?;
    let table = unsafe { entry(host::table()) };
    if table.is_null() {
        return Err("`sage_plugin_entry` returned no plugin table".into());
    }
    // Read the two leading fields before trusting the rest of the layout.
    let (abi, size) = unsafe { ((*table).abi_version, (*table).struct_size) };
    if abi != SAGE_PLUGIN_ABI_VERSION {
        return Err(format!(
            "built for plugin ABI version {abi}, but this sage speaks version {SAGE_PLUGIN_ABI_VERSION}; rebuild the plugin against this sage's plugins/include/sage_plugin.h"
        ));
    }
    if (size as usize) < std::mem::size_of::<SagePluginV1>() {
        return Err(format!(
            "plugin table is {size} bytes, ABI version {abi} needs {}; rebuild the plugin",
            std::mem::size_of::<SagePluginV1>()
        ));
    }
    let table: &'static SagePluginV1 = unsafe { &*table };
    let kind = Kind::from_ffi(table.kind).ok_or_else(|| format!("unknown plugin kind {}", table.kind.0))?;
    let name = unsafe { c_str(table.name) }.filter(|n| !n.is_empty()).ok_or("the plugin has no name")?;
    let version = unsafe { c_str(table.version) }.unwrap_or_else(|| "?".into());
    let description = unsafe { c_str(table.description) }.unwrap_or_default();
    for (present, f) in [
        (table.create.is_some(), "create"),
        (table.destroy.is_some(), "destroy"),
        (table.last_error.is_some(), "last_error"),
    ] {
        if !present {
            return Err(format!("{kind} `{name}` lacks the required function `{f}`"));
        }
    }
    if let Some(init) = table.init {
        let status = unsafe { init() };
        if status != SageStatus::SAGE_OK {
            let msg = unsafe { c_str((table.last_error.expect("checked"))(std::ptr::null())) }.unwrap_or_default();
            return Err(format!("{kind} `{name}` failed to initialise (status {}): {msg}", status.0));
        }
    }
    Ok(LoadedPlugin { kind, name, version, description, file: file.to_path_buf(), table })
}

impl Discovery {
    /// The plugin of this kind and name, or a user error listing what there is.
    pub fn get(&self, kind: Kind, name: &str) -> Result<&LoadedPlugin> {
        self.plugins.iter().find(|p| p.kind == kind && p.name == name).ok_or_else(|| {
            let have: Vec<&str> = self.plugins.iter().filter(|p| p.kind == kind).map(|p| p.name.as_str()).collect();
            let refused: Vec<String> =
                self.refused.iter().map(|r| format!("{} ({})", r.file.display(), r.reason)).collect();
            user_err!(
                "no {kind} plugin named `{name}` (found: {}){}. Build the in-tree plugins with `cargo build --release`, or add a folder with --plugin-dir / SAGE_PLUGIN_PATH; `sage plugins` lists what was found",
                if have.is_empty() { "none".to_string() } else { have.join(", ") },
                if refused.is_empty() { String::new() } else { format!("; refused: {}", refused.join("; ")) }
            )
        })
    }
}

/// A live plugin instance; destroyed on drop (the library stays loaded).
pub struct Instance {
    plugin: LoadedPlugin,
    ptr: *mut SageInstance,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "instance of {:?}", self.plugin)
    }
}

// Instances are used from one thread at a time (`&mut self` on every call).
unsafe impl Send for Instance {}

impl LoadedPlugin {
    /// Creates an instance from a JSON config; a refusal names the plugin, its file and reason.
    pub fn instantiate(&self, config: &serde_json::Value) -> Result<Instance> {
        let cfg = CString::new(config.to_string()).expect("JSON has no NUL");
        let mut ptr = std::ptr::null_mut();
        let create = self.table.create.expect("checked at load");
        let status = unsafe { create(cfg.as_ptr(), &mut ptr) };
        if status != SageStatus::SAGE_OK || ptr.is_null() {
            let msg = unsafe { c_str((self.table.last_error.expect("checked"))(std::ptr::null())) }.unwrap_or_default();
            return Err(user_err!(
                "{} plugin `{}` ({}) refused its configuration: {msg}",
                self.kind,
                self.name,
                self.file.display()
            ));
        }
        Ok(Instance { plugin: self.clone(), ptr })
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

impl Instance {
    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    fn check(&self, what: &str, status: SageStatus) -> Result<()> {
        if status == SageStatus::SAGE_OK {
            return Ok(());
        }
        let msg = unsafe { c_str((self.plugin.table.last_error.expect("checked"))(self.ptr)) }.unwrap_or_default();
        let p = &self.plugin;
        Err(anyhow::Error::new(CallError {
            status,
            message: format!("{} plugin `{}` ({}): {what} failed: {msg}", p.kind, p.name, p.file.display()),
        }))
    }

    fn missing(&self, what: &str) -> anyhow::Error {
        user_err!("{} plugin `{}` does not provide {what}", self.plugin.kind, self.plugin.name)
    }

    unsafe fn take_string(&self, p: *const c_char) -> Result<String> {
        c_str(p).ok_or_else(|| anyhow::anyhow!("plugin `{}` returned no (or non-UTF-8) text", self.plugin.name))
    }

    pub fn backbone_describe(&mut self) -> Result<serde_json::Value> {
        let f = self.plugin.table.backbone_describe.ok_or_else(|| self.missing("backbone_describe"))?;
        let mut out = std::ptr::null();
        self.check("describe", unsafe { f(self.ptr, &mut out) })?;
        Ok(serde_json::from_str(&unsafe { self.take_string(out)? })?)
    }

    /// `pixels[3, h, w]` → `patches[p, c]` (the caller sizes `patches` from the description).
    pub fn backbone_encode_image(
        &mut self,
        pixels: &[f32],
        hw: (usize, usize),
        patches: &mut [f32],
        pc: (usize, usize),
    ) -> Result<()> {
        let f = self.plugin.table.backbone_encode_image.ok_or_else(|| self.missing("backbone_encode_image"))?;
        anyhow::ensure!(
            pixels.len() == 3 * hw.0 * hw.1 && patches.len() == pc.0 * pc.1,
            "tensor sizes do not match their shapes"
        );
        let pin = view(pixels.as_ptr() as *mut _, &[3, hw.0, hw.1]);
        let mut pout = view(patches.as_mut_ptr(), &[pc.0, pc.1]);
        self.check("encode_image", unsafe { f(self.ptr, &pin, &mut pout) })
    }

    pub fn backbone_generate(&mut self, prompt: &str, options: &serde_json::Value) -> Result<String> {
        let f = self.plugin.table.backbone_generate.ok_or_else(|| self.missing("backbone_generate"))?;
        let (p, o) = (CString::new(prompt)?, CString::new(options.to_string())?);
        let mut out = std::ptr::null();
        self.check("generate", unsafe { f(self.ptr, p.as_ptr(), o.as_ptr(), &mut out) })?;
        unsafe { self.take_string(out) }
    }

    pub fn judge_score(&mut self, request: &serde_json::Value) -> Result<serde_json::Value> {
        let f = self.plugin.table.judge_score.ok_or_else(|| self.missing("judge_score"))?;
        let r = CString::new(request.to_string())?;
        let mut out = std::ptr::null();
        self.check("score", unsafe { f(self.ptr, r.as_ptr(), &mut out) })?;
        Ok(serde_json::from_str(&unsafe { self.take_string(out)? })?)
    }

    pub fn dataset_open(&mut self, source: &Path) -> Result<usize> {
        let f = self.plugin.table.dataset_open.ok_or_else(|| self.missing("dataset_open"))?;
        let s = CString::new(source.to_string_lossy().as_bytes())?;
        let mut n: i64 = 0;
        self.check("open", unsafe { f(self.ptr, s.as_ptr(), &mut n) })?;
        usize::try_from(n).map_err(|_| anyhow::anyhow!("plugin `{}` reported {n} samples", self.plugin.name))
    }

    pub fn dataset_get(&mut self, index: usize) -> Result<serde_json::Value> {
        let f = self.plugin.table.dataset_get.ok_or_else(|| self.missing("dataset_get"))?;
        let mut out = std::ptr::null();
        self.check("get", unsafe { f(self.ptr, index as i64, &mut out) })?;
        Ok(serde_json::from_str(&unsafe { self.take_string(out)? })?)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(d) = self.plugin.table.destroy {
            unsafe { d(self.ptr) };
        }
    }
}

/// A contiguous CPU f32 view.
fn view(data: *mut f32, shape: &[usize]) -> SageTensorView {
    let mut v = SageTensorView {
        data: data as *mut std::ffi::c_void,
        dtype: SageDType::SAGE_DTYPE_F32,
        ndim: shape.len() as i32,
        shape: [0; SAGE_MAX_DIMS as usize],
        strides: [0; SAGE_MAX_DIMS as usize],
        device: SageDeviceType::SAGE_DEVICE_CPU,
        device_index: 0,
        stream: std::ptr::null_mut(),
    };
    let mut stride = 1i64;
    for d in (0..shape.len()).rev() {
        v.shape[d] = shape[d] as i64;
        v.strides[d] = stride;
        stride *= shape[d] as i64;
    }
    v
}
