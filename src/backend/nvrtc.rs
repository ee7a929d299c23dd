//! NVRTC, loaded at run time by absolute path (ARCHITECTURE.md §4): compiles `kernels/*.cu` to PTX for
//! one GPU architecture, with an on-disk cache under `$SAGE_HOME/kernels-cache`.
//!
//! The CI compile check (`tests/kernels_compile.rs`) and the CUDA backend share this wrapper. It
//! creates no CUDA context and needs no driver: NVRTC is a pure compiler.
//!
//! NVRTC dlopens `libnvrtc-builtins.so.13.0` by soname at compile time. Loading that library first,
//! by absolute path, makes the dynamic loader hand the already-loaded copy to NVRTC, so the pinned
//! wheel works without `LD_LIBRARY_PATH`.

use crate::assets;
use anyhow::{anyhow, bail, Context, Result};
use libloading::Library;
use sha2::{Digest, Sha256};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

type NvrtcResult = c_int;
type NvrtcProgram = *mut c_void;

type VersionFn = unsafe extern "C" fn(*mut c_int, *mut c_int) -> NvrtcResult;
type CreateProgramFn = unsafe extern "C" fn(
    *mut NvrtcProgram,
    *const c_char,
    *const c_char,
    c_int,
    *const *const c_char,
    *const *const c_char,
) -> NvrtcResult;
type CompileProgramFn = unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> NvrtcResult;
type GetSizeFn = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> NvrtcResult;
type GetBytesFn = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> NvrtcResult;
type DestroyProgramFn = unsafe extern "C" fn(*mut NvrtcProgram) -> NvrtcResult;
type GetErrorStringFn = unsafe extern "C" fn(NvrtcResult) -> *const c_char;

/// A GPU architecture to compile for: `Arch(80)` is `compute_80` PTX (A100), `Arch(90)` is H100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Arch(pub u32);

impl Arch {
    pub const SM80: Arch = Arch(80);
    pub const SM90: Arch = Arch(90);

    /// The NVRTC option, `--gpu-architecture=compute_XX` (virtual arch: the output is PTX).
    pub fn nvrtc_option(self) -> String {
        format!("--gpu-architecture=compute_{}", self.0)
    }

    /// The `ptxas --gpu-name` value, `sm_XX`.
    pub fn sm(self) -> String {
        format!("sm_{}", self.0)
    }
}

/// A header handed to NVRTC with the program (`#include "NAME"` finds it without any file on
/// disk): `(include name, contents)`. The kernels' `common.cuh` travels this way, embedded in the
/// binary like the kernels themselves.
pub type Header<'a> = (&'a str, &'a str);

/// Options every kernel is compiled with (besides the architecture and include folders).
/// No `--use_fast_math`: the parity tolerances of kernels/README.md assume IEEE `expf`/`logf`.
pub const DEFAULT_OPTIONS: &[&str] = &["--std=c++17", "-lineinfo"];

/// A loaded NVRTC. The libraries stay loaded for the life of the value (the global one: forever).
pub struct Nvrtc {
    version: (i32, i32),
    path: PathBuf,
    create: CreateProgramFn,
    compile: CompileProgramFn,
    log_size: GetSizeFn,
    log: GetBytesFn,
    ptx_size: GetSizeFn,
    ptx: GetBytesFn,
    destroy: DestroyProgramFn,
    error_string: GetErrorStringFn,
    // Keep the libraries after the function pointers: they must outlive them.
    _lib: Library,
    _builtins: Option<Library>,
}

impl std::fmt::Debug for Nvrtc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nvrtc").field("version", &self.version).field("path", &self.path).finish()
    }
}

unsafe fn sym<T: Copy>(lib: &Library, name: &str, path: &Path) -> Result<T> {
    let s: libloading::Symbol<T> = lib
        .get(name.as_bytes())
        .with_context(|| format!("{} has no symbol {name}: not an NVRTC library", path.display()))?;
    Ok(*s)
}

impl Nvrtc {
    /// Loads NVRTC from `lib` (absolute path to `libnvrtc.so.*`), loading `builtins`
    /// (`libnvrtc-builtins.so.*`) first when given.
    pub fn load(lib: &Path, builtins: Option<&Path>) -> Result<Nvrtc> {
        // SAFETY: loading a shared library runs its initialisers; NVRTC's are benign. The
        // builtins library must be loaded before NVRTC asks the loader for it by soname.
        let builtins_lib = match builtins {
            Some(b) => Some(
                unsafe { Library::new(b) }
                    .with_context(|| format!("loading the NVRTC builtins library {}", b.display()))?,
            ),
            None => None,
        };
        let l = unsafe { Library::new(lib) }.with_context(|| format!("loading NVRTC from {}", lib.display()))?;
        // SAFETY: the declared types match nvrtc.h (CUDA 13.0) for these entry points.
        let nv = unsafe {
            let version: VersionFn = sym(&l, "nvrtcVersion", lib)?;
            let (mut major, mut minor) = (0, 0);
            let rc = version(&mut major, &mut minor);
            if rc != 0 {
                bail!("nvrtcVersion failed with code {rc} ({})", lib.display());
            }
            Nvrtc {
                version: (major, minor),
                path: lib.to_path_buf(),
                create: sym(&l, "nvrtcCreateProgram", lib)?,
                compile: sym(&l, "nvrtcCompileProgram", lib)?,
                log_size: sym(&l, "nvrtcGetProgramLogSize", lib)?,
                log: sym(&l, "nvrtcGetProgramLog", lib)?,
                ptx_size: sym(&l, "nvrtcGetPTXSize", lib)?,
                ptx: sym(&l, "nvrtcGetPTX", lib)?,
                destroy: sym(&l, "nvrtcDestroyProgram", lib)?,
                error_string: sym(&l, "nvrtcGetErrorString", lib)?,
                _lib: l,
                _builtins: builtins_lib,
            }
        };
        Ok(nv)
    }

    /// Loads the pinned NVRTC of the `nvidia-cuda-nvrtc` wheel (`sage fetch --cuda`).
    pub fn from_assets() -> Result<Nvrtc> {
        let tc = assets::cuda_toolchain()?;
        Nvrtc::load(&tc.nvrtc, Some(&tc.nvrtc_builtins))
    }

    /// The process-wide NVRTC 13.0 ([`Toolchain::find`]), loaded once and never unloaded.
    pub fn global() -> Result<&'static Nvrtc> {
        Ok(&global_toolchain()?.0)
    }
    /// `(major, minor)` as reported by `nvrtcVersion`.
    pub fn version(&self) -> (i32, i32) {
        self.version
    }

    /// Where the library was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails unless this is NVRTC 13.0: a newer one emits PTX (ISA 9.1+) that the 580 driver
    /// series cannot load (ARCHITECTURE.md §4).
    pub fn require_13_0(&self) -> Result<()> {
        if self.version != (13, 0) {
            bail!(
                "NVRTC at {} is {}.{}, but the kernels are pinned to NVRTC 13.0 (a newer one emits PTX a 580 driver cannot load); run `sage fetch --cuda`",
                self.path.display(),
                self.version.0,
                self.version.1
            );
        }
        Ok(())
    }

    fn err_str(&self, rc: NvrtcResult) -> String {
        // SAFETY: nvrtcGetErrorString returns a static NUL-terminated string for any code.
        let p = unsafe { (self.error_string)(rc) };
        if p.is_null() {
            return format!("NVRTC error {rc}");
        }
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Compiles `source` (file name `name`, used in messages) to PTX for `arch`, with the embedded
    /// `headers`, `-I` for each of `include_dirs` and [`DEFAULT_OPTIONS`] plus `extra_options`. No
    /// cache. The error carries NVRTC's compile log.
    pub fn compile_uncached(
        &self,
        source: &str,
        name: &str,
        arch: Arch,
        headers: &[Header],
        include_dirs: &[PathBuf],
        extra_options: &[&str],
    ) -> Result<String> {
        let src = CString::new(source).context("kernel source contains a NUL byte")?;
        let cname = CString::new(name).context("kernel name contains a NUL byte")?;
        let mut header_names = Vec::with_capacity(headers.len());
        let mut header_sources = Vec::with_capacity(headers.len());
        for (hname, hsrc) in headers {
            header_names.push(CString::new(*hname).context("header name contains a NUL byte")?);
            header_sources.push(CString::new(*hsrc).with_context(|| format!("header {hname} contains a NUL byte"))?);
        }
        let header_name_ptrs: Vec<*const c_char> = header_names.iter().map(|h| h.as_ptr()).collect();
        let header_source_ptrs: Vec<*const c_char> = header_sources.iter().map(|h| h.as_ptr()).collect();
        let mut opts: Vec<CString> = vec![CString::new(arch.nvrtc_option())?];
        for o in DEFAULT_OPTIONS.iter().chain(extra_options) {
            opts.push(CString::new(*o)?);
        }
        for d in include_dirs {
            opts.push(CString::new(format!("-I{}", d.display())).context("include path contains a NUL byte")?);
        }
        let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();

        let mut prog: NvrtcProgram = std::ptr::null_mut();
        // SAFETY: valid NUL-terminated strings that outlive the call; the two header arrays have
        // `headers.len()` entries each (NVRTC copies them).
        let rc = unsafe {
            (self.create)(
                &mut prog,
                src.as_ptr(),
                cname.as_ptr(),
                headers.len() as c_int,
                header_source_ptrs.as_ptr(),
                header_name_ptrs.as_ptr(),
            )
        };
        if rc != 0 {
            bail!("nvrtcCreateProgram({name}) failed: {}", self.err_str(rc));
        }
        // Destroy the program on every path out.
        struct Guard<'a>(&'a Nvrtc, NvrtcProgram);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                // SAFETY: the program was created by the same library and is destroyed once.
                unsafe { (self.0.destroy)(&mut self.1) };
            }
        }
        let guard = Guard(self, prog);

        // SAFETY: `prog` is live; the option pointers are valid for the call.
        let rc = unsafe { (self.compile)(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr()) };
        let log = self.read(prog, self.log_size, self.log)?;
        if rc != 0 {
            bail!(
                "NVRTC {}.{} could not compile {name} for {}: {}\n{}",
                self.version.0,
                self.version.1,
                arch.nvrtc_option(),
                self.err_str(rc),
                log.trim_end()
            );
        }
        let ptx = self.read(prog, self.ptx_size, self.ptx)?;
        drop(guard);
        Ok(ptx)
    }

    fn read(&self, prog: NvrtcProgram, size: GetSizeFn, get: GetBytesFn) -> Result<String> {
        let mut n = 0usize;
        // SAFETY: `prog` is live; the buffer has the size NVRTC asked for.
        let rc = unsafe { size(prog, &mut n) };
        if rc != 0 {
            bail!("NVRTC size query failed: {}", self.err_str(rc));
        }
        let mut buf = vec![0u8; n.max(1)];
        let rc = unsafe { get(prog, buf.as_mut_ptr().cast()) };
        if rc != 0 {
            bail!("NVRTC read failed: {}", self.err_str(rc));
        }
        if let Some(end) = buf.iter().position(|&b| b == 0) {
            buf.truncate(end);
        }
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }

    /// Like [`Nvrtc::compile_uncached`], but first looks in `cache_dir` (normally [`cache_dir`])
    /// for PTX compiled from the same source, headers, architecture and options (see
    /// [`cache_key`]), and stores a fresh result there atomically.
    #[allow(clippy::too_many_arguments)]
    pub fn compile_cached(
        &self,
        source: &str,
        name: &str,
        arch: Arch,
        headers: &[Header],
        include_dirs: &[PathBuf],
        extra_options: &[&str],
        cache_dir: &Path,
    ) -> Result<String> {
        self.require_13_0()?;
        let path = cache_path(cache_dir, source, name, arch, headers, extra_options);
        if let Some(ptx) = read_cached(&path) {
            return Ok(ptx);
        }
        let ptx = self.compile_uncached(source, name, arch, headers, include_dirs, extra_options)?;
        crate::util::write_atomic(&path, ptx.as_bytes())
            .with_context(|| format!("caching compiled PTX at {}", path.display()))?;
        Ok(ptx)
    }
}

/// Hex sha256 (first 32 digits) of everything that decides the PTX: the pinned NVRTC version
/// (always 13.0: [`Nvrtc::require_13_0`]), the architecture, the options, the source and the
/// embedded headers (a change to `common.cuh` recompiles every kernel). Where
/// NVRTC and the headers live is deliberately not part of it, so PTX compiled here can be carried
/// to a machine with no NVRTC at all (`sage kernels build` here, the cache copied to the GPU machine).
pub fn cache_key(source: &str, arch: Arch, headers: &[Header], extra_options: &[&str]) -> String {
    let mut h = Sha256::new();
    h.update(format!("nvrtc 13.0\n{}\n", arch.nvrtc_option()));
    for o in DEFAULT_OPTIONS.iter().chain(extra_options) {
        h.update(o.as_bytes());
        h.update(b"\n");
    }
    h.update(source.as_bytes());
    // Each header as its name, its length and its bytes, so no two header sets hash alike by
    // moving text across a boundary. No headers hashes exactly as before they existed.
    for (name, text) in headers {
        h.update(format!("\nheader {name} {}\n", text.len()));
        h.update(text.as_bytes());
    }
    let full = format!("{:x}", h.finalize());
    full[..32].to_string()
}

/// `<cache_dir>/<stem>-sm_XX-<key>.ptx`.
pub fn cache_path(
    cache_dir: &Path,
    source: &str,
    name: &str,
    arch: Arch,
    headers: &[Header],
    extra_options: &[&str],
) -> PathBuf {
    let stem = Path::new(name).file_stem().and_then(|s| s.to_str()).unwrap_or("kernel");
    cache_dir.join(format!("{stem}-{}-{}.ptx", arch.sm(), cache_key(source, arch, headers, extra_options)))
}

fn read_cached(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().filter(|ptx| !ptx.is_empty())
}

/// The cached PTX for `source` (compiled under `name` for `arch` with `headers` and the default
/// options), if any. Needs no NVRTC.
pub fn cached(source: &str, name: &str, arch: Arch, headers: &[Header]) -> Option<String> {
    read_cached(&cache_path(&cache_dir(), source, name, arch, headers, &[]))
}

/// `$SAGE_HOME/kernels-cache`.
pub fn cache_dir() -> PathBuf {
    assets::sage_home().join("kernels-cache")
}

/// Where NVRTC and the CUDA headers come from.
#[derive(Clone, Debug)]
pub struct Toolchain {
    pub nvrtc: PathBuf,
    pub builtins: Option<PathBuf>,
    pub include: PathBuf,
}

/// `SAGE_NVRTC`: the path of another NVRTC 13.0 (`libnvrtc.so.13` of a CUDA 13.0 toolkit), for a
/// machine without the wheels, such as the GPU machine. Headers: `SAGE_CUDA_INCLUDE`, or the
/// toolkit's `include` folder next to the library's `lib64`/`lib`.
pub const NVRTC_ENV: &str = "SAGE_NVRTC";
pub const INCLUDE_ENV: &str = "SAGE_CUDA_INCLUDE";

impl Toolchain {
    /// `SAGE_NVRTC` when set, else the pinned wheels; the error says how to get either.
    pub fn find() -> Result<Toolchain> {
        if let Some(lib) = std::env::var_os(NVRTC_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
            let dir = lib.parent().unwrap_or(Path::new("."));
            let builtins = std::fs::read_dir(dir).ok().and_then(|rd| {
                rd.filter_map(|e| e.ok()).map(|e| e.path()).find(|p| {
                    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libnvrtc-builtins.so.13"))
                })
            });
            let include = match std::env::var_os(INCLUDE_ENV).filter(|v| !v.is_empty()) {
                Some(i) => PathBuf::from(i),
                None => dir.parent().unwrap_or(Path::new(".")).join("include"),
            };
            if !include.join("cuda_bf16.h").exists() {
                bail!(
                    "{NVRTC_ENV}={} but {} has no cuda_bf16.h; set {INCLUDE_ENV} to the CUDA 13.0 include folder",
                    lib.display(),
                    include.display()
                );
            }
            return Ok(Toolchain { nvrtc: lib, builtins, include });
        }
        let tc = assets::cuda_toolchain().map_err(|e| {
            anyhow!(
                "{e:#}; or set {NVRTC_ENV} to a CUDA 13.0 libnvrtc.so.13, or precompile with `sage kernels build` \
                 and copy $SAGE_HOME/kernels-cache to this machine"
            )
        })?;
        Ok(Toolchain { nvrtc: tc.nvrtc, builtins: Some(tc.nvrtc_builtins), include: tc.include })
    }
}

fn global_toolchain() -> Result<&'static (Nvrtc, Toolchain)> {
    static NVRTC: OnceLock<std::result::Result<(Nvrtc, Toolchain), String>> = OnceLock::new();
    NVRTC
        .get_or_init(|| {
            let go = || -> Result<(Nvrtc, Toolchain)> {
                let tc = Toolchain::find()?;
                let nv = Nvrtc::load(&tc.nvrtc, tc.builtins.as_deref())?;
                nv.require_13_0()?;
                Ok((nv, tc))
            };
            go().map_err(|e| format!("{e:#}"))
        })
        .as_ref()
        .map_err(|e| anyhow!("{e}"))
}

/// Compiles `source` for `arch` with NVRTC 13.0 ([`Toolchain::find`]), with the toolkit's CUDA
/// include folder and `include_dirs`, through the on-disk cache. Returns the PTX; the error carries
/// the compile log.
pub fn compile(source: &str, arch: Arch, include_dirs: &[PathBuf]) -> Result<String> {
    compile_named(source, "kernel.cu", arch, &[], include_dirs)
}

/// [`compile`] with a file name for messages and the cache entry, and embedded `headers`. A cache
/// hit loads no NVRTC.
pub fn compile_named(
    source: &str,
    name: &str,
    arch: Arch,
    headers: &[Header],
    include_dirs: &[PathBuf],
) -> Result<String> {
    if let Some(ptx) = cached(source, name, arch, headers) {
        return Ok(ptx);
    }
    let (nv, tc) = global_toolchain()?;
    let mut dirs = vec![tc.include.clone()];
    dirs.extend_from_slice(include_dirs);
    nv.compile_cached(source, name, arch, headers, &dirs, &[], &cache_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvrtc_arch_options_are_spelled_as_nvrtc_and_ptxas_expect() {
        assert_eq!(Arch::SM80.nvrtc_option(), "--gpu-architecture=compute_80");
        assert_eq!(Arch::SM90.sm(), "sm_90");
    }

    #[test]
    fn nvrtc_missing_library_is_an_error_naming_the_path() {
        let err = Nvrtc::load(Path::new("/nonexistent/libnvrtc.so.13"), None).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/libnvrtc.so.13"), "{err:#}");
    }
}
