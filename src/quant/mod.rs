//! ggml's quantized block formats, and matrix products computed straight from them.
//!
//! A GGUF checkpoint stores most weight matrices as blocks of 32 (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)
//! or 256 (the K-quants Q4_K, Q5_K, Q6_K) values sharing one or two f16 scales. Decode reads every
//! weight once per token, so its speed is the bytes per weight: 4.5–6.6 bits here against 32 for
//! f32. This module keeps the blocks and multiplies with them the way llama.cpp does:
//!
//! - [`blocks`]: the layouts and dequantisation of [`QType`] and [`QMatrix`] (the reference every
//!   kernel is tested against, and what the GGUF reader uses to produce f32; the types themselves
//!   live in `crate::qmatrix`, a leaf that the op set's interface can import);
//! - [`act`]: the activations quantized per block to int8 (`Q8` for the 32-blocks, `Q8K` with
//!   16-element sums for the K-quants), so that a block's dot product is integer arithmetic;
//! - [`dot`]: the portable block dot products (the fallback, and the reference of the SIMD ones);
//! - [`avx2`]: the same dot products on AVX2 (`maddubs` of unsigned weights by signed
//!   activations), and for the 32-block types a build with AVX-512 VNNI's `vpdpbusd`; chosen at
//!   run time;
//! - [`matmul`]: `y = x·Wᵀ` over all threads (integer dot products for the few rows of a decode
//!   step, dequantized tiles of `W` and the f32 GEMM from [`matmul::TILE_GEMM_ROWS`] rows on),
//!   the grouped product of weights that read one input, the input gradient `dx = dy·W` (tiles
//!   again, never the whole matrix in f32), and row gathers (an embedding table).
//!
//! Not here: 512-bit kernels (two blocks per register) and the GPU's fused dequantising GEMM.

pub mod act;
pub mod avx2;
pub mod blocks;
pub mod dot;
pub mod matmul;

pub use blocks::{dequantize, dequantize_into, QMatrix, QType};
pub use matmul::{qmatmul, qmatmul_group, qmatmul_input_grad, qrows};

/// Which dot-product implementation runs on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isa {
    /// Plain Rust, any CPU.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// AVX2 and AVX-512 VNNI (with VL): the 32-block types' VNNI build, the K-quants' AVX2 one.
    Avx512Vnni,
}

/// The best [`Isa`] this CPU supports, unless `SAGE_QUANT_ISA` (`portable` or `avx2`) asks for a
/// lesser one (for comparisons, and for testing a fallback on a CPU that has more). Checked once.
pub fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = std::env::var("SAGE_QUANT_ISA").ok();
        let best = if avx2::vnni_available() {
            Isa::Avx512Vnni
        } else if avx2::available() {
            Isa::Avx2
        } else {
            Isa::Portable
        };
        match cap.as_deref() {
            Some("portable") => Isa::Portable,
            Some("avx2") if best != Isa::Portable => Isa::Avx2,
            _ => best,
        }
    })
}
