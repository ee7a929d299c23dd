//! The dot products of [`super::dot`] on AVX2: each block's weights are unpacked to one byte per
//! value (unsigned), multiplied by the int8 activations with `maddubs` (u8 × i8 pairs summed to
//! i16, no saturation for values < 64) and widened with `madd` (by one, or by a sub-block's
//! scale), then scaled once per block in f32. Offsets (`q − 8`, `q − 16`, `q − 32`) and the
//! K-quants' mins are applied once per block from the activations' precomputed sums.
//!
//! On CPUs with AVX-512 VNNI (and VL) the 32-block types run a second build of the same kernels
//! in which `vpdpbusd` sums four u8 × i8 products into i32 in one instruction, where AVX2 needs
//! `maddubs` then `madd` by one: the integer sums are the same (no i16 step saturates here), so
//! the two builds agree bit for bit. The K-quants keep the AVX2 build on every CPU: their `madd`
//! multiplies by a sub-block's scale, which `vpdpbusd` cannot fold in.
//!
//! Every kernel is written once, generic over `N`, the rows of activations one weight row meets
//! per pass: `N = 1` is the decode step's dot product, `N = `[`ROWS`] the batched one, where a
//! block's unpacking, scales and mins are paid once for all `N` rows instead of once per row.

use super::act::{Q8, Q8K};
use super::blocks::QType;
use super::dot::{DotQ8, DotQ8K, DotRows};

/// Whether this CPU runs these kernels (AVX2, FMA and F16C, checked at run time).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this CPU also runs the VNNI build of the 32-block kernels (AVX-512 VNNI and VL on
/// top of [`available`]).
pub fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        available() && is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The kernels of a 32-block type, for one row and for [`super::dot::ROWS`] rows of
/// activations: the VNNI build with `vnni` (`None` when this CPU lacks AVX-512 VNNI), else the
/// AVX2 one (`None` when this CPU lacks AVX2); `None` for a K-quant.
pub fn q8_kernels(ty: QType, vnni: bool) -> Option<(DotQ8, DotRows<Q8>)> {
    let runs_here = if vnni { vnni_available() } else { available() };
    if !runs_here {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(match (ty, vnni) {
            (QType::Q4_0, false) => (imp::q4_0, imp::q4_0_x4),
            (QType::Q4_1, false) => (imp::q4_1, imp::q4_1_x4),
            (QType::Q5_0, false) => (imp::q5_0, imp::q5_0_x4),
            (QType::Q5_1, false) => (imp::q5_1, imp::q5_1_x4),
            (QType::Q8_0, false) => (imp::q8_0, imp::q8_0_x4),
            (QType::Q4_0, true) => (imp::q4_0_vnni, imp::q4_0_vnni_x4),
            (QType::Q4_1, true) => (imp::q4_1_vnni, imp::q4_1_vnni_x4),
            (QType::Q5_0, true) => (imp::q5_0_vnni, imp::q5_0_vnni_x4),
            (QType::Q5_1, true) => (imp::q5_1_vnni, imp::q5_1_vnni_x4),
            (QType::Q8_0, true) => (imp::q8_0_vnni, imp::q8_0_vnni_x4),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The AVX2 kernels of a K-quant, for one row and for `ROWS` rows of activations; `None` when
/// this CPU lacks AVX2 (or for a 32-block type).
pub fn q8k_kernels(ty: QType) -> Option<(DotQ8K, DotRows<Q8K>)> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(match ty {
            QType::Q4K => (imp::q4_k, imp::q4_k_x4),
            QType::Q5K => (imp::q5_k, imp::q5_k_x4),
            QType::Q6K => (imp::q6_k, imp::q6_k_x4),
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::super::act::{Q8, Q8K};
    use super::super::blocks::{k_scale_min, QType};
    use super::super::dot::ROWS;
    use std::arch::x86_64::*;

    // The safe entry points, one row and `ROWS` rows per type: `q8_kernels` / `q8k_kernels` hand
    // them out only after `available()` confirmed AVX2, FMA and F16C (and `vnni_available()`
    // AVX-512 VNNI and VL for the `_vnni` ones), so the target-feature functions they call may run.
    macro_rules! entry {
        ($one:ident, $many:ident, $inner:ident, $act:ty) => {
            pub fn $one(w: &[u8], a: &[$act]) -> f32 {
                // SAFETY: see above; every block index is below the blocks in `w` and in `a`.
                let [y] = unsafe { $inner::<1>(w, [a]) };
                y
            }
            pub fn $many(w: &[u8], a: [&[$act]; ROWS]) -> [f32; ROWS] {
                // SAFETY: as above, with the shortest of the activation rows.
                unsafe { $inner::<ROWS>(w, a) }
            }
        };
    }
    entry!(q4_0, q4_0_x4, q4_0_avx2, Q8);
    entry!(q4_1, q4_1_x4, q4_1_avx2, Q8);
    entry!(q5_0, q5_0_x4, q5_0_avx2, Q8);
    entry!(q5_1, q5_1_x4, q5_1_avx2, Q8);
    entry!(q8_0, q8_0_x4, q8_0_avx2, Q8);
    entry!(q4_0_vnni, q4_0_vnni_x4, q4_0_avx512vnni, Q8);
    entry!(q4_1_vnni, q4_1_vnni_x4, q4_1_avx512vnni, Q8);
    entry!(q5_0_vnni, q5_0_vnni_x4, q5_0_avx512vnni, Q8);
    entry!(q5_1_vnni, q5_1_vnni_x4, q5_1_avx512vnni, Q8);
    entry!(q8_0_vnni, q8_0_vnni_x4, q8_0_avx512vnni, Q8);
    entry!(q4_k, q4_k_x4, q4_k_avx2, Q8K);
    entry!(q5_k, q5_k_x4, q5_k_avx2, Q8K);
    entry!(q6_k, q6_k_x4, q6_k_avx2, Q8K);

    /// How far ahead of the block it reads a kernel asks for the weight bytes. Decode streams
    /// every weight from memory once per token, and on the AVX-512 Xeon of 2026-12-05 the
    /// kernels stalled on their weight loads (`perf annotate`: the instruction after each load
    /// held half the samples) at a third of the machine's read bandwidth. Asking a page ahead
    /// took `sage bench infer` batch-1 decode from 65.3 to 113.8 tokens/s (SmolLM2) and from
    /// 17.6 to 33.0 (Qwen2.5-0.5B) on two threads (benches/results/infer-20261205T033908Z and
    /// …075214Z); in the tuning runs 2 and 8 KiB did as well as 4 within the noise, 1 KiB less,
    /// 256 bytes much less. Past a row's end the lines are the next rows', which the same task
    /// reads next.
    const PREFETCH_AHEAD: usize = 4096;

    /// Asks for the cache lines of `w[at + PREFETCH_AHEAD..][..len]` (a hint: an address past
    /// the end of `w` is not read and cannot fault).
    #[inline(always)]
    unsafe fn prefetch_ahead(w: &[u8], at: usize, len: usize) {
        // A `while`, not `step_by`: its iterator was not inlined into the kernels, and the call
        // spilled their accumulators (batch-16 decode lost a third).
        let p = w.as_ptr().wrapping_add(at + PREFETCH_AHEAD);
        let mut off = 0;
        while off < len {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off) as *const i8);
            off += 64;
        }
    }

    #[inline(always)]
    unsafe fn f16_at(b: &[u8], i: usize) -> f32 {
        let bits = u16::from_le_bytes([b[i], b[i + 1]]);
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `hsum(acc[r]) + extra[r]` for each row. A loop, not `array::from_fn` or `map`: a closure
    /// does not inherit its caller's `#[target_feature]`, and `perf` showed the reductions in it
    /// as out-of-line calls (a fifth of batch-16 decode).
    #[inline(always)]
    unsafe fn hsums<const N: usize>(acc: [__m256; N], extra: [f32; N]) -> [f32; N] {
        let mut out = [0f32; N];
        for r in 0..N {
            out[r] = hsum(acc[r]) + extra[r];
        }
        out
    }

    /// Eight i32 sums of `u[i]·s[i]` (u8 × i8) over groups of four bytes: one `vpdpbusd` with
    /// `VNNI` (only inside an `avx512vnni,avx512vl` function), else `maddubs` and `madd` by one.
    #[inline(always)]
    unsafe fn dot_u8_i8<const VNNI: bool>(u: __m256i, s: __m256i) -> __m256i {
        if VNNI {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        } else {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// The blocks every row has: the weight row's, or fewer if an activation row is shorter.
    #[inline(always)]
    fn blocks<A, const N: usize>(w: &[u8], block_bytes: usize, a: &[&[A]; N]) -> usize {
        a.iter().fold(w.len() / block_bytes, |n, a| n.min(a.len()))
    }

    /// The 32 nibbles of 16 bytes in element order: low nibbles (elements 0..16) in the low lane,
    /// high nibbles (16..32) in the high lane.
    #[inline(always)]
    unsafe fn nibbles(qs: &[u8]) -> __m256i {
        let x = _mm_loadu_si128(qs[..16].as_ptr() as *const __m128i);
        let v = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
        _mm256_and_si256(v, _mm256_set1_epi8(0x0F))
    }

    /// Byte `j` is 0xFF where bit `j` of `qh` is set, else 0.
    #[inline(always)]
    unsafe fn bits(qh: u32) -> __m256i {
        let shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
        let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(qh as i32), shuf);
        let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
        _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
    }

    /// A Q5 block's 32 five-bit values.
    #[inline(always)]
    unsafe fn five_bit(b: &[u8], qh_at: usize) -> __m256i {
        let qh = u32::from_le_bytes(b[qh_at..qh_at + 4].try_into().unwrap());
        let high = _mm256_and_si256(bits(qh), _mm256_set1_epi8(0x10));
        _mm256_or_si256(nibbles(&b[qh_at + 4..qh_at + 20]), high)
    }

    /// One 32-block of a Q4_0, Q4_1, Q5_0 or Q5_1 row against `N` rows: the values are unpacked
    /// once, then each row adds `dw·da·Σq·a` to its accumulator and the offset (`q − 8`,
    /// `q − 16`) or the min (`m·Σx = m·(da·Σa)`) to its `extra`. `ty` is a constant at each
    /// call, so the branches fold away.
    #[inline(always)]
    unsafe fn block32<const N: usize, const VNNI: bool>(
        b: &[u8],
        a: &[&[Q8]; N],
        j: usize,
        ty: QType,
        acc: &mut [__m256; N],
        extra: &mut [f32; N],
    ) {
        let dw = f16_at(b, 0);
        let values = match ty {
            QType::Q4_0 => nibbles(&b[2..18]),
            QType::Q4_1 => nibbles(&b[4..20]),
            QType::Q5_0 => five_bit(b, 2),
            _ => five_bit(b, 4),
        };
        let offset = match ty {
            QType::Q4_0 => -8.0 * dw,
            QType::Q5_0 => -16.0 * dw,
            _ => f16_at(b, 2),
        };
        for r in 0..N {
            let x = a[r].get_unchecked(j);
            let s = dot_u8_i8::<VNNI>(values, load(x.qs.as_ptr() as *const u8));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), _mm256_cvtepi32_ps(s), acc[r]);
            extra[r] += offset * x.s;
        }
    }

    /// The 32-block types against `N` rows. At `N = 1` two blocks per iteration go to two
    /// accumulators (named ones: an indexed pair would live on the stack), so that one block's
    /// `fmadd` need not wait for the previous one's; at `N = 4` the rows give that independence.
    #[inline(always)]
    unsafe fn blocks32<const N: usize, const VNNI: bool>(w: &[u8], a: [&[Q8]; N], ty: QType) -> [f32; N] {
        let bb = ty.block_bytes();
        let n = blocks(w, bb, &a);
        let block = |j: usize| w.get_unchecked(j * bb..(j + 1) * bb);
        let (mut acc0, mut acc1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let (mut extra0, mut extra1) = ([0f32; N], [0f32; N]);
        let mut j = 0;
        if N == 1 {
            while j + 1 < n {
                prefetch_ahead(w, j * bb, 2 * bb);
                block32::<N, VNNI>(block(j), &a, j, ty, &mut acc0, &mut extra0);
                block32::<N, VNNI>(block(j + 1), &a, j + 1, ty, &mut acc1, &mut extra1);
                j += 2;
            }
        }
        for j in j..n {
            prefetch_ahead(w, j * bb, bb);
            block32::<N, VNNI>(block(j), &a, j, ty, &mut acc0, &mut extra0);
        }
        // This order of the sums, as before the loop replaced a closure: a model's outputs stay
        // bit for bit what they were (adding `extra1` to `extra0` first moved the perplexity of
        // `sage bench infer`'s 128-token text by ±1.2 %: the int8 activations make the decode
        // sensitive to the last bit).
        let mut out = [0f32; N];
        for r in 0..N {
            out[r] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + extra0[r] + extra1[r];
        }
        out
    }

    // The two builds of each 32-block kernel: the same code, compiled for AVX2 and for AVX-512
    // VNNI (whose `dot_u8_i8` is one instruction).
    macro_rules! builds32 {
        ($avx2:ident, $vnni:ident, $body:ident, $($ty:expr)?) => {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn $avx2<const N: usize>(w: &[u8], a: [&[Q8]; N]) -> [f32; N] {
                $body::<N, false>(w, a $(, $ty)?)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            unsafe fn $vnni<const N: usize>(w: &[u8], a: [&[Q8]; N]) -> [f32; N] {
                $body::<N, true>(w, a $(, $ty)?)
            }
        };
    }
    builds32!(q4_0_avx2, q4_0_avx512vnni, blocks32, QType::Q4_0);
    builds32!(q4_1_avx2, q4_1_avx512vnni, blocks32, QType::Q4_1);
    builds32!(q5_0_avx2, q5_0_avx512vnni, blocks32, QType::Q5_0);
    builds32!(q5_1_avx2, q5_1_avx512vnni, blocks32, QType::Q5_1);
    builds32!(q8_0_avx2, q8_0_avx512vnni, q8_0_blocks,);

    /// Q8_0: signed × signed as `|q| × (a with q's sign)`; `|q|` is computed once per block.
    #[inline(always)]
    unsafe fn q8_0_blocks<const N: usize, const VNNI: bool>(w: &[u8], a: [&[Q8]; N]) -> [f32; N] {
        let n = blocks(w, 34, &a);
        let mut acc = [_mm256_setzero_ps(); N];
        for j in 0..n {
            let b = w.get_unchecked(j * 34..(j + 1) * 34);
            prefetch_ahead(w, j * 34, 34);
            let dw = f16_at(b, 0);
            let q = load(b[2..34].as_ptr());
            let magnitude = _mm256_sign_epi8(q, q);
            for r in 0..N {
                let x = a[r].get_unchecked(j);
                let s = dot_u8_i8::<VNNI>(magnitude, _mm256_sign_epi8(load(x.qs.as_ptr() as *const u8), q));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(dw * x.d), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
        hsums(acc, [0.0; N])
    }

    /// The sum of eight i32 lanes.
    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)))
    }

    /// `Σ_g w[g]·bsums[g]` over a row's sixteen 16-value sums, `w` sixteen i16 weights (a
    /// K-quant block's mins, each twice; Q6_K's scales): one `madd`, where the scalar loop
    /// cost more than the block's vector work.
    #[inline(always)]
    unsafe fn weighted_bsums(w: __m256i, bsums: &[i16; 16]) -> __m256i {
        _mm256_madd_epi16(w, _mm256_loadu_si256(bsums.as_ptr() as *const __m256i))
    }

    /// Q4_K and Q5_K against `N` rows: per 64 values, one 32-byte load of nibbles holds
    /// sub-blocks `2c` (low) and `2c + 1` (high), unpacked once; each row multiplies them and
    /// weights them by their 6-bit scales in the `madd`.
    #[inline(always)]
    unsafe fn k_quant_4_5<const N: usize>(w: &[u8], a: [&[Q8K]; N], five: bool) -> [f32; N] {
        let bb = if five { 176 } else { 144 };
        let n = blocks(w, bb, &a);
        let mask = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let mut acc = [_mm256_setzero_ps(); N];
        let mut minus_mins = [0f32; N];
        for j in 0..n {
            let b = w.get_unchecked(j * bb..(j + 1) * bb);
            prefetch_ahead(w, j * bb, bb);
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let mut sc = [0i16; 8];
            let mut m = [0i16; 16];
            for k in 0..8 {
                let (scale, min) = k_scale_min(k, &b[4..16]);
                (sc[k], m[2 * k], m[2 * k + 1]) = (scale as i16, min as i16, min as i16);
            }
            let m = _mm256_loadu_si256(m.as_ptr() as *const __m256i);
            let qs = if five { &b[48..176] } else { &b[16..144] };
            let qh = if five { load(b[16..48].as_ptr()) } else { _mm256_setzero_si256() };
            let mut sumi = [_mm256_setzero_si256(); N];
            for c in 0..4 {
                let q = load(qs[32 * c..32 * c + 32].as_ptr());
                let mut lo = _mm256_and_si256(q, mask);
                let mut hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
                if five {
                    let shift = _mm_cvtsi32_si128(2 * c as i32);
                    let h = _mm256_srl_epi16(qh, shift);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(h, one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 1), one), 4));
                }
                let (sc_lo, sc_hi) = (_mm256_set1_epi16(sc[2 * c]), _mm256_set1_epi16(sc[2 * c + 1]));
                for r in 0..N {
                    let y = &a[r].get_unchecked(j).qs;
                    let p_lo =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(y[64 * c..].as_ptr() as *const u8)), sc_lo);
                    let p_hi = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(hi, load(y[64 * c + 32..].as_ptr() as *const u8)),
                        sc_hi,
                    );
                    sumi[r] = _mm256_add_epi32(sumi[r], _mm256_add_epi32(p_lo, p_hi));
                }
            }
            for r in 0..N {
                let x = a[r].get_unchecked(j);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                minus_mins[r] -= dmin * x.d * hsum_i32(weighted_bsums(m, &x.bsums)) as f32;
            }
        }
        hsums(acc, minus_mins)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k_avx2<const N: usize>(w: &[u8], a: [&[Q8K]; N]) -> [f32; N] {
        k_quant_4_5(w, a, false)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_k_avx2<const N: usize>(w: &[u8], a: [&[Q8K]; N]) -> [f32; N] {
        k_quant_4_5(w, a, true)
    }

    /// Bits `shift..shift + 2` of each byte of `qh`, moved to bits 4..6.
    #[inline(always)]
    unsafe fn two_bits(qh: __m256i, shift: i32, three: __m256i) -> __m256i {
        let h = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift));
        _mm256_slli_epi16(_mm256_and_si256(h, three), 4)
    }

    /// Q6_K against `N` rows: per half (128 values), 64 bytes of low nibbles and 32 of 2-bit
    /// highs make four vectors of 32 six-bit values, unpacked once; each covers two 16-value
    /// sub-blocks, whose int8 scales sit in the two lanes of the `madd` multiplier. The `− 32`
    /// comes off once per block and row, from the row's 16-value sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_avx2<const N: usize>(w: &[u8], a: [&[Q8K]; N]) -> [f32; N] {
        let n = blocks(w, 210, &a);
        let mask = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); N];
        for j in 0..n {
            let b = w.get_unchecked(j * 210..(j + 1) * 210);
            prefetch_ahead(w, j * 210, 210);
            let d = f16_at(b, 208);
            let mut sc = [0i16; 16];
            for g in 0..16 {
                sc[g] = b[192 + g] as i8 as i16;
            }
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(b[192..208].as_ptr() as *const __m128i));
            let mut sumi = [_mm256_setzero_si256(); N];
            for half in 0..2 {
                let ql0 = load(b[64 * half..].as_ptr());
                let ql1 = load(b[64 * half + 32..].as_ptr());
                let qh = load(b[128 + 32 * half..].as_ptr());
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, mask), two_bits(qh, 0, three)),
                    _mm256_or_si256(_mm256_and_si256(ql1, mask), two_bits(qh, 2, three)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), mask), two_bits(qh, 4, three)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), mask), two_bits(qh, 6, three)),
                ];
                for (k, q) in q.into_iter().enumerate() {
                    let g = 8 * half + 2 * k;
                    let scales = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                    for r in 0..N {
                        let y = load(a[r].get_unchecked(j).qs[128 * half + 32 * k..].as_ptr() as *const u8);
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scales));
                    }
                }
            }
            // The − 32 in integers, lane-wise: |Σ| < 2³¹ (256 values × 63 × 127 × 128 ≈ 2.6e8).
            for r in 0..N {
                let x = a[r].get_unchecked(j);
                let sum = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32(weighted_bsums(sc16, &x.bsums), 5));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * x.d), _mm256_cvtepi32_ps(sum), acc[r]);
            }
        }
        hsums(acc, [0.0; N])
    }
}

#[cfg(test)]
mod tests {
    use super::super::act::{quantize_q8, quantize_q8k};
    use super::super::blocks::testing::{random_matrix, Bytes};
    use super::super::blocks::QMatrix;
    use super::super::dot::{self, ROWS};
    use super::*;

    /// Row `r` of `w` against `x` with every kernel of its type: `(portable, one-row SIMD,
    /// each of the ROWS-row kernel's results for `x` placed at every position among other rows)`;
    /// the SIMD kernels are the VNNI build with `vnni` (for a 32-block type), else AVX2's.
    pub(super) fn kernels_on(
        w: &QMatrix,
        r: usize,
        x: &[f32],
        others: &[Vec<f32>],
        vnni: bool,
    ) -> (f32, f32, Vec<f32>) {
        let ty = w.qtype;
        let simd8 = |ty| q8_kernels(ty, vnni);
        // The ROWS-row kernel sees `x` at position p and the other rows elsewhere: a result
        // must not depend on its neighbours.
        macro_rules! run {
            ($quant:ident, $portable:ident, $simd:ident) => {{
                let a = $quant(x);
                let rest: Vec<_> = others.iter().map(|o| $quant(o)).collect();
                let (one, many) = $simd(ty).unwrap();
                let batched = (0..ROWS)
                    .map(|p| {
                        let rows: [&[_]; ROWS] =
                            std::array::from_fn(|i| if i == p { &a[..] } else { &rest[i % rest.len()][..] });
                        many(w.row(r), rows)[p]
                    })
                    .collect();
                (dot::$portable(ty).unwrap()(w.row(r), &a), one(w.row(r), &a), batched)
            }};
        }
        if ty.k_quant() {
            run!(quantize_q8k, q8k_kernel, q8k_kernels)
        } else {
            run!(quantize_q8, q8_kernel, simd8)
        }
    }

    /// Every AVX2 kernel, one row and ROWS rows, against the portable one on the same quantized
    /// inputs, at several lengths (skipped, and said so, on a CPU without AVX2).
    #[test]
    fn avx2_kernels_match_the_portable_ones() {
        if !available() {
            eprintln!("no AVX2 on this CPU: the AVX2 kernels are not tested here");
            return;
        }
        for_each_case(QType::ALL.iter().copied(), false, |what, simd, portable| {
            let tol = 1e-5 * portable.abs().max(1.0);
            assert!((simd - portable).abs() <= tol, "{what}: avx2 {simd} vs portable {portable}");
        });
    }

    /// The VNNI build of every 32-block kernel, one row and ROWS rows, gives the AVX2 build's
    /// result bit for bit: the same integer sums, scaled and added in the same order (skipped,
    /// and said so, on a CPU without AVX-512 VNNI).
    #[test]
    fn vnni_kernels_equal_the_avx2_ones_bit_for_bit() {
        if !vnni_available() {
            eprintln!("no AVX-512 VNNI on this CPU: the VNNI kernels are not tested here");
            return;
        }
        let blocks32 = QType::ALL.iter().copied().filter(|t| !t.k_quant());
        let mut avx2 = Vec::new();
        for_each_case(blocks32.clone(), false, |_, simd, _| avx2.push(simd));
        let mut vnni = Vec::new();
        for_each_case(blocks32, true, |_, simd, _| vnni.push(simd));
        assert_eq!(avx2.len(), vnni.len());
        for (i, (a, v)) in avx2.iter().zip(&vnni).enumerate() {
            assert_eq!(a.to_bits(), v.to_bits(), "case {i}: avx2 {a} vs vnni {v}");
        }
    }

    /// Calls `check(what, simd, portable)` for each SIMD result (one row, and the ROWS-row
    /// kernel with the row at each position) of three weight rows of each type at 1, 2, 3 and 11
    /// blocks against the portable kernel's.
    fn for_each_case(types: impl Iterator<Item = QType>, vnni: bool, mut check: impl FnMut(&str, f32, f32)) {
        for ty in types {
            for nblocks in [1, 2, 3, 11] {
                let cols = ty.block_len() * nblocks;
                let w = random_matrix(ty, 3, cols, 1234 + nblocks as u64);
                let mut g = Bytes(5 + nblocks as u64);
                let mut vector = |scale: f32| -> Vec<f32> { (0..cols).map(|_| g.unit() * scale).collect() };
                let x = vector(3.0);
                let others = vec![vector(1.0), vector(10.0), vector(0.1)];
                for r in 0..3 {
                    let (slow, fast, batched) = kernels_on(&w, r, &x, &others, vnni);
                    check(&format!("{ty}, {nblocks} blocks, row {r}, one row"), fast, slow);
                    for (p, b) in batched.iter().enumerate() {
                        check(&format!("{ty}, {nblocks} blocks, row {r}, x{ROWS} at {p}"), *b, slow);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod real_weights {
    use super::tests::kernels_on;
    use super::*;

    /// The kernels this CPU runs (one row and four: VNNI's for the 32-block types where it has
    /// AVX-512 VNNI, else AVX2's) and the portable ones on the real SmolLM2 and Qwen2.5 blocks
    /// (every tensor type in them) with activations shaped like a decoder's (a few large
    /// outliers).
    #[test]
    fn simd_kernels_match_the_portable_ones_on_real_weights() {
        if !available() {
            return;
        }
        let vnni = vnni_available();
        for asset in [crate::assets::Asset::SmolLm2Gguf, crate::assets::Asset::Qwen25Gguf] {
            let g = crate::formats::gguf::Gguf::open(&asset.path().unwrap()).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for name in g.tensors.keys() {
                let Some(w) = g.quantized(name) else { continue };
                seen.insert(w.qtype);
                let x: Vec<f32> = (0..w.cols)
                    .map(|i| if i % 97 == 5 { 40.0 } else { ((i * 37 % 23) as f32 - 11.0) * 0.05 })
                    .collect();
                let other: Vec<f32> = (0..w.cols).map(|i| ((i * 13 % 29) as f32 - 14.0) * 0.2).collect();
                for r in (0..w.rows).step_by(7) {
                    let (slow, fast, batched) = kernels_on(&w, r, &x, std::slice::from_ref(&other), vnni);
                    // The kernels sum the same block products in different orders: the error
                    // bound scales with the terms' magnitudes, not with their (cancelling) sum.
                    let row = super::super::dequantize(w.qtype, w.row(r));
                    let mag: f32 = row.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum();
                    for v in std::iter::once(fast).chain(batched) {
                        assert!(
                            (v - slow).abs() <= 1e-5 * mag.max(1.0),
                            "{name} ({}) row {r}: {v} vs {slow} (Σ|wx| {mag})",
                            w.qtype
                        );
                    }
                }
            }
            eprintln!("{asset:?}: {seen:?}");
        }
    }
}
