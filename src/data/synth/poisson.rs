//! Poisson image editing (Pérez et al. 2003) on a rectangle, one channel at a time: find `f`
//! whose discrete Laplacian equals the guidance field's divergence at every interior pixel and
//! which equals the destination on the rectangle's outer ring of pixels. The 5-point system
//! (4·f_p − Σ interior neighbours = Σ guidance + Σ ring neighbours) is symmetric positive definite,
//! so it is solved by conjugate gradients from the destination as the first guess, until the
//! residual's norm falls below `tolerance` × the right-hand side's.

/// The solved rectangle and how the solve went.
#[derive(Clone, Debug)]
pub struct Solution {
    /// `w × h`, row-major; the outer ring is the destination's.
    pub values: Vec<f64>,
    pub iterations: u32,
    /// Final ‖b − A·x‖ / ‖b‖.
    pub relative_residual: f64,
}

/// Blends `patch` into `dest` (both `w × h`, one channel). With `mixed`, each neighbour pair's
/// guidance is whichever of the patch's and the destination's differences is larger in magnitude
/// (texture of both survives); otherwise the patch's.
pub fn blend(dest: &[f64], patch: &[f64], w: usize, h: usize, mixed: bool, tolerance: f64, max_iter: u32) -> Solution {
    assert_eq!(dest.len(), w * h);
    assert_eq!(patch.len(), w * h);
    let mut values = dest.to_vec();
    if w < 3 || h < 3 {
        return Solution { values, iterations: 0, relative_residual: 0.0 };
    }
    let (iw, ih) = (w - 2, h - 2);
    let n = iw * ih;
    let at = |x: usize, y: usize| y * w + x;
    let guide = |p: usize, q: usize| {
        let g = patch[p] - patch[q];
        let d = dest[p] - dest[q];
        if mixed && d.abs() > g.abs() {
            d
        } else {
            g
        }
    };
    // Right-hand side: guidance of the four pairs, plus the fixed ring neighbours.
    let mut b = vec![0.0f64; n];
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            let p = at(x, y);
            let mut s = 0.0;
            for (qx, qy) in [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)] {
                let q = at(qx, qy);
                s += guide(p, q);
                if qx == 0 || qy == 0 || qx == w - 1 || qy == h - 1 {
                    s += dest[q];
                }
            }
            b[(y - 1) * iw + (x - 1)] = s;
        }
    }
    // A·v on the interior unknowns (neighbours on the ring are in b, not in A).
    let apply = |v: &[f64], out: &mut [f64]| {
        for j in 0..ih {
            for i in 0..iw {
                let k = j * iw + i;
                let mut s = 4.0 * v[k];
                if i > 0 {
                    s -= v[k - 1];
                }
                if i + 1 < iw {
                    s -= v[k + 1];
                }
                if j > 0 {
                    s -= v[k - iw];
                }
                if j + 1 < ih {
                    s -= v[k + iw];
                }
                out[k] = s;
            }
        }
    };
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let mut x: Vec<f64> = (0..n).map(|k| dest[at(k % iw + 1, k / iw + 1)]).collect();
    let mut ap = vec![0.0; n];
    apply(&x, &mut ap);
    let mut r: Vec<f64> = b.iter().zip(&ap).map(|(b, a)| b - a).collect();
    let mut p = r.clone();
    let mut rs = dot(&r, &r);
    let b_norm = dot(&b, &b).sqrt().max(f64::MIN_POSITIVE);
    let mut iterations = 0;
    while rs.sqrt() > tolerance * b_norm && iterations < max_iter {
        apply(&p, &mut ap);
        let pap = dot(&p, &ap);
        if pap <= 0.0 {
            break;
        }
        let alpha = rs / pap;
        for ((xk, rk), (pk, apk)) in x.iter_mut().zip(r.iter_mut()).zip(p.iter().zip(&ap)) {
            *xk += alpha * pk;
            *rk -= alpha * apk;
        }
        let rs_new = dot(&r, &r);
        let beta = rs_new / rs;
        for (pk, rk) in p.iter_mut().zip(&r) {
            *pk = rk + beta * *pk;
        }
        rs = rs_new;
        iterations += 1;
    }
    for (k, v) in x.iter().enumerate() {
        values[at(k % iw + 1, k / iw + 1)] = *v;
    }
    Solution { values, iterations, relative_residual: rs.sqrt() / b_norm }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn laplacian(f: &[f64], w: usize, x: usize, y: usize) -> f64 {
        let at = |x: usize, y: usize| f[y * w + x];
        at(x - 1, y) + at(x + 1, y) + at(x, y - 1) + at(x, y + 1) - 4.0 * at(x, y)
    }

    #[test]
    fn known_answer_is_the_patch_lifted_to_the_boundary() {
        // The destination's ring is the patch plus 10: the unique solution is patch + 10 everywhere.
        let (w, h) = (12usize, 9usize);
        let patch: Vec<f64> = (0..w * h).map(|i| ((i % w).pow(2) + 3 * (i / w) + (i % w) * (i / w)) as f64).collect();
        let mut dest: Vec<f64> = patch.iter().map(|v| v + 10.0).collect();
        // The destination's interior must not matter (it is only the first guess).
        for y in 1..h - 1 {
            for x in 1..w - 1 {
                dest[y * w + x] = 200.0;
            }
        }
        let s = blend(&dest, &patch, w, h, false, 1e-12, 1000);
        assert!(s.relative_residual <= 1e-12, "{}", s.relative_residual);
        let err = s.values.iter().zip(&patch).map(|(f, g)| (f - g - 10.0).abs()).fold(0.0, f64::max);
        assert!(err < 1e-8, "max error {err}");
        assert!(s.iterations > 0 && s.iterations <= 140, "{} iterations for 70 unknowns", s.iterations);
    }

    #[test]
    fn laplacian_matches_the_patch_and_the_ring_is_kept() {
        let (w, h) = (20, 15);
        let hash = |i: usize, k: usize| ((i * 2654435761 + k * 97) % 251) as f64;
        let dest: Vec<f64> = (0..w * h).map(|i| hash(i, 1)).collect();
        let patch: Vec<f64> = (0..w * h).map(|i| hash(i, 2)).collect();
        let s = blend(&dest, &patch, w, h, false, 1e-10, 5000);
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                if x == 0 || y == 0 || x == w - 1 || y == h - 1 {
                    assert_eq!(s.values[i], dest[i], "ring ({x}, {y})");
                } else {
                    let d = laplacian(&s.values, w, x, y) - laplacian(&patch, w, x, y);
                    assert!(d.abs() < 1e-5, "Laplacian off by {d} at ({x}, {y})");
                }
            }
        }
    }

    #[test]
    fn mixed_gradients_with_a_flat_patch_give_the_destination() {
        let (w, h) = (10, 10);
        let dest: Vec<f64> = (0..w * h).map(|i| ((i * 37) % 101) as f64).collect();
        let s = blend(&dest, &[5.0; 100], w, h, true, 1e-12, 1000);
        let err = s.values.iter().zip(&dest).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(err < 1e-8, "{err}");
        // Normal cloning of a flat patch instead smooths the interior to the ring's harmonic fill.
        let flat = blend(&dest, &[5.0; 100], w, h, false, 1e-12, 1000);
        assert!(flat.values.iter().zip(&dest).any(|(a, b)| (a - b).abs() > 1.0));
    }
}
