//! Products with a quantized weight `W [out, in]` ([`QMatrix`]) on all threads: the linear
//! layer `y = x·Wᵀ` from the blocks (activations quantized per block, integer dot products),
//! its input gradient `dx = dy·W` (tiles of `W` dequantized to f32 one at a time and multiplied
//! by the f32 GEMM: a backward is GEMM-bound and needs full-precision `dy`), and row gathers.

use super::act::{quantize_q8, quantize_q8k};
use super::act::{Q8, Q8K};
use super::blocks::{dequantize_into, QMatrix};
use super::dot::{DotQ8, DotQ8K, DotRow, DotRows, ROWS};
use super::{avx2, dot, isa, Isa};
use crate::ops::gemm::{sgemm, MatRef};
use crate::threads::threads;
use rayon::prelude::*;

/// Below this many weight bytes × rows a product runs on the calling thread: waking the pool
/// costs more than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// Output rows of `W` dequantized per tile of the input gradient.
const GRAD_TILE: usize = 128;

/// From this many rows on, [`qmatmul`] dequantizes tiles of `W` and runs the f32 GEMM: each
/// weight is unpacked once for all rows instead of once per four rows, and the GEMM's register
/// blocking beats the integer kernels'. Measured with `sage bench infer` on two cores: at 16
/// rows (batch-16 decode) the integer path was 2.2× (SmolLM2) and 1.8× (Qwen2.5) faster than
/// the tiles with one-row kernels, and the four-row kernels took it 1.4× and 1.5× further; at
/// 128 rows (prefill) the tiles stay 1.2–1.4× faster than the four-row kernels.
pub const TILE_GEMM_ROWS: usize = 32;

/// `y [rows, out] = x [rows, in] · Wᵀ` (`+ y` with `accumulate`): integer dot products with
/// int8 activations below [`TILE_GEMM_ROWS`] rows (decode), dequantized tiles and the f32 GEMM
/// from there on (prefill, training).
pub fn qmatmul(x: &[f32], rows: usize, w: &QMatrix, y: &mut [f32], accumulate: bool) {
    if rows >= TILE_GEMM_ROWS {
        qmatmul_tiles(x, rows, w, y, accumulate)
    } else {
        qmatmul_int8(x, rows, w, y, accumulate)
    }
}

/// Calls `f(o0, n, tile)` for each tile of [`GRAD_TILE`] output rows `o0..o0 + n` of `W`,
/// `tile [n, in]` dequantized to f32 (in parallel over its rows), one buffer reused for all.
fn for_each_tile(w: &QMatrix, mut f: impl FnMut(usize, usize, &[f32])) {
    let (out, cols) = (w.rows, w.cols);
    let mut tile = vec![0.0f32; GRAD_TILE.min(out) * cols];
    for o0 in (0..out).step_by(GRAD_TILE) {
        let n = GRAD_TILE.min(out - o0);
        let t = &mut tile[..n * cols];
        t.par_chunks_mut(cols).enumerate().for_each(|(i, row)| dequantize_into(w.qtype, w.row(o0 + i), row));
        f(o0, n, t);
    }
}

/// [`qmatmul`] by dequantized tiles of [`GRAD_TILE`] rows of `W` and the f32 GEMM.
pub fn qmatmul_tiles(x: &[f32], rows: usize, w: &QMatrix, y: &mut [f32], accumulate: bool) {
    assert_eq!(x.len(), rows * w.cols, "qmatmul: x is not [rows, in]");
    assert!(y.len() >= rows * w.rows, "qmatmul: y is smaller than [rows, out]");
    let (out, cols) = (w.rows, w.cols);
    let mut part = vec![0.0f32; rows * GRAD_TILE.min(out)];
    for_each_tile(w, |o0, n, t| {
        // part [rows, n] = x · tileᵀ, then into columns o0..o0+n of y.
        let p = &mut part[..rows * n];
        sgemm(rows, n, cols, MatRef::rows(x, cols), MatRef::transposed(t, cols), p, false);
        for (yr, pr) in y.chunks_exact_mut(out).zip(p.chunks_exact(n)) {
            let dst = &mut yr[o0..o0 + n];
            if accumulate {
                dst.iter_mut().zip(pr).for_each(|(d, v)| *d += v);
            } else {
                dst.copy_from_slice(pr);
            }
        }
    });
}

/// `y [rows, out]` from the integer path's `yt [out, rows]` (`+ y` with `accumulate`).
fn untranspose(yt: &[f32], out: usize, rows: usize, y: &mut [f32], accumulate: bool) {
    for (r, yr) in y[..rows * out].chunks_exact_mut(out).enumerate() {
        if accumulate {
            yr.iter_mut().enumerate().for_each(|(o, v)| *v += yt[o * rows + r]);
        } else {
            yr.iter_mut().enumerate().for_each(|(o, v)| *v = yt[o * rows + r]);
        }
    }
}

/// [`qmatmul`] by integer dot products: each row of `x` quantized per block to int8 (as
/// llama.cpp does), each weight row against four rows of `x` per kernel call.
pub fn qmatmul_int8(x: &[f32], rows: usize, w: &QMatrix, y: &mut [f32], accumulate: bool) {
    qmatmul_int8_with(Kernels::Best, x, rows, w, y, accumulate)
}

/// Which dot-product kernels the integer path uses: the variants `sage bench quant` times side
/// by side (the model always runs [`Kernels::Best`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// The best SIMD build this CPU has ([`isa`]), four activation rows per call while four remain.
    Best,
    /// The same, one activation row per call.
    OneRow,
    /// The AVX2 build, four rows per call, also where VNNI's would run (the portable kernels on
    /// a CPU without AVX2).
    Avx2,
    /// The portable kernels.
    Portable,
}

/// [`qmatmul_int8`] with the chosen [`Kernels`].
pub fn qmatmul_int8_with(kernels: Kernels, x: &[f32], rows: usize, w: &QMatrix, y: &mut [f32], accumulate: bool) {
    assert!(y.len() >= rows * w.rows, "qmatmul: y is smaller than [rows, out]");
    if rows == 0 {
        return;
    }
    let yt = int8_group(x, rows, &[w], kernels).pop().expect("one product");
    untranspose(&yt, w.rows, rows, y, accumulate);
}

/// `x·Wᵢᵀ` for several weights that read the same input (a block's q, k and v; gate and up): the
/// input is quantized once and all the products share one parallel pass, which halves the
/// thread pool's wake-ups in a decode step. Returns each `[rows, outᵢ]`.
pub fn qmatmul_group(x: &[f32], rows: usize, ws: &[&QMatrix]) -> Vec<Vec<f32>> {
    if rows >= TILE_GEMM_ROWS {
        return ws
            .iter()
            .map(|w| {
                let mut y = vec![0.0; rows * w.rows];
                qmatmul_tiles(x, rows, w, &mut y, false);
                y
            })
            .collect();
    }
    let mut outs = int8_group(x, rows, ws, Kernels::Best);
    if rows > 1 {
        for (y, w) in outs.iter_mut().zip(ws) {
            let yt = std::mem::take(y);
            *y = vec![0.0; rows * w.rows];
            untranspose(&yt, w.rows, rows, y, false);
        }
    }
    outs
}

/// A weight type's dot products against its kind of quantized activations: one row, and
/// [`ROWS`] rows at once where a SIMD kernel exists.
#[derive(Clone, Copy)]
enum Kernel {
    Q8(DotQ8, Option<DotRows<Q8>>),
    Q8K(DotQ8K, Option<DotRows<Q8K>>),
}

fn kernel(ty: super::QType, kernels: Kernels) -> Kernel {
    let simd = isa() != Isa::Portable && kernels != Kernels::Portable;
    let vnni = isa() == Isa::Avx512Vnni && kernels != Kernels::Avx2;
    let rows4 = kernels != Kernels::OneRow;
    if ty.k_quant() {
        match simd.then(|| avx2::q8k_kernels(ty)).flatten() {
            Some((one, four)) => Kernel::Q8K(one, rows4.then_some(four)),
            None => Kernel::Q8K(dot::q8k_kernel(ty).expect("every K-quant has a portable kernel"), None),
        }
    } else {
        match simd.then(|| avx2::q8_kernels(ty, vnni)).flatten() {
            Some((one, four)) => Kernel::Q8(one, rows4.then_some(four)),
            None => Kernel::Q8(dot::q8_kernel(ty).expect("every 32-block type has a portable kernel"), None),
        }
    }
}

/// `y[r] = dot(w, a[r])` for the `y.len()` rows of activations `a` (`n` blocks each): [`ROWS`]
/// rows per call of the batched kernel while there are that many, then one at a time.
fn dot_rows<A>(w: &[u8], a: &[A], n: usize, y: &mut [f32], one: DotRow<A>, many: Option<DotRows<A>>) {
    let row = |r: usize| &a[r * n..(r + 1) * n];
    let mut done = 0;
    if let Some(many) = many {
        for (i, ys) in y.chunks_exact_mut(ROWS).enumerate() {
            ys.copy_from_slice(&many(w, std::array::from_fn(|k| row(i * ROWS + k))));
            done += ROWS;
        }
    }
    for (r, v) in y.iter_mut().enumerate().skip(done) {
        *v = one(w, row(r));
    }
}

/// Each row of `x` quantized (in parallel when there are many).
fn quantize_rows<A: Send>(x: &[f32], rows: usize, q: fn(&[f32]) -> Vec<A>) -> Vec<A> {
    let cols = x.len() / rows;
    if rows < 8 {
        return q(x);
    }
    x.par_chunks(cols).flat_map_iter(q).collect()
}

/// `yt_i [out_i, rows]` with `yt_i[o, r] = dot(W_i[o], x[r])`, parallel over chunks of output
/// rows of every `W_i` at once: each task reads its rows of `W` once (they stay in L1 across the
/// activation rows).
fn int8_group(x: &[f32], rows: usize, ws: &[&QMatrix], kernels: Kernels) -> Vec<Vec<f32>> {
    let cols = ws[0].cols;
    assert!(ws.iter().all(|w| w.cols == cols), "qmatmul_group: weights of different widths");
    assert_eq!(x.len(), rows * cols, "qmatmul: x is not [rows, in]");
    let q8 = if ws.iter().any(|w| !w.qtype.k_quant()) { quantize_rows(x, rows, quantize_q8) } else { Vec::new() };
    let q8k = if ws.iter().any(|w| w.qtype.k_quant()) { quantize_rows(x, rows, quantize_q8k) } else { Vec::new() };
    let (n8, n8k) = (q8.len() / rows, q8k.len() / rows);
    let compute = |w: &QMatrix, k: Kernel, o0: usize, part: &mut [f32]| {
        for (i, yo) in part.chunks_exact_mut(rows).enumerate() {
            let wr = w.row(o0 + i);
            match k {
                Kernel::Q8(one, many) => dot_rows(wr, &q8, n8, yo, one, many),
                Kernel::Q8K(one, many) => dot_rows(wr, &q8k, n8k, yo, one, many),
            }
        }
    };
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0.0f32; w.rows * rows]).collect();
    let work: usize = ws.iter().map(|w| w.nbytes()).sum::<usize>() * rows;
    if work < PARALLEL_MIN_WORK || threads() == 1 {
        for (w, yt) in ws.iter().zip(outs.iter_mut()) {
            compute(w, kernel(w.qtype, kernels), 0, yt);
        }
        return outs;
    }
    // A few tasks per thread over all the outputs, so that a slow thread does not hold the
    // others up.
    let total: usize = ws.iter().map(|w| w.rows).sum();
    let chunk = total.div_ceil(threads() * 4).max(8);
    let mut tasks = Vec::new();
    for (w, yt) in ws.iter().zip(outs.iter_mut()) {
        let k = kernel(w.qtype, kernels);
        for (c, part) in yt.chunks_mut(chunk * rows).enumerate() {
            tasks.push((*w, k, c * chunk, part));
        }
    }
    tasks.into_par_iter().for_each(|(w, k, o0, part)| compute(w, k, o0, part));
    outs
}

/// `dx [rows, in] = dy [rows, out] · W` (`+ dx` with `accumulate`): the input gradient of
/// [`qmatmul`], one tile of [`GRAD_TILE`] output rows of `W` dequantized at a time.
pub fn qmatmul_input_grad(dy: &[f32], rows: usize, w: &QMatrix, dx: &mut [f32], accumulate: bool) {
    assert_eq!(dy.len(), rows * w.rows, "qmatmul_input_grad: dy is not [rows, out]");
    assert!(dx.len() >= rows * w.cols, "qmatmul_input_grad: dx is smaller than [rows, in]");
    let (out, cols) = (w.rows, w.cols);
    for_each_tile(w, |o0, n, t| {
        // dy[:, o0..o0+n] is a strided view of dy.
        let a = MatRef { data: &dy[o0..], row_stride: out, col_stride: 1 };
        sgemm(rows, cols, n, a, MatRef::rows(t, cols), &mut dx[..rows * cols], accumulate || o0 > 0);
    });
}

/// Rows `ids` of `W`, dequantized: `[ids.len(), in]` (an embedding lookup in a quantized table).
pub fn qrows(w: &QMatrix, ids: &[u32]) -> Vec<f32> {
    let mut out = vec![0.0f32; ids.len() * w.cols];
    for (row, &id) in out.chunks_exact_mut(w.cols).zip(ids) {
        dequantize_into(w.qtype, w.row(id as usize), row);
    }
    out
}

/// A frozen LM head kept as blocks, for the losses ([`crate::ops::edpo::token_logprobs`],
/// [`crate::ops::edpo::logprob_backward`]): each vocabulary chunk they ask for is dequantized
/// into their buffer (in parallel over its rows), so the f32 head never exists whole.
impl crate::ops::edpo::HeadRows for QMatrix {
    fn vocab(&self, c: usize) -> usize {
        assert_eq!(c, self.cols, "the hidden states are not as wide as the LM head's rows");
        self.rows
    }
    fn rows<'a>(&'a self, v0: usize, n: usize, c: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        assert_eq!(c, self.cols, "the hidden states are not as wide as the LM head's rows");
        buf.resize(n * c, 0.0);
        buf.par_chunks_mut(c).enumerate().for_each(|(i, row)| dequantize_into(self.qtype, self.row(v0 + i), row));
        &buf[..]
    }
}

#[cfg(test)]
mod tests {
    use super::super::blocks::testing::{random_matrix, Bytes};
    use super::super::QType;
    use super::*;

    fn f32_linear(x: &[f32], rows: usize, w: &[f32], out: usize, cols: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..cols).map(|i| x[r * cols + i] as f64 * w[o * cols + i] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    /// The quantized product against the f32 product with the dequantised weights, for every
    /// type at odd sizes (an odd number of blocks, output rows not a multiple of any chunk):
    /// the only difference is the activations' int8 rounding, bounded relative to Σ|x·w|.
    #[test]
    fn qmatmul_matches_dequantise_then_f32() {
        for ty in QType::ALL {
            let (out, cols) = (37, ty.block_len() * 3);
            let w = random_matrix(ty, out, cols, 77);
            let wf = w.dequantize();
            let mut g = Bytes(3);
            for rows in [1, 5, TILE_GEMM_ROWS + 1] {
                let x: Vec<f32> = (0..rows * cols).map(|_| g.unit()).collect();
                let want = f32_linear(&x, rows, &wf, out, cols);
                let mut y = vec![0.0; rows * out];
                qmatmul_int8(&x, rows, &w, &mut y, false);
                // The tile path is exact up to f32 summation.
                let mut yt = vec![0.0; rows * out];
                qmatmul_tiles(&x, rows, &w, &mut yt, false);
                assert!(yt.iter().zip(&want).all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0)), "{ty} tiles");
                for r in 0..rows {
                    for o in 0..out {
                        let mag: f32 = (0..cols).map(|i| (x[r * cols + i] * wf[o * cols + i]).abs()).sum();
                        let (a, b) = (y[r * out + o], want[r * out + o]);
                        // int8 activations: each term off by at most half a step (1/254 of the
                        // block's largest |x|), relative error well under 1%.
                        assert!(
                            (a - b).abs() <= 0.01 * mag + 1e-6,
                            "{ty} rows {rows} [{r},{o}]: {a} vs {b} (Σ|xw| {mag})"
                        );
                    }
                }
                // accumulate adds.
                let mut y2 = vec![1.0; rows * out];
                qmatmul_int8(&x, rows, &w, &mut y2, true);
                assert!(y2.iter().zip(&y).all(|(a, b)| (a - 1.0 - b).abs() < 1e-4));
            }
        }
    }

    /// A group of weights of different types over one input gives each one's own product.
    #[test]
    fn grouped_products_match_single_ones() {
        let ws = [
            random_matrix(QType::Q5_0, 33, 256, 1),
            random_matrix(QType::Q4K, 20, 256, 2),
            random_matrix(QType::Q8_0, 300, 256, 3),
        ];
        let refs: Vec<&QMatrix> = ws.iter().collect();
        let mut g = Bytes(4);
        for rows in [1, 3, TILE_GEMM_ROWS] {
            let x: Vec<f32> = (0..rows * 256).map(|_| g.unit()).collect();
            for (w, y) in ws.iter().zip(qmatmul_group(&x, rows, &refs)) {
                let mut want = vec![0.0; rows * w.rows];
                qmatmul(&x, rows, w, &mut want, false);
                assert_eq!(y, want, "{} rows {rows}", w.qtype);
            }
        }
    }

    /// The input gradient is exact up to f32 summation (the dequantised tiles are exact).
    #[test]
    fn input_grad_and_rows_match_the_dequantised_matrix() {
        for ty in [QType::Q4_1, QType::Q6K, QType::Q8_0] {
            let (out, cols, rows) = (GRAD_TILE + 19, ty.block_len() * 2, 3);
            let w = random_matrix(ty, out, cols, 11);
            let wf = w.dequantize();
            let mut g = Bytes(8);
            let dy: Vec<f32> = (0..rows * out).map(|_| g.unit()).collect();
            let mut dx = vec![0.5; rows * cols];
            qmatmul_input_grad(&dy, rows, &w, &mut dx, true);
            for r in 0..rows {
                for i in 0..cols {
                    let want: f64 =
                        0.5 + (0..out).map(|o| dy[r * out + o] as f64 * wf[o * cols + i] as f64).sum::<f64>();
                    assert!((dx[r * cols + i] as f64 - want).abs() < 1e-4 * want.abs().max(1.0), "{ty} dx[{r},{i}]");
                }
            }
            let picked = qrows(&w, &[3, 0, (out - 1) as u32]);
            assert_eq!(&picked[..cols], &wf[3 * cols..4 * cols]);
            assert_eq!(&picked[2 * cols..], &wf[(out - 1) * cols..]);
        }
    }
}
