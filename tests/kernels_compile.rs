//! Every `kernels/*.cu` compiles with the pinned NVRTC 13.0 for compute_80 and compute_90, and
//! `ptxas -v` assembles the PTX for sm_80 / sm_90 with no register spills (ARCHITECTURE.md §4). Needs no
//! GPU and no driver: NVRTC and ptxas come from the wheels `sage fetch --cuda` installs. These
//! tests fail (they do not skip) when the wheels are missing: CI installs them first.

use sage::assets::{cuda_toolchain, CudaToolchain};
use sage::backend::nvrtc::{Arch, Nvrtc};
use std::path::{Path, PathBuf};
use std::process::Command;

const ARCHS: [Arch; 2] = [Arch::SM80, Arch::SM90];

fn toolchain() -> CudaToolchain {
    cuda_toolchain().unwrap_or_else(|e| {
        panic!("the pinned CUDA toolchain wheels are missing ({e:#}); run `sage fetch --cuda` first")
    })
}

fn nvrtc(tc: &CudaToolchain) -> Nvrtc {
    Nvrtc::load(&tc.nvrtc, Some(&tc.nvrtc_builtins))
        .unwrap_or_else(|e| panic!("cannot load NVRTC from the wheel ({e:#}); run `sage fetch --cuda --force`"))
}

fn kernels_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// `kernels/common.cuh` as it is on disk, handed to NVRTC as the binary hands its embedded copy.
fn common_header() -> String {
    let p = kernels_dir().join("common.cuh");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()))
}

/// One function's `ptxas -v` report.
#[derive(Debug, Default)]
struct FnReport {
    name: String,
    registers: Option<u32>,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    entry: bool,
}

/// Parses `ptxas -v` output: a `Function properties for NAME` line, then
/// `N bytes stack frame, S bytes spill stores, L bytes spill loads`, then (entries)
/// `Used R registers, ...`.
fn parse_ptxas(log: &str) -> Vec<FnReport> {
    let mut out: Vec<FnReport> = Vec::new();
    let mut entries = Vec::new();
    let num_before = |line: &str, what: &str| -> Option<u32> {
        let i = line.find(what)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            entries.push(rest.split('\'').next().unwrap_or("").to_string());
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim().to_string();
            let entry = entries.contains(&name);
            out.push(FnReport { name, entry, ..Default::default() });
        } else if line.contains("bytes spill stores") {
            let f = out.last_mut().expect("a spill line follows a `Function properties` line");
            f.stack = num_before(line, "bytes stack frame").expect("stack frame size");
            f.spill_stores = num_before(line, "bytes spill stores").expect("spill stores");
            f.spill_loads = num_before(line, "bytes spill loads").expect("spill loads");
        } else if line.contains("Used") && line.contains("registers") {
            if let Some(f) = out.last_mut() {
                f.registers =
                    line.split("Used ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|r| r.parse().ok());
            }
        }
    }
    out
}

/// Compiles `file` for both architectures, runs `ptxas -v` and checks it; returns the summary lines.
fn check_kernel_file(file: &Path) -> Vec<String> {
    let tc = toolchain();
    let nv = nvrtc(&tc);
    let name = file.file_name().unwrap().to_string_lossy().into_owned();
    let source = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    let common = common_header();
    let headers = [("common.cuh", common.as_str())];
    let tmp = tempfile::tempdir().unwrap();
    let mut summary = Vec::new();
    for arch in ARCHS {
        let ptx = nv
            .compile_uncached(&source, &name, arch, &headers, std::slice::from_ref(&tc.include), &[])
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert!(ptx.contains(".entry"), "{name} for {}: the PTX has no kernel entry point", arch.sm());
        let ptx_path = tmp.path().join(format!("{name}.{}.ptx", arch.sm()));
        std::fs::write(&ptx_path, &ptx).unwrap();
        let out = Command::new(&tc.ptxas)
            .arg("-v")
            .arg("--gpu-name")
            .arg(arch.sm())
            .arg(&ptx_path)
            .arg("-o")
            .arg(tmp.path().join(format!("{name}.{}.cubin", arch.sm())))
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}); run `sage fetch --cuda --force`", tc.ptxas.display()));
        let log = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ptxas --gpu-name {} failed on {name}:\n{log}", arch.sm());
        let fns = parse_ptxas(&log);
        let entries: Vec<&FnReport> = fns.iter().filter(|f| f.entry).collect();
        assert!(!entries.is_empty(), "ptxas reported no entry function for {name} ({}):\n{log}", arch.sm());
        for f in &fns {
            assert!(
                f.spill_stores == 0 && f.spill_loads == 0,
                "{name}: {} spills on {} ({} bytes spill stores, {} bytes spill loads):\n{log}",
                f.name,
                arch.sm(),
                f.spill_stores,
                f.spill_loads
            );
            summary.push(format!(
                "{name} {} {}: {} registers, {} bytes stack, {} bytes spill stores, {} bytes spill loads",
                arch.sm(),
                f.name,
                f.registers.map_or("?".to_string(), |r| r.to_string()),
                f.stack,
                f.spill_stores,
                f.spill_loads
            ));
        }
        // Every line ptxas prints about spills says 0 (also for non-entry functions).
        for line in log.lines().filter(|l| l.contains("spill")) {
            assert!(
                line.contains("0 bytes spill stores") && line.contains("0 bytes spill loads"),
                "{name} ({}): {line}",
                arch.sm()
            );
        }
    }
    for line in &summary {
        println!("{line}");
    }
    summary
}

/// The entry points the host code launches, per file: a rename fails here, not on the GPU.
fn assert_entries(file: &str, expected: &[&str]) {
    let lines = check_kernel_file(&kernels_dir().join(file));
    for arch in ARCHS {
        for e in expected {
            let needle = format!("{file} {} {e}:", arch.sm());
            assert!(lines.iter().any(|l| l.starts_with(&needle)), "{file}: no entry point `{e}` for {}", arch.sm());
        }
    }
}

#[test]
fn nvrtc_version_is_13_0() {
    let tc = toolchain();
    let nv = nvrtc(&tc);
    assert_eq!(
        nv.version(),
        (13, 0),
        "NVRTC at {} must be 13.0 (a newer one emits PTX a 580 driver cannot load); run `sage fetch --cuda --force`",
        tc.nvrtc.display()
    );
    nv.require_13_0().unwrap();
}

/// The shared entry point the CUDA backend will use: the pinned NVRTC, the wheel's headers and
/// the `$SAGE_HOME/kernels-cache` cache; PTX ISA 9.0 is what a 580 driver loads.
#[test]
fn nvrtc_compile_through_the_sage_home_cache_emits_ptx_isa_9_0() {
    let _ = toolchain();
    let src =
        "#include <cuda_bf16.h>\nextern \"C\" __global__ void nvrtc_cache_probe(const __nv_bfloat16* x, float* y) \
               { y[threadIdx.x] = __bfloat162float(x[threadIdx.x]); }\n";
    for arch in ARCHS {
        let ptx = sage::backend::nvrtc::compile(src, arch, &[]).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(ptx.contains(".version 9.0"), "NVRTC 13.0 emits PTX ISA 9.0:\n{}", &ptx[..ptx.len().min(400)]);
        assert!(ptx.contains(&format!(".target {}", arch.sm())), "{}", &ptx[..ptx.len().min(400)]);
        assert_eq!(sage::backend::nvrtc::compile(src, arch, &[]).unwrap(), ptx, "the cached PTX is the same");
    }
    let cached = std::fs::read_dir(sage::backend::nvrtc::cache_dir()).unwrap().count();
    assert!(cached >= 2, "two cache entries under {}", sage::backend::nvrtc::cache_dir().display());
}

#[test]
fn nvrtc_compile_error_carries_the_log() {
    let tc = toolchain();
    let nv = nvrtc(&tc);
    let err = nv
        .compile_uncached(
            "extern \"C\" __global__ void k() { undeclared_thing(); }",
            "broken.cu",
            Arch::SM80,
            &[],
            &[],
            &[],
        )
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("broken.cu") && msg.contains("undeclared_thing"), "{msg}");
}

#[test]
fn nvrtc_cache_returns_the_same_ptx_and_is_keyed_by_arch() {
    let tc = toolchain();
    let nv = nvrtc(&tc);
    let cache = tempfile::tempdir().unwrap();
    let src = "extern \"C\" __global__ void k(float* x) { x[threadIdx.x] *= 2.0f; }";
    let inc = [tc.include.clone()];
    let a = nv.compile_cached(src, "k.cu", Arch::SM80, &[], &inc, &[], cache.path()).unwrap();
    let files: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "one cache entry after one compile");
    let b = nv.compile_cached(src, "k.cu", Arch::SM80, &[], &inc, &[], cache.path()).unwrap();
    assert_eq!(a, b);
    let c = nv.compile_cached(src, "k.cu", Arch::SM90, &[], &inc, &[], cache.path()).unwrap();
    assert_ne!(a, c, "sm_90 PTX differs from sm_80 PTX");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 2);
    assert_ne!(
        sage::backend::nvrtc::cache_key(src, Arch::SM80, &[], &[]),
        sage::backend::nvrtc::cache_key(src, Arch::SM90, &[], &[])
    );
    assert_ne!(
        sage::backend::nvrtc::cache_key(src, Arch::SM80, &[], &[]),
        sage::backend::nvrtc::cache_key(&format!("{src}\n"), Arch::SM80, &[], &[])
    );
}

/// The PTX cache key covers the embedded headers: editing kernels/common.cuh must not let a
/// machine load PTX compiled from the old one. Needs no NVRTC.
#[test]
fn nvrtc_cache_key_follows_the_embedded_headers() {
    use sage::backend::nvrtc::cache_key;
    let src = "#include \"common.cuh\"\n";
    let none = cache_key(src, Arch::SM80, &[], &[]);
    let a = cache_key(src, Arch::SM80, &[("common.cuh", "int x;")], &[]);
    let b = cache_key(src, Arch::SM80, &[("common.cuh", "int y;")], &[]);
    let renamed = cache_key(src, Arch::SM80, &[("other.cuh", "int x;")], &[]);
    assert_ne!(none, a, "adding a header changes the key");
    assert_ne!(a, b, "changing a header's text changes the key");
    assert_ne!(a, renamed, "the header's include name is part of the key");
    assert_eq!(a, cache_key(src, Arch::SM80, &[("common.cuh", "int x;")], &[]));
    // Text moved from the source into a header is a different program.
    assert_ne!(cache_key("ab", Arch::SM80, &[("h", "c")], &[]), cache_key("a", Arch::SM80, &[("h", "bc")], &[]));
    // The backend's own cache entries follow the header the binary embeds.
    let file = &sage::backend::cuda::kernels::MINCOS_TOPK;
    let (name, text) = sage::backend::cuda::kernels::HEADERS[0];
    assert_eq!(name, "common.cuh");
    assert_eq!(text, common_header(), "the binary embeds kernels/common.cuh as it is on disk");
    let edited = format!("{text}\n// edited\n");
    assert_ne!(
        cache_key(file.source, Arch::SM90, &sage::backend::cuda::kernels::HEADERS, &[]),
        cache_key(file.source, Arch::SM90, &[(name, edited.as_str())], &[])
    );
}

#[test]
fn kernel_mincos_topk_compiles_without_spills() {
    assert_entries(
        "mincos_topk.cu",
        &["mincos_inv_norms", "mincos_reduce_v1", "mincos_reduce_v2", "mincos_merge_topk", "mincos_gather"],
    );
}

#[test]
fn kernel_fusion_attn_compiles_without_spills() {
    assert_entries(
        "fusion_attn.cu",
        &["fusion_attn_fwd", "fusion_attn_bwd_delta", "fusion_attn_bwd_dq", "fusion_attn_bwd_dkdv"],
    );
}

#[test]
fn kernel_edpo_loss_compiles_without_spills() {
    assert_entries(
        "edpo_loss.cu",
        &["edpo_logits_lse_partial", "edpo_lse_combine_seqsum", "edpo_loss_fwd", "edpo_dlogits"],
    );
}

#[test]
fn kernel_llm_ops_compiles_without_spills() {
    assert_entries("llm_ops.cu", sage::backend::cuda::kernels::LLM_OPS.entries);
}

#[test]
fn kernel_llm_attn_compiles_without_spills() {
    assert_entries("llm_attn.cu", sage::backend::cuda::kernels::LLM_ATTN.entries);
}

#[test]
fn kernel_head_ops_compiles_without_spills() {
    assert_entries("head_ops.cu", sage::backend::cuda::kernels::HEAD_OPS.entries);
}

#[test]
fn kernel_llm_decode_compiles_without_spills() {
    assert_entries("llm_decode.cu", sage::backend::cuda::kernels::LLM_DECODE.entries);
}

#[test]
fn kernel_dwconv_compiles_without_spills() {
    assert_entries("dwconv.cu", sage::backend::cuda::kernels::DWCONV.entries);
}

#[test]
fn kernel_qgemm_compiles_without_spills() {
    assert_entries("qgemm.cu", sage::backend::cuda::kernels::QGEMM.entries);
}

/// Any `.cu` added later is compiled and checked too, before it gets a test of its own.
#[test]
fn kernel_every_cu_file_compiles_without_spills() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kernels_dir())
        .expect("kernels/ exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected at least the three kernels in kernels/, found {files:?}");
    let known = [
        "mincos_topk.cu",
        "fusion_attn.cu",
        "edpo_loss.cu",
        "llm_ops.cu",
        "llm_attn.cu",
        "head_ops.cu",
        "llm_decode.cu",
        "dwconv.cu",
        "qgemm.cu",
    ];
    for f in files.iter().filter(|f| !known.iter().any(|k| f.ends_with(k))) {
        check_kernel_file(f);
    }
}

#[test]
fn kernel_toolchain_check_names_the_cuda_wheels_and_the_fetch_command() {
    let empty = tempfile::tempdir().unwrap();
    let sage = || {
        let mut c = assert_cmd::Command::cargo_bin("sage").unwrap();
        c.env("SAGE_HOME", empty.path());
        c
    };
    let out = sage().args(["fetch", "--check", "--cuda"]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    for spec in ["nvidia-cuda-nvrtc==13.0.88", "nvidia-cuda-runtime==13.0.96", "nvidia-cuda-nvcc==13.0.88"] {
        assert!(stdout.lines().any(|l| l.starts_with(spec) && l.contains("missing")), "{spec}: {stdout}");
    }
    assert!(stderr.contains("sage fetch --cuda"), "{stderr}");
    // The default fetch stays models-only.
    let out = sage().args(["fetch", "--check"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("nvidia-cuda"));
}

#[test]
fn kernel_ptxas_report_parser_reads_registers_and_spills() {
    let log = "ptxas info    : Compiling entry function 'k' for 'sm_80'\n\
               ptxas info    : Function properties for k\n    \
               16 bytes stack frame, 12 bytes spill stores, 72 bytes spill loads\n\
               ptxas info    : Used 64 registers, used 1 barriers, 8320 bytes smem\n";
    let f = &parse_ptxas(log)[0];
    assert_eq!((f.name.as_str(), f.entry, f.registers), ("k", true, Some(64)));
    assert_eq!((f.stack, f.spill_stores, f.spill_loads), (16, 12, 72));
}
