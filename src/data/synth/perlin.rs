//! Two-dimensional gradient (Perlin) noise, as DRAEM's reference code draws it: a random unit
//! gradient at each lattice point, and at each pixel the quintic-faded interpolation of the four
//! surrounding gradients' dot products with the offsets to them. With unit gradients the value
//! never exceeds √½ in magnitude (reached only at a cell's centre with all four gradients aimed
//! at it), which is why DRAEM's threshold of 0.5 keeps small blobs.

use rand::Rng;

/// The largest magnitude a value can have.
pub const BOUND: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// Noise over a `w × h` image with `cells_x × cells_y` lattice cells (≥ 1 each), row-major.
/// Pixel centres are sampled, so the field does not depend on where the image's edge falls.
pub fn noise(w: usize, h: usize, cells_x: usize, cells_y: usize, rng: &mut impl Rng) -> Vec<f32> {
    let (cx, cy) = (cells_x.max(1), cells_y.max(1));
    let grads: Vec<(f32, f32)> = (0..(cx + 1) * (cy + 1))
        .map(|_| {
            let a = rng.random_range(0.0..std::f32::consts::TAU);
            (a.cos(), a.sin())
        })
        .collect();
    let g = |i: usize, j: usize| grads[j * (cx + 1) + i];
    let fade = |t: f32| t * t * t * (t * (t * 6.0 - 15.0) + 10.0);
    let mut out = Vec::with_capacity(w * h);
    for y in 0..h {
        let v = (y as f32 + 0.5) * cy as f32 / h as f32;
        let j = (v as usize).min(cy - 1);
        let fy = v - j as f32;
        for x in 0..w {
            let u = (x as f32 + 0.5) * cx as f32 / w as f32;
            let i = (u as usize).min(cx - 1);
            let fx = u - i as f32;
            let dot = |(gx, gy): (f32, f32), dx: f32, dy: f32| gx * dx + gy * dy;
            let n00 = dot(g(i, j), fx, fy);
            let n10 = dot(g(i + 1, j), fx - 1.0, fy);
            let n01 = dot(g(i, j + 1), fx, fy - 1.0);
            let n11 = dot(g(i + 1, j + 1), fx - 1.0, fy - 1.0);
            let (sx, sy) = (fade(fx), fade(fy));
            let n0 = n00 + sx * (n10 - n00);
            let n1 = n01 + sx * (n11 - n01);
            out.push(n0 + sy * (n1 - n0));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn values_are_bounded_varied_and_deterministic() {
        for (cells, seed) in [(1, 0), (4, 1), (32, 2), (100, 3)] {
            let a = noise(64, 48, cells, cells, &mut ChaCha8Rng::seed_from_u64(seed));
            assert_eq!(a.len(), 64 * 48);
            assert!(a.iter().all(|v| v.abs() <= BOUND + 1e-5), "{cells} cells: beyond ±√½");
            assert_eq!(a, noise(64, 48, cells, cells, &mut ChaCha8Rng::seed_from_u64(seed)));
            assert_ne!(a, noise(64, 48, cells, cells, &mut ChaCha8Rng::seed_from_u64(seed + 10)));
            let mean = a.iter().sum::<f32>() / a.len() as f32;
            let sd = (a.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / a.len() as f32).sqrt();
            assert!(sd > 0.05, "{cells} cells: nearly constant (sd {sd})");
        }
    }

    #[test]
    fn noise_is_smooth_at_coarse_scales() {
        // Four cells across 64 pixels: neighbouring pixels differ by far less than the range.
        let a = noise(64, 64, 4, 4, &mut ChaCha8Rng::seed_from_u64(5));
        let max_step = (0..64 * 63).map(|i| (a[i] - a[i + 64]).abs()).fold(0.0f32, f32::max);
        assert!(max_step < 0.2, "step {max_step}");
    }
}
