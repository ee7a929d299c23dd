//! `sage bench kernels`: the CUDA kernels at the shapes of ARCHITECTURE.md §9, timed with CUDA events.
//! `benches/run_kernels.sh` runs this and the PyTorch references (`benches/kernels_torch.py`) in
//! one call on the GPU machine and writes the report with the ratios to `benches/results/`.

use crate::backend::cuda::dwconv;
use crate::backend::cuda::edpo::{self as gedpo, DevicePairs, SeqShape};
use crate::backend::cuda::fusion;
use crate::backend::cuda::gemm::gemm;
use crate::backend::cuda::llm_decode::{self, DecodeVariant};
use crate::backend::cuda::mincos::{self, MincosShape, Variant};
use crate::backend::cuda::qgemm;
use crate::backend::cuda::Gpu;
use crate::ops::conv::Padding;
use crate::ops::edpo::Pair;
use crate::ops::fusion_attn::FusionShape;
use crate::ops::similarity::Reduce;
use crate::opset::DecodeShape;
use crate::opset::DwShape;
use crate::opset::GemmSpec;
use crate::quant::blocks::testing::random_matrix;
use crate::quant::QType;
use anyhow::Result;
use half::bf16;
use serde::Serialize;

/// One timed case.
#[derive(Serialize, Debug)]
pub struct Case {
    /// `mincos_topk`, `fusion_attn_fwd_bwd`, `gemm_bf16`, `edpo_loss_fwd_bwd`, `decode_attn`,
    /// `dwconv_fwd_bwd`, `qgemm_xwt`.
    pub op: &'static str,
    /// Which implementation (`v2`, `v1`, `cublaslt`, `fused`; for `qgemm_xwt` the block type or
    /// `cublaslt_bf16`).
    pub variant: String,
    pub shape: serde_json::Value,
    pub median_ms: f64,
    /// For GEMMs: 2·m·n·k / time.
    pub tflops: Option<f64>,
    /// Device bytes the op allocates (intermediates and outputs, inputs excluded): an upper bound
    /// of its peak extra memory.
    pub allocated_bytes: usize,
}

/// Deterministic bf16 values in [−1, 1) (xorshift), cheap enough for 10⁸ elements.
fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// The sizes: ARCHITECTURE.md §9, or small ones (`--quick`) that check the harness in seconds.
pub struct Sizes {
    pub mincos: MincosShape,
    pub fusion: FusionShape,
    pub gemm: Vec<usize>,
    pub edpo: (usize, usize, usize, usize), // pairs, T, C, V
    /// Decode attention: queries (one per sequence) at the last of `slots` cached positions.
    pub decode: DecodeShape,
    /// Depthwise convolution, forward (ReLU6) and backward.
    pub dwconv: DwShape,
    /// A linear layer from quantized blocks `[out, in]`, at each batch (rows of activations).
    pub qgemm: (usize, usize, Vec<usize>),
}

impl Sizes {
    pub fn design() -> Sizes {
        Sizes {
            mincos: MincosShape {
                batch: 32,
                patches: 1024,
                ref_patches: 1024,
                channels: 1024,
                k: 32,
                reduce: Reduce::Nearest,
                zero_shot: false,
            },
            // C = 2048 over 16 heads: D = 128.
            fusion: FusionShape { batch: 32, queries: 16, keys: 64, heads: 16, head_dim: 128 },
            gemm: vec![4096, 8192],
            // Qwen2-0.5B's hidden size and vocabulary.
            edpo: (8, 1024, 896, 151_936),
            // Qwen2-0.5B's attention (14 query heads over 2 key/value heads of 64), batch 16 at
            // position 1023: `sage bench train`'s generation at its longest.
            decode: DecodeShape { seqs: 16, slots: 1024, heads: 14, kv_heads: 2, head_dim: 64 },
            // EfficientNet-Lite0's stage-3 depthwise layer (144 channels, 5×5, stride 2, 56² → 28²)
            // over a batch of 32 images.
            dwconv: DwShape { n: 32, c: 144, h: 56, w: 56, k: 5, stride: 2, pad: Padding::tf_same(56, 56, 5, 2) },
            // Qwen2.5-0.5B's MLP down projection (896 × 4864, Q4_K in its Q4_K_M file): decode at
            // batch 1 and 16, and a 512-token prefill.
            qgemm: (896, 4864, vec![1, 16, 512]),
        }
    }

    pub fn quick() -> Sizes {
        Sizes {
            mincos: MincosShape {
                batch: 2,
                patches: 196,
                ref_patches: 196,
                channels: 256,
                k: 16,
                ..Sizes::design().mincos
            },
            fusion: FusionShape { batch: 2, queries: 16, keys: 64, heads: 4, head_dim: 64 },
            gemm: vec![512],
            edpo: (2, 128, 256, 4096),
            decode: DecodeShape { seqs: 2, slots: 128, heads: 4, kv_heads: 2, head_dim: 64 },
            dwconv: DwShape { n: 2, c: 16, h: 28, w: 28, k: 3, stride: 1, pad: Padding::tf_same(28, 28, 3, 1) },
            qgemm: (64, 512, vec![1, 16]),
        }
    }
}

pub fn run(
    gpu: &Gpu,
    sizes: &Sizes,
    warmup: usize,
    repeats: usize,
    mut progress: impl FnMut(&Case),
) -> Result<Vec<Case>> {
    let mut cases = Vec::new();
    let mut push = |c: Case| {
        progress(&c);
        cases.push(c);
    };

    // Min-cos top-K, both similarity variants.
    let s = sizes.mincos;
    let test = gpu.upload(&random_bf16(s.batch * s.patches * s.channels, 1))?;
    let reference = gpu.upload(&random_bf16(s.batch * s.ref_patches * s.channels, 2))?;
    let nsplit = mincos::default_splits(&s, gpu.info().sm_count);
    for variant in [Variant::V2, Variant::V1] {
        let before = gpu.allocated_bytes();
        mincos::mincos_topk(gpu, &test, Some(&reference), s, variant, nsplit)?;
        gpu.sync()?;
        let allocated = gpu.allocated_bytes() - before;
        let ms = gpu.time_ms(warmup, repeats, || {
            mincos::mincos_topk(gpu, &test, Some(&reference), s, variant, nsplit).map(drop)
        })?;
        push(Case {
            op: "mincos_topk",
            variant: format!("{variant:?}").to_lowercase(),
            shape: serde_json::json!({ "B": s.batch, "P": s.patches, "P_ref": s.ref_patches, "C": s.channels, "K": s.k, "nsplit": nsplit }),
            median_ms: ms,
            tflops: None,
            allocated_bytes: allocated,
        });
    }
    drop((test, reference));

    // Fusion attention, forward + backward.
    let f = sizes.fusion;
    let q = gpu.upload(&random_bf16(f.q_len(), 3))?;
    let k = gpu.upload(&random_bf16(f.kv_len(), 4))?;
    let v = gpu.upload(&random_bf16(f.kv_len(), 5))?;
    let dout = gpu.upload(&random_bf16(f.q_len(), 6))?;
    let fwd_bwd = || -> Result<()> {
        let (out, lse) = fusion::forward(gpu, &q, &k, &v, f)?;
        fusion::backward(gpu, &q, &k, &v, &out, &lse, &dout, f)?;
        Ok(())
    };
    let before = gpu.allocated_bytes();
    fwd_bwd()?;
    gpu.sync()?;
    let allocated = gpu.allocated_bytes() - before;
    let ms = gpu.time_ms(warmup, repeats, fwd_bwd)?;
    push(Case {
        op: "fusion_attn_fwd_bwd",
        variant: "v1".into(),
        shape: serde_json::json!({ "B": f.batch, "L": f.queries, "S": f.keys, "H": f.heads, "D": f.head_dim }),
        median_ms: ms,
        tflops: None,
        allocated_bytes: allocated,
    });
    drop((q, k, v, dout));

    // bf16 GEMM through cuBLASLt.
    let blas = gpu.blas()?;
    for &n in &sizes.gemm {
        let a = gpu.upload(&random_bf16(n * n, 7))?;
        let b = gpu.upload(&random_bf16(n * n, 8))?;
        let mut c = gpu.zeros::<bf16>(n * n)?;
        let spec = GemmSpec::nn(n, n, n);
        let ms =
            gpu.time_ms(warmup, repeats, || gemm(blas, &spec, &a.slice(..), &b.slice(..), &mut c.slice_mut(..), None))?;
        push(Case {
            op: "gemm_bf16",
            variant: "cublaslt".into(),
            shape: serde_json::json!({ "m": n, "n": n, "k": n }),
            median_ms: ms,
            tflops: Some(spec.flops() / (ms * 1e-3) / 1e12),
            allocated_bytes: n * n * 2,
        });
    }

    // Fused E-DPO loss: policy forward, loss, backward to the hidden states (the LM head is
    // frozen, as in `sage edpo`); the reference's sequence log-probabilities are inputs.
    let (pairs, t, c, vocab) = sizes.edpo;
    let shape = SeqShape { n: 2 * pairs, t, c, v: vocab };
    let r = shape.rows();
    let hidden = gpu.upload(&random_bf16(r * c, 9))?;
    let weight = gpu.upload(&random_bf16(vocab * c, 10))?;
    let targets_host: Vec<i32> = (0..r).map(|i| ((i as u64 * 2_654_435_761) % vocab as u64) as i32).collect();
    // The answer is the last quarter of each sequence.
    let mask_host: Vec<bool> = (0..r).map(|i| i % t >= t - t / 4).collect();
    let targets = gpu.upload(&targets_host)?;
    let mask = gpu.upload(&mask_host.iter().map(|&m| u8::from(m)).collect::<Vec<_>>())?;
    let reference_seq = gpu.upload(&vec![-50.0f32; 2 * pairs])?;
    let pair_list: Vec<Pair> = (0..pairs).map(|p| Pair { chosen: 2 * p, rejected: 2 * p + 1, delta_h: 0.1 }).collect();
    let dpairs = DevicePairs::upload(gpu, &pair_list, 2 * pairs)?;
    let spans = gedpo::answer_spans(&mask_host, t, 1024);
    let nsplit = gedpo::default_splits(&shape, gpu.info().sm_count);
    let step = || -> Result<()> {
        let pol = gedpo::sequence_logprobs(gpu, &hidden, &weight, &targets, &mask, shape, nsplit)?;
        let l = gedpo::loss(gpu, &pol.seq, &reference_seq, &dpairs, shape.n, 0.1, 1.0)?;
        gedpo::backward(gpu, &hidden, &weight, &targets, &mask, &pol.lse, &l.grad_seq, shape, &spans, None)?;
        Ok(())
    };
    let before = gpu.allocated_bytes();
    step()?;
    gpu.sync()?;
    let allocated = gpu.allocated_bytes() - before;
    let ms = gpu.time_ms(warmup.min(2), repeats, step)?;
    push(Case {
        op: "edpo_loss_fwd_bwd",
        variant: "fused".into(),
        shape: serde_json::json!({ "pairs": pairs, "N": 2 * pairs, "T": t, "C": c, "V": vocab, "answer_tokens": t / 4, "nsplit": nsplit }),
        median_ms: ms,
        tflops: None,
        allocated_bytes: allocated,
    });
    drop((hidden, weight, targets, mask, reference_seq, dpairs));

    // Decode attention over a full cache, every sequence's query at the last slot: at the
    // benchmark's batch and at batch 1, variant 1 and variant 2 (chunks for about two blocks per SM).
    let d = sizes.decode;
    for d in [d, DecodeShape { seqs: 1, ..d }] {
        let kc = gpu.upload(&random_bf16(d.cache_len(), 11))?;
        let vc = gpu.upload(&random_bf16(d.cache_len(), 12))?;
        let q = gpu.upload(&random_bf16(d.seqs * d.heads * d.head_dim, 13))?;
        let seq_host: Vec<u32> = (0..d.seqs as u32).collect();
        let pos_host = vec![d.slots as u32 - 1; d.seqs];
        d.check(&seq_host, &pos_host)?;
        let (seq, pos) = (llm_decode::upload_ids(gpu, &seq_host)?, llm_decode::upload_ids(gpu, &pos_host)?);
        // The device's choice of chunks, or two chunks where it would keep variant 1 (so both
        // variants are always timed).
        let split = match DecodeVariant::for_device(&d, d.seqs, gpu.info().sm_count) {
            DecodeVariant::V1 => DecodeVariant::V2 { chunk: 128 * d.slots.div_ceil(256).max(1) },
            v2 => v2,
        };
        for variant in [DecodeVariant::V1, split] {
            let attend =
                || llm_decode::decode_attention_variant(gpu, &q, &kc, &vc, d, &seq, &pos, d.seqs, variant).map(drop);
            let before = gpu.allocated_bytes();
            attend()?;
            gpu.sync()?;
            let allocated = gpu.allocated_bytes() - before;
            let ms = gpu.time_ms(warmup, repeats, attend)?;
            let (name, chunk) = match variant {
                DecodeVariant::V1 => ("v1", None),
                DecodeVariant::V2 { chunk } => ("v2", Some(chunk)),
            };
            push(Case {
                op: "decode_attn",
                variant: name.into(),
                shape: serde_json::json!({ "B": d.seqs, "T": d.slots, "H": d.heads, "H_kv": d.kv_heads, "D": d.head_dim, "chunk": chunk }),
                median_ms: ms,
                tflops: None,
                allocated_bytes: allocated,
            });
        }
    }

    // Depthwise convolution: forward with ReLU6, the mask, dx, dw and db.
    let s = sizes.dwconv;
    let x = gpu.upload(&random_bf16(s.in_len(), 14))?;
    let w = gpu.upload(&random_bf16(s.c * s.k * s.k, 15))?;
    let b = gpu.upload(&vec![0.1f32; s.c])?;
    // Masking an already masked gradient costs the same, so one buffer serves every repeat.
    let mut dy = gpu.upload(&random_bf16(s.out_len(), 16))?;
    let mut conv = || -> Result<()> {
        let y = dwconv::forward(gpu, &x, &w, &b, s, true)?;
        dwconv::relu6_backward(gpu, &mut dy, &y)?;
        dwconv::backward(gpu, &x, &w, &dy, s)?;
        Ok(())
    };
    let before = gpu.allocated_bytes();
    conv()?;
    gpu.sync()?;
    let allocated = gpu.allocated_bytes() - before;
    let ms = gpu.time_ms(warmup, repeats, &mut conv)?;
    let (ho, wo) = s.out_hw();
    push(Case {
        op: "dwconv_fwd_bwd",
        variant: "v1".into(),
        shape: serde_json::json!({ "N": s.n, "C": s.c, "H": s.h, "W": s.w, "k": s.k, "stride": s.stride, "Ho": ho, "Wo": wo }),
        median_ms: ms,
        tflops: None,
        allocated_bytes: allocated,
    });
    drop((x, w, b, dy));

    // A linear layer from quantized blocks (Q4_K, Q8_0) beside cuBLASLt on the same weights in
    // bf16: decode is a read of the weight, so the blocks' 4.5 and 8.5 bits per weight against
    // bf16's 16 bound the ratio there; at prefill sizes the bf16 GEMM's tensor cores should win.
    let (out, inn, ref batches) = sizes.qgemm;
    for qtype in [QType::Q4K, QType::Q8_0] {
        let w = qgemm::upload(gpu, &random_matrix(qtype, out, inn, 17))?;
        for &rows in batches {
            let x = gpu.upload(&random_bf16(rows * inn, 18))?;
            let forward = || qgemm::linear(gpu, &x, &w, rows, None, None).map(drop);
            let before = gpu.allocated_bytes();
            forward()?;
            gpu.sync()?;
            let allocated = gpu.allocated_bytes() - before;
            let ms = gpu.time_ms(warmup, repeats, forward)?;
            let spec = GemmSpec::linear(rows, out, inn);
            push(Case {
                op: "qgemm_xwt",
                variant: qtype.name().to_lowercase(),
                shape: serde_json::json!({ "rows": rows, "out": out, "in": inn, "weight_bytes": w.bytes() }),
                median_ms: ms,
                tflops: Some(spec.flops() / (ms * 1e-3) / 1e12),
                allocated_bytes: allocated,
            });
        }
    }
    let w = gpu.upload(&random_bf16(out * inn, 19))?;
    for &rows in batches {
        let x = gpu.upload(&random_bf16(rows * inn, 18))?;
        let mut y = gpu.zeros::<bf16>(rows * out)?;
        let spec = GemmSpec::linear(rows, out, inn);
        let ms =
            gpu.time_ms(warmup, repeats, || gemm(blas, &spec, &x.slice(..), &w.slice(..), &mut y.slice_mut(..), None))?;
        push(Case {
            op: "qgemm_xwt",
            variant: "cublaslt_bf16".into(),
            shape: serde_json::json!({ "rows": rows, "out": out, "in": inn, "weight_bytes": out * inn * 2 }),
            median_ms: ms,
            tflops: Some(spec.flops() / (ms * 1e-3) / 1e12),
            allocated_bytes: rows * out * 2,
        });
    }
    Ok(cases)
}
