//! The op set. Each file is one op family: the CPU reference implementation and the tensor-level
//! entry point that checks shapes and dispatches on the tensor's device. Backward passes (issue 5)
//! and CUDA kernels (issue 4) are added to the same files, next to the forward they mirror.

pub mod activation;
pub mod attention;
pub mod conv;
#[cfg(test)]
mod decoder_block_grad;
pub mod dot;
pub mod edpo;
pub mod elementwise;
pub mod embedding;
pub mod fusion_attn;
pub mod gemm;
pub mod gemm_avx512;
#[cfg(test)]
pub(crate) mod gradcheck;
pub mod loss;
pub mod matmul;
pub mod matref;
pub mod norm;
pub mod pool;
pub mod rope;
pub mod similarity;
pub mod vmath;

pub use activation::{gelu, relu6_, silu, softmax_rows_, swiglu};
pub use elementwise::{add, add_};
pub use embedding::embedding;
pub use matmul::{linear, matmul};
pub use norm::{l2_normalize_rows, layer_norm, rms_norm};

use crate::tensor::Tensor;
use anyhow::{bail, Result};

/// Fails unless `t`'s last dimension is `cols`.
pub(crate) fn expect_last_dim(t: &Tensor, cols: usize, what: &str) -> Result<()> {
    if t.shape().last() != Some(&cols) {
        bail!("{what}: expected last dimension {cols}, got shape {:?}", t.shape());
    }
    Ok(())
}
