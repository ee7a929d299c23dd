//! Pooling and resampling on CHW feature maps and on token rows.

use rayon::prelude::*;

/// Mean over rows `[n, c]` → `[c]`.
pub fn mean_rows(x: &[f32], c: usize) -> Vec<f32> {
    let n = x.len() / c.max(1);
    let mut out = vec![0.0; c];
    for row in x.chunks_exact(c) {
        out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= n.max(1) as f32);
    out
}

/// Backward of [`mean_rows`]: `dx[r, :] += dy / n` for every row.
pub fn mean_rows_backward(dx: &mut [f32], dy: &[f32]) {
    let c = dy.len();
    let inv = 1.0 / (dx.len() / c.max(1)).max(1) as f32;
    dx.par_chunks_mut(c).for_each(|row| row.iter_mut().zip(dy).for_each(|(d, &g)| *d += g * inv));
}

/// Global average pool `[c, h, w]` → `[c]`.
pub fn global_avg_pool(x: &[f32], c: usize) -> Vec<f32> {
    let hw = x.len() / c.max(1);
    x.chunks_exact(hw).map(|ch| ch.iter().sum::<f32>() / hw as f32).collect()
}

/// Average over a `k×k` window, stride 1, "same" output size, counting only in-bounds pixels
/// (PatchCore's local neighbourhood aggregation).
pub fn avg_pool_same(x: &[f32], c: usize, h: usize, w: usize, k: usize) -> Vec<f32> {
    let r = (k / 2) as isize;
    let mut out = vec![0.0; c * h * w];
    out.par_chunks_mut(h * w).enumerate().for_each(|(ch, dst)| {
        let src = &x[ch * h * w..(ch + 1) * h * w];
        for y in 0..h as isize {
            for xx in 0..w as isize {
                let (mut acc, mut n) = (0.0, 0.0);
                for yy in (y - r).max(0)..(y + r + 1).min(h as isize) {
                    for xk in (xx - r).max(0)..(xx + r + 1).min(w as isize) {
                        acc += src[yy as usize * w + xk as usize];
                        n += 1.0;
                    }
                }
                dst[y as usize * w + xx as usize] = acc / n;
            }
        }
    });
    out
}

/// Bilinear resize of a `[c, h, w]` map to `[c, oh, ow]` (align_corners = false, as PyTorch).
pub fn resize_bilinear(x: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    let (sy, sx) = (h as f32 / oh as f32, w as f32 / ow as f32);
    let mut out = vec![0.0; c * oh * ow];
    out.par_chunks_mut(oh * ow).enumerate().for_each(|(ch, dst)| {
        let src = &x[ch * h * w..(ch + 1) * h * w];
        for oy in 0..oh {
            let fy = ((oy as f32 + 0.5) * sy - 0.5).max(0.0);
            let y0 = (fy as usize).min(h - 1);
            let y1 = (y0 + 1).min(h - 1);
            let ty = fy - y0 as f32;
            for ox in 0..ow {
                let fx = ((ox as f32 + 0.5) * sx - 0.5).max(0.0);
                let x0 = (fx as usize).min(w - 1);
                let x1 = (x0 + 1).min(w - 1);
                let tx = fx - x0 as f32;
                let top = src[y0 * w + x0] * (1.0 - tx) + src[y0 * w + x1] * tx;
                let bot = src[y1 * w + x0] * (1.0 - tx) + src[y1 * w + x1] * tx;
                dst[oy * ow + ox] = top * (1.0 - ty) + bot * ty;
            }
        }
    });
    out
}

/// Area (box) downsampling `[c, h, w]` → `[c, oh, ow]` for integer factors `h / oh`, `w / ow`.
pub fn resize_area(x: &[f32], c: usize, h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    if !h.is_multiple_of(oh) || !w.is_multiple_of(ow) {
        return resize_bilinear(x, c, h, w, oh, ow);
    }
    let (fy, fx) = (h / oh, w / ow);
    let mut out = vec![0.0; c * oh * ow];
    for ch in 0..c {
        for y in 0..h {
            for xx in 0..w {
                out[ch * oh * ow + (y / fy) * ow + xx / fx] += x[ch * h * w + y * w + xx];
            }
        }
    }
    out.iter_mut().for_each(|v| *v /= (fy * fx) as f32);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::gradcheck::{check, project, rng, uniform, Tol};

    #[test]
    fn mean_rows_backward_matches_finite_differences_grad() {
        let (n, c) = (7, 5);
        let mut g = rng(71);
        let x = uniform(&mut g, n * c, -1.0, 1.0);
        let r = uniform(&mut g, c, -1.0, 1.0);
        let mut dx = vec![0.0; x.len()];
        mean_rows_backward(&mut dx, &r);
        check("dx", &x, &dx, 1e-2, Tol { atol: 1e-4, rtol: 1e-3 }, |x| project(&mean_rows(x, c), &r));
    }

    #[test]
    fn pools_and_resize_keep_constants_and_means() {
        let x = vec![2.0; 2 * 3 * 4];
        assert!(avg_pool_same(&x, 2, 3, 4, 3).iter().all(|&v| (v - 2.0).abs() < 1e-6));
        assert!(resize_bilinear(&x, 2, 3, 4, 7, 5).iter().all(|&v| (v - 2.0).abs() < 1e-6));
        assert_eq!(global_avg_pool(&[1.0, 3.0, 5.0, 7.0], 2), vec![2.0, 6.0]);
        assert_eq!(mean_rows(&[1.0, 2.0, 3.0, 4.0], 2), vec![2.0, 3.0]);
        // Upsampling 1×2 → 1×4 interpolates between the two pixels.
        let r = resize_bilinear(&[0.0, 1.0], 1, 1, 2, 1, 4);
        assert_eq!(r, vec![0.0, 0.25, 0.75, 1.0]);
    }
}
