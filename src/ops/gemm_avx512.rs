//! An f32 GEMM on AVX-512 for the CPUs that have it, where the `gemm` crate (built on stable
//! Rust, without its `nightly` feature) stops at AVX2: on a two-FMA-unit AVX-512 core a 512-bit
//! FMA does twice the work of a 256-bit one at the same rate (measured on this project's Xeon VM:
//! 237 against 129 GFLOP/s per core).
//!
//! The textbook blocking (GotoBLAS, as llm.c's CPU matmul and MLAS do it):
//! - `k` in blocks of [`KC`]; a row-major `a` is read in place, any other layout is packed once
//!   into panels of [`MR`] rows (`panel[kk][i]`, zero-padded past `m`), shared by the tasks;
//! - the columns of `c` in panels of [`NR`], one task each: for each block of `k` its `b` panel
//!   (`[kc][NR]`, zero-padded past `n`; 32 KiB, in L1) is packed — by 16 × 16 transposes in
//!   registers when `b` is a transposed weight — or taken from a weight packed once by
//!   [`pack_weight`], then meets every row panel of `a`;
//! - the micro-kernel: an `MR × NR` tile of `c` in 24 registers of 16 lanes, per `kk` four loads
//!   of `b`, `MR` broadcasts of `a` and `4·MR` FMAs; the tile is added to `c` (or stored) with
//!   masks at the right edge.
//!
//! The tile shape was chosen in `sage bench encoder` (DINOv2 at 224 and 448 px, interleaved with
//! onnxruntime): 6 × 64 with blocks of 128 against 8 × 32, 12 × 32 and 8 × 48, within a few per
//! cent of each other; packing the frozen weights once moved the encoder more than any shape.
//!
//! Each element of `c` sums its `k` products in one fixed order whatever the thread count, so
//! results are reproducible run to run. [`sgemm`](super::gemm::sgemm) sends products here only
//! when the CPU has AVX-512F and the shape is large enough to fill the tiles
//! ([`worth_it`]); `SAGE_GEMM=crate` keeps every product on the `gemm` crate (for comparisons).

use super::matref::MatRef;
use rayon::prelude::*;

/// Rows of `c` per micro-kernel tile.
pub const MR: usize = 6;
/// Columns of `c` per micro-kernel tile: four 16-lane registers.
pub const NR: usize = 64;
/// Products per block of `k`: a `b` panel (`KC × NR` floats, 32 KiB) stays in a 48 KiB L1
/// beside the lines of `a` being broadcast.
pub const KC: usize = 128;

/// Whether this CPU has AVX-512F and `SAGE_GEMM` does not ask for the `gemm` crate. Checked once.
pub fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        let forced_off = std::env::var("SAGE_GEMM").is_ok_and(|v| v == "crate");
        #[cfg(target_arch = "x86_64")]
        {
            !forced_off && is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = forced_off;
            false
        }
    })
}

/// Whether a product of this shape goes to this kernel: the CPU has it, the tiles are mostly
/// full (a thin `n` would spend most lanes on padding), and `m` is large enough that packing `b`
/// (`k·n` floats, reused by `m / MR` tiles) is a small share of the work. An attention block's 64
/// queries against its keys come here: with the 16 × 16 transposes inlined they ran faster than on
/// the crate's kernels in `sage bench encoder` (at 128 rows, the earlier bound, they did not:
/// the transposes were out-of-line calls then). Below 64 rows a packed `b` panel meets too few
/// tiles to pay for its packing, and the crate's kernels read small operands unpacked.
pub fn worth_it(m: usize, n: usize, k: usize) -> bool {
    available() && m >= MIN_ROWS && n >= NR && k >= 16
}

/// The fewest rows of `c` [`worth_it`] sends here.
pub const MIN_ROWS: usize = 64;

/// `c[m×n] = a·b (+ c if accumulate)`, as [`super::gemm::sgemm`], on a CPU with AVX-512F
/// ([`available`]; panics elsewhere, and on operands too small for their shape). Column panels
/// run on the rayon pool when `parallel`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(m: usize, n: usize, k: usize, a: MatRef, b: MatRef, c: &mut [f32], accumulate: bool, parallel: bool) {
    let start = if accumulate { Start::Accumulate } else { Start::Zero };
    product(m, n, k, a, Rhs::Strided(b), Out::Slice(c), start, parallel)
}

/// A linear layer's weight `W [n, k]` packed once as the `b = Wᵀ` of [`sgemm_packed`]: column
/// panel by column panel, each block of `k` laid out `[kc][NR]` as [`sgemm`] packs it on every
/// call. A frozen weight (the DINOv2 encoder's) is then read contiguously, and never transposed
/// again.
pub fn pack_weight(w: &[f32], n: usize, k: usize) -> Vec<f32> {
    assert_eq!(w.len(), n * k, "pack_weight: W is not [n, k]");
    pack_rhs(MatRef::transposed(w, k), k, n)
}

/// Any `b [k, n]` packed once as [`pack_weight`] packs a weight: for an operand that meets many
/// `a`s (an attention head's keys and values, one product per block of queries).
pub fn pack_rhs(b: MatRef, k: usize, n: usize) -> Vec<f32> {
    assert!(available(), "gemm_avx512::pack_rhs on a CPU without AVX-512F");
    let mut packed = vec![0.0f32; n.div_ceil(NR) * k * NR];
    if packed.is_empty() {
        return packed;
    }
    assert!((k - 1) * b.row_stride + (n - 1) * b.col_stride < b.data.len(), "pack_rhs: b out of bounds");
    packed.par_chunks_mut(k * NR).enumerate().for_each(|(jp, panels)| {
        let cols = NR.min(n - jp * NR);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            pack_b(b, p0, kc, jp * NR, cols, &mut panels[p0 * NR..(p0 + kc) * NR]);
        }
    });
    packed
}

/// `c[m×n] = a·Wᵀ (+ c if accumulate)` with `W [n, k]` from [`pack_weight`] (or `a·b` with `b`
/// from [`pack_rhs`]); bit-equal to [`sgemm`] with the same `b`.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed(
    m: usize,
    n: usize,
    k: usize,
    a: MatRef,
    w: &[f32],
    c: &mut [f32],
    accumulate: bool,
    parallel: bool,
) {
    assert!(w.len() >= n.div_ceil(NR) * k * NR, "sgemm_packed: the weight was packed for another shape");
    let start = if accumulate { Start::Accumulate } else { Start::Zero };
    product(m, n, k, a, Rhs::Packed(w), Out::Slice(c), start, parallel)
}

/// A linear layer's output `a·Wᵀ + bias` (the bias added to every row) in a new buffer, with `W
/// [n, k]` from [`pack_weight`]. The bias is where each tile's sums start, so the output is
/// written once, without a zero fill or a bias pass over it first (at 448 px DINOv2's MLP output
/// is 6 MB, far past L2).
pub fn sgemm_packed_bias(m: usize, n: usize, k: usize, a: MatRef, w: &[f32], bias: &[f32], parallel: bool) -> Vec<f32> {
    assert!(w.len() >= n.div_ceil(NR) * k * NR, "sgemm_packed_bias: the weight was packed for another shape");
    assert!(bias.len() >= n, "sgemm_packed_bias: {} bias values for {n} columns", bias.len());
    let mut c: Vec<f32> = Vec::with_capacity(m * n);
    product(m, n, k, a, Rhs::Packed(w), Out::Spare(&mut c), Start::Bias(bias), parallel);
    // SAFETY: `product` with `Start::Bias` wrote all `m × n` elements (every tile of every column
    // panel is stored at its first block of `k`; with `k = 0` the bias rows are copied).
    unsafe { c.set_len(m * n) };
    c
}

/// What each element of `c` starts from before its products are added.
#[derive(Clone, Copy)]
enum Start<'a> {
    Zero,
    /// `c`'s own value.
    Accumulate,
    /// `bias[column]`.
    Bias(&'a [f32]),
}

/// Where the product is written: an initialised slice, or the spare capacity of a new buffer
/// (written only, never read, when the start is not [`Start::Accumulate`]).
enum Out<'a> {
    Slice(&'a mut [f32]),
    Spare(&'a mut Vec<f32>),
}

/// Where the micro-kernel's `b` panels come from.
#[derive(Clone, Copy)]
enum Rhs<'a> {
    /// Packed by each column panel's task, block by block.
    Strided(MatRef<'a>),
    /// Already packed by [`pack_weight`].
    Packed(&'a [f32]),
}

#[allow(clippy::too_many_arguments)]
fn product(m: usize, n: usize, k: usize, a: MatRef, b: Rhs, out: Out, start: Start, parallel: bool) {
    assert!(available(), "gemm_avx512 on a CPU without AVX-512F");
    let c_base = match out {
        Out::Slice(c) => {
            assert!(c.len() >= m * n, "gemm output too small");
            c.as_mut_ptr()
        }
        Out::Spare(c) => {
            assert!(
                c.capacity() >= m * n && !matches!(start, Start::Accumulate),
                "gemm: a new output cannot accumulate"
            );
            c.as_mut_ptr()
        }
    };
    if m == 0 || n == 0 || k == 0 {
        for i in 0..m {
            // SAFETY: row `i` of `c` (`n` elements at `i·n`) is inside the `m × n` checked above.
            let row =
                unsafe { std::slice::from_raw_parts_mut(c_base.add(i * n) as *mut std::mem::MaybeUninit<f32>, n) };
            match start {
                Start::Zero => row.iter_mut().for_each(|v| *v = std::mem::MaybeUninit::new(0.0)),
                Start::Bias(bias) => row.iter_mut().zip(bias).for_each(|(v, &b)| *v = std::mem::MaybeUninit::new(b)),
                Start::Accumulate => {}
            }
        }
        return;
    }
    // The micro-kernel reads `a` through raw pointers: its furthest element must be inside.
    assert!((m - 1) * a.row_stride + (k - 1) * a.col_stride < a.data.len(), "gemm lhs out of bounds");
    let (row_panels, col_panels) = (m.div_ceil(MR), n.div_ceil(NR));
    // A row-major `a` is read in place (its rows are the micro-kernel's broadcast streams);
    // any other layout is packed once, block by block of `k`: `[k block][row panel][kk][MR]`.
    let direct = a.col_stride == 1;
    let mut apack = Vec::new();
    if !direct {
        apack = vec![0.0f32; row_panels * MR * k];
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let block = &mut apack[row_panels * MR * p0..][..row_panels * MR * kc];
            for (ip, panel) in block.chunks_exact_mut(kc * MR).enumerate() {
                pack_a(a, ip * MR, MR.min(m - ip * MR), p0, kc, panel);
            }
        }
    }
    let c_ptr = SharedOut(c_base);
    // One column panel of `c` per task: for each block of `k`, its `b` panel (packed here, or
    // taken from the packed weight) stays in L1 and meets every row panel of `a` in turn.
    let column_panel = |jp: usize| {
        let mut scratch = match b {
            Rhs::Strided(_) => vec![0.0f32; KC.min(k) * NR],
            Rhs::Packed(_) => Vec::new(),
        };
        let cols = NR.min(n - jp * NR);
        for p0 in (0..k).step_by(KC) {
            let kc = KC.min(k - p0);
            let bpanel: &[f32] = match b {
                Rhs::Strided(b) => {
                    pack_b(b, p0, kc, jp * NR, cols, &mut scratch[..kc * NR]);
                    &scratch[..kc * NR]
                }
                Rhs::Packed(w) => &w[jp * k * NR + p0 * NR..][..kc * NR],
            };
            // The first block of `k` starts each tile from zero, `c` or the bias; later ones add.
            let tile_start = match start {
                _ if p0 > 0 => TileStart::AddC,
                Start::Accumulate => TileStart::AddC,
                Start::Zero => TileStart::Store,
                Start::Bias(bias) => TileStart::AddRow(bias[jp * NR..].as_ptr()),
            };
            for ip in 0..row_panels {
                let rows = MR.min(m - ip * MR);
                let out = c_ptr.at(ip * MR * n + jp * NR);
                // SAFETY: AVX-512F was checked; every `a` row pointer reads `kc` floats inside
                // `a` (rows past `m` repeat the last one: their sums are never stored) or inside
                // its packed panel; the `b` panel holds `kc × NR`; the tile (`rows × cols` at row
                // `ip·MR`, column `jp·NR`, row stride `n`) lies inside `c` (at least `m × n`), and
                // no other task writes these columns.
                unsafe {
                    if direct {
                        let rows_at: [*const f32; MR] =
                            std::array::from_fn(|i| a.data[(ip * MR + i.min(rows - 1)) * a.row_stride + p0..].as_ptr());
                        imp::tile::<1>(kc, rows_at, bpanel.as_ptr(), out, n, rows, cols, tile_start)
                    } else {
                        let panel = &apack[row_panels * MR * p0 + ip * kc * MR..];
                        let rows_at: [*const f32; MR] = std::array::from_fn(|i| panel[i..].as_ptr());
                        imp::tile::<MR>(kc, rows_at, bpanel.as_ptr(), out, n, rows, cols, tile_start)
                    }
                };
            }
        }
    };
    if parallel {
        (0..col_panels).into_par_iter().for_each(column_panel);
    } else {
        (0..col_panels).for_each(column_panel);
    }
}

/// `c`'s base pointer, shared by the tasks that write its disjoint column panels.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: the tasks write disjoint elements of `c`, which `sgemm` borrows mutably for the whole
// product.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// `b[p0..p0 + kc, j0..j0 + cols]` as one panel `[kc][NR]`, zeros past `cols`.
fn pack_b(b: MatRef, p0: usize, kc: usize, j0: usize, cols: usize, panel: &mut [f32]) {
    if b.row_stride == 1 {
        // Column-contiguous `b` (a transposed weight `Wᵀ`): 16 × 16 blocks, each column's run
        // loaded as one register and the block transposed in registers (a scalar copy with
        // strided stores took a fifth of the encoder's time).
        assert!(panel.len() >= kc * NR);
        for g in 0..NR / 16 {
            let group_cols = cols.saturating_sub(16 * g).min(16);
            let columns: [&[f32]; 16] = std::array::from_fn(|t| {
                if t < group_cols {
                    &b.data[(j0 + 16 * g + t) * b.col_stride + p0..][..kc]
                } else {
                    &[]
                }
            });
            // SAFETY: AVX-512F was checked by `product` or `pack_weight`; each column slice
            // holds `kc` floats (or none: read as zeros), and `panel` holds `kc × NR`.
            unsafe { imp::transpose_into(&columns, kc, &mut panel[16 * g..]) };
        }
    } else {
        for (kk, row) in panel.chunks_exact_mut(NR).take(kc).enumerate() {
            let base = (p0 + kk) * b.row_stride + j0 * b.col_stride;
            if b.col_stride == 1 {
                // Row-contiguous `b` (an attention block's values): one copy per row.
                row[..cols].copy_from_slice(&b.data[base..base + cols]);
            } else {
                for (j, v) in row[..cols].iter_mut().enumerate() {
                    *v = b.data[base + j * b.col_stride];
                }
            }
            row[cols..].fill(0.0);
        }
    }
}

/// `a[i0..i0 + rows, p0..p0 + kc]` as `[kc][MR]`, zeros in the rows past `rows`.
fn pack_a(a: MatRef, i0: usize, rows: usize, p0: usize, kc: usize, out: &mut [f32]) {
    for i in 0..MR {
        if i < rows {
            let base = (i0 + i) * a.row_stride + p0 * a.col_stride;
            for kk in 0..kc {
                out[kk * MR + i] = a.data[base + kk * a.col_stride];
            }
        } else {
            for kk in 0..kc {
                out[kk * MR + i] = 0.0;
            }
        }
    }
}

/// What a tile's sums are added to before they are stored.
#[derive(Clone, Copy)]
enum TileStart {
    /// Nothing: `c` is overwritten (and never read).
    Store,
    /// `c`'s current values.
    AddC,
    /// A row of `cols` values (the bias), the same for every row of the tile.
    AddRow(*const f32),
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::{TileStart, MR, NR};
    use std::arch::x86_64::*;

    /// The `rows × cols` tile of `c` at `c` (row stride `ldc`) `= a·b (+ the start)`: `a`'s row
    /// `i` is read at `a[i] + kk·KS` (`KS = 1` in place, `MR` packed), `b` is packed `[kc][NR]`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const KS: usize>(
        kc: usize,
        a: [*const f32; MR],
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        rows: usize,
        cols: usize,
        start: TileStart,
    ) {
        const NV: usize = NR / 16;
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for kk in 0..kc {
            let bv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(b.add(kk * NR + 16 * v)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let ai = _mm512_set1_ps(*a[i].add(kk * KS));
                for v in 0..NV {
                    acc[v] = _mm512_fmadd_ps(ai, bv[v], acc[v]);
                }
            }
        }
        let masks: [__mmask16; NV] = std::array::from_fn(|v| {
            let n = cols.saturating_sub(16 * v).min(16);
            ((1u32 << n) - 1) as __mmask16
        });
        let mut bias = [_mm512_setzero_ps(); NV];
        if let TileStart::AddRow(b) = start {
            for v in 0..NV {
                bias[v] = _mm512_maskz_loadu_ps(masks[v], b.add(16 * v));
            }
        }
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let row = c.add(i * ldc);
            for v in 0..NV {
                let out = match start {
                    TileStart::Store => acc[v],
                    TileStart::AddC => _mm512_add_ps(acc[v], _mm512_maskz_loadu_ps(masks[v], row.add(16 * v))),
                    TileStart::AddRow(_) => _mm512_add_ps(acc[v], bias[v]),
                };
                _mm512_mask_storeu_ps(row.add(16 * v), masks[v], out);
            }
        }
    }

    /// `panel[kk·NR + t] = columns[t][kk]` for `kk < kc`, `t < 16` (an empty column reads as
    /// zeros): 16 × 16 blocks transposed in registers.
    // Plain loops, no closures: a closure (`array::from_fn`'s) is a function of its own that does
    // not inherit `target_feature`, so its intrinsics became calls (seen in `perf`: the
    // transposes ran as out-of-line `_mm512_shuffle_f32x4` calls).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn transpose_into(columns: &[&[f32]; 16], kc: usize, panel: &mut [f32]) {
        debug_assert!(panel.len() >= (kc.max(1) - 1) * NR + 16);
        for kk0 in (0..kc).step_by(16) {
            let rem = (kc - kk0).min(16);
            let mask = ((1u32 << rem) - 1) as __mmask16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (t, col) in columns.iter().enumerate() {
                if !col.is_empty() {
                    r[t] = _mm512_maskz_loadu_ps(mask, col.as_ptr().add(kk0));
                }
            }
            let out = transpose16(&r);
            for (c, v) in out.iter().enumerate().take(rem) {
                _mm512_storeu_ps(panel.as_mut_ptr().add((kk0 + c) * NR), *v);
            }
        }
    }

    /// The transpose of 16 rows of 16 floats: `out[c][t] = r[t][c]`. Unpacks of 32- then
    /// 64-bit pairs gather each column's values four rows at a time within 128-bit lanes;
    /// two rounds of lane shuffles put the four groups in row order.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transpose16(r: &[__m512; 16]) -> [__m512; 16] {
        // t[2p] holds elements 4L, 4L+1 of rows 2p, 2p+1 in lane L; t[2p+1] elements 4L+2, 4L+3.
        let mut t = [_mm512_setzero_ps(); 16];
        for p in 0..8 {
            t[2 * p] = _mm512_unpacklo_ps(r[2 * p], r[2 * p + 1]);
            t[2 * p + 1] = _mm512_unpackhi_ps(r[2 * p], r[2 * p + 1]);
        }
        // u[4q + s] holds, in lane L, element 4L + s of rows 4q..4q+4.
        let mut u = [_mm512_setzero_ps(); 16];
        for q in 0..4 {
            for half in 0..2 {
                let a = _mm512_castps_pd(t[4 * q + half]);
                let b = _mm512_castps_pd(t[4 * q + 2 + half]);
                u[4 * q + 2 * half] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
                u[4 * q + 2 * half + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
            }
        }
        // out[4L + s] = [u[s].L, u[4 + s].L, u[8 + s].L, u[12 + s].L]: lanes 0, 1 of each
        // pair of sources, then lanes 2, 3.
        let mut out = [_mm512_setzero_ps(); 16];
        for s in 0..4 {
            let lo01 = _mm512_shuffle_f32x4(u[s], u[4 + s], 0x44);
            let hi01 = _mm512_shuffle_f32x4(u[8 + s], u[12 + s], 0x44);
            let lo23 = _mm512_shuffle_f32x4(u[s], u[4 + s], 0xEE);
            let hi23 = _mm512_shuffle_f32x4(u[8 + s], u[12 + s], 0xEE);
            out[s] = _mm512_shuffle_f32x4(lo01, hi01, 0x88);
            out[4 + s] = _mm512_shuffle_f32x4(lo01, hi01, 0xDD);
            out[8 + s] = _mm512_shuffle_f32x4(lo23, hi23, 0x88);
            out[12 + s] = _mm512_shuffle_f32x4(lo23, hi23, 0xDD);
        }
        out
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod imp {
    use super::TileStart;
    pub unsafe fn transpose_into(_: &[&[f32]; 16], _: usize, _: &mut [f32]) {
        unreachable!("gemm_avx512 is only used where AVX-512F was detected")
    }
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn tile<const KS: usize>(
        _: usize,
        _: [*const f32; super::MR],
        _: *const f32,
        _: *mut f32,
        _: usize,
        _: usize,
        _: usize,
        _: TileStart,
    ) {
        unreachable!("gemm_avx512 is only used where AVX-512F was detected")
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm::{lcg, sgemm_reference};
    use super::*;

    /// A weight packed once gives the per-call product bit for bit, at shapes with partial
    /// column panels and several blocks of `k`, serial and parallel.
    #[test]
    fn a_packed_weight_gives_the_per_call_product_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512F on this CPU (or SAGE_GEMM=crate): the packed weights are not tested here");
            return;
        }
        for &(m, n, k) in &[(1, 5, 3), (7, 70, 2 * KC + 5), (130, 384, 384), (13, NR, KC)] {
            let x = lcg(m * k, 4);
            let w = lcg(n * k, 5);
            let packed = pack_weight(&w, n, k);
            for (accumulate, parallel) in [(false, false), (true, true)] {
                let start = lcg(m * n, 6);
                let mut want = start.clone();
                sgemm(m, n, k, MatRef::rows(&x, k), MatRef::transposed(&w, k), &mut want, accumulate, parallel);
                let mut got = start.clone();
                sgemm_packed(m, n, k, MatRef::rows(&x, k), &packed, &mut got, accumulate, parallel);
                assert_eq!(got, want, "{m}x{n}x{k} accumulate {accumulate}");
            }
        }
    }

    /// A bias as the start of the sums gives what a bias written into `c` and then accumulated
    /// gives, bit for bit: partial column panels, several blocks of `k`, `k = 0`, serial and
    /// parallel.
    #[test]
    fn a_bias_start_equals_a_bias_filled_output_accumulated() {
        if !available() {
            eprintln!("no AVX-512F on this CPU (or SAGE_GEMM=crate): the bias start is not tested here");
            return;
        }
        for &(m, n, k) in &[(1, 5, 3), (7, 70, 2 * KC + 5), (130, 384, 384), (13, NR, KC), (4, 9, 0)] {
            let x = lcg(m * k, 4);
            let w = lcg(n * k, 5);
            let bias = lcg(n, 6);
            let packed = pack_weight(&w, n, k);
            let mut want: Vec<f32> = (0..m).flat_map(|_| bias.iter().copied()).collect();
            sgemm_packed(m, n, k, MatRef::rows(&x, k), &packed, &mut want, true, false);
            for parallel in [false, true] {
                let got = sgemm_packed_bias(m, n, k, MatRef::rows(&x, k), &packed, &bias, parallel);
                assert_eq!(got, want, "{m}x{n}x{k} parallel {parallel}");
            }
        }
    }

    /// Every layout the model code passes (`a` row-major or transposed, `b` row-major or a
    /// transposed weight), edge tiles in both directions, `k` across several blocks, with and
    /// without accumulation, serial and parallel (bit-equal to each other), against the f64
    /// triple loop (skipped, and said so, on a CPU without AVX-512F).
    #[test]
    fn avx512_gemm_matches_the_reference_on_every_layout_and_edge() {
        if !available() {
            eprintln!("no AVX-512F on this CPU (or SAGE_GEMM=crate): the AVX-512 GEMM is not tested here");
            return;
        }
        for &(m, n, k) in
            &[(8, 32, 16), (9, 33, 17), (257, 384, 384), (31, 70, 2 * KC + 5), (100, 257, 64), (64, 1025, 64)]
        {
            let a = lcg(m * k, 1);
            let b = lcg(k * n, 2);
            let layouts: [(MatRef, MatRef); 4] = [
                (MatRef::rows(&a, k), MatRef::rows(&b, n)),
                (MatRef::rows(&a, k), MatRef::transposed(&b, k)),
                (MatRef::transposed(&a, m), MatRef::rows(&b, n)),
                (MatRef::transposed(&a, m), MatRef::transposed(&b, k)),
            ];
            for (l, (ar, br)) in layouts.into_iter().enumerate() {
                for accumulate in [false, true] {
                    let start = lcg(m * n, 3);
                    let mut want = start.clone();
                    sgemm_reference(m, n, k, ar, br, &mut want, accumulate);
                    let mut serial = start.clone();
                    sgemm(m, n, k, ar, br, &mut serial, accumulate, false);
                    let mut parallel = start.clone();
                    sgemm(m, n, k, ar, br, &mut parallel, accumulate, true);
                    assert_eq!(serial, parallel, "{m}x{n}x{k} layout {l}: threads changed the sums");
                    for (idx, (x, y)) in serial.iter().zip(&want).enumerate() {
                        assert!(
                            (x - y).abs() < 1e-4 * (1.0 + y.abs()),
                            "{m}x{n}x{k} layout {l} accumulate {accumulate} [{idx}]: {x} vs {y}"
                        );
                    }
                }
            }
        }
    }
}
