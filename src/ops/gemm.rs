//! The CPU GEMM every linear layer and convolution uses: `c = a·b` over strided f32 operands.
//!
//! It goes through the `gemm` crate (the one candle uses): runtime-dispatched AVX2/NEON
//! micro-kernels with cache blocking and rayon parallelism (its AVX-512 kernels need its
//! `nightly` feature, which stable Rust cannot build). On a CPU with AVX-512F, products large
//! enough to fill its tiles go to [`super::gemm_avx512`] instead. `sage bench cpu` measures it
//! against numpy's BLAS on the same machine.

use crate::threads::threads;

/// Below this many multiply-adds a single thread is faster than waking the pool.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

pub use super::matref::MatRef;

/// `c[m×n] = a[m×k] · b[k×n] (+ c if accumulate)`, `c` row-major and contiguous. Large products
/// run on every thread.
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    sgemm_on(m, n, k, a, b, c, accumulate, worth_threads(m, n, k))
}

/// Whether a product is large enough to run on every thread.
fn worth_threads(m: usize, n: usize, k: usize) -> bool {
    m * n * k >= PARALLEL_MIN_FLOPS && threads() > 1
}

/// [`sgemm`] on the calling thread only: for callers that already split their work into one task
/// per thread (the fusion attention's blocks), where a GEMM that forks again only adds joins.
pub fn sgemm_serial(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    sgemm_on(m, n, k, a, b, c, accumulate, false)
}

#[allow(clippy::too_many_arguments)]
fn sgemm_on(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool, parallel: bool) {
    assert!(c.len() >= m * n, "gemm output too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    // Bounds: the furthest element each operand is read at.
    let last = |r: MatRef, rows: usize, cols: usize| (rows - 1) * r.row_stride + (cols - 1) * r.col_stride;
    assert!(last(a, m, k) < a.data.len(), "gemm lhs out of bounds");
    assert!(last(b, k, n) < b.data.len(), "gemm rhs out of bounds");
    if super::gemm_avx512::worth_it(m, n, k) {
        return super::gemm_avx512::sgemm(m, n, k, a, b, c, accumulate, parallel);
    }
    let par = if parallel { gemm::Parallelism::Rayon(threads()) } else { gemm::Parallelism::None };
    // SAFETY: all three operands were bounds-checked above for the given strides, and `c` is
    // exclusively borrowed.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A linear layer's weight `W [n, k]` in the layout [`sgemm_linear_prepared`] reads: packed once
/// for the AVX-512 GEMM where it runs ([`super::gemm_avx512::pack_weight`]), else `W` as it is.
/// For frozen weights only: the result is no longer `W` row by row.
pub fn prepare_linear_weight(w: Vec<f32>, n: usize, k: usize) -> Vec<f32> {
    if super::gemm_avx512::available() {
        super::gemm_avx512::pack_weight(&w, n, k)
    } else {
        w
    }
}

/// `c [m, n] = x [m, k] · Wᵀ (+ c if accumulate)` with `W` from [`prepare_linear_weight`].
pub fn sgemm_linear_prepared(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], c: &mut [f32], accumulate: bool) {
    if super::gemm_avx512::available() {
        let parallel = worth_threads(m, n, k);
        super::gemm_avx512::sgemm_packed(m, n, k, MatRef::rows(x, k), w, c, accumulate, parallel)
    } else {
        sgemm(m, n, k, MatRef::rows(x, k), MatRef::transposed(w, k), c, accumulate)
    }
}

/// A `b [k, n]` operand prepared once for many products with different `a`s (an attention head's
/// keys and values meet every block of queries): packed for the AVX-512 kernel where products of
/// its width go there, else the operand as it is.
pub enum PreparedRhs<'a> {
    Packed(Vec<f32>),
    Plain(MatRef<'a>),
}

/// [`PreparedRhs`] for `b [k, n]`.
pub fn prepare_rhs<'a>(b: MatRef<'a>, k: usize, n: usize) -> PreparedRhs<'a> {
    if super::gemm_avx512::worth_it(super::gemm_avx512::MIN_ROWS, n, k) {
        PreparedRhs::Packed(super::gemm_avx512::pack_rhs(b, k, n))
    } else {
        PreparedRhs::Plain(b)
    }
}

/// [`sgemm_serial`] with a `b` from [`prepare_rhs`].
pub fn sgemm_serial_prepared(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    b: &PreparedRhs,
    c: &mut [f32],
    accumulate: bool,
) {
    match b {
        PreparedRhs::Packed(w) => super::gemm_avx512::sgemm_packed(m, n, k, a, w, c, accumulate, false),
        PreparedRhs::Plain(b) => sgemm_serial(m, n, k, a, *b, c, accumulate),
    }
}

/// `x [m, k] · Wᵀ + bias` (the bias added to every row) in a new buffer, with `W` from
/// [`prepare_linear_weight`]: the AVX-512 kernel starts its sums from the bias and writes the
/// output once; elsewhere the bias rows are written first (on every thread) and the product
/// added.
pub fn sgemm_linear_prepared_bias(m: usize, n: usize, k: usize, x: &[f32], w: &[f32], bias: &[f32]) -> Vec<f32> {
    assert!(bias.len() >= n, "linear layer: {} bias values for {n} outputs", bias.len());
    if super::gemm_avx512::available() {
        return super::gemm_avx512::sgemm_packed_bias(m, n, k, MatRef::rows(x, k), w, bias, worth_threads(m, n, k));
    }
    let mut c = bias_rows(m, n, bias);
    sgemm_linear_prepared(m, n, k, x, w, &mut c, true);
    c
}

/// `m` rows of `bias[..n]`, the start of a product that adds to its bias. Written on every thread:
/// a serial fill of fc1's [1025, 1536] output cost the DINOv2 forward at 448 px more than its
/// LayerNorms.
pub fn bias_rows(m: usize, n: usize, bias: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut c = vec![0.0f32; m * n];
    if n > 0 {
        c.par_chunks_mut(n).with_min_len(64).for_each(|r| r.copy_from_slice(&bias[..n]));
    }
    c
}

/// The textbook triple loop: the reference the fast path is tested against.
pub fn sgemm_reference(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for p in 0..k {
                acc += a.data[i * a.row_stride + p * a.col_stride] as f64
                    * b.data[p * b.row_stride + j * b.col_stride] as f64;
            }
            let out = &mut c[i * n + j];
            *out = if accumulate { *out + acc as f32 } else { acc as f32 };
        }
    }
}

/// `n` values in [-0.5, 0.5) from a seeded LCG: the GEMM tests' operands.
#[cfg(test)]
pub(crate) fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A prepared weight (packed for AVX-512 where the CPU has it, else as it is) gives
    /// `x·Wᵀ` within f32 rounding of the triple loop, accumulating or not, and with a bias.
    #[test]
    fn a_prepared_linear_weight_gives_x_times_w_transposed() {
        for &(m, n, k) in &[(1, 3, 2), (200, 70, 300), (9, 384, 40)] {
            let x = lcg(m * k, 7);
            let w = lcg(n * k, 8);
            let prepared = prepare_linear_weight(w.clone(), n, k);
            for accumulate in [false, true] {
                let mut fast = lcg(m * n, 9);
                let mut slow = fast.clone();
                sgemm_linear_prepared(m, n, k, &x, &prepared, &mut fast, accumulate);
                sgemm_reference(m, n, k, MatRef::rows(&x, k), MatRef::transposed(&w, k), &mut slow, accumulate);
                for (a, b) in fast.iter().zip(&slow) {
                    assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{m}x{n}x{k}: {a} vs {b}");
                }
            }
            // With a bias: `x·Wᵀ + bias` on every row.
            let bias = lcg(n, 10);
            let got = sgemm_linear_prepared_bias(m, n, k, &x, &prepared, &bias);
            let mut want: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
            sgemm_reference(m, n, k, MatRef::rows(&x, k), MatRef::transposed(&w, k), &mut want, true);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{m}x{n}x{k} with bias: {a} vs {b}");
            }
        }
    }

    #[test]
    fn sgemm_matches_reference_for_odd_shapes_and_transposes() {
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 33, 65), (64, 1, 300), (129, 70, 31)] {
            let a = lcg(m * k, 1);
            let bt = lcg(n * k, 2); // stored n×k, used transposed
            let mut fast = lcg(m * n, 3);
            let mut slow = fast.clone();
            sgemm(m, n, k, MatRef::rows(&a, k), MatRef::transposed(&bt, k), &mut fast, true);
            sgemm_reference(m, n, k, MatRef::rows(&a, k), MatRef::transposed(&bt, k), &mut slow, true);
            for (x, y) in fast.iter().zip(&slow) {
                assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{m}x{n}x{k}: {x} vs {y}");
            }
        }
    }
}
