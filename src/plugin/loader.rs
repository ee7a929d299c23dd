//! Plugin libraries: loading one and validating its table ([`load`]), then calling it through
//! the C ABI. Which files are tried, and in what order, is [`super::discovery`]'s. Libraries are
//! never unloaded.

use super::host;
use super::instance::{Calls, Factory, Kind, PluginInfo};
use anyhow::Result;
use sage_plugin_sdk::ffi::*;
use sage_plugin_sdk::{F32View, F32ViewMut, PluginError, PluginResult};
use std::ffi::{c_char, CStr, CString};
use std::path::Path;

fn kind_from_ffi(k: SageKind) -> Option<Kind> {
    match k {
        SageKind::SAGE_KIND_BACKBONE => Some(Kind::Backbone),
        SageKind::SAGE_KIND_JUDGE => Some(Kind::Judge),
        SageKind::SAGE_KIND_DATASET => Some(Kind::Dataset),
        _ => None,
    }
}

unsafe fn c_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        None
    } else {
        CStr::from_ptr(p).to_str().ok().map(str::to_owned)
    }
}

/// Loads one library and validates its table; the error is the refusal reason.
pub fn load(file: &Path) -> Result<PluginInfo, String> {
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
    let kind = kind_from_ffi(table.kind).ok_or_else(|| format!("unknown plugin kind {}", table.kind.0))?;
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
    Ok(PluginInfo {
        kind,
        name,
        version,
        description,
        builtin: false,
        file: Some(file.to_path_buf()),
        factory: Factory::Library(table, |table, config| {
            LibraryInstance::create(table, config).map(|i| Box::new(i) as Box<dyn Calls>)
        }),
    })
}

/// An instance of a library plugin, called through its table; destroyed on drop (the library
/// stays loaded).
pub(crate) struct LibraryInstance {
    table: &'static SagePluginV1,
    ptr: *mut SageInstance,
}

// Instances are used from one thread at a time (`&mut self` on every call).
unsafe impl Send for LibraryInstance {}

impl LibraryInstance {
    pub(crate) fn create(table: &'static SagePluginV1, config_json: &str) -> PluginResult<LibraryInstance> {
        let cfg = CString::new(config_json).map_err(|_| PluginError::invalid("the config contains a NUL"))?;
        let mut ptr = std::ptr::null_mut();
        let create = table.create.expect("checked at load");
        let status = unsafe { create(cfg.as_ptr(), &mut ptr) };
        if status != SageStatus::SAGE_OK || ptr.is_null() {
            let msg = unsafe { c_str((table.last_error.expect("checked"))(std::ptr::null())) }.unwrap_or_default();
            return Err(PluginError::new(status, msg));
        }
        Ok(LibraryInstance { table, ptr })
    }

    fn check(&self, status: SageStatus) -> PluginResult<()> {
        if status == SageStatus::SAGE_OK {
            return Ok(());
        }
        let msg = unsafe { c_str((self.table.last_error.expect("checked"))(self.ptr)) }.unwrap_or_default();
        Err(PluginError::new(status, msg))
    }

    /// A function the table leaves out: the plugin does not offer it.
    fn missing(what: &str) -> PluginError {
        PluginError::new(SageStatus::SAGE_UNSUPPORTED, format!("the plugin does not provide {what}"))
    }

    /// The string a call lent; it stays valid until the instance's next call.
    unsafe fn take_string(p: *const c_char) -> PluginResult<String> {
        c_str(p).ok_or_else(|| PluginError::other("the plugin returned no (or non-UTF-8) text"))
    }
}

fn c_string(s: &str, what: &str) -> PluginResult<CString> {
    CString::new(s).map_err(|_| PluginError::invalid(format!("{what} contains a NUL")))
}

impl Calls for LibraryInstance {
    fn backbone_describe(&mut self) -> PluginResult<String> {
        let f = self.table.backbone_describe.ok_or_else(|| Self::missing("backbone_describe"))?;
        let mut out = std::ptr::null();
        self.check(unsafe { f(self.ptr, &mut out) })?;
        unsafe { Self::take_string(out) }
    }

    fn backbone_encode_image(&mut self, pixels: F32View, out: F32ViewMut) -> PluginResult<()> {
        let f = self.table.backbone_encode_image.ok_or_else(|| Self::missing("backbone_encode_image"))?;
        let pin = view(pixels.data.as_ptr() as *mut _, &pixels.shape);
        let mut pout = view(out.data.as_mut_ptr(), &out.shape);
        self.check(unsafe { f(self.ptr, &pin, &mut pout) })
    }

    fn backbone_generate(&mut self, prompt: &str, options_json: &str) -> PluginResult<String> {
        let f = self.table.backbone_generate.ok_or_else(|| Self::missing("backbone_generate"))?;
        let (p, o) = (c_string(prompt, "the prompt")?, c_string(options_json, "the options")?);
        let mut out = std::ptr::null();
        self.check(unsafe { f(self.ptr, p.as_ptr(), o.as_ptr(), &mut out) })?;
        unsafe { Self::take_string(out) }
    }

    fn judge_score(&mut self, request_json: &str) -> PluginResult<String> {
        let f = self.table.judge_score.ok_or_else(|| Self::missing("judge_score"))?;
        let r = c_string(request_json, "the request")?;
        let mut out = std::ptr::null();
        self.check(unsafe { f(self.ptr, r.as_ptr(), &mut out) })?;
        unsafe { Self::take_string(out) }
    }

    fn dataset_open(&mut self, source: &str) -> PluginResult<i64> {
        let f = self.table.dataset_open.ok_or_else(|| Self::missing("dataset_open"))?;
        let s = c_string(source, "the source path")?;
        let mut n: i64 = 0;
        self.check(unsafe { f(self.ptr, s.as_ptr(), &mut n) })?;
        Ok(n)
    }

    fn dataset_get(&mut self, index: i64) -> PluginResult<String> {
        let f = self.table.dataset_get.ok_or_else(|| Self::missing("dataset_get"))?;
        let mut out = std::ptr::null();
        self.check(unsafe { f(self.ptr, index, &mut out) })?;
        unsafe { Self::take_string(out) }
    }
}

impl Drop for LibraryInstance {
    fn drop(&mut self) {
        if let Some(d) = self.table.destroy {
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
