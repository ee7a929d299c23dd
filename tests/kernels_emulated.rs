//! Kernel logic checked on the CPU, no GPU needed: each `kernels/*.cu` (with kernels/common.cuh
//! pasted in) is rewritten for the small CUDA emulation in `tests/emu/emu.h` (each CUDA thread a fiber on one host thread, exact
//! barriers for `__syncthreads` and shuffles, `mma.sync` rebuilt from the PTX fragment layout),
//! compiled with the host C++ compiler (C++20; `CXX` or `c++`) together with `tests/emu/<kernel>_check.cpp`, and
//! run: every launch the host will make, at odd shapes, against double-precision references.
//!
//! This catches indexing, tiling, masking, split/merge and reduction mistakes; it does not replace
//! parity on a device (`tests/kernels_parity.rs`): see `tests/emu/emu.h` for what it cannot see.

mod common;

use common::emu::{common_header, compile, emu_dir, emulated_source, root};
use std::path::Path;
use std::process::Command;

fn run_check(kernel: &str) {
    let cu = root().join("kernels").join(format!("{kernel}.cu"));
    let check = emu_dir().join(format!("{kernel}_check.cpp"));
    let src = std::fs::read_to_string(&cu).unwrap_or_else(|e| panic!("reading {}: {e}", cu.display()));
    let emu = emulated_source(&src, &common_header());
    assert!(
        !emu.contains("asm volatile") && !emu.contains("asm("),
        "{kernel}.cu has inline PTX the emulation does not replace: add it to tests/emu/emu.h and EMULATED_HELPERS"
    );
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join(format!("{kernel}.emu.h")), emu).unwrap();
    let exe = tmp.path().join("check");
    let inc_emu = emu_dir();
    let args = ["-std=c++20", "-O2", "-pthread", "-w", "-I"].map(std::ffi::OsStr::new);
    let paths = [tmp.path().as_os_str(), std::ffi::OsStr::new("-I"), inc_emu.as_os_str(), check.as_os_str()];
    let out = [std::ffi::OsStr::new("-o"), exe.as_os_str()];
    compile(&[&args[..], &paths, &out].concat(), &format!("the emulated {kernel}"));
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
fn kernel_emulated_qgemm() {
    run_check("qgemm");
}

#[test]
fn kernel_every_cu_file_has_an_emulated_check() {
    for e in std::fs::read_dir(root().join("kernels")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "cu") {
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            let check = Path::new("tests/emu").join(format!("{stem}_check.cpp"));
            assert!(root().join(&check).exists(), "{} has no emulated check ({})", p.display(), check.display());
        }
    }
}

#[test]
fn kernel_emulation_rewrite_pastes_the_common_header_and_strips_ptx_helpers_and_dynamic_shared_memory() {
    let common = "#include <cuda_bf16.h>\n\
                  __device__ __forceinline__ void cp_async_commit() { asm volatile(\"cp.async.commit_group;\\n\" ::); }\n\
                  template <int N>\n\
                  __device__ __forceinline__ void cp_async_wait() {\n    asm volatile(\"x\" ::\"n\"(N));\n}\n";
    let src = "#include \"common.cuh\"\n\
               __global__ void k() { extern __shared__ __align__(16) unsigned char smem[]; cp_async_commit(); }\n";
    let out = emulated_source(src, common);
    assert!(out.starts_with("#include \"emu.h\""), "{out}");
    assert!(!out.contains("common.cuh"), "{out}");
    assert!(!out.contains("asm") && !out.contains("template"), "{out}");
    assert!(out.contains("unsigned char* smem = g_dyn_smem;") && out.contains("cp_async_commit();"), "{out}");
}

/// Every inline-PTX helper of kernels/common.cuh has an emulation: none is left after the rewrite.
#[test]
fn kernel_emulation_of_the_common_header_leaves_no_inline_ptx() {
    let out = emulated_source("#include \"common.cuh\"\n", &common_header());
    assert!(!out.contains("asm volatile") && !out.contains("asm("), "{out}");
    assert!(out.contains("warp_sum") && out.contains("tc_tile_gemm"), "{out}");
}
