//! The dot products of [`super::dot`] on AVX2: each block's weights are unpacked to one byte per
//! value (unsigned), multiplied by the int8 activations with `maddubs` (u8 × i8 pairs summed to
//! i16, no saturation for values < 64) and widened with `madd` (by one, or by a sub-block's
//! scale), then scaled once per block in f32. Offsets (`q − 8`, `q − 16`, `q − 32`) and the
//! K-quants' mins are applied once per block from the activations' precomputed sums.

use super::blocks::QType;
use super::dot::{DotQ8, DotQ8K};

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

/// The AVX2 kernel of a 32-block type; `None` when this CPU lacks AVX2 (or for a K-quant).
pub fn q8_kernel(ty: QType) -> Option<DotQ8> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(match ty {
            QType::Q4_0 => imp::q4_0,
            QType::Q4_1 => imp::q4_1,
            QType::Q5_0 => imp::q5_0,
            QType::Q5_1 => imp::q5_1,
            QType::Q8_0 => imp::q8_0,
            _ => return None,
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = ty;
        None
    }
}

/// The AVX2 kernel of a K-quant; `None` when this CPU lacks AVX2 (or for a 32-block type).
pub fn q8k_kernel(ty: QType) -> Option<DotQ8K> {
    if !available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        Some(match ty {
            QType::Q4K => imp::q4_k,
            QType::Q5K => imp::q5_k,
            QType::Q6K => imp::q6_k,
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
    use std::arch::x86_64::*;

    // The safe entry points: `q8_kernel` / `q8k_kernel` hand them out only after `available()`
    // confirmed AVX2, FMA and F16C, so the target-feature functions they call may run.
    macro_rules! entry {
        ($name:ident, $inner:ident, $act:ty) => {
            pub fn $name(w: &[u8], a: &[$act]) -> f32 {
                // SAFETY: see above; the slices are bounds-checked by `chunks_exact` / `zip`.
                unsafe { $inner(w, a) }
            }
        };
    }
    entry!(q4_0, q4_0_avx2, Q8);
    entry!(q4_1, q4_1_avx2, Q8);
    entry!(q5_0, q5_0_avx2, Q8);
    entry!(q5_1, q5_1_avx2, Q8);
    entry!(q8_0, q8_0_avx2, Q8);
    entry!(q4_k, q4_k_avx2, Q8K);
    entry!(q5_k, q5_k_avx2, Q8K);
    entry!(q6_k, q6_k_avx2, Q8K);

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

    /// Eight i32 sums of `u[i]·s[i]` (u8 × i8) over groups of four bytes.
    #[inline(always)]
    unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
    }

    #[inline(always)]
    unsafe fn load(p: *const u8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
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

    /// One 32-block: `dw·da·Σq·a` added to `acc`; the offset (`q − 8`, `q − 16`) or the min
    /// `m·Σx = m·(da·Σa)` added to `extra`. `ty` is a constant at each call, so the branches fold
    /// away.
    #[inline(always)]
    unsafe fn block32(b: &[u8], a: &Q8, ty: QType, acc: __m256, extra: &mut f32) -> __m256 {
        let dw = f16_at(b, 0);
        let values = match ty {
            QType::Q4_0 => nibbles(&b[2..18]),
            QType::Q4_1 => nibbles(&b[4..20]),
            QType::Q5_0 => five_bit(b, 2),
            _ => five_bit(b, 4),
        };
        let s = dot_u8_i8(values, load(a.qs.as_ptr() as *const u8));
        *extra += match ty {
            QType::Q4_0 => -8.0 * dw * a.s,
            QType::Q5_0 => -16.0 * dw * a.s,
            _ => f16_at(b, 2) * a.s,
        };
        _mm256_fmadd_ps(_mm256_set1_ps(dw * a.d), _mm256_cvtepi32_ps(s), acc)
    }

    /// The 32-block types, two blocks per iteration into two accumulators (registers: an
    /// indexed pair would live on the stack).
    #[inline(always)]
    unsafe fn blocks32(w: &[u8], a: &[Q8], ty: QType) -> f32 {
        let bb = ty.block_bytes();
        let n = a.len().min(w.len() / bb);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut extra0, mut extra1) = (0f32, 0f32);
        let mut j = 0;
        while j + 1 < n {
            acc0 = block32(&w[j * bb..(j + 1) * bb], &a[j], ty, acc0, &mut extra0);
            acc1 = block32(&w[(j + 1) * bb..(j + 2) * bb], &a[j + 1], ty, acc1, &mut extra1);
            j += 2;
        }
        if j < n {
            acc0 = block32(&w[j * bb..(j + 1) * bb], &a[j], ty, acc0, &mut extra0);
        }
        hsum(_mm256_add_ps(acc0, acc1)) + extra0 + extra1
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_0_avx2(w: &[u8], a: &[Q8]) -> f32 {
        blocks32(w, a, QType::Q4_0)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_avx2(w: &[u8], a: &[Q8]) -> f32 {
        blocks32(w, a, QType::Q4_1)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_0_avx2(w: &[u8], a: &[Q8]) -> f32 {
        blocks32(w, a, QType::Q5_0)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_1_avx2(w: &[u8], a: &[Q8]) -> f32 {
        blocks32(w, a, QType::Q5_1)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_avx2(w: &[u8], a: &[Q8]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        for (b, a) in w.chunks_exact(34).zip(a) {
            let d = f16_at(b, 0) * a.d;
            let q = load(b[2..34].as_ptr());
            let y = load(a.qs.as_ptr() as *const u8);
            // Signed × signed as |q| × (y with q's sign).
            let s = dot_u8_i8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(s), acc);
        }
        hsum(acc)
    }

    /// Q4_K and Q5_K: per 64 values, one 32-byte load of nibbles holds sub-blocks `2c` (low) and
    /// `2c + 1` (high); each is multiplied and weighted by its 6-bit scale in the `madd`.
    #[inline(always)]
    unsafe fn k_quant_4_5(w: &[u8], a: &[Q8K], five: bool) -> f32 {
        let bb = if five { 176 } else { 144 };
        let mask = _mm256_set1_epi8(0x0F);
        let one = _mm256_set1_epi8(1);
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for (b, a) in w.chunks_exact(bb).zip(a) {
            let (d, dmin) = (f16_at(b, 0) * a.d, f16_at(b, 2) * a.d);
            let mut sc = [0i16; 8];
            let mut summ = 0i32;
            for (j, s) in sc.iter_mut().enumerate() {
                let (scale, m) = k_scale_min(j, &b[4..16]);
                *s = scale as i16;
                summ += m as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32);
            }
            mins += dmin * summ as f32;
            let qs = if five { &b[48..176] } else { &b[16..144] };
            let qh = if five { load(b[16..48].as_ptr()) } else { _mm256_setzero_si256() };
            let mut sumi = _mm256_setzero_si256();
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
                let y_lo = load(a.qs[64 * c..].as_ptr() as *const u8);
                let y_hi = load(a.qs[64 * c + 32..].as_ptr() as *const u8);
                let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, y_lo), _mm256_set1_epi16(sc[2 * c]));
                let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, y_hi), _mm256_set1_epi16(sc[2 * c + 1]));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc) - mins
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_k_avx2(w: &[u8], a: &[Q8K]) -> f32 {
        k_quant_4_5(w, a, false)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q5_k_avx2(w: &[u8], a: &[Q8K]) -> f32 {
        k_quant_4_5(w, a, true)
    }

    /// Bits `shift..shift + 2` of each byte of `qh`, moved to bits 4..6.
    #[inline(always)]
    unsafe fn two_bits(qh: __m256i, shift: i32, three: __m256i) -> __m256i {
        let h = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift));
        _mm256_slli_epi16(_mm256_and_si256(h, three), 4)
    }

    /// Q6_K: per half (128 values), 64 bytes of low nibbles and 32 of 2-bit highs make four
    /// vectors of 32 six-bit values; each covers two 16-value sub-blocks, whose int8 scales sit
    /// in the two lanes of the `madd` multiplier. The `− 32` comes off once per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q6_k_avx2(w: &[u8], a: &[Q8K]) -> f32 {
        let mask = _mm256_set1_epi8(0x0F);
        let three = _mm256_set1_epi8(3);
        let mut acc = _mm256_setzero_ps();
        let mut offsets = 0f32;
        for (b, a) in w.chunks_exact(210).zip(a) {
            let d = f16_at(b, 208) * a.d;
            let sc: [i16; 16] = std::array::from_fn(|g| b[192 + g] as i8 as i16);
            let off: i32 = sc.iter().zip(&a.bsums).map(|(&s, &x)| s as i32 * x as i32).sum();
            offsets += d * (32 * off) as f32;
            let mut sumi = _mm256_setzero_si256();
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
                    let y = load(a.qs[128 * half + 32 * k..].as_ptr() as *const u8);
                    let scales = _mm256_set_m128i(_mm_set1_epi16(sc[g + 1]), _mm_set1_epi16(sc[g]));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), scales));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        }
        hsum(acc) - offsets
    }
}

#[cfg(test)]
mod tests {
    use super::super::act::{quantize_q8, quantize_q8k};
    use super::super::blocks::testing::{random_matrix, Bytes};
    use super::super::dot;
    use super::*;

    /// Every AVX2 kernel against the portable one on the same quantized inputs, at several
    /// lengths (skipped, and said so, on a CPU without AVX2).
    #[test]
    fn avx2_kernels_match_the_portable_ones() {
        if !available() {
            eprintln!("no AVX2 on this CPU: the AVX2 kernels are not tested here");
            return;
        }
        for ty in QType::ALL {
            for nblocks in [1, 3, 11] {
                let cols = ty.block_len() * nblocks;
                let w = random_matrix(ty, 3, cols, 1234 + nblocks as u64);
                let mut g = Bytes(5 + nblocks as u64);
                let x: Vec<f32> = (0..cols).map(|_| g.unit() * 3.0).collect();
                for r in 0..3 {
                    let (fast, slow) = if ty.k_quant() {
                        let a = quantize_q8k(&x);
                        (q8k_kernel(ty).unwrap()(w.row(r), &a), dot::q8k_kernel(ty).unwrap()(w.row(r), &a))
                    } else {
                        let a = quantize_q8(&x);
                        (q8_kernel(ty).unwrap()(w.row(r), &a), dot::q8_kernel(ty).unwrap()(w.row(r), &a))
                    };
                    let tol = 1e-5 * slow.abs().max(1.0);
                    assert!(
                        (fast - slow).abs() <= tol,
                        "{ty}, {nblocks} blocks, row {r}: avx2 {fast} vs portable {slow}"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod real_weights {
    use super::super::act::{quantize_q8, quantize_q8k};
    use super::super::dot;
    use super::*;

    /// The AVX2 and portable kernels on the real SmolLM2 and Qwen2.5 blocks (every tensor type in
    /// them) with activations shaped like a decoder's (a few large outliers).
    #[test]
    fn avx2_kernels_match_the_portable_ones_on_real_weights() {
        if !available() {
            return;
        }
        for asset in [crate::assets::Asset::SmolLm2Gguf, crate::assets::Asset::Qwen25Gguf] {
            let g = crate::formats::gguf::Gguf::open(&asset.path().unwrap()).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            for name in g.tensors.keys() {
                let Some(w) = g.quantized(name) else { continue };
                seen.insert(w.qtype);
                let x: Vec<f32> = (0..w.cols)
                    .map(|i| if i % 97 == 5 { 40.0 } else { ((i * 37 % 23) as f32 - 11.0) * 0.05 })
                    .collect();
                for r in 0..w.rows {
                    let (fast, slow) = if w.qtype.k_quant() {
                        let a = quantize_q8k(&x);
                        (q8k_kernel(w.qtype).unwrap()(w.row(r), &a), dot::q8k_kernel(w.qtype).unwrap()(w.row(r), &a))
                    } else {
                        let a = quantize_q8(&x);
                        (q8_kernel(w.qtype).unwrap()(w.row(r), &a), dot::q8_kernel(w.qtype).unwrap()(w.row(r), &a))
                    };
                    assert!(
                        (fast - slow).abs() <= 1e-4 * slow.abs().max(1.0),
                        "{name} ({}) row {r}: {fast} vs {slow}",
                        w.qtype
                    );
                }
            }
            eprintln!("{asset:?}: {seen:?}");
        }
    }
}
