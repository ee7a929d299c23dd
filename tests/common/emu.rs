//! The CPU emulation of `kernels/*.cu` (tests/emu/emu.h), shared by the kernel-logic checks
//! (tests/kernels_emulated.rs) and the emulated device (tests/emu/fake_cuda.cpp, a stand-in
//! `libcuda.so` + `libcublasLt.so` that runs the CUDA backend's host code end to end on the CPU).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The emulator's sources: emu.h, the stand-in driver and the per-kernel checks.
pub fn emu_dir() -> PathBuf {
    root().join("tests/emu")
}

/// The header every kernel includes, as it is on disk.
pub const COMMON_HEADER: &str = "common.cuh";

/// The inline-PTX helpers (all in kernels/common.cuh) the emulation header replaces. A kernel
/// that adds another `asm` helper must add its emulation to `tests/emu/emu.h` and its name here.
pub const EMULATED_HELPERS: [&str; 4] = ["cp_async16", "cp_async_commit", "cp_async_wait", "mma_16816"];

/// Removes the definition of `__device__ __forceinline__ void NAME(...) { ... }` (with a
/// `template <...>` line just before it), if present.
fn strip_definition(src: &str, name: &str) -> String {
    let needle = format!("__device__ __forceinline__ void {name}(");
    let Some(at) = src.find(&needle) else { return src.to_string() };
    let mut start = src[..at].rfind('\n').map_or(0, |i| i + 1);
    // A `template <...>` on the line before belongs to the definition.
    if start > 0 {
        let prev = src[..start - 1].rfind('\n').map_or(0, |i| i + 1);
        if src[prev..start].trim_start().starts_with("template") {
            start = prev;
        }
    }
    let open = at + src[at..].find('{').expect("a definition has a body");
    let mut depth = 0usize;
    let mut end = open;
    for (i, ch) in src[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = open + i + 1;
                    break;
                }
            }
            _ => {}
        }
    }
    format!("{}{}", &src[..start], &src[end..])
}

/// `#include "common.cuh"` replaced by `common`'s text: each kernel gets its own copy, so the
/// emulated device can put every kernel file in a namespace of its own.
fn paste_common_header(cu: &str, common: &str) -> String {
    cu.replace(&format!("#include \"{COMMON_HEADER}\""), common)
}

/// The kernel source rewritten for the emulation header, with `common` (the text of
/// kernels/common.cuh) pasted where it is included.
pub fn emulated_source(cu: &str, common: &str) -> String {
    let mut s = paste_common_header(cu, common).replace("#include <cuda_bf16.h>", "#include \"emu.h\"");
    // `extern __shared__ __align__(16) unsigned char NAME[];` → a pointer into g_dyn_smem.
    while let Some(i) = s.find("extern __shared__") {
        let end = i + s[i..].find(';').expect("declaration ends with ;");
        let name = s[i..end].split_whitespace().last().unwrap().trim_end_matches("[]").to_string();
        s.replace_range(i..=end, &format!("unsigned char* {name} = g_dyn_smem;"));
    }
    for h in EMULATED_HELPERS {
        s = strip_definition(&s, h);
    }
    s
}

/// The entry points (`__global__` functions) of a kernel source, in order.
pub fn entry_points(cu: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in cu.match_indices("__global__ void ") {
        let mut rest = &cu[at + "__global__ void ".len()..];
        if let Some(r) = rest.strip_prefix("__launch_bounds__(") {
            rest = r[r.find(')').expect("__launch_bounds__(...) closes") + 1..].trim_start();
        }
        let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        out.push(name);
    }
    out
}

pub fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

/// Runs the host C++ compiler with `args`; panics with its errors (naming `what`) on failure.
pub fn compile(args: &[&std::ffi::OsStr], what: &str) {
    let out = Command::new(cxx())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{}` ({e}); install g++ ≥ 11 or set CXX", cxx()));
    assert!(
        out.status.success(),
        "compiling {what} failed (needs C++20 and x86-64: g++ ≥ 10 or clang ≥ 10):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// kernels/common.cuh as it is on disk.
pub fn common_header() -> String {
    let p = root().join("kernels").join(COMMON_HEADER);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// Builds the emulated device (`libcuda.so` and `libcublasLt.so` from tests/emu/fake_cuda.cpp,
/// fake_cublaslt.cpp, every kernels/*.cu and kernels/common.cuh) once per source hash under the
/// test target's tmp folder, and returns the folder to put first on `LD_LIBRARY_PATH`.
pub fn emulated_device() -> PathBuf {
    let emu = emu_dir();
    let mut cus: Vec<PathBuf> = std::fs::read_dir(root().join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    cus.sort();
    let mut h = DefaultHasher::new();
    cxx().hash(&mut h);
    for p in cus.iter().chain(&[
        root().join("kernels").join(COMMON_HEADER),
        emu.join("emu.h"),
        emu.join("fake_cuda.h"),
        emu.join("fake_cuda.cpp"),
        emu.join("fake_cublaslt.cpp"),
    ]) {
        std::fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())).hash(&mut h);
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("emulated-device-{:016x}", h.finish()));
    if dir.join("libcuda.so").exists() && dir.join("libcublasLt.so").exists() {
        return dir;
    }
    // Build beside the final folder and rename it into place: a build cut short is never reused.
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let t = tmp.path();
    let mut sources = vec![emu.join("fake_cuda.cpp")];
    let common = common_header();
    for cu in &cus {
        let stem = cu.file_stem().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(cu).unwrap();
        // Each file in its own namespace, so helpers of the same name in two files do not clash;
        // the entry points are found by name through the registry, not by C linkage.
        let body = emulated_source(&src, &common).replace("extern \"C\" ", "");
        std::fs::write(t.join(format!("{stem}.emu.h")), body).unwrap();
        let mut unit = format!("#include \"fake_cuda.h\"\nnamespace fake_{stem} {{\n#include \"{stem}.emu.h\"\n}}\n");
        for name in entry_points(&src) {
            unit += &format!("FAKE_CUDA_KERNEL(fake_{stem}, {name})\n");
        }
        let path = t.join(format!("{stem}.fake.cpp"));
        std::fs::write(&path, unit).unwrap();
        sources.push(path);
    }
    let (inc_t, inc_emu) = (t.as_os_str().to_owned(), emu.as_os_str().to_owned());
    let common = ["-std=c++20", "-O2", "-fPIC", "-shared", "-pthread", "-w"];
    let lib = |name: &str, srcs: &[PathBuf], extra: &[&str]| {
        let out = t.join(name);
        let soname = format!("-Wl,-soname,{name}");
        let mut args: Vec<&std::ffi::OsStr> = common.iter().chain(extra).map(|s| std::ffi::OsStr::new(*s)).collect();
        args.extend([std::ffi::OsStr::new("-I"), &inc_t, std::ffi::OsStr::new("-I"), &inc_emu]);
        args.extend(srcs.iter().map(|p| p.as_os_str()));
        args.extend([std::ffi::OsStr::new(&soname), std::ffi::OsStr::new("-o"), out.as_os_str()]);
        compile(&args, name);
    };
    lib("libcuda.so", &sources, &[]);
    // The GEMM is the emulated device's hot loop (the SAGE step's tests run a 135M-parameter LLM).
    lib("libcublasLt.so", &[emu.join("fake_cublaslt.cpp")], &["-O3", "-march=native"]);
    let built = tmp.keep();
    if std::fs::rename(&built, &dir).is_err() {
        // Another test binary (they run in parallel) built the same sources first.
        let _ = std::fs::remove_dir_all(&built);
    }
    dir
}

/// `LD_LIBRARY_PATH` with the emulated device's folder first.
pub fn library_path(device: &std::path::Path) -> String {
    match std::env::var_os("LD_LIBRARY_PATH") {
        Some(p) if !p.is_empty() => format!("{}:{}", device.display(), p.to_string_lossy()),
        _ => device.display().to_string(),
    }
}

/// Runs this test binary again with `args` on the emulated device (the child sees
/// `SAGE_EMULATED_DEVICE`, so a runner test it matches returns at once), prints its output and
/// returns its stdout; panics when it fails or when a GPU test in it skipped.
pub fn run_tests_on_emulated_device(args: &[&str], envs: &[(&str, &str)]) -> String {
    let lib = emulated_device();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(args)
        .args(["--test-threads", "1", "--nocapture"])
        .env("SAGE_EMULATED_DEVICE", "1")
        .env("LD_LIBRARY_PATH", library_path(&lib))
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "a test failed on the emulated device:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("skipped, no usable CUDA device"), "the emulated device was not used:\n{stdout}");
    stdout
}

/// Whether this process is a child started by [`run_tests_on_emulated_device`].
pub fn in_emulated_child() -> bool {
    std::env::var_os("SAGE_EMULATED_DEVICE").is_some()
}
