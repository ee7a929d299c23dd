//! Generic mutation: byte-level edits any loader must survive, and the "interesting" values the
//! structure-aware mutators write into fields. Everything draws from one seeded RNG, so an input
//! is a pure function of (seed, target, iteration).

use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;

pub type FuzzRng = ChaCha8Rng;

/// Integers that break code which trusts a count, a size or an index.
pub const INTERESTING_INTS: &[i128] = &[
    0,
    1,
    -1,
    2,
    3,
    7,
    18,
    255,
    256,
    1000,
    65535,
    65536,
    1 << 31,
    (1 << 31) - 1,
    -(1 << 31),
    1 << 32,
    (1 << 32) - 1,
    1 << 40,
    1 << 53,
    (1 << 63) - 1,
    -(1 << 63),
    1 << 63,
    (1 << 64) - 1,
];

/// Floats that break code which trusts a rate, an epsilon or a base.
pub const INTERESTING_FLOATS: &[f64] =
    &[0.0, -0.0, -1.0, 1e-30, 1e30, 1e300, -1e300, f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.5, 3.0e38];

pub fn pick<'a, T>(rng: &mut FuzzRng, xs: &'a [T]) -> &'a T {
    &xs[rng.random_range(0..xs.len())]
}

/// An interesting integer, or one next to a value already there (off-by-one, doubled, negated).
pub fn int_near(rng: &mut FuzzRng, old: i128) -> i128 {
    match rng.random_range(0..6) {
        0 => old + 1,
        1 => old - 1,
        2 => old.saturating_mul(2),
        3 => -old,
        4 => old.saturating_mul(1 << rng.random_range(4..40)),
        _ => *pick(rng, INTERESTING_INTS),
    }
}

pub fn float_near(rng: &mut FuzzRng, old: f64) -> f64 {
    match rng.random_range(0..4) {
        0 => -old,
        1 => old * 1e6,
        2 => old / 1e6,
        _ => *pick(rng, INTERESTING_FLOATS),
    }
}

/// One byte-level edit: bit flips, byte sets, interesting little-endian words, deletions,
/// duplications, splices from another seed, truncation.
pub fn bytes(rng: &mut FuzzRng, data: &[u8], other: &[u8]) -> Vec<u8> {
    let mut d = data.to_vec();
    if d.is_empty() {
        return other.to_vec();
    }
    // Headers hold most of the structure: bias positions towards the start half the time.
    let pos = |rng: &mut FuzzRng, len: usize| {
        if rng.random_bool(0.5) {
            rng.random_range(0..len.min(4096))
        } else {
            rng.random_range(0..len)
        }
    };
    match rng.random_range(0..8) {
        0 => {
            for _ in 0..rng.random_range(1..8) {
                let p = pos(rng, d.len());
                d[p] ^= 1 << rng.random_range(0..8);
            }
        }
        1 => {
            let p = pos(rng, d.len());
            d[p] = *pick(rng, &[0u8, 1, 0x7f, 0x80, 0xff, b'"', b'{', b'[', b'\n', b'.']);
        }
        2 => {
            let w = *pick(rng, &[2usize, 4, 8]);
            let p = pos(rng, d.len());
            let v = *pick(rng, INTERESTING_INTS) as u64;
            for (k, b) in v.to_le_bytes().iter().take(w).enumerate() {
                if let Some(x) = d.get_mut(p + k) {
                    *x = *b;
                }
            }
        }
        3 => {
            let p = pos(rng, d.len());
            let n = rng.random_range(1..=(d.len() - p).min(256));
            d.drain(p..p + n);
        }
        4 => {
            let p = pos(rng, d.len());
            let n = rng.random_range(1..=(d.len() - p).min(256));
            let chunk = d[p..p + n].to_vec();
            let times = rng.random_range(1..16);
            for _ in 0..times {
                d.splice(p..p, chunk.iter().copied());
            }
        }
        5 if !other.is_empty() => {
            let p = pos(rng, d.len());
            let q = rng.random_range(0..other.len());
            let n = rng.random_range(1..=(other.len() - q).min(1024));
            d.splice(p..(p + n).min(d.len()), other[q..q + n].iter().copied());
        }
        6 => {
            let p = pos(rng, d.len());
            for b in d.iter_mut().skip(p).take(rng.random_range(1..64)) {
                *b = rng.next_u32() as u8;
            }
        }
        _ => {
            let cut = pos(rng, d.len());
            d.truncate(cut);
        }
    }
    d
}

/// Truncates at a random point (the most common real-world damage: an interrupted download).
pub fn truncate(rng: &mut FuzzRng, data: &[u8]) -> Vec<u8> {
    data[..rng.random_range(0..data.len().max(1))].to_vec()
}
