//! Kernel parity against the CPU references (ARCHITECTURE.md §4): every kernel at several shapes, odd
//! sizes included, with the tolerance written down (kernels/README.md).
//!
//! Without a working CUDA device each GPU test prints why it skipped and returns; `Gpu::open`
//! never creates a context where there is no driver. Inputs are bf16; the CPU reference gets the
//! same bf16 values as f32, so the tolerances measure the kernels' own arithmetic (fp32
//! accumulation, bf16 outputs).

mod common;

use half::bf16;
use sage::backend::cuda::edpo::{self as gedpo, DevicePairs, SeqShape};
use sage::backend::cuda::gemm::{gemm, gemm_reference};
use sage::backend::cuda::mincos::{self, MincosShape, Variant};
use sage::backend::cuda::{fusion, Gpu};
use sage::ops::edpo::{self, EdpoConfig, Pair};
use sage::ops::fusion_attn::{self, FusionShape};
use sage::ops::similarity::{self, Reduce};
use sage::opset::GemmSpec;
use std::sync::Arc;

/// Every GPU test of this file, run again in a child process on the emulated device
/// (tests/emu/fake_cuda.cpp: a stand-in `libcuda.so` and `libcublasLt.so` that execute the
/// launches on the CPU through tests/emu/emu.h) at the small shapes. On a machine without a GPU
/// this is what runs the CUDA backend's host code (cudarc calls, argument lists, grids, dynamic
/// shared memory, copies, cuBLASLt layouts) end to end; it is no substitute for a device.
#[test]
fn kernel_parity_on_the_emulated_device() {
    if common::emu::in_emulated_child() {
        return;
    }
    let stdout = common::emu::run_tests_on_emulated_device(&["kernel_parity_"], &[("SAGE_PARITY_SMALL", "1")]);
    let ran = stdout.lines().filter(|l| l.contains(": running on sage emulated device")).count();
    assert!(ran >= 15, "only {ran} GPU tests ran on the emulated device:\n{stdout}");
}

/// `sage bench kernels --quick --json` on the emulated device: the benchmark harness the GPU
/// machine runs (every op and variant, allocation figures, the JSON report) end to end. The
/// times are CPU times of the emulation and mean nothing.
#[test]
fn bench_kernels_quick_runs_on_the_emulated_device() {
    if common::emu::in_emulated_child() {
        return;
    }
    let lib = common::emu::emulated_device();
    let out = common::sage()
        .env("LD_LIBRARY_PATH", common::emu::library_path(&lib))
        .args(["--json", "bench", "kernels", "--quick", "--warmup", "0", "--repeats", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j = common::stdout_json(&out);
    assert_eq!(j["device"]["name"], "sage emulated device (CPU, tests/emu)");
    let cases = j["cases"].as_array().unwrap();
    for op in [
        "mincos_topk",
        "fusion_attn_fwd_bwd",
        "gemm_bf16",
        "edpo_loss_fwd_bwd",
        "decode_attn",
        "dwconv_fwd_bwd",
        "qgemm_xwt",
    ] {
        let rows: Vec<_> = cases.iter().filter(|c| c["op"] == op).collect();
        assert!(!rows.is_empty(), "no {op} row: {j}");
        for r in rows {
            let ms = r["median_ms"].as_f64().unwrap();
            assert!(ms.is_finite() && ms > 0.0 && r["allocated_bytes"].as_u64().unwrap() > 0, "{r}");
        }
    }
}

/// The device, or `None` after printing why the GPU half of a test is skipped.
fn gpu(test: &str) -> Option<Arc<Gpu>> {
    match Gpu::global() {
        Ok(g) => {
            println!("{test}: running on {} (sm_{})", g.info().name, g.info().arch);
            Some(g)
        }
        Err(e) => {
            println!("{test}: skipped, no usable CUDA device: {e:#}");
            None
        }
    }
}

/// `SAGE_PARITY_SMALL=1` (set under compute-sanitizer, which slows kernels 10–100×) drops the
/// benchmark-sized cases.
fn small_only() -> bool {
    std::env::var_os("SAGE_PARITY_SMALL").is_some()
}

fn keep(elements: usize) -> bool {
    !small_only() || elements <= 4_000_000
}

/// Deterministic bf16 values in [−1, 1) and the same values as f32.
fn rnd(n: usize, seed: u64) -> (Vec<bf16>, Vec<f32>) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let b: Vec<bf16> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect();
    let f = b.iter().map(|v| v.to_f32()).collect();
    (b, f)
}

fn to_f32(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// max |a − b| / max(max |b|, tiny).
fn rel_to_max(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-20);
    a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

// The shapes each parity run covers (bf16 inputs; the CPU reference gets the same bf16-rounded
// values as f32). Odd sizes on purpose: partial 64-row/64-column tiles, C not a multiple of 32.

/// (B, P, P', C, K): P' ≠ P, P and P' not multiples of 64, C % 32 ≠ 0 (v2 needs C % 8 == 0; the
/// C = 37 case runs v1 only).
const MINCOS_CASES: &[(usize, usize, usize, usize, usize)] =
    &[(1, 1, 1, 8, 1), (2, 100, 77, 40, 5), (3, 257, 130, 328, 17), (2, 64, 64, 37, 64), (32, 1024, 1024, 1024, 32)];

/// (B, L, S, H, D).
const FUSION_CASES: &[(usize, usize, usize, usize, usize)] =
    &[(1, 1, 1, 1, 2), (2, 5, 33, 3, 18), (3, 16, 64, 4, 64), (32, 16, 64, 16, 128), (2, 40, 70, 2, 256)];

/// (pairs, T, C, V, vocabulary splits). The benchmark shape (8, 1024, 896, 151 936) is left to
/// `sage bench kernels`: its CPU reference alone is 4.5 TFLOP.
const EDPO_CASES: &[(usize, usize, usize, usize, usize)] =
    &[(1, 5, 8, 7, 1), (2, 67, 40, 1000, 3), (3, 130, 576, 49_152, 8)];

/// (m, n, k, batch): odd sizes, and a linear layer of SmolLM2's shape.
const GEMM_CASES: &[(usize, usize, usize, usize)] = &[(1, 1, 8, 1), (37, 53, 72, 1), (64, 576, 576, 1), (5, 24, 16, 3)];

/// Tolerances (kernels/README.md): similarity and map 2e-3 absolute (fp32 accumulation of bf16
/// products, inverse norms folded in); the rest relative to the largest reference magnitude.
const SIM_TOL: f32 = 2e-3;

#[test]
fn kernel_parity_mincos_topk() {
    let Some(gpu) = gpu("mincos_topk") else { return };
    let mut compared = 0;
    for &(b, p, pr, c, k) in MINCOS_CASES.iter().filter(|c| keep(c.0 * c.1 * c.2)) {
        for reduce in [Reduce::Nearest, Reduce::Min] {
            for zero_shot in [false, true] {
                let variants: &[Variant] = if c % 8 == 0 { &[Variant::V1, Variant::V2] } else { &[Variant::V1] };
                for &variant in variants {
                    for nsplit in [1usize, 3] {
                        let s =
                            MincosShape { batch: b, patches: p, ref_patches: pr, channels: c, k, reduce, zero_shot };
                        let pr_eff = if zero_shot { p } else { pr };
                        let nsplit = nsplit.min(pr_eff.div_ceil(64));
                        let (tb, tf) = rnd(b * p * c, 11 + b as u64);
                        let (rb, rf) = rnd(b * pr * c, 13 + c as u64);
                        let test = gpu.upload(&tb).unwrap();
                        let reference = gpu.upload(&rb).unwrap();
                        let out =
                            mincos::mincos_topk(&gpu, &test, (!zero_shot).then_some(&reference), s, variant, nsplit)
                                .unwrap_or_else(|e| panic!("{s:?} {variant:?}: {e:#}"));
                        let sim = gpu.download(&out.sim).unwrap();
                        let map = gpu.download(&out.map).unwrap();
                        let idx = gpu.download(&out.ref_index).unwrap();
                        let topk = gpu.download(&out.topk).unwrap();
                        let v_sel = gpu.download(&out.v_sel).unwrap();
                        let d = gpu.download(&out.d).unwrap();
                        for bi in 0..b {
                            let t_b = &tf[bi * p * c..(bi + 1) * p * c];
                            let r_b = (!zero_shot).then(|| &rf[bi * pr * c..(bi + 1) * pr * c]);
                            let want = similarity::mincos_topk(t_b, r_b, c, k, reduce);
                            let ctx = format!("{s:?} {variant:?} nsplit {nsplit} item {bi}");
                            for i in 0..p {
                                let (g, w) = (sim[bi * p + i], want.similarity[i]);
                                assert!((g - w).abs() <= SIM_TOL, "{ctx}: sim[{i}] {g} vs {w}");
                                assert!((map[bi * p + i] - (1.0 - w)).abs() <= SIM_TOL, "{ctx}: map[{i}]");
                            }
                            // ref_index must agree wherever the best cosine is clear of the rest.
                            let rr = r_b.unwrap_or(t_b);
                            for i in 0..p {
                                let j = idx[bi * p + i];
                                let w = want.ref_index[i] as i32;
                                if j != w {
                                    let cos = |jj: usize| cosine(&t_b[i * c..(i + 1) * c], &rr[jj * c..(jj + 1) * c]);
                                    assert!(j >= 0 && (j as usize) < pr_eff, "{ctx}: ref_index[{i}] = {j}");
                                    assert!(
                                        (cos(j as usize) - cos(w as usize)).abs() <= SIM_TOL,
                                        "{ctx}: ref_index[{i}] {j} vs {w}, cosines differ by more than {SIM_TOL}"
                                    );
                                }
                            }
                            // top-K: the same set up to near-ties at the K-th value, sim ascending.
                            let kk = k.min(p);
                            let got: Vec<i32> = topk[bi * k..bi * k + k].to_vec();
                            assert!(got[kk..].iter().all(|&x| x == -1), "{ctx}: entries past P must be -1: {got:?}");
                            let kth = want.similarity[want.topk[kk - 1] as usize];
                            for (r, &i) in got[..kk].iter().enumerate() {
                                assert!(i >= 0 && (i as usize) < p, "{ctx}: topk[{r}] = {i}");
                                assert!(
                                    want.similarity[i as usize] <= kth + SIM_TOL,
                                    "{ctx}: topk[{r}] = {i} has sim {} above the K-th {kth}",
                                    want.similarity[i as usize]
                                );
                                // gather: v_sel bit-equal to the test row, d = t − r[nn] rounded once.
                                let row = &tb[(bi * p + i as usize) * c..(bi * p + i as usize + 1) * c];
                                let vs = &v_sel[(bi * k + r) * c..(bi * k + r + 1) * c];
                                assert_eq!(vs, row, "{ctx}: v_sel[{r}]");
                                let nn = idx[bi * p + i as usize] as usize;
                                for ch in 0..c {
                                    let want_d = bf16::from_f32(row[ch].to_f32() - rr[nn * c + ch]);
                                    assert_eq!(d[(bi * k + r) * c + ch], want_d, "{ctx}: d[{r}][{ch}]");
                                }
                            }
                            let mut u = got[..kk].to_vec();
                            u.sort_unstable();
                            u.dedup();
                            assert_eq!(u.len(), kk, "{ctx}: top-K repeats a patch: {got:?}");
                        }
                        compared += 1;
                    }
                }
            }
        }
    }
    println!("mincos_topk: {compared} configurations compared with ops::similarity::mincos_topk");
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
    for (x, y) in a.iter().zip(b) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64) * (*x as f64);
        bb += (*y as f64) * (*y as f64);
    }
    let inv = |v: f64| if v > 0.0 { 1.0 / v.sqrt() } else { 0.0 };
    (ab * inv(aa) * inv(bb)) as f32
}

#[test]
fn kernel_parity_fusion_attn() {
    let Some(gpu) = gpu("fusion_attn") else { return };
    for &(b, l, n, h, d) in FUSION_CASES.iter().filter(|c| keep(c.0 * c.1 * c.2 * c.3 * c.4)) {
        let s = FusionShape { batch: b, queries: l, keys: n, heads: h, head_dim: d };
        let (qb, qf) = rnd(s.q_len(), 21);
        let (kb, kf) = rnd(s.kv_len(), 22);
        let (vb, vf) = rnd(s.kv_len(), 23);
        let (db, df) = rnd(s.q_len(), 24);
        let (q, k, v, dout) =
            (gpu.upload(&qb).unwrap(), gpu.upload(&kb).unwrap(), gpu.upload(&vb).unwrap(), gpu.upload(&db).unwrap());
        let (out, lse) = fusion::forward(&gpu, &q, &k, &v, s).unwrap_or_else(|e| panic!("{s:?}: {e:#}"));
        let g = fusion::backward(&gpu, &q, &k, &v, &out, &lse, &dout, s).unwrap_or_else(|e| panic!("{s:?}: {e:#}"));
        let (mut want_out, mut want_lse) = (vec![0.0; s.q_len()], vec![0.0; s.lse_len()]);
        fusion_attn::fusion_attn_forward(&qf, &kf, &vf, s, &mut want_out, &mut want_lse);
        let got_out = to_f32(&gpu.download(&out).unwrap());
        let got_lse = gpu.download(&lse).unwrap();
        for (i, (g, w)) in got_out.iter().zip(&want_out).enumerate() {
            assert!((g - w).abs() <= 1e-2 + 1e-2 * w.abs(), "{s:?}: out[{i}] {g} vs {w}");
        }
        for (i, (g, w)) in got_lse.iter().zip(&want_lse).enumerate() {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{s:?}: lse[{i}] {g} vs {w}");
        }
        // The backward reference runs on the GPU's (bf16) output, as the kernel does.
        let want = fusion_attn::fusion_attn_backward(&qf, &kf, &vf, &got_out, &got_lse, &df, s);
        for (name, got, want) in [("dq", &g.dq, &want.dq), ("dk", &g.dk, &want.dk), ("dv", &g.dv, &want.dv)] {
            let e = rel_to_max(&to_f32(&gpu.download(got).unwrap()), want);
            assert!(e <= 2e-2, "{s:?}: {name} differs by {e} of its max magnitude");
        }
    }
    println!("fusion_attn: {} shapes compared with ops::fusion_attn", FUSION_CASES.len());
}

#[test]
fn kernel_parity_edpo_loss() {
    let Some(gpu) = gpu("edpo_loss") else { return };
    for &(pairs, t, c, v, nsplit) in EDPO_CASES.iter().filter(|c| keep(2 * c.0 * c.1 * c.3)) {
        let n = 2 * pairs;
        let r = n * t;
        let shape = SeqShape { n, t, c, v };
        let (hb, hf) = rnd(r * c, 31);
        let (wb, wf) = rnd(v * c, 32);
        let targets: Vec<u32> = (0..r).map(|i| (i * 7919 % v) as u32).collect();
        // The last third of each sequence is the answer.
        let mask: Vec<bool> = (0..r).map(|i| i % t >= t - t.div_ceil(3)).collect();
        let ps: Vec<Pair> =
            (0..pairs).map(|p| Pair { chosen: 2 * p, rejected: 2 * p + 1, delta_h: 0.05 * p as f32 - 0.1 }).collect();
        let reference: Vec<f32> = (0..n).map(|i| -3.0 - 0.25 * i as f32).collect();
        let cfg = EdpoConfig { beta: 0.1, eta: 0.5 };
        let ctx = format!("pairs {pairs} T {t} C {c} V {v} splits {nsplit}");

        let h = gpu.upload(&hb).unwrap();
        let w = gpu.upload(&wb).unwrap();
        let tg = gpu.upload(&targets.iter().map(|&x| x as i32).collect::<Vec<_>>()).unwrap();
        let mk = gpu.upload(&mask.iter().map(|&m| u8::from(m)).collect::<Vec<_>>()).unwrap();
        let pol =
            gedpo::sequence_logprobs(&gpu, &h, &w, &tg, &mk, shape, nsplit).unwrap_or_else(|e| panic!("{ctx}: {e:#}"));
        let ref_seq = gpu.upload(&reference).unwrap();
        let dp = DevicePairs::upload(&gpu, &ps, n).unwrap();
        let l = gedpo::loss(&gpu, &pol.seq, &ref_seq, &dp, n, cfg.beta, cfg.eta).unwrap();
        let spans = gedpo::answer_spans(&mask, t, 64);
        // The LM head's gradient buffer starts dirty: the backward must overwrite it.
        let mut g_dw = gpu.upload(&vec![bf16::from_f32(7.0); wb.len()]).unwrap();
        let g_dh =
            gedpo::backward(&gpu, &h, &w, &tg, &mk, &pol.lse, &l.grad_seq, shape, &spans, Some(&mut g_dw)).unwrap();

        let tl = edpo::token_logprobs(&hf, &wf, c, &targets, &mask);
        let want_seq = edpo::masked_sequence_sums(&tl.logp, &mask, t);
        let want_loss = edpo::edpo_loss(&want_seq, &reference, &ps, cfg);
        let (lse, logp, seq) =
            (gpu.download(&pol.lse).unwrap(), gpu.download(&pol.logp).unwrap(), gpu.download(&pol.seq).unwrap());
        for i in 0..r {
            assert!((lse[i] - tl.lse[i]).abs() <= 1e-3, "{ctx}: lse[{i}] {} vs {}", lse[i], tl.lse[i]);
            assert!((logp[i] - tl.logp[i]).abs() <= 1e-3, "{ctx}: logp[{i}] {} vs {}", logp[i], tl.logp[i]);
        }
        for i in 0..n {
            assert!((seq[i] - want_seq[i]).abs() <= 1e-3 * want_seq[i].abs().max(1.0), "{ctx}: seq[{i}]");
        }
        let loss = gpu.download(&l.loss).unwrap()[0];
        assert!((loss - want_loss.loss).abs() <= 1e-3, "{ctx}: loss {loss} vs {}", want_loss.loss);
        let margins = gpu.download(&l.margin).unwrap();
        for (p, (g, w)) in margins.iter().zip(&want_loss.margins).enumerate() {
            assert!((g - w).abs() <= 1e-3 * w.abs().max(1.0), "{ctx}: margin[{p}] {g} vs {w}");
        }
        let grad_seq = gpu.download(&l.grad_seq).unwrap();
        for (i, (g, w)) in grad_seq.iter().zip(&want_loss.grad_policy).enumerate() {
            assert!((g - w).abs() <= 1e-5, "{ctx}: grad_seq[{i}] {g} vs {w}");
        }
        // Gradients: the reference runs on the GPU's lse and grad_seq, as the kernel does.
        let grad_token: Vec<f32> = (0..r).map(|i| if mask[i] { grad_seq[i / t] } else { 0.0 }).collect();
        let mut want_dw = vec![0.0f32; wf.len()];
        let want_dh = edpo::logprob_backward(&hf, &wf, c, &targets, &lse, &grad_token, Some(&mut want_dw));
        let e = rel_to_max(&to_f32(&gpu.download(&g_dh).unwrap()), &want_dh);
        assert!(e <= 2e-2, "{ctx}: dH differs by {e} of its max magnitude");
        let e = rel_to_max(&to_f32(&gpu.download(&g_dw).unwrap()), &want_dw);
        assert!(e <= 2e-2, "{ctx}: dW differs by {e} of its max magnitude");
    }
    println!("edpo_loss: {} shapes compared with ops::edpo", EDPO_CASES.len());
}

#[test]
fn kernel_parity_gemm_cublaslt() {
    let Some(gpu) = gpu("gemm") else { return };
    let blas = gpu.blas().unwrap_or_else(|e| panic!("{e:#}"));
    for &(m, n, k, batch) in GEMM_CASES {
        for (trans_a, trans_b, bias, gelu, accumulate) in [
            (false, false, false, false, false),
            (false, true, true, false, false),
            (false, true, true, true, false),
            (true, false, false, false, true),
            (true, true, false, true, false),
        ] {
            let spec =
                GemmSpec { m, n, k, trans_a, trans_b, batch, broadcast_b: false, accumulate, gelu, b_prepared: false };
            let (ab, af) = rnd(batch * m * k, 41);
            let (bb, bf) = rnd(batch * k * n, 42);
            let (cb, cf) = rnd(batch * m * n, 43);
            let (biasb, biasf) = rnd(n, 44);
            let a = gpu.upload(&ab).unwrap();
            let b = gpu.upload(&bb).unwrap();
            let mut c = gpu.upload(&cb).unwrap();
            let bias_d = gpu.upload(&biasb).unwrap();
            let bias_view = bias.then(|| bias_d.slice(..));
            gemm(blas, &spec, &a.slice(..), &b.slice(..), &mut c.slice_mut(..), bias_view.as_ref())
                .unwrap_or_else(|e| panic!("{spec:?}: {e:#}"));
            let mut want = cf.clone();
            gemm_reference(&spec, &af, &bf, &mut want, bias.then_some(&biasf[..]));
            let e = rel_to_max(&to_f32(&gpu.download(&c).unwrap()), &want);
            assert!(e <= 1e-2, "{spec:?}: differs by {e} of the max magnitude");
        }
    }
    println!("gemm: {} shapes × 5 forms compared with gemm_reference", GEMM_CASES.len());
}

/// The CPU side of every parity case runs: the references accept the shapes the GPU branch will
/// use (the largest, benchmark-sized ones excluded to keep this quick).
#[test]
fn kernel_parity_cpu_references_accept_every_small_case() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rnd = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // bf16-representable values in [-1, 1)
                half::bf16::from_f32(((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0).to_f32()
            })
            .collect()
    };
    for &(b, p, pr, c, k) in MINCOS_CASES.iter().filter(|c| c.0 * c.1 * c.2 * c.3 < 50_000_000) {
        for reduce in [Reduce::Nearest, Reduce::Min] {
            let (t, r) = (rnd(b * p * c), rnd(b * pr * c));
            for bi in 0..b {
                let s = similarity::mincos_topk(
                    &t[bi * p * c..(bi + 1) * p * c],
                    Some(&r[bi * pr * c..(bi + 1) * pr * c]),
                    c,
                    k,
                    reduce,
                );
                assert_eq!((s.similarity.len(), s.topk.len()), (p, k.min(p)));
            }
        }
    }
    for &(b, l, n, h, d) in FUSION_CASES.iter().filter(|c| c.0 * c.1 * c.2 * c.3 * c.4 < 5_000_000) {
        let s = FusionShape { batch: b, queries: l, keys: n, heads: h, head_dim: d };
        let (q, kk, v) = (rnd(s.q_len()), rnd(s.kv_len()), rnd(s.kv_len()));
        let (mut out, mut lse) = (vec![0.0; s.q_len()], vec![0.0; s.lse_len()]);
        fusion_attn::fusion_attn_forward(&q, &kk, &v, s, &mut out, &mut lse);
        let g = fusion_attn::fusion_attn_backward(&q, &kk, &v, &out, &lse, &rnd(s.q_len()), s);
        assert!(g.dq.iter().chain(&g.dk).chain(&g.dv).all(|x| x.is_finite()));
    }
    for &(pairs, t, c, v, _) in EDPO_CASES.iter().filter(|e| e.0 * e.1 * e.2 * e.3 < 100_000_000) {
        let n = 2 * pairs;
        let (hidden, weight) = (rnd(n * t * c), rnd(v * c));
        let targets: Vec<u32> = (0..n * t).map(|i| (i * 7919 % v) as u32).collect();
        let mask: Vec<bool> = (0..n * t).map(|i| i % t >= t - t.div_ceil(3)).collect();
        let reference = vec![-1.0; n];
        let ps: Vec<Pair> = (0..pairs).map(|p| Pair { chosen: 2 * p, rejected: 2 * p + 1, delta_h: 0.1 }).collect();
        let step = edpo::edpo_step(edpo::EdpoBatch {
            hidden: &hidden,
            weight: &weight,
            c,
            t,
            targets: &targets,
            mask: &mask,
            reference: &reference,
            pairs: &ps,
            cfg: EdpoConfig { beta: 0.1, eta: 0.5 },
        });
        assert!(step.loss.loss.is_finite() && step.d_hidden.iter().all(|x| x.is_finite()));
    }
}

/// RMSNorm, SwiGLU and AdamW (`kernels/llm_ops.cu`) against `ops::norm`, `ops::activation` and
/// `train::AdamW`: bf16 outputs within 1e-2 relative + 1e-3, the RMSNorm weight gradient (fp32)
/// within 1e-4 of its max magnitude, AdamW (fp32, the same arithmetic) within 1e-6.
#[test]
fn kernel_parity_llm_ops() {
    let Some(gpu) = gpu("llm_ops") else { return };
    use sage::backend::cuda::llm;
    use sage::ops::activation::{swiglu_backward, swiglu_forward};
    use sage::ops::norm::{rms_norm_backward, rms_norm_rows};
    let close = |got: &[f32], want: &[f32], what: &str| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-2 * w.abs() + 1e-3, "{what}[{i}]: {g} vs {w}");
        }
    };
    for &(rows, c) in &[(1usize, 1usize), (5, 37), (130, 576), (64, 896)] {
        let (xb, xf) = rnd(rows * c, 51);
        let (wb, wf) = rnd(c, 52);
        let (dyb, dyf) = rnd(rows * c, 53);
        let (dx0b, dx0f) = rnd(rows * c, 54);
        let (x, w, dy) = (gpu.upload(&xb).unwrap(), gpu.upload(&wb).unwrap(), gpu.upload(&dyb).unwrap());
        let (y, rstd) = llm::rmsnorm_forward(&gpu, &x, &w, rows, 1e-5).unwrap();
        let mut want = vec![0.0; rows * c];
        rms_norm_rows(&xf, &wf, 1e-5, &mut want);
        close(&to_f32(&gpu.download(&y).unwrap()), &want, "rmsnorm y");
        let mut dx = gpu.upload(&dx0b).unwrap();
        let mut dw = gpu.upload(&vec![0.5f32; c]).unwrap();
        llm::rmsnorm_backward(&gpu, &x, &w, &dy, &rstd, rows, true, &mut dx, Some(&mut dw)).unwrap();
        let (mut want_dx, mut want_dw) = (dx0f.clone(), vec![0.5f32; c]);
        rms_norm_backward(&mut want_dx, Some(&mut want_dw), &dyf, &xf, &wf, 1e-5);
        close(&to_f32(&gpu.download(&dx).unwrap()), &want_dx, "rmsnorm dx");
        let e = rel_to_max(&gpu.download(&dw).unwrap(), &want_dw);
        assert!(e <= 1e-4, "rmsnorm dw differs by {e} of its max magnitude ({rows}×{c})");
    }
    for &n in &[1usize, 1000, 4864 * 3 + 5] {
        let (gb, gf) = rnd(n, 61);
        let (ub, uf) = rnd(n, 62);
        let (dyb, dyf) = rnd(n, 63);
        let (g, u, dy) = (gpu.upload(&gb).unwrap(), gpu.upload(&ub).unwrap(), gpu.upload(&dyb).unwrap());
        let y = llm::swiglu_forward(&gpu, &g, &u).unwrap();
        let mut want = vec![0.0; n];
        swiglu_forward(&mut want, &gf, &uf);
        close(&to_f32(&gpu.download(&y).unwrap()), &want, "swiglu y");
        let (mut dg, mut du) = (gpu.zeros::<bf16>(n).unwrap(), gpu.zeros::<bf16>(n).unwrap());
        llm::swiglu_backward(&gpu, &dy, &g, &u, false, &mut dg, &mut du).unwrap();
        let (mut wdg, mut wdu) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&mut wdg, &mut wdu, &dyf, &gf, &uf);
        close(&to_f32(&gpu.download(&dg).unwrap()), &wdg, "swiglu dgate");
        close(&to_f32(&gpu.download(&du).unwrap()), &wdu, "swiglu dup");
    }
    // AdamW: three steps against the CPU op set's AdamW (held to a hand-computed update in
    // backend::cpu::host_ops's tests).
    use sage::opset::{AdamWScalars, GradRef, Optimizer};
    let n = 10_007;
    let cfg = sage::train::AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    let (_, x0) = rnd(n, 71);
    let host = sage::backend::cpu::HostOps;
    let (mut hx, mut hm, mut hv) = (x0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
    let mut x = gpu.upload(&x0).unwrap();
    let (mut m, mut v) = (gpu.zeros::<f32>(n).unwrap(), gpu.zeros::<f32>(n).unwrap());
    for t in 1..=3u64 {
        let (_, g) = rnd(n, 80 + t);
        let s = AdamWScalars::new(&cfg, t, 1e-2);
        host.adamw(None, GradRef::Buf(&g), &mut hm, &mut hv, &mut hx, &s, true, &vec![1.0, 0.0, 0.0]).unwrap();
        llm::adamw_step(&gpu, &mut x, &gpu.upload(&g).unwrap(), &mut m, &mut v, cfg, t, 1e-2, true).unwrap();
    }
    let got = gpu.download(&x).unwrap();
    for (i, (g, w)) in got.iter().zip(&hx).enumerate() {
        assert!((g - w).abs() <= 1e-6, "adamw x[{i}]: {g} vs {w}");
    }
    println!("llm_ops: rmsnorm, swiglu and adamw compared with their CPU references");
}

/// RoPE, causal grouped-query attention and the embedding (`kernels/llm_attn.cu`) against
/// `ops::rope`, `ops::attention` (causal) and `ops::embedding`: bf16 outputs within 1e-2 relative +
/// 2e-3, attention gradients within 1e-2 of their max magnitude, the embedding gather exact.
#[test]
fn kernel_parity_llm_attn() {
    let Some(gpu) = gpu("llm_attn") else { return };
    use sage::backend::cuda::llm_attn;
    use sage::ops::attention::{attention, attention_backward, AttnShape, Mask};
    use sage::ops::rope::RopeTable;
    use sage::opset::CausalShape;
    let close = |got: &[f32], want: &[f32], what: &str| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-2 * w.abs() + 2e-3, "{what}[{i}]: {g} vs {w}");
        }
    };
    // RoPE: two sequences of t positions, forward then backward.
    for &(t, heads, d) in &[(1usize, 1usize, 2usize), (7, 3, 8), (130, 9, 64)] {
        let table = RopeTable::new(d, 10_000.0, 256);
        let (cos, sin) = table.tables();
        let (cos, sin) = (gpu.upload(cos).unwrap(), gpu.upload(sin).unwrap());
        let rows = 2 * t;
        let (xb, xf) = rnd(rows * heads * d, 91);
        let mut x = gpu.upload(&xb).unwrap();
        llm_attn::rope(&gpu, &mut x, &cos, &sin, d / 2, rows, t, heads, false).unwrap();
        let mut want = xf.clone();
        for s in want.chunks_mut(t * heads * d) {
            table.apply_pairs_(s, heads, 0);
        }
        let fwd = to_f32(&gpu.download(&x).unwrap());
        close(&fwd, &want, "rope");
        // The backward is held against the CPU backward of the kernel's own bf16 forward output:
        // against the original input, two bf16 roundings of the rotated pairs would already
        // exceed the tolerance (the emulated device found this before any GPU ran it).
        llm_attn::rope(&gpu, &mut x, &cos, &sin, d / 2, rows, t, heads, true).unwrap();
        let mut want_back = fwd;
        for s in want_back.chunks_mut(t * heads * d) {
            table.apply_pairs_backward_(s, heads, 0);
        }
        close(&to_f32(&gpu.download(&x).unwrap()), &want_back, "rope backward");
    }
    // Attention, per sequence against the CPU op.
    for &(b, t, h, hkv, d) in
        &[(1usize, 1usize, 1usize, 1usize, 2usize), (2, 37, 4, 2, 8), (2, 130, 9, 3, 64), (1, 257, 14, 2, 64)]
    {
        let s = CausalShape { batch: b, seq: t, heads: h, kv_heads: hkv, head_dim: d };
        if !keep(s.q_len() * t) {
            continue;
        }
        let (qb, qf) = rnd(s.q_len(), 101);
        let (kb, kf) = rnd(s.kv_len(), 102);
        let (vb, vf) = rnd(s.kv_len(), 103);
        let (dob, dof) = rnd(s.q_len(), 104);
        let (q, k, v, dout) =
            (gpu.upload(&qb).unwrap(), gpu.upload(&kb).unwrap(), gpu.upload(&vb).unwrap(), gpu.upload(&dob).unwrap());
        let (out, lse) = llm_attn::attention_forward(&gpu, &q, &k, &v, s).unwrap();
        let (dq, dk, dv) = llm_attn::attention_backward(&gpu, &q, &k, &v, &out, &lse, &dout, s).unwrap();
        let shape = AttnShape { heads: h, kv_heads: hkv, head_dim: d };
        let (qn, kn) = (t * h * d, t * hkv * d);
        let mut want = vec![0.0; s.q_len()];
        let (mut wdq, mut wdk, mut wdv) = (vec![0.0; s.q_len()], vec![0.0; s.kv_len()], vec![0.0; s.kv_len()]);
        for i in 0..b {
            let (qs, ks) = (i * qn..(i + 1) * qn, i * kn..(i + 1) * kn);
            attention(
                &qf[qs.clone()],
                &kf[ks.clone()],
                &vf[ks.clone()],
                shape,
                Mask::Causal { start: 0 },
                &mut want[qs.clone()],
            );
            attention_backward(
                &mut wdq[qs.clone()],
                &mut wdk[ks.clone()],
                &mut wdv[ks.clone()],
                &dof[qs.clone()],
                &qf[qs],
                &kf[ks.clone()],
                &vf[ks],
                shape,
                Mask::Causal { start: 0 },
            );
        }
        close(&to_f32(&gpu.download(&out).unwrap()), &want, "attention out");
        for (name, got, want) in [("dq", &dq, &wdq), ("dk", &dk, &wdk), ("dv", &dv, &wdv)] {
            let e = rel_to_max(&to_f32(&gpu.download(got).unwrap()), want);
            assert!(e <= 1e-2, "attention {name} differs by {e} of its max magnitude ({s:?})");
        }
    }
    // Embedding: gather is a copy; the backward sums repeated tokens.
    let (vocab, dim) = (1000usize, 72usize);
    let (tb, tf) = rnd(vocab * dim, 111);
    let table = gpu.upload(&tb).unwrap();
    let ids: Vec<u32> = (0..300u32).map(|i| (i * 37 + i / 7) % vocab as u32).collect();
    let out = llm_attn::embedding_forward(&gpu, &table, &ids, dim).unwrap();
    let want: Vec<f32> = ids.iter().flat_map(|&i| tf[i as usize * dim..(i as usize + 1) * dim].to_vec()).collect();
    assert_eq!(to_f32(&gpu.download(&out).unwrap()), want, "embedding gather");
    let (db, df) = rnd(ids.len() * dim, 112);
    let mut dtable = gpu.zeros::<bf16>(vocab * dim).unwrap();
    llm_attn::embedding_backward(&gpu, &ids, &gpu.upload(&db).unwrap(), dim, &mut dtable).unwrap();
    let mut wd = vec![0.0; vocab * dim];
    sage::ops::embedding::embedding_backward(&mut wd, &df, &ids, dim);
    close(&to_f32(&gpu.download(&dtable).unwrap()), &wd, "embedding backward");
    assert!(llm_attn::embedding_forward(&gpu, &table, &[vocab as u32], dim).is_err());
    println!("llm_attn: rope, causal attention and embedding compared with their CPU references");
}

/// The LLaMA training step on the GPU against the same model on the CPU op set (which
/// `models::llama`'s tests hold to finite differences): ten AdamW steps on one batch,
/// each step's loss within 2% (bf16 weights and activations against f32).
#[test]
fn kernel_parity_llama_train_step_ten_steps() {
    llama_train_step_ten_steps(sage::models::llama::Finetune::Full, BaseWeights::F32);
}

/// QLoRA: the base's linear layers as Q8_0 blocks (`QuantOps`: both op sets keep the blocks; the
/// GPU's products dequantize them as they load them), adapters on every linear layer.
#[test]
fn kernel_parity_llama_train_step_ten_steps_qlora() {
    let targets = sage::models::llama::LINEAR_NAMES.iter().map(|s| s.to_string()).collect();
    llama_train_step_ten_steps(
        sage::models::llama::Finetune::Lora { rank: 4, alpha: 8.0, targets },
        BaseWeights::Quantized,
    );
}

use sage::models::llama::BaseWeights;

/// [`sage::models::random_init::RandomLlama`] with every 2-D tensor served as Q8_0 blocks, and as
/// those blocks dequantized to f32 (so both bases hold the same weights).
struct Q8Blocks(sage::models::random_init::RandomLlama);

impl sage::models::WeightSource for Q8Blocks {
    fn get(&self, name: &str) -> anyhow::Result<sage::Tensor> {
        match self.quantized(name) {
            Some(q) => sage::Tensor::from_vec(q.dequantize(), &[q.rows, q.cols]),
            None => self.0.get(name),
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn quantized(&self, name: &str) -> Option<sage::quant::QMatrix> {
        let t = self.0.get(name).ok()?;
        let [rows, cols] = t.shape()[..] else { return None };
        let x = t.into_f32s().ok()?;
        let mut bytes = Vec::new();
        for b in x.chunks_exact(32) {
            let d = half::f16::from_f32(b.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0);
            bytes.extend(d.to_le_bytes());
            let id = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
            bytes.extend(b.iter().map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8));
        }
        sage::quant::QMatrix::new(sage::quant::QType::Q8_0, rows, cols, bytes.into()).ok()
    }
}

/// The same with LoRA adapters on every linear layer (frozen base weights, no gradient for them).
#[test]
fn kernel_parity_llama_train_step_ten_steps_lora() {
    let targets = sage::models::llama::LINEAR_NAMES.iter().map(|s| s.to_string()).collect();
    llama_train_step_ten_steps(sage::models::llama::Finetune::Lora { rank: 4, alpha: 8.0, targets }, BaseWeights::F32);
}

fn llama_train_step_ten_steps(finetune: sage::models::llama::Finetune, base: BaseWeights) {
    let Some(gpu) = gpu("llama train step") else { return };
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::models::llama::{Family, Llama, LlamaConfig, LlamaParams};
    use sage::models::random_init::RandomLlama;
    use sage::train::{AdamWConfig, ParamSet, SeedRng};
    let config = LlamaConfig {
        family: Family::Llama,
        vocab_size: 515,
        hidden_size: 64,
        intermediate_size: 96,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 16,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        context_length: 128,
    };
    let weights = Q8Blocks(RandomLlama { config: config.clone(), seed: 9 });
    let mut params = ParamSet::new();
    let model = LlamaParams::load_with(&weights, config.clone(), &finetune, base, &mut params, &mut SeedRng::new(0, 0))
        .unwrap();
    let mut host = Llama::new(HostOps, &model, &params, Some(AdamWConfig::default())).unwrap();
    let mut dev = Llama::new(CudaOps::new(gpu.clone()), &model, &params, Some(AdamWConfig::default())).unwrap();
    let (batch, t) = (2, 33);
    let seqs: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..=t).map(|i| ((b * 101 + i * 37 + 5) % 515) as u32).collect()).collect();
    let inputs: Vec<u32> = seqs.iter().flat_map(|s| s[..t].to_vec()).collect();
    let mut targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].to_vec()).collect();
    targets[..4].fill(sage::ops::loss::IGNORE);
    let mut losses = Vec::new();
    for step in 0..10 {
        let a = host.train_step(&inputs, &targets, batch, 1e-3).unwrap();
        let b = dev.train_step(&inputs, &targets, batch, 1e-3).unwrap();
        assert!((a - b).abs() <= 2e-2 * a.abs(), "step {step}: GPU loss {b} vs CPU {a}");
        losses.push((a, b));
    }
    assert!(losses[9].1 < losses[0].1, "the GPU loss should fall over ten steps: {losses:?}");
    println!("llama train step ({finetune:?}, {base:?} base): ten steps, (cpu, gpu) losses {losses:?}");
}

/// The similarity family through the op set (`CudaOps` on the fused min-cosine kernel against
/// `HostOps`), as the anomaly map and the memory bank call it: bank searches of several test
/// images at once with K = 0 (the map only), zero-shot, and a memory bank uploaded once
/// (`MemoryBank::on`) against the CPU bank's own search. Inputs of the op calls are bf16-exact, so
/// the kernel's `SIM_TOL` holds; the memory bank's rows are unit f32 rows rounded to bf16 on upload,
/// which moves a cosine by up to about 2 × 2⁻⁹ (1e-2 allowed).
#[test]
fn kernel_parity_similarity_through_the_op_set() {
    let Some(gpu) = gpu("similarity (op set)") else { return };
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::models::memory_bank::MemoryBank;
    use sage::opset::{Buffers, Similarity, SimilarityShape};
    let (dev, host) = (CudaOps::new(gpu), HostOps);
    // (test patches, reference patches, channels, K): a bank larger than one 64-row tile, several
    // test images' rows at once, K = 0 and K > 0, a width that is not a multiple of 8 (v1).
    for &(p, pr, c, k) in
        &[(1usize, 1usize, 8usize, 0usize), (196 * 3, 700, 152, 0), (256, 130, 384, 8), (70, 65, 37, 5)]
    {
        for zero_shot in [false, true] {
            let (_, tf) = rnd(p * c, 21 + p as u64);
            let (_, rf) = rnd(pr * c, 23 + c as u64);
            let s = SimilarityShape { patches: p, ref_patches: pr, channels: c, k, reduce: Reduce::Nearest };
            let (t_d, r_d) = (dev.upload(&tf).unwrap(), dev.upload(&rf).unwrap());
            let got = dev.mincos_topk(&t_d, (!zero_shot).then_some(&r_d), s).unwrap();
            let want = host.mincos_topk(&tf, (!zero_shot).then_some(&rf), s).unwrap();
            let ctx = format!("{s:?} zero-shot {zero_shot}");
            assert_eq!(got.similarity.len(), p, "{ctx}");
            for (i, (g, w)) in got.similarity.iter().zip(&want.similarity).enumerate() {
                assert!((g - w).abs() <= SIM_TOL, "{ctx}: sim[{i}] {g} vs {w}");
            }
            assert_eq!(got.topk.len(), k.min(p), "{ctx}: K = {k} patches");
            let kth = want.topk.last().map_or(f32::INFINITY, |&i| want.similarity[i as usize]);
            assert!(got.topk.iter().all(|&i| want.similarity[i as usize] <= kth + SIM_TOL), "{ctx}: {:?}", got.topk);
        }
    }
    let (_, bank_rows) = rnd(700 * 152, 5);
    let (_, tests) = rnd(196 * 3 * 152, 6);
    let mut bank = MemoryBank::new(152);
    bank.push(&bank_rows).unwrap();
    let images: Vec<&[f32]> = tests.chunks(196 * 152).collect();
    let on_dev = bank.on(&dev).unwrap().anomaly_maps(&images).unwrap();
    for (img, got) in images.iter().zip(&on_dev) {
        let want = bank.anomaly_map(img).unwrap();
        let err = got.iter().zip(&want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(got.len() == want.len() && err <= 1e-2, "memory bank map: max |Δ| {err}");
    }
    println!("similarity (op set): 8 searches and a 700-patch memory bank against HostOps");
}

/// `got` within `tol` × the largest magnitude of `want`, element by element.
fn close(what: &str, got: Vec<f32>, want: &[f32], tol: f32) {
    let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    let err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(got.len() == want.len() && err <= tol * scale, "{what}: max |Δ| {err} at scale {scale}");
}

/// The SAGE head's ops and gradient clipping of the device step (`kernels/head_ops.cu`,
/// `sumsq`/`clip_factor` and the clipped AdamW of `kernels/llm_ops.cu`, the cuBLASLt bias GEMM,
/// `copy_rows`), through the op set, against `HostOps` on the same bf16 inputs. Tolerances:
/// outputs within 2% of the largest magnitude (bf16 rounding of the outputs), reductions in fp32
/// within 1e-3 relative.
#[test]
fn kernel_parity_sage_head_ops_through_the_op_set() {
    let Some(gpu) = gpu("sage head ops") else { return };
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::opset::*;
    let (c, h) = (CudaOps::new(gpu.clone()), HostOps);
    for &(rows, cols) in &[(1usize, 1usize), (7, 37), (65, 576), (130, 300)] {
        let ((_, x), (_, w), (_, b), (_, dy)) = (rnd(rows * cols, 1), rnd(cols, 2), rnd(cols, 3), rnd(rows * cols, 4));
        let w: Vec<f32> = w.iter().map(|v| 1.0 + 0.5 * v).collect();
        let up = |v: &[f32]| c.upload(v).unwrap();
        let (gx, gw, gb, gdy) = (up(&x), up(&w), up(&b), up(&dy));
        // LayerNorm forward and backward.
        let (gy, gst) = c.layernorm(&gx, &gw, &gb, rows, 1e-5).unwrap();
        let (hy, hst) = h.layernorm(&x, &w, &b, rows, 1e-5).unwrap();
        close("layernorm y", c.download(&gy).unwrap(), &hy, 2e-2);
        let (mut gdw, mut gdb) = (c.stat_zeros(cols).unwrap(), c.stat_zeros(cols).unwrap());
        let (mut hdw, mut hdb) = (vec![0.0; cols], vec![0.0; cols]);
        let gdx = c.layernorm_backward(&gx, &gw, &gdy, &gst, rows, 1e-5, &mut gdw, &mut gdb).unwrap();
        let hdx = h.layernorm_backward(&x, &w, &dy, &hst, rows, 1e-5, &mut hdw, &mut hdb).unwrap();
        close("layernorm dx", c.download(&gdx).unwrap(), &hdx, 2e-2);
        close("layernorm dw", c.download_stat(&gdw).unwrap(), &hdw, 1e-3);
        close("layernorm db", c.download_stat(&gdb).unwrap(), &hdb, 1e-3);
        // GELU, column sums, scale, bias GEMM, copy_rows.
        let xs: Vec<f32> = x.iter().map(|v| 4.0 * v).collect();
        close("gelu", c.download(&c.gelu(&up(&xs)).unwrap()).unwrap(), &h.gelu(&xs).unwrap(), 2e-2);
        let gg = c.gelu_backward(&gdy, &up(&xs)).unwrap();
        close("gelu backward", c.download(&gg).unwrap(), &h.gelu_backward(&dy, &xs).unwrap(), 2e-2);
        let (mut gs, mut hs) = (c.upload_stat(&b).unwrap(), b.clone());
        c.col_sum(&gx, rows, &mut gs).unwrap();
        h.col_sum(&x, rows, &mut hs).unwrap();
        close("col_sum", c.download_stat(&gs).unwrap(), &hs, 1e-3);
        let (mut gsc, mut hsc) = (up(&x), x.clone());
        c.scale(&mut gsc, 0.37).unwrap();
        h.scale(&mut hsc, 0.37).unwrap();
        close("scale", c.download(&gsc).unwrap(), &hsc, 1e-2);
        let spec = GemmSpec::linear(rows, cols, cols);
        let wm: Vec<f32> = rnd(cols * cols, 5).1;
        let gl = c.gemm_bias_new(&spec, &gx, &up(&wm), &gb).unwrap();
        close("linear + bias", c.download(&gl).unwrap(), &h.gemm_bias_new(&spec, &x, &wm, &b).unwrap(), 2e-2);
        let (mut gdst, mut hdst) = (c.zeros((rows + 2) * cols).unwrap(), vec![0.0; (rows + 2) * cols]);
        c.copy_rows(&gx, rows / 2, &mut gdst, 2, rows - rows / 2, cols).unwrap();
        h.copy_rows(&x, rows / 2, &mut hdst, 2, rows - rows / 2, cols).unwrap();
        close("copy_rows", c.download(&gdst).unwrap(), &hdst, 0.0);
        // Σg² over a bf16 and an fp32 gradient, the clip factor, and one clipped AdamW step.
        let (mut gsq, mut hsq) = (c.stat_zeros(1).unwrap(), vec![0.0f32]);
        let gstat = c.upload_stat(&dy).unwrap();
        c.sum_squares(GradRef::Buf(&gx), &mut gsq).unwrap();
        c.sum_squares(GradRef::Stat(&gstat), &mut gsq).unwrap();
        h.sum_squares(GradRef::Buf(&x), &mut hsq).unwrap();
        h.sum_squares(GradRef::Stat(&dy), &mut hsq).unwrap();
        close("sum of squares", c.download_stat(&gsq).unwrap(), &hsq, 1e-4);
        let max = Some(0.5 * hsq[0].sqrt());
        let (gclip, hclip) = (c.clip_factor(&gsq, max).unwrap(), h.clip_factor(&hsq, max).unwrap());
        close("clip factor", c.download_stat(&gclip).unwrap(), &hclip, 1e-4);
        let s = sage::train::AdamWScalars::new(&sage::train::AdamWConfig::default(), 1, 1e-2);
        let (mut gm, mut gv, mut gmaster, mut gwork) =
            (c.stat_zeros(cols).unwrap(), c.stat_zeros(cols).unwrap(), c.upload_stat(&w).unwrap(), up(&w));
        let (mut hm, mut hv, mut hmaster, mut hwork) = (vec![0.0; cols], vec![0.0; cols], w.clone(), w.clone());
        c.adamw(Some(&mut gmaster), GradRef::Buf(&gb), &mut gm, &mut gv, &mut gwork, &s, true, &gclip).unwrap();
        h.adamw(Some(&mut hmaster), GradRef::Buf(&b), &mut hm, &mut hv, &mut hwork, &s, true, &hclip).unwrap();
        close("clipped adamw", c.download_stat(&gmaster).unwrap(), &hmaster, 1e-5);
    }
    println!("sage head ops: layernorm, gelu, col_sum, scale, bias GEMM, copy_rows, clipping compared with HostOps");
}

/// The E-DPO step's ops through the op set (`seq_logprobs`, `edpo_loss`, `mul_stat`,
/// `logprob_backward`: the fused kernels of `kernels/edpo_loss.cu` and `mul_f32`) against
/// `HostOps` on the same bf16 inputs, with padded sequences (ignored targets). Tolerances as the
/// E-DPO kernels' own (kernels/README.md): log-probabilities 1e-3 relative, margins and
/// `∂loss/∂π` 1e-3, the hidden and head gradients 2e-2 × their largest magnitude.
#[test]
fn kernel_parity_edpo_step_ops_through_the_op_set() {
    let Some(gpu) = gpu("edpo step ops") else { return };
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::ops::loss::IGNORE;
    use sage::opset::*;
    let (c, h) = (CudaOps::new(gpu.clone()), HostOps);
    for &(n, t, dim, vocab) in &[(2usize, 5usize, 16usize, 37usize), (4, 33, 64, 1000), (6, 70, 96, 5003)] {
        let (_, hidden) = rnd(n * t * dim, 11);
        let (_, w) = rnd(vocab * dim, 12);
        // Answers at the end of each sequence, padding after the shorter ones.
        let mut targets = vec![IGNORE; n * t];
        for s in 0..n {
            let (start, end) = (t / 3, t - s % 3);
            for r in start..end {
                targets[s * t + r] = ((s * 31 + r * 7) % vocab) as u32;
            }
        }
        let (gh, gw) = (c.upload(&hidden).unwrap(), c.upload(&w).unwrap());
        let (gseq, glse) = c.seq_logprobs(&gh, &gw, &targets, n).unwrap();
        let (hseq, hlse) = h.seq_logprobs(&hidden, &w, &targets, n).unwrap();
        close("sequence log-probabilities", c.download_stat(&gseq).unwrap(), &hseq, 1e-3);
        let lse_counted = |l: Vec<f32>| -> Vec<f32> {
            l.iter().zip(&targets).filter(|(_, &y)| y != IGNORE).map(|(&v, _)| v).collect()
        };
        close("lse", lse_counted(c.download_stat(&glse).unwrap()), &lse_counted(hlse.clone()), 1e-3);
        let reference: Vec<f32> = hseq.iter().enumerate().map(|(i, v)| v + 0.3 * (i as f32 - 1.0)).collect();
        let pairs: Vec<Pair> =
            (0..n / 2).map(|i| Pair { chosen: 2 * i, rejected: 2 * i + 1, delta_h: 0.1 * i as f32 }).collect();
        let cfg = EdpoConfig { beta: 0.1, eta: 0.5 };
        let (gm, mut gg) = c.edpo_loss(&gseq, &c.upload_stat(&reference).unwrap(), &pairs, cfg).unwrap();
        let (hm, mut hg) = h.edpo_loss(&hseq, &reference, &pairs, cfg).unwrap();
        close("margins", c.download_stat(&gm).unwrap(), &hm, 1e-3);
        let scale: Vec<f32> = (0..n).map(|i| 0.5 + i as f32).collect();
        c.mul_stat(&mut gg, &scale).unwrap();
        h.mul_stat(&mut hg, &scale).unwrap();
        close("grad_seq", c.download_stat(&gg).unwrap(), &hg, 1e-3);
        // Both gradient buffers start dirty: the op overwrites them.
        let (mut gdw, mut hdw) = (c.upload(&vec![7.0; w.len()]).unwrap(), vec![7.0; w.len()]);
        let gdh = c.logprob_backward(&gh, &gw, &targets, &glse, &gg, n, Some(&mut gdw)).unwrap();
        let hdh = h.logprob_backward(&hidden, &w, &targets, &hlse, &hg, n, Some(&mut hdw)).unwrap();
        close("d_hidden", c.download(&gdh).unwrap(), &hdh, 2e-2);
        close("d_head", c.download(&gdw).unwrap(), &hdw, 2e-2);
    }
    println!("edpo step ops: seq_logprobs, edpo_loss, mul_stat, logprob_backward compared with HostOps");
}

/// Linear layers from quantized blocks (`kernels/qgemm.cu`) through the op set, for every block
/// type, against `HostOps`' dense ops on the blocks dequantized by `quant::dequantize` (the CPU
/// reference, ggml's layouts): the product with a bias and added into a residual, the input
/// gradient added into a buffer, the embedding lookup (exact: the bf16 of each decoded value), and
/// the sequence log-probabilities and their hidden gradient through a quantized LM head (the GPU
/// reads the head's bf16 dequantization, which the reference is given too). Products within 1% of
/// the largest magnitude (bf16 outputs), log-probabilities 1e-3 relative, the gradient 2e-2.
#[test]
fn kernel_parity_qgemm_through_the_op_set() {
    let Some(gpu) = gpu("quantized gemm") else { return };
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::ops::loss::IGNORE;
    use sage::opset::*;
    let (c, h) = (CudaOps::new(gpu.clone()), HostOps);
    for (i, &ty) in sage::quant::QType::ALL.iter().enumerate() {
        let len = ty.block_len();
        // Odd output counts (partial 4-warp groups), rows across 8-row tiles, and (32-value
        // types) an input width that is not a multiple of the gradient's 256-column blocks.
        for &(out, blocks, rows) in &[(1usize, 1usize, 1usize), (37, if len == 32 { 11 } else { 2 }, 19)] {
            let inn = blocks * len;
            let w = sage::quant::blocks::testing::random_matrix(ty, out, inn, 31 + i as u64);
            let wf = w.dequantize();
            let gw = c.upload_quant(&w).unwrap();
            assert_eq!(c.quant_bytes(&gw), w.nbytes(), "{ty}: the device holds the blocks");
            let what = |op: &str| format!("{ty} {op} [{rows}, {inn}]·[{out}, {inn}]ᵀ");
            let (_, x) = rnd(rows * inn, 41);
            let (_, bias) = rnd(out, 42);
            let (_, resid) = rnd(rows * out, 43);
            let gx = c.upload(&x).unwrap();
            let spec = GemmSpec::linear(rows, out, inn);
            let want = h.gemm_bias_new(&spec, &x, &wf, &bias).unwrap();
            let got = c.qlinear(&gx, &gw, rows, Some(&c.upload(&bias).unwrap()), None).unwrap();
            close(&what("x·Wᵀ + b"), c.download(&got).unwrap(), &want, 1e-2);
            let mut want = resid.clone();
            h.gemm(&GemmSpec { accumulate: true, ..spec }, &x, &wf, &mut want).unwrap();
            let got = c.qlinear(&gx, &gw, rows, None, Some(c.upload(&resid).unwrap())).unwrap();
            close(&what("y + x·Wᵀ"), c.download(&got).unwrap(), &want, 1e-2);
            let (_, dy) = rnd(rows * out, 44);
            let (_, dx0) = rnd(rows * inn, 45);
            let mut want = dx0.clone();
            h.gemm(&GemmSpec { accumulate: true, ..GemmSpec::nn(rows, inn, out) }, &dy, &wf, &mut want).unwrap();
            let got = c.qlinear_input_grad(&c.upload(&dy).unwrap(), &gw, rows, Some(c.upload(&dx0).unwrap())).unwrap();
            close(&what("dx + dy·W"), c.download(&got).unwrap(), &want, 1e-2);
            let ids: Vec<u32> = [out - 1, 0, out / 2, 0].iter().map(|&v| v as u32).collect();
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&r| wf[r as usize * inn..][..inn].iter().map(|&v| bf16::from_f32(v).to_f32()))
                .collect();
            assert_eq!(c.download(&c.qembed(&gw, &ids).unwrap()).unwrap(), want, "{ty}: embedding lookup");
            assert!(c.qembed(&gw, &[out as u32]).is_err(), "{ty}: an id past the table is refused");
        }
        // A quantized LM head [V, C] in the losses: two sequences, padding ignored.
        let (vocab, dim, seqs, t) = (203, 2 * len, 2, 6);
        let w = sage::quant::blocks::testing::random_matrix(ty, vocab, dim, 51 + i as u64);
        let wb: Vec<f32> = w.dequantize().iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let gw = c.upload_quant(&w).unwrap();
        let (_, hidden) = rnd(seqs * t * dim, 52);
        let mut targets: Vec<u32> = (0..seqs * t).map(|r| ((r * 37 + 11) % vocab) as u32).collect();
        targets[..2].fill(IGNORE);
        let gh = c.upload(&hidden).unwrap();
        let (gseq, glse) = c.q_seq_logprobs(&gh, &gw, &targets, seqs).unwrap();
        let (hseq, hlse) = h.seq_logprobs(&hidden, &wb, &targets, seqs).unwrap();
        close(&format!("{ty} head: sequence log-probabilities"), c.download_stat(&gseq).unwrap(), &hseq, 1e-3);
        let grad: Vec<f32> = (0..seqs).map(|s| 0.5 - s as f32).collect();
        let gdh = c.q_logprob_backward(&gh, &gw, &targets, &glse, &c.upload_stat(&grad).unwrap(), seqs).unwrap();
        let hdh = h.logprob_backward(&hidden, &wb, &targets, &hlse, &grad, seqs, None).unwrap();
        close(&format!("{ty} head: d_hidden"), c.download(&gdh).unwrap(), &hdh, 2e-2);
    }
    println!("quantized gemm: qlinear, qlinear_input_grad, qembed and the quantized-head losses of every block type match the CPU references");
}

/// KV-cached decoding (`kernels/llm_decode.cu`): `rope_at`, `kv_append` and `decode_attention`
/// through the op set against `HostOps` on the same bf16 inputs (outputs within 2% of the largest
/// magnitude, the append exact), then a LLaMA's cached decode on the GPU (prefill of two prompts
/// of different lengths, then teacher-forced decode steps) against the uncached forward of the
/// whole sequences on the CPU reference ops: every decoded position's hidden state within 3% of
/// the largest magnitude.
#[test]
fn kernel_parity_llm_decode_through_the_op_set() {
    let Some(gpu) = gpu("llm decode") else { return };
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::ops::rope::RopeTable;
    use sage::opset::*;
    let (c, h) = (CudaOps::new(gpu.clone()), HostOps);
    for &(seqs, slots, heads, kv_heads, d) in
        &[(1usize, 1usize, 1usize, 1usize, 2usize), (2, 40, 4, 2, 8), (3, 300, 9, 3, 64), (2, 129, 14, 2, 128)]
    {
        let s = DecodeShape { seqs, slots, heads, kv_heads, head_dim: d };
        // One query per sequence at the last slot, one at a tile edge, one at position 0.
        let mut rows: Vec<(u32, u32)> = (0..seqs as u32).map(|b| (b, slots as u32 - 1)).collect();
        rows.push((0, (slots as u32 - 1).min(32)));
        rows.push((seqs as u32 - 1, 0));
        let (seq, pos): (Vec<u32>, Vec<u32>) = rows.iter().copied().unzip();
        let n = seq.len();
        let (_, kc) = rnd(s.cache_len(), 21);
        let (_, vc) = rnd(s.cache_len(), 22);
        let (_, q) = rnd(n * heads * d, 23);
        let (gseq, gpos) = (c.upload_ids(&seq).unwrap(), c.upload_ids(&pos).unwrap());
        let (gk, gv, gq) = (c.upload(&kc).unwrap(), c.upload(&vc).unwrap(), c.upload(&q).unwrap());
        let got = c.decode_attention(&gq, &gk, &gv, s, &gseq, &gpos, n).unwrap();
        let want = h.decode_attention(&q, &kc, &vc, s, &seq, &pos, n).unwrap();
        close(&format!("decode attention {s:?}"), c.download(&got).unwrap(), &want, 2e-2);
        // Variant 2 (flash-decoding) at chunks of 128 positions, and the device's own choice.
        use sage::backend::cuda::llm_decode::{decode_attention_variant, DecodeVariant};
        let choice = DecodeVariant::for_device(&s, n, gpu.info().sm_count);
        for v in [DecodeVariant::V2 { chunk: 128 }, choice] {
            let got = decode_attention_variant(&gpu, &gq, &gk, &gv, s, &gseq, &gpos, n, v).unwrap();
            close(&format!("decode attention {v:?} {s:?}"), c.download(&got).unwrap(), &want, 2e-2);
        }
        // RoPE at the rows' positions.
        let table = RopeTable::new(d, 10_000.0, slots);
        let (cos, sin) = table.tables();
        let (gt, ht) = (c.rope_tables(cos, sin, d / 2).unwrap(), h.rope_tables(cos, sin, d / 2).unwrap());
        let (mut gx, mut hx) = (c.upload(&q).unwrap(), q.clone());
        c.rope_at(&mut gx, &gt, d / 2, heads, &gpos, n).unwrap();
        h.rope_at(&mut hx, &ht, d / 2, heads, &pos, n).unwrap();
        close("rope_at", c.download(&gx).unwrap(), &hx, 2e-2);
        // The append, into distinct slots (the first row per sequence and the position-0 row).
        let width = kv_heads * d;
        let (_, src) = rnd(n * width, 24);
        let (mut gcache, mut hcache) = (c.upload(&kc).unwrap(), kc.clone());
        c.kv_append(&c.upload(&src).unwrap(), &gseq, &gpos, seqs, width, slots, &mut gcache).unwrap();
        h.kv_append(&src, &seq, &pos, seqs, width, slots, &mut hcache).unwrap();
        close("kv_append", c.download(&gcache).unwrap(), &hcache, 0.0);
    }

    cached_decode_matches_uncached_forward(c, 3e-2);
    println!("llm decode: rope_at, kv_append, decode_attention and nine cached decode steps match the CPU ops");
}

/// A LLaMA's cached decode on `ops` (prefill of two prompts of different lengths, then
/// teacher-forced decode steps) against the uncached forward of the whole sequences on the CPU
/// reference ops: every position's hidden state within `tol` × the largest magnitude.
fn cached_decode_matches_uncached_forward<O: sage::opset::StepOps>(ops: O, tol: f32) {
    use sage::backend::cpu::HostOps;
    use sage::opset::*;
    let h = HostOps;
    use sage::models::llama::{Family, Finetune, Llama, LlamaConfig, LlamaParams};
    use sage::models::random_init::RandomLlama;
    use sage::train::{AdamWConfig, ParamSet, SeedRng};
    let config = LlamaConfig {
        family: Family::Llama,
        vocab_size: 515,
        hidden_size: 128,
        intermediate_size: 192,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 32,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        context_length: 128,
    };
    let weights = RandomLlama { config: config.clone(), seed: 4 };
    let mut params = ParamSet::new();
    let model =
        LlamaParams::load(&weights, config.clone(), &Finetune::Full, &mut params, &mut SeedRng::new(0, 0)).unwrap();
    let host = Llama::new(HostOps, &model, &params, Some(AdamWConfig::default())).unwrap();
    let dev = Llama::new(ops, &model, &params, None).unwrap();
    let (t, lens, steps, dim) = (70usize, [70usize, 45], 9usize, config.hidden_size);
    let seqs: Vec<Vec<u32>> =
        (0..2).map(|b| (0..t + steps).map(|i| ((b * 131 + i * 29 + 3) % 515) as u32).collect()).collect();
    // The CPU reference: each whole sequence (prompt and the teacher-forced tokens) uncached.
    let mut want = Vec::new();
    for (b, s) in seqs.iter().enumerate() {
        let n = lens[b] + steps;
        let x = h.embed(host.w(host.token_embd()), &s[..n], dim).unwrap();
        let fwd = host.forward_rows(x, &vec![sage::ops::loss::IGNORE; n], 1, false).unwrap();
        want.push(fwd.hidden);
    }
    let ids: Vec<u32> =
        seqs.iter().enumerate().flat_map(|(b, s)| (0..t).map(move |i| if i < lens[b] { s[i] } else { 0 })).collect();
    let mut cache = dev.new_cache(2, t + steps).unwrap();
    let x = dev.ops.embed(dev.w(dev.token_embd()), &ids, dim).unwrap();
    let hidden = dev.ops.download(&dev.prefill(x, t, &lens, &mut cache).unwrap()).unwrap();
    for b in 0..2 {
        let got = hidden[b * t * dim..(b * t + lens[b]) * dim].to_vec();
        close(&format!("prefill hidden, sequence {b}"), got, &want[b][..lens[b] * dim], tol);
    }
    for k in 0..steps {
        let toks: Vec<u32> = (0..2).map(|b| seqs[b][lens[b] + k]).collect();
        let x = dev.ops.embed(dev.w(dev.token_embd()), &toks, dim).unwrap();
        let got = dev.ops.download(&dev.decode(x, &[0, 1], &mut cache).unwrap()).unwrap();
        for b in 0..2 {
            let p = lens[b] + k;
            close(
                &format!("decode step {k}, sequence {b}"),
                got[b * dim..(b + 1) * dim].to_vec(),
                &want[b][p * dim..(p + 1) * dim],
                tol,
            );
        }
    }
}

/// The harness of the GPU decode check, on the CPU reference ops (where cached and uncached
/// attention differ only by summation order).
#[test]
fn cached_decode_on_host_ops_matches_the_uncached_forward() {
    cached_decode_matches_uncached_forward(sage::backend::cpu::HostOps, 1e-5);
}

/// Depthwise convolution (`kernels/dwconv.cu`) against `ops::conv::{depthwise_conv2d,
/// depthwise_conv2d_backward}` at EfficientNet-Lite0's depthwise shapes (TF "SAME" padding,
/// asymmetric at stride 2) and odd ones: y and dx (bf16) within 1e-2 relative + 1e-2, dw and db
/// (fp32 sums) within 1e-3 × their largest magnitude, the ReLU6 mask exact; the dense
/// convolutions' epilogue (`channel_bias_act`) against `HostOps` within 1e-2 of the largest magnitude.
#[test]
fn kernel_parity_dwconv() {
    let Some(gpu) = gpu("dwconv") else { return };
    use sage::backend::cuda::dwconv;
    use sage::ops::conv::{depthwise_conv2d, depthwise_conv2d_backward, Padding};
    use sage::opset::DwShape;
    for &(n, c, h, k, stride) in &[
        (1usize, 1usize, 1usize, 3usize, 1usize),
        (2, 3, 7, 3, 2),
        (2, 32, 112, 3, 1),
        (1, 96, 112, 3, 2),
        (2, 144, 56, 5, 2),
        (1, 672, 14, 5, 1),
        (3, 5, 13, 5, 2),
    ] {
        let s = DwShape { n, c, h, w: h + 1, k, stride, pad: Padding::tf_same(h, h + 1, k, stride) };
        let (ho, wo) = s.out_hw();
        let (xb, xf) = rnd(s.in_len(), 61);
        let (wb, wf) = rnd(c * k * k, 62);
        let (dyb, dyf) = rnd(s.out_len(), 63);
        let bias: Vec<f32> = (0..c).map(|i| 0.1 * (i % 7) as f32 - 0.3).collect();
        let (x, w, b) = (gpu.upload(&xb).unwrap(), gpu.upload(&wb).unwrap(), gpu.upload(&bias).unwrap());
        for relu6 in [false, true] {
            let y = to_f32(&gpu.download(&dwconv::forward(&gpu, &x, &w, &b, s, relu6).unwrap()).unwrap());
            let (cin, cout) = (h * s.w, ho * wo);
            for img in 0..n {
                let (mut want, _, _) =
                    depthwise_conv2d(&xf[img * c * cin..(img + 1) * c * cin], c, h, s.w, &wf, k, stride, s.pad, &bias);
                if relu6 {
                    sage::ops::relu6_(&mut want);
                }
                for (i, (g, wv)) in y[img * c * cout..(img + 1) * c * cout].iter().zip(&want).enumerate() {
                    assert!(
                        (g - wv).abs() <= 1e-2 * wv.abs() + 1e-2,
                        "dwconv y {s:?} relu6 {relu6} [{i}]: {g} vs {wv}"
                    );
                }
            }
        }
        // Backward: the ReLU6 mask, then dx, dw, db against the CPU summed over the images.
        let y = dwconv::forward(&gpu, &x, &w, &b, s, true).unwrap();
        let mut dy = gpu.upload(&dyb).unwrap();
        dwconv::relu6_backward(&gpu, &mut dy, &y).unwrap();
        let (y_h, dy_h) = (to_f32(&gpu.download(&y).unwrap()), to_f32(&gpu.download(&dy).unwrap()));
        for (i, ((&g, &v), &orig)) in dy_h.iter().zip(&y_h).zip(&dyf).enumerate() {
            assert_eq!(g, if v > 0.0 && v < 6.0 { orig } else { 0.0 }, "relu6 mask [{i}]");
        }
        let (dx, dw, db) = dwconv::backward(&gpu, &x, &w, &dy, s).unwrap();
        let dx = to_f32(&gpu.download(&dx).unwrap());
        let (cin, cout) = (h * s.w, ho * wo);
        let (mut wdw, mut wdb) = (vec![0.0f32; c * k * k], vec![0.0f32; c]);
        for img in 0..n {
            let (rdx, rdw, rdb) = depthwise_conv2d_backward(
                &xf[img * c * cin..(img + 1) * c * cin],
                &dy_h[img * c * cout..(img + 1) * c * cout],
                c,
                h,
                s.w,
                &wf,
                k,
                stride,
                s.pad,
            );
            for (i, (g, wv)) in dx[img * c * cin..(img + 1) * c * cin].iter().zip(&rdx).enumerate() {
                assert!((g - wv).abs() <= 1e-2 * wv.abs() + 1e-2, "dwconv dx {s:?} [{i}]: {g} vs {wv}");
            }
            wdw.iter_mut().zip(&rdw).for_each(|(a, b)| *a += b);
            wdb.iter_mut().zip(&rdb).for_each(|(a, b)| *a += b);
        }
        close(&format!("dwconv dw {s:?}"), gpu.download(&dw).unwrap(), &wdw, 1e-3);
        close(&format!("dwconv db {s:?}"), gpu.download(&db).unwrap(), &wdb, 1e-3);
    }
    // The dense convolutions' epilogue through the op set: bias, residual, ReLU6.
    use sage::backend::cpu::HostOps;
    use sage::backend::cuda::step_ops::CudaOps;
    use sage::opset::*;
    let (c, h) = (CudaOps::new(gpu.clone()), HostOps);
    for &(channels, p) in &[(1usize, 1usize), (7, 49), (144, 784)] {
        let (_, y) = rnd(channels * p, 71);
        let (_, res) = rnd(channels * p, 72);
        let y: Vec<f32> = y.iter().map(|v| 8.0 * v).collect();
        let bias: Vec<f32> = (0..channels).map(|i| 0.5 * (i % 5) as f32 - 1.0).collect();
        for (with_res, relu6) in [(false, true), (true, false), (true, true)] {
            let (mut gy, mut hy) = (c.upload(&y).unwrap(), y.clone());
            let (gres, gbias) = (c.upload(&res).unwrap(), c.upload_stat(&bias).unwrap());
            c.channel_bias_act(&mut gy, &gbias, channels, with_res.then_some(&gres), relu6).unwrap();
            h.channel_bias_act(&mut hy, &bias, channels, with_res.then_some(&res), relu6).unwrap();
            close(
                &format!("channel epilogue C{channels} P{p} res {with_res} relu6 {relu6}"),
                c.download(&gy).unwrap(),
                &hy,
                1e-2,
            );
        }
    }
    println!(
        "dwconv: forward (bias, ReLU6), ReLU6 mask, dx, dw, db match ops::conv; the channel epilogue matches HostOps"
    );
}
