//! `exp` and `erf` in f32 that vectorize, and the slice loops and sums that use them.
//!
//! libm's `expf` and `erf` are calls the compiler cannot widen: in a DINOv2 forward on the
//! two-core machine (`perf` of `sage bench encoder --sizes 448`) the softmax's `expf` took 7 % of
//! the time and GELU's `erf` 12 %, one element per call. Written as straight-line polynomials with
//! a select instead of a branch, both become eight-lane AVX2 code (sixteen-lane on AVX-512F)
//! inside a loop compiled for it.
//!
//! Accuracy (tested against f64 over a dense grid): `exp` within 2 ulp on its whole range;
//! `erf` within 2 ulp. Both are rounded differently from libm, so a result can move in its last
//! bit; nothing here is used where bit-equality with another engine is asserted.

/// Below this `eˣ` is 0 in f32 (`2ⁿ` leaves the normal range).
const EXP_LO: f32 = -87.33654;

/// `eˣ` for f32: `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2` (ln 2 split in two for an exact
/// reduction), a degree-7 polynomial for `eʳ` (Cephes' `expf` coefficients), `2ⁿ` built in the
/// exponent bits. Below −87.3 (where `2ⁿ` leaves the normal range) the result is 0, above 88.7
/// it is +∞; NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.72283;
    let (er, k) = exp_parts(x.clamp(EXP_LO, HI));
    // 2ⁿ built as 2^⌊n/2⌋·2^⌈n/2⌉ so that n = 128 (reached just below the clamp) keeps both
    // exponent fields in range.
    let (k1, k2) = (k >> 1, k - (k >> 1));
    let s1 = f32::from_bits(((k1 + 127) << 23) as u32);
    let s2 = f32::from_bits(((k2 + 127) << 23) as u32);
    let y = er * s1 * s2;
    // NaN passes through the clamp and the polynomial as NaN.
    if x < EXP_LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `eˣ` for the shifted scores of a softmax (`x ≤ 0`, up to the rounding residue of the row's
/// maximum above): [`exp`] without its overflow select and with `2ⁿ` as one factor, which
/// `n ≤ 1` keeps in range — bit-identical to [`exp`] below `1.5·ln 2` (tested). Inputs are
/// clamped to `[−87.3, 1.5·ln 2]`, so a larger `x` (never a softmax's: its residue stays below
/// half an ulp of the maximum) gives `e^{1.5·ln 2}`, not `eˣ`.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const HI: f32 = 1.039_720_8; // 1.5·ln 2: n ≤ 1 after rounding
    let (er, k) = exp_parts(x.clamp(EXP_LO, HI));
    // n ∈ [−126, 1]: 2ⁿ is a normal number.
    let y = er * f32::from_bits(((k + 127) << 23) as u32);
    if x < EXP_LO {
        0.0
    } else {
        y
    }
}

/// `(eʳ, n)` with `c = n·ln 2 + r` for a clamped `c`: the reduction and polynomial of [`exp`].
#[inline(always)]
fn exp_parts(c: f32) -> (f32, i32) {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let n = (c * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, c));
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = (p * r).mul_add(r, r) + 1.0;
    // n ∈ [−126, 128] read as an integer by the 1.5·2²³ trick (exact for |n| < 2²²; `as i32`
    // would saturate NaN and so not vectorize).
    (er, (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000)
}

/// The error function for f32 (a faithfully rounded minimax pair: an odd polynomial below
/// |x| = 0.9277, `1 − e^{poly}` above), both halves evaluated and one selected so the loop stays
/// branch-free.
#[inline(always)]
pub fn erf(a: f32) -> f32 {
    let t = a.abs();
    let s = a * a;
    // |x| > 0.927734375: erf = 1 − exp(p(t)).
    let mut r = (-1.728_534_7e-5f32).mul_add(t, 3.831_971_3e-4);
    let u = (-3.883_964_4e-3f32).mul_add(t, 2.425_462_2e-2);
    r = r.mul_add(s, u);
    r = r.mul_add(t, -1.067_778_8e-1);
    r = r.mul_add(t, -6.348_467e-1);
    r = r.mul_add(t, -1.287_175_1e-1);
    r = r.mul_add(t, -t);
    let big = (1.0 - exp(r)).copysign(a);
    // Below: erf = a + a·q(a²).
    let mut q = -5.967_617e-4f32;
    q = q.mul_add(s, 4.991_194_2e-3);
    q = q.mul_add(s, -2.676_813_5e-2);
    q = q.mul_add(s, 1.128_199_3e-1);
    q = q.mul_add(s, -3.761_253_4e-1);
    q = q.mul_add(s, 1.283_791_7e-1);
    let small = q.mul_add(a, a);
    if t > 0.927_734_4 {
        big
    } else {
        small
    }
}

/// `y[i] = f(x[i])`, compiled for AVX-512F (sixteen lanes) or AVX2 + FMA (eight) where the CPU
/// has them, else for the baseline target; the same results on each (per-element arithmetic with
/// fused multiply-adds).
#[inline(always)]
pub fn map(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F and FMA (checked above).
        return unsafe { map_avx512(y, x, f) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { map_avx2(y, x, f) };
    }
    y.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
}

/// The numerators of a softmax of `scale·row` (`scale > 0`), in place: `row[i] = e^{scale·row[i]
/// − m}` with `m = max(scale·row)`; returns `(m, Σ)`. The caller divides where it is cheapest (the
/// fusion attention divides its output rows, `head_dim` wide, not these `keys`-wide rows, and so
/// saves a pass over the largest buffer it has; `activation::softmax_` divides the row). An empty or all −∞ row becomes zeros, `(−∞, 0)`.
pub fn softmax_numerators_(row: &mut [f32], scale: f32) -> (f32, f32) {
    debug_assert!(scale > 0.0, "softmax_numerators_ takes a positive scale");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F and FMA (checked above).
        return unsafe { softmax_numerators_avx512(row, scale) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked above).
        return unsafe { softmax_numerators_avx2(row, scale) };
    }
    softmax_numerators_generic(row, scale)
}

#[inline(always)]
fn softmax_numerators_generic(row: &mut [f32], scale: f32) -> (f32, f32) {
    let m = max(row) * scale;
    if row.is_empty() || m == f32::NEG_INFINITY {
        row.fill(0.0);
        return (f32::NEG_INFINITY, 0.0);
    }
    (m, exp_sum(row, scale, m))
}

/// `row[i] = e^{scale·row[i] − m}`, returning the sum. Two loops over the row (it is in L1 by
/// then): one loop with the sum in it was not vectorized (the compiler's straight-line vectorizer
/// keeps `exp`'s range selects as branches; the loop vectorizer turns them into blends).
#[inline(always)]
fn exp_sum(row: &mut [f32], scale: f32, m: f32) -> f32 {
    row.iter_mut().for_each(|v| *v = exp_nonpositive(scale.mul_add(*v, -m)));
    sum(row)
}

/// The maximum of a slice (−∞ when empty), in eight lanes.
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for i in 0..8 {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    lanes.iter().copied().fold(tail, f32::max)
}

/// `Σ x[i]` in eight lanes.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    lanes_sum(x, |v| v)
}

/// `Σ (x[i] − mean)²` in eight lanes.
#[inline(always)]
pub fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    lanes_sum(x, |v| (v - mean) * (v - mean))
}

#[inline(always)]
fn lanes_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for i in 0..8 {
            lanes[i] += f(c[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Whether the CPU has AVX-512F (and FMA): the loops below are then compiled for 16 lanes.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn map_avx512(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32) {
    y.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn softmax_numerators_avx512(row: &mut [f32], scale: f32) -> (f32, f32) {
    softmax_numerators_generic(row, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn map_avx2(y: &mut [f32], x: &[f32], f: impl Fn(f32) -> f32) {
    y.iter_mut().zip(x).for_each(|(o, &v)| *o = f(v));
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_numerators_avx2(row: &mut [f32], scale: f32) -> (f32, f32) {
    softmax_numerators_generic(row, scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in units in the last place of `want` (f32).
    fn ulps(got: f32, want: f64) -> f64 {
        let w = want as f32;
        let ulp = (f32::from_bits(w.abs().to_bits() + 1) - w.abs()) as f64;
        (got as f64 - want).abs() / ulp
    }

    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        (0..=n).map(|i| lo + (hi - lo) * i as f32 / n as f32).collect()
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_on_its_range() {
        let xs = grid(-87.0, 88.5, 400_000);
        let mut y = vec![0.0; xs.len()];
        map(&mut y, &xs, exp);
        let worst = xs.iter().zip(&y).map(|(&x, &e)| ulps(e, (x as f64).exp())).fold(0.0, f64::max);
        assert!(worst <= 2.0, "worst {worst} ulp");
        // The scalar path (no AVX2 loop) agrees with the vector one.
        for (&x, &e) in xs.iter().zip(&y).step_by(997) {
            assert_eq!(exp(x).to_bits(), e.to_bits(), "exp({x})");
        }
    }

    /// The softmax's exponential is [`exp`] bit for bit on `x ≤ 0` (down to where both give 0),
    /// and above 0 up to its clamp (beyond any rounding residue a row's maximum can leave).
    #[test]
    fn exp_nonpositive_is_exp_bit_for_bit_below_zero() {
        let mut xs = grid(-90.0, 0.0, 400_000);
        xs.extend(grid(0.0, 1.0397, 10_000));
        xs.extend([-0.0, 1e-7, 3e-7, f32::MIN_POSITIVE, -87.33654, -87.3366, f32::NEG_INFINITY]);
        for &x in &xs {
            assert_eq!(exp_nonpositive(x).to_bits(), exp(x).to_bits(), "x = {x}");
        }
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(ulps(exp(88.7), 88.7f32 as f64).is_finite());
        assert!(ulps(exp(88.7), (88.7f32 as f64).exp()) <= 2.0);
        assert!(ulps(exp(-87.3), (-87.3f32 as f64).exp()) <= 2.0);
    }

    #[test]
    fn erf_is_within_two_ulp_of_f64() {
        let xs = grid(-6.0, 6.0, 400_000);
        let mut y = vec![0.0; xs.len()];
        map(&mut y, &xs, erf);
        let worst = xs.iter().zip(&y).map(|(&x, &e)| ulps(e, libm::erf(x as f64))).fold(0.0, f64::max);
        assert!(worst <= 2.0, "worst {worst} ulp");
        // Tiny arguments keep their relative accuracy (erf x ≈ 2x/√π).
        for x in [1e-30f32, -3e-10, 1e-5] {
            assert!(ulps(erf(x), libm::erf(x as f64)) <= 2.0, "erf({x})");
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
    }

    #[test]
    fn softmax_numerators_match_f64() {
        let row: Vec<f32> = (0..77).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.9).collect();
        let scale = 0.125;
        let mut got = row.clone();
        let (m, z) = softmax_numerators_(&mut got, scale);
        let m64 = row.iter().map(|&x| (x * scale) as f64).fold(f64::NEG_INFINITY, f64::max);
        let z64: f64 = row.iter().map(|&x| ((x * scale) as f64 - m64).exp()).sum();
        assert_eq!(m as f64, m64);
        assert!((z as f64 - z64).abs() < 1e-5 * z64, "sum {z} vs {z64}");
        for (&x, &e) in row.iter().zip(&got) {
            let want = ((x * scale) as f64 - m64).exp();
            assert!((e as f64 - want).abs() < 3e-7 * want.max(1e-30), "{e} vs {want}");
        }
        let mut empty: Vec<f32> = vec![];
        assert_eq!(softmax_numerators_(&mut empty, 1.0), (f32::NEG_INFINITY, 0.0));
        let mut masked = vec![f32::NEG_INFINITY; 3];
        assert_eq!(softmax_numerators_(&mut masked, 1.0), (f32::NEG_INFINITY, 0.0));
        assert_eq!(masked, vec![0.0; 3]);
    }

    #[test]
    fn max_and_sums_in_lanes() {
        for n in [0usize, 1, 7, 8, 9, 64, 77] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max), "n {n}");
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(&x) as f64 - want).abs() < 1e-5, "n {n}");
            let dev: f64 = x.iter().map(|&v| (v as f64 - 0.25) * (v as f64 - 0.25)).sum();
            assert!((sum_sq_dev(&x, 0.25) as f64 - dev).abs() < 1e-4, "n {n}");
        }
    }
}
