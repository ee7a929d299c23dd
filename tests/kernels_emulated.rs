//! Kernel logic checked on the CPU, no GPU needed: each `kernels/*.cu` is rewritten for the small
//! CUDA emulation in `kernels/emu/emu.h` (one host thread per CUDA thread, barriers for
//! `__syncthreads` and shuffles, `mma.sync` rebuilt from the PTX fragment layout), compiled with the
//! host C++ compiler (C++20; `CXX` or `c++`) together with `kernels/emu/<kernel>_check.cpp`, and
//! run: every launch the host will make, at odd shapes, against double-precision references.
//!
//! This catches indexing, tiling, masking, split/merge and reduction mistakes; it does not replace
//! parity on a device (`tests/kernels_parity.rs`): see `kernels/emu/emu.h` for what it cannot see.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The inline-PTX helpers the emulation header replaces. A kernel that adds another `asm` helper
/// must add its emulation to `kernels/emu/emu.h` and its name here.
const EMULATED_HELPERS: [&str; 4] = ["cp_async16", "cp_async_commit", "cp_async_wait", "mma_16816"];

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

/// The kernel source rewritten for the emulation header.
fn emulated_source(cu: &str) -> String {
    let mut s = cu.replace("#include <cuda_bf16.h>", "#include \"emu.h\"");
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

fn cxx() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "c++".into())
}

fn run_check(kernel: &str) {
    let cu = root().join("kernels").join(format!("{kernel}.cu"));
    let check = root().join("kernels/emu").join(format!("{kernel}_check.cpp"));
    let src = std::fs::read_to_string(&cu).unwrap_or_else(|e| panic!("reading {}: {e}", cu.display()));
    let emu = emulated_source(&src);
    assert!(
        !emu.contains("asm volatile") && !emu.contains("asm("),
        "{kernel}.cu has inline PTX the emulation does not replace: add it to kernels/emu/emu.h and EMULATED_HELPERS"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(format!("{kernel}.emu.h")), emu).unwrap();
    let exe = tmp.path().join("check");
    let out = Command::new(cxx())
        .args(["-std=c++20", "-O2", "-pthread", "-w"])
        .arg("-I")
        .arg(tmp.path())
        .arg("-I")
        .arg(root().join("kernels/emu"))
        .arg(&check)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{}` ({e}); install g++ ≥ 11 or set CXX", cxx()));
    assert!(
        out.status.success(),
        "compiling the emulated {kernel} failed (needs C++20 <barrier>: g++ ≥ 11 or clang ≥ 14):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&exe).output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    print!("{stdout}");
    assert!(run.status.success(), "emulated {kernel} differs from its reference:\n{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("case ")) && !stdout.contains("FAIL"), "{stdout}");
}

#[test]
fn kernel_emulated_mincos_topk() {
    run_check("mincos_topk");
}

#[test]
fn kernel_emulated_fusion_attn() {
    run_check("fusion_attn");
}

#[test]
fn kernel_emulated_edpo_loss() {
    run_check("edpo_loss");
}

#[test]
fn kernel_emulated_llm_ops() {
    run_check("llm_ops");
}

#[test]
fn kernel_emulated_llm_attn() {
    run_check("llm_attn");
}

#[test]
fn kernel_emulated_head_ops() {
    run_check("head_ops");
}

#[test]
fn kernel_emulated_llm_decode() {
    run_check("llm_decode");
}

#[test]
fn kernel_emulated_dwconv() {
    run_check("dwconv");
}

#[test]
fn kernel_every_cu_file_has_an_emulated_check() {
    for e in std::fs::read_dir(root().join("kernels")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "cu") {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let check = Path::new("kernels/emu").join(format!("{stem}_check.cpp"));
            assert!(root().join(&check).exists(), "{} has no emulated check ({})", p.display(), check.display());
        }
    }
}

#[test]
fn kernel_emulation_rewrite_strips_ptx_helpers_and_dynamic_shared_memory() {
    let src = "#include <cuda_bf16.h>\n\
               __device__ __forceinline__ void cp_async_commit() { asm volatile(\"cp.async.commit_group;\\n\" ::); }\n\
               template <int N>\n\
               __device__ __forceinline__ void cp_async_wait() {\n    asm volatile(\"x\" ::\"n\"(N));\n}\n\
               __global__ void k() { extern __shared__ __align__(16) unsigned char smem[]; cp_async_commit(); }\n";
    let out = emulated_source(src);
    assert!(out.starts_with("#include \"emu.h\""), "{out}");
    assert!(!out.contains("asm") && !out.contains("template"), "{out}");
    assert!(out.contains("unsigned char* smem = g_dyn_smem;") && out.contains("cp_async_commit();"), "{out}");
}
