//! The op set: what a model needs from a compute backend, as traits split by op family, each
//! with its shape types beside it. A model is written once against [`StepOps`] (all families);
//! `backend::cpu::HostOps` implements it on the CPU reference ops of `crate::ops` (f32) and
//! `backend::cuda::step_ops::CudaOps` on the kernels of `kernels/` and cuBLASLt (bf16 storage,
//! fp32 statistics). This module imports no implementation: the backends depend on it, never the
//! reverse.
//!
//! Buffers: [`Buffers::Buf`] holds activations, weights and gradients (bf16 on the GPU),
//! [`Buffers::Stat`] fp32 values (norm and softmax statistics, master weights, optimizer moments).
//! Every op is queued on the device's stream: nothing waits for the host except
//! [`Buffers::download`] and [`Buffers::download_stat`].

pub mod activation;
pub mod attention;
pub mod conv;
pub mod decode;
pub mod gemm;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod similarity;

pub use activation::Activations;
pub use attention::{Attention, CausalShape, FusionShape};
pub use conv::{Conv, DwShape, Padding};
pub use decode::{Decode, DecodeShape};
pub use gemm::{Gemm, GemmSpec};
pub use loss::{CrossEntropyOut, EdpoConfig, Losses, Pair};
pub use norm::Norms;
pub use optim::{clip_rule, AdamWScalars, GradRef, Optimizer};
pub use quant::QuantOps;
pub use similarity::{PatchScores, Reduce, Similarity, SimilarityShape};

use anyhow::Result;

/// Memory and row movement: the buffer types of a backend, transfers, allocation, copies, gathers
/// and scatters of rows, and scaling.
pub trait Buffers {
    type Buf;
    type Stat;
    /// Row indices (sequence numbers, positions) in the op set's form, for the decode ops.
    type Ids;
    /// What runs the ops, for logs and reports.
    fn describe(&self) -> String;
    fn upload(&self, x: &[f32]) -> Result<Self::Buf>;
    /// Waits for the queued work.
    fn download(&self, x: &Self::Buf) -> Result<Vec<f32>>;
    fn upload_stat(&self, x: &[f32]) -> Result<Self::Stat>;
    /// Waits for the queued work.
    fn download_stat(&self, x: &Self::Stat) -> Result<Vec<f32>>;
    fn zeros(&self, n: usize) -> Result<Self::Buf>;
    fn stat_zeros(&self, n: usize) -> Result<Self::Stat>;
    fn copy(&self, x: &Self::Buf) -> Result<Self::Buf>;
    /// `x = 0`: a reused buffer about to be accumulated into.
    fn fill_zero(&self, x: &mut Self::Buf) -> Result<()>;
    /// `table[ids]`, `[ids.len(), dim]`.
    fn embed(&self, table: &Self::Buf, ids: &[u32], dim: usize) -> Result<Self::Buf>;
    /// `dtable[ids[r]] += dout[r]`.
    fn embed_backward(&self, ids: &[u32], dout: &Self::Buf, dim: usize, dtable: &mut Self::Buf) -> Result<()>;
    /// Copies `rows` rows of `dim` from `src` (from row `src_row`) into `dst` (from row `dst_row`).
    #[allow(clippy::too_many_arguments)]
    fn copy_rows(
        &self,
        src: &Self::Buf,
        src_row: usize,
        dst: &mut Self::Buf,
        dst_row: usize,
        rows: usize,
        dim: usize,
    ) -> Result<()>;
    /// `x *= s`.
    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()>;
    /// `x[i] *= f[i]`.
    fn mul_stat(&self, x: &mut Self::Stat, f: &[f32]) -> Result<()>;
    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids>;
}

/// Every op family: what the models are written against. Implemented for any type that
/// implements each family.
pub trait StepOps:
    Buffers + Gemm + Norms + Activations + Attention + Decode + Losses + Optimizer + Conv + QuantOps + Similarity
{
}

impl<T> StepOps for T where
    T: Buffers + Gemm + Norms + Activations + Attention + Decode + Losses + Optimizer + Conv + QuantOps + Similarity
{
}
