//! Activations quantized per block to int8, as llama.cpp does before a quantized dot product:
//! `x ≈ d·q` with `q = round(x / d)`, `d = max|x| / 127` over the block. The error this adds is
//! of the order of the weights' own (8 bits against 4–6), and it turns each block's products into
//! integer arithmetic.

/// 32 activations (for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 weights), with `Σq` for the types whose
/// values carry an offset (`(q − 8)·d`, `q·d + m`).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
pub struct Q8 {
    pub qs: [i8; 32],
    pub d: f32,
    pub sum: i32,
    /// `d·Σq`: the block's sum as the kernels scale it.
    pub s: f32,
}

/// 256 activations (for the K-quants), with the sums of each 16 (the K-quants' mins and Q6_K's
/// offset apply per 16 or 32 values).
#[derive(Clone, Copy, Debug)]
#[repr(C, align(32))]
pub struct Q8K {
    pub qs: [i8; 256],
    pub bsums: [i16; 16],
    pub d: f32,
}

/// `(d, 1/d)` for a block whose largest magnitude is `amax` (an all-zero block gets `d = 0`).
fn scale(amax: f32) -> (f32, f32) {
    if amax > 0.0 {
        let d = amax / 127.0;
        (d, 1.0 / d)
    } else {
        (0.0, 0.0)
    }
}

fn quantize_block(x: &[f32], qs: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (d, id) = scale(amax);
    for (q, &v) in qs.iter_mut().zip(x) {
        // |v·id| ≤ 127 by construction; round half away from zero as ggml's `roundf`.
        *q = (v * id).round() as i8;
    }
    d
}

/// `x` (a multiple of 32 values) as [`Q8`] blocks.
pub fn quantize_q8(x: &[f32]) -> Vec<Q8> {
    x.chunks_exact(32)
        .map(|b| {
            let mut blk = Q8 { qs: [0; 32], d: 0.0, sum: 0, s: 0.0 };
            blk.d = quantize_block(b, &mut blk.qs);
            blk.sum = blk.qs.iter().map(|&q| q as i32).sum();
            blk.s = blk.d * blk.sum as f32;
            blk
        })
        .collect()
}

/// `x` (a multiple of 256 values) as [`Q8K`] blocks.
pub fn quantize_q8k(x: &[f32]) -> Vec<Q8K> {
    x.chunks_exact(256)
        .map(|b| {
            let mut blk = Q8K { qs: [0; 256], bsums: [0; 16], d: 0.0 };
            blk.d = quantize_block(b, &mut blk.qs);
            for (s, g) in blk.bsums.iter_mut().zip(blk.qs.chunks_exact(16)) {
                *s = g.iter().map(|&q| q as i16).sum();
            }
            blk
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        for (b, xs) in quantize_q8(&x).iter().zip(x.chunks_exact(32)) {
            assert_eq!(b.sum, b.qs.iter().map(|&q| q as i32).sum::<i32>());
            for (&q, &v) in b.qs.iter().zip(xs) {
                assert!((q as f32 * b.d - v).abs() <= 0.5 * b.d + 1e-7);
            }
        }
        for (b, xs) in quantize_q8k(&x).iter().zip(x.chunks_exact(256)) {
            assert_eq!(b.bsums[3], b.qs[48..64].iter().map(|&q| q as i16).sum::<i16>());
            for (&q, &v) in b.qs.iter().zip(xs) {
                assert!((q as f32 * b.d - v).abs() <= 0.5 * b.d + 1e-7);
            }
        }
        // A zero block stays zero.
        let z = quantize_q8(&[0.0; 32]);
        assert_eq!((z[0].d, z[0].sum), (0.0, 0));
    }
}
