//! Portable dot products of one row of weight blocks with one row of quantized activations:
//! integer sums per block, scaled once per block (per sub-block for the K-quants). These are the
//! fallback on CPUs without AVX2 and the reference the SIMD versions are tested against.

use super::act::{Q8, Q8K};
use super::blocks::{k_scale_min, QType};
use half::f16;

/// A weight row's dot product with one row of activation blocks `A`.
pub type DotRow<A> = fn(&[u8], &[A]) -> f32;
/// A weight row's dot products with [`ROWS`] rows of activation blocks `A`.
pub type DotRows<A> = fn(&[u8], [&[A]; ROWS]) -> [f32; ROWS];

/// Rows of activations the batched kernels take per weight row: a block is unpacked once for
/// all of them (SIMD only; the portable path calls the one-row kernel per row). 8 against 4 and
/// 16, per round: batch-16 decode +11–16 % over 4 on both models with the VNNI build, +2.5–37 %
/// with the AVX2 build; 16 slower than 4 on SmolLM2 (benches/results/quant-rows-20261205.txt).
pub const ROWS: usize = 8;

/// A row dot product against 32-blocks of activations.
pub type DotQ8 = DotRow<Q8>;
/// A row dot product against 256-blocks of activations.
pub type DotQ8K = DotRow<Q8K>;

/// The portable kernel of a 32-block type (`None` for a K-quant).
pub fn q8_kernel(ty: QType) -> Option<DotQ8> {
    Some(match ty {
        QType::Q4_0 => q4_0,
        QType::Q4_1 => q4_1,
        QType::Q5_0 => q5_0,
        QType::Q5_1 => q5_1,
        QType::Q8_0 => q8_0,
        _ => return None,
    })
}

/// The portable kernel of a K-quant (`None` for a 32-block type).
pub fn q8k_kernel(ty: QType) -> Option<DotQ8K> {
    Some(match ty {
        QType::Q4K => q4_k,
        QType::Q5K => q5_k,
        QType::Q6K => q6_k,
        _ => return None,
    })
}

pub(crate) fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 32 values of a Q4 or Q5 block as unsigned integers (element `j < 16` in the low nibble of
/// byte `j`, `j + 16` in the high one; `qh` bit `j` is element `j`'s fifth bit).
fn nibbles(qs: &[u8], qh: Option<u32>) -> [i32; 32] {
    let mut q = [0i32; 32];
    for j in 0..16 {
        q[j] = (qs[j] & 0xF) as i32;
        q[j + 16] = (qs[j] >> 4) as i32;
    }
    if let Some(h) = qh {
        for (j, v) in q.iter_mut().enumerate() {
            *v |= (((h >> j) & 1) << 4) as i32;
        }
    }
    q
}

fn idot(q: &[i32], a: &[i8]) -> i32 {
    q.iter().zip(a).map(|(&q, &a)| q * a as i32).sum()
}

fn q4_0(w: &[u8], a: &[Q8]) -> f32 {
    w.chunks_exact(18)
        .zip(a)
        .map(|(b, a)| f16_at(b, 0) * a.d * (idot(&nibbles(&b[2..18], None), &a.qs) - 8 * a.sum) as f32)
        .sum()
}

fn q4_1(w: &[u8], a: &[Q8]) -> f32 {
    w.chunks_exact(20)
        .zip(a)
        .map(|(b, a)| {
            let sumi = idot(&nibbles(&b[4..20], None), &a.qs);
            f16_at(b, 0) * a.d * sumi as f32 + f16_at(b, 2) * a.d * a.sum as f32
        })
        .sum()
}

fn qh_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn q5_0(w: &[u8], a: &[Q8]) -> f32 {
    w.chunks_exact(22)
        .zip(a)
        .map(|(b, a)| f16_at(b, 0) * a.d * (idot(&nibbles(&b[6..22], Some(qh_at(b, 2))), &a.qs) - 16 * a.sum) as f32)
        .sum()
}

fn q5_1(w: &[u8], a: &[Q8]) -> f32 {
    w.chunks_exact(24)
        .zip(a)
        .map(|(b, a)| {
            let sumi = idot(&nibbles(&b[8..24], Some(qh_at(b, 4))), &a.qs);
            f16_at(b, 0) * a.d * sumi as f32 + f16_at(b, 2) * a.d * a.sum as f32
        })
        .sum()
}

fn q8_0(w: &[u8], a: &[Q8]) -> f32 {
    w.chunks_exact(34)
        .zip(a)
        .map(|(b, a)| {
            let sumi: i32 = b[2..34].iter().zip(&a.qs).map(|(&q, &x)| (q as i8) as i32 * x as i32).sum();
            f16_at(b, 0) * a.d * sumi as f32
        })
        .sum()
}

/// Q4_K and Q5_K: 8 sub-blocks of 32 with 6-bit scales and mins, `w = d·sc·q − dmin·m`.
fn k_quant_4_5(w: &[u8], a: &[Q8K], five: bool) -> f32 {
    let bb = if five { 176 } else { 144 };
    w.chunks_exact(bb)
        .zip(a)
        .map(|(b, a)| {
            let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
            let scales = &b[4..16];
            let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
            let (mut sum_sc, mut sum_m) = (0i32, 0i32);
            for j in 0..8 {
                let (sc, m) = k_scale_min(j, scales);
                let (chunk, high) = (j / 2, j % 2 == 1);
                let mut sumi = 0i32;
                for l in 0..32 {
                    let byte = qs[chunk * 32 + l];
                    let mut q = if high { byte >> 4 } else { byte & 0xF } as i32;
                    if five {
                        q |= (((qh[l] >> j) & 1) << 4) as i32;
                    }
                    sumi += q * a.qs[32 * j + l] as i32;
                }
                sum_sc += sc as i32 * sumi;
                sum_m += m as i32 * (a.bsums[2 * j] as i32 + a.bsums[2 * j + 1] as i32);
            }
            a.d * (d * sum_sc as f32 - dmin * sum_m as f32)
        })
        .sum()
}

fn q4_k(w: &[u8], a: &[Q8K]) -> f32 {
    k_quant_4_5(w, a, false)
}

fn q5_k(w: &[u8], a: &[Q8K]) -> f32 {
    k_quant_4_5(w, a, true)
}

/// The 256 six-bit values of a Q6_K block, unsigned (`0..64`; the value is `q − 32`).
pub(crate) fn q6_k_values(b: &[u8]) -> [i32; 256] {
    let (ql_all, qh_all) = (&b[0..128], &b[128..192]);
    let mut q = [0i32; 256];
    for half in 0..2 {
        let (ql, qh) = (&ql_all[half * 64..], &qh_all[half * 32..]);
        let y = &mut q[half * 128..];
        for l in 0..32 {
            y[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32;
            y[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32;
            y[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32;
            y[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32;
        }
    }
    q
}

/// Q6_K: 16 sub-blocks of 16 with int8 scales, `w = d·sc·(q − 32)`.
fn q6_k(w: &[u8], a: &[Q8K]) -> f32 {
    w.chunks_exact(210)
        .zip(a)
        .map(|(b, a)| {
            let q = q6_k_values(b);
            let sc = &b[192..208];
            let mut total = 0i32;
            for g in 0..16 {
                let sumi = idot(&q[16 * g..16 * g + 16], &a.qs[16 * g..16 * g + 16]);
                total += (sc[g] as i8) as i32 * (sumi - 32 * a.bsums[g] as i32);
            }
            f16_at(b, 208) * a.d * total as f32
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::super::act::{quantize_q8, quantize_q8k};
    use super::super::blocks::testing::{random_matrix, Bytes};
    use super::*;

    /// Each kernel against the f32 dot of the dequantised weights with the dequantised
    /// activations: the same numbers, summed in another order.
    #[test]
    fn portable_kernels_match_the_dequantised_dot() {
        for ty in QType::ALL {
            let cols = ty.block_len() * 3;
            let w = random_matrix(ty, 2, cols, 7 + ty.block_bytes() as u64);
            let mut g = Bytes(99);
            let x: Vec<f32> = (0..cols).map(|_| g.unit()).collect();
            for r in 0..2 {
                let wf = super::super::dequantize(ty, w.row(r));
                let (got, xd): (f32, Vec<f32>) = if ty.k_quant() {
                    let a = quantize_q8k(&x);
                    let xd = a.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
                    (q8k_kernel(ty).unwrap()(w.row(r), &a), xd)
                } else {
                    let a = quantize_q8(&x);
                    let xd = a.iter().flat_map(|b| b.qs.iter().map(move |&q| q as f32 * b.d)).collect();
                    (q8_kernel(ty).unwrap()(w.row(r), &a), xd)
                };
                let want: f64 = wf.iter().zip(&xd).map(|(&a, &b)| a as f64 * b as f64).sum();
                let mag: f64 = wf.iter().zip(&xd).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                assert!(
                    (got as f64 - want).abs() <= 1e-5 * mag.max(1e-3),
                    "{ty} row {r}: kernel {got} vs dequantised {want} (Σ|terms| {mag})"
                );
            }
        }
    }
}
