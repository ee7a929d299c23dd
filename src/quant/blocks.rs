//! The block layouts of ggml's quantized types (`ggml-common.h`) and their dequantisation.

use half::f16;

pub use crate::qmatrix::{QMatrix, QType};

/// Dequantisation of a whole matrix (the layout itself is `crate::qmatrix`).
impl QMatrix {
    /// The whole matrix as f32 (tests and merges; inference never calls it).
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize(self.qtype, &self.data)
    }
}

fn h(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantises whole blocks of `ty` to f32.
pub fn dequantize(ty: QType, bytes: &[u8]) -> Vec<f32> {
    let mut out = vec![0.0f32; bytes.len() / ty.block_bytes() * ty.block_len()];
    dequantize_into(ty, bytes, &mut out);
    out
}

/// Dequantises whole blocks of `ty` into `out` (`bytes / block_bytes · block_len` values).
pub fn dequantize_into(ty: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    assert_eq!(out.len(), bytes.len() / bb * ty.block_len(), "dequantize_into: output size");
    match ty {
        QType::Q8_0 => {
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(34)) {
                let d = h(b, 0);
                o.iter_mut().zip(&b[2..]).for_each(|(o, &q)| *o = d * (q as i8) as f32);
            }
        }
        QType::Q4_0 | QType::Q4_1 => {
            let with_min = ty == QType::Q4_1;
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(bb)) {
                let d = h(b, 0);
                let (m, qs) = if with_min { (h(b, 2), &b[4..20]) } else { (-8.0 * d, &b[2..18]) };
                for (j, &q) in qs.iter().enumerate() {
                    o[j] = (q & 0x0F) as f32 * d + m;
                    o[j + 16] = (q >> 4) as f32 * d + m;
                }
            }
        }
        QType::Q5_0 | QType::Q5_1 => {
            // d (and m), 32 high bits, 16 bytes of low nibbles: element j < 16 takes the low
            // nibble of byte j and bit j; element j + 16 the high nibble and bit j + 16.
            let with_min = ty == QType::Q5_1;
            for (o, b) in out.chunks_exact_mut(32).zip(bytes.chunks_exact(bb)) {
                let d = h(b, 0);
                let at = if with_min { 4 } else { 2 };
                let (m, offset) = if with_min { (h(b, 2), 0.0) } else { (0.0, 16.0) };
                let qh = u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
                for (j, &q) in b[at + 4..at + 20].iter().enumerate() {
                    let lo = (q & 0x0F) as u32 | (((qh >> j) & 1) << 4);
                    let hi = (q >> 4) as u32 | (((qh >> (j + 16)) & 1) << 4);
                    o[j] = (lo as f32 - offset) * d + m;
                    o[j + 16] = (hi as f32 - offset) * d + m;
                }
            }
        }
        QType::Q4K | QType::Q5K => {
            let five = ty == QType::Q5K;
            for (o, b) in out.chunks_exact_mut(256).zip(bytes.chunks_exact(bb)) {
                let (d, dmin) = (h(b, 0), h(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = if five { (&b[16..48], &b[48..176]) } else { (&b[0..0], &b[16..144]) };
                for chunk in 0..4 {
                    let (sc1, m1) = k_scale_min(2 * chunk, scales);
                    let (sc2, m2) = k_scale_min(2 * chunk + 1, scales);
                    let (d1, d2) = (d * sc1 as f32, d * sc2 as f32);
                    let (m1, m2) = (dmin * m1 as f32, dmin * m2 as f32);
                    let q = &qs[chunk * 32..chunk * 32 + 32];
                    let y = &mut o[chunk * 64..chunk * 64 + 64];
                    for l in 0..32 {
                        // Q5_K: bit 2·chunk of qh[l] is the fifth bit of the low nibble, bit
                        // 2·chunk + 1 of the high one.
                        let (hi1, hi2) =
                            if five { ((qh[l] >> (2 * chunk)) & 1, (qh[l] >> (2 * chunk + 1)) & 1) } else { (0, 0) };
                        y[l] = d1 * ((q[l] & 0xF) | (hi1 << 4)) as f32 - m1;
                        y[l + 32] = d2 * ((q[l] >> 4) | (hi2 << 4)) as f32 - m2;
                    }
                }
            }
        }
        QType::Q6K => {
            for (o, b) in out.chunks_exact_mut(256).zip(bytes.chunks_exact(210)) {
                let (ql_all, qh_all, sc_all) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = h(b, 208);
                for half in 0..2 {
                    let (ql, qh) = (&ql_all[half * 64..], &qh_all[half * 32..]);
                    let sc = &sc_all[half * 8..];
                    let y = &mut o[half * 128..half * 128 + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (of 8) of a Q4_K or Q5_K super-block.
pub fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Random blocks with valid scales, for the kernels' tests and `sage bench kernels` (whose timings
/// do not depend on the values, but whose outputs should be finite).
pub mod testing {
    use super::*;

    /// A deterministic generator (xorshift) so the kernel tests need no seed plumbing.
    pub struct Bytes(pub u64);

    impl Bytes {
        pub fn bits(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn byte(&mut self) -> u8 {
            (self.bits() >> 24) as u8
        }
        /// Uniform in (-1, 1).
        pub fn unit(&mut self) -> f32 {
            (self.bits() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
    }

    /// `rows × cols` random blocks of `ty`: random quant bytes, finite f16 scales of moderate size.
    pub fn random_matrix(ty: QType, rows: usize, cols: usize, seed: u64) -> QMatrix {
        let mut g = Bytes(seed.max(1));
        let nblocks = rows * cols / ty.block_len();
        let mut data = Vec::with_capacity(nblocks * ty.block_bytes());
        let f16b = |x: f32| f16::from_f32(x).to_le_bytes();
        for _ in 0..nblocks {
            let mut b: Vec<u8> = (0..ty.block_bytes()).map(|_| g.byte()).collect();
            let (d, m) = (0.01 + 0.02 * g.unit().abs(), 0.05 * g.unit());
            match ty {
                QType::Q4_1 | QType::Q5_1 => {
                    b[0..2].copy_from_slice(&f16b(d));
                    b[2..4].copy_from_slice(&f16b(m));
                }
                QType::Q4K | QType::Q5K => {
                    b[0..2].copy_from_slice(&f16b(d * 0.1));
                    b[2..4].copy_from_slice(&f16b(m.abs() * 0.1));
                }
                QType::Q6K => b[208..210].copy_from_slice(&f16b(d * 0.1)),
                _ => b[0..2].copy_from_slice(&f16b(d)),
            }
            data.extend(b);
        }
        QMatrix::new(ty, rows, cols, data.into()).unwrap()
    }
}
