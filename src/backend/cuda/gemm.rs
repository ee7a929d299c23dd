//! bf16 GEMM on the GPU through cuBLASLt (fp32 accumulation), in the row-major convention of the
//! CPU backend, with the bias and GELU epilogues and strided batches. Every linear layer's path.
//!
//! cuBLASLt is column-major. A row-major `X [r, c]` is the column-major `Xᵀ [c, r]` in the same
//! memory, so the row-major `C = op(A)·op(B)` is issued as the column-major
//! `Cᵀ = op(B)ᵀ·op(A)ᵀ`: the operands swap places, and the bias (one value per row of the
//! column-major output) becomes one value per output column, the linear-layer bias.

use crate::opset::GemmSpec;
use anyhow::{anyhow, bail, Result};
use cudarc::cublaslt::{Activation, CudaBlasLT, Matmul, MatmulConfig};
use cudarc::driver::{CudaStream, CudaView, CudaViewMut};
use half::bf16;
use std::sync::Arc;

/// A cuBLASLt handle with its workspace.
#[derive(Debug)]
pub struct Blas {
    lt: CudaBlasLT,
}

impl Blas {
    /// Loads cuBLASLt and creates a handle, or says why not (never panics).
    pub fn new(stream: &Arc<CudaStream>) -> Result<Blas> {
        // SAFETY: dlopen by name; nothing is called in the library yet.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            bail!("cuBLASLt (libcublasLt.so.13) could not be loaded: add the CUDA 13 lib64 folder to LD_LIBRARY_PATH");
        }
        let stream = stream.clone();
        std::panic::catch_unwind(move || CudaBlasLT::new(stream))
            .map_err(|_| anyhow!("cuBLASLt panicked while creating its handle and workspace (out of memory?)"))?
            .map(|lt| Blas { lt })
            .map_err(|e| anyhow!("cublasLtCreate: {e:?}"))
    }
}

/// Runs one (batched) GEMM on the handle's stream.
pub fn gemm(
    blas: &Blas,
    spec: &GemmSpec,
    a: &CudaView<bf16>,
    b: &CudaView<bf16>,
    c: &mut CudaViewMut<bf16>,
    bias: Option<&CudaView<bf16>>,
) -> Result<()> {
    spec.check(a.len(), b.len(), c.len(), bias.map(|x| x.len()))?;
    let GemmSpec { m, n, k, trans_a, trans_b, .. } = *spec;
    let batch = spec.batch.max(1);
    // Column-major problem: C'[n, m] = A'·B' with A' = op(b)ᵀ, B' = op(a)ᵀ.
    let lda = if trans_b { k } else { n };
    let ldb = if trans_a { m } else { k };
    let cfg = MatmulConfig {
        transa: trans_b,
        transb: trans_a,
        transc: false,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        alpha: 1.0,
        lda: lda as i64,
        ldb: ldb as i64,
        beta: if spec.accumulate { 1.0 } else { 0.0 },
        ldc: n as i64,
        stride_a: (batch > 1).then_some(if spec.broadcast_b { 0 } else { (k * n) as i64 }),
        stride_b: (batch > 1).then_some((m * k) as i64),
        stride_c: (batch > 1).then_some((m * n) as i64),
        stride_bias: (batch > 1 && bias.is_some()).then_some(0),
        batch_size: (batch > 1).then_some(i32::try_from(batch)?),
    };
    let act = spec.gelu.then_some(Activation::Gelu);
    // SAFETY: the sizes were checked against the buffers; cuBLASLt reads a, b, bias and writes c
    // on the handle's stream.
    unsafe { blas.lt.matmul(cfg, b, a, c, bias, act.as_ref()) }.map_err(|e| anyhow!("cublasLtMatmul ({spec:?}): {e:?}"))
}

/// The CPU reference of [`gemm()`] (f32 math on the same bf16 inputs), for the parity tests.
pub fn gemm_reference(spec: &GemmSpec, a: &[f32], b: &[f32], c: &mut [f32], bias: Option<&[f32]>) {
    let GemmSpec { m, n, k, trans_a, trans_b, .. } = *spec;
    for bt in 0..spec.batch.max(1) {
        let a = &a[bt * m * k..(bt + 1) * m * k];
        let boff = if spec.broadcast_b { 0 } else { bt * k * n };
        let b = &b[boff..boff + k * n];
        let c = &mut c[bt * m * n..(bt + 1) * m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for p in 0..k {
                    let x = if trans_a { a[p * m + i] } else { a[i * k + p] };
                    let y = if trans_b { b[j * k + p] } else { b[p * n + j] };
                    acc += x * y;
                }
                if let Some(bias) = bias {
                    acc += bias[j];
                }
                if spec.gelu {
                    acc = crate::ops::activation::gelu_tanh(acc);
                }
                c[i * n + j] = if spec.accumulate { c[i * n + j] + acc } else { acc };
            }
        }
    }
}
