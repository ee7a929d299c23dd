//! The patch position embedding resampled to another grid, as Hugging Face's DINOv2 does it
//! (`interpolate_pos_encoding`: `F.interpolate(mode="bicubic", align_corners=False)` to
//! `size = (H / patch, W / patch)`), which ONNX exports as `Resize(mode=cubic,
//! coordinate_transformation_mode=half_pixel, cubic_coeff_a=-0.75)`.
//!
//! Both use Keys' cubic convolution with a = −0.75, sample output index `o` at input coordinate
//! `(o + ½)·in/out − ½`, and clamp taps outside the grid to the edge. It is separable: rows first,
//! then columns (the order changes only rounding).

const A: f32 = -0.75;

/// Keys' cubic convolution kernel at distance `d`.
fn cubic(d: f32) -> f32 {
    let d = d.abs();
    if d <= 1.0 {
        ((A + 2.0) * d - (A + 3.0)) * d * d + 1.0
    } else if d < 2.0 {
        ((A * d - 5.0 * A) * d + 8.0 * A) * d - 4.0 * A
    } else {
        0.0
    }
}

/// For each output index, the four input indices (clamped) and their weights.
fn taps(n_in: usize, n_out: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| {
            let x = (o as f32 + 0.5) * scale - 0.5;
            let x0 = x.floor();
            let t = x - x0;
            let idx = |k: i64| (x0 as i64 + k).clamp(0, n_in as i64 - 1) as usize;
            ([idx(-1), idx(0), idx(1), idx(2)], [cubic(t + 1.0), cubic(t), cubic(1.0 - t), cubic(2.0 - t)])
        })
        .collect()
}

/// Resamples `grid [h_in, w_in, dim]` (row-major, channels last) to `[h_out, w_out, dim]`. The
/// same size is returned unchanged, as HF skips the interpolation then.
pub fn resize(grid: &[f32], (h_in, w_in): (usize, usize), (h_out, w_out): (usize, usize), dim: usize) -> Vec<f32> {
    assert_eq!(grid.len(), h_in * w_in * dim, "position grid size");
    if (h_in, w_in) == (h_out, w_out) {
        return grid.to_vec();
    }
    // Along rows: [h_in, w_in, dim] → [h_out, w_in, dim].
    let mut rows = vec![0.0f32; h_out * w_in * dim];
    for (o, (idx, wt)) in taps(h_in, h_out).into_iter().enumerate() {
        let out = &mut rows[o * w_in * dim..(o + 1) * w_in * dim];
        for (i, w) in idx.iter().zip(wt) {
            let src = &grid[i * w_in * dim..(i + 1) * w_in * dim];
            out.iter_mut().zip(src).for_each(|(y, x)| *y += w * x);
        }
    }
    // Along columns: → [h_out, w_out, dim].
    let col_taps = taps(w_in, w_out);
    let mut out = vec![0.0f32; h_out * w_out * dim];
    for r in 0..h_out {
        for (o, (idx, wt)) in col_taps.iter().enumerate() {
            let dst = &mut out[(r * w_out + o) * dim..(r * w_out + o + 1) * dim];
            for (i, w) in idx.iter().zip(wt) {
                let src = &rows[(r * w_in + i) * dim..(r * w_in + i + 1) * dim];
                dst.iter_mut().zip(src).for_each(|(y, x)| *y += w * x);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_and_constants_stay_constant() {
        for (n_in, n_out) in [(37, 16), (37, 32), (4, 9), (5, 5)] {
            for (_, w) in taps(n_in, n_out) {
                assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            }
        }
        let g = vec![2.5f32; 37 * 37 * 3];
        assert!(resize(&g, (37, 37), (16, 16), 3).iter().all(|v| (v - 2.5).abs() < 1e-5));
    }

    #[test]
    fn a_hand_computed_upsampling() {
        // 1-D, 2 → 4 (one row, one channel): output o samples x = (o + ½)/2 − ½ =
        // −0.25, 0.25, 0.75, 1.25. At x = 0.25 (x0 = 0, t = 0.25) the taps are indices
        // [−1→0, 0, 1, 2→1] with weights W(1.25), W(0.25), W(0.75), W(1.75):
        // W(0.25) = (1.25·0.25 − 2.25)·0.0625 + 1 = 0.87890625,
        // W(0.75) = (1.25·0.75 − 2.25)·0.5625 + 1 = 0.26171875,
        // W(1.25) = ((−0.75·1.25 + 3.75)·1.25 − 6)·1.25 + 3 = −0.10546875,
        // W(1.75) = ((−0.75·1.75 + 3.75)·1.75 − 6)·1.75 + 3 = −0.03515625.
        // Values [0, 1]: 0·(W(1.25) + W(0.25)) + 1·(W(0.75) + W(1.75)) = 0.2265625.
        let out = resize(&[0.0, 1.0], (1, 2), (1, 4), 1);
        assert!((out[1] - 0.2265625).abs() < 1e-6, "{out:?}");
        // Symmetry: out[2] = 1 − out[1]; the ends overshoot the edge values slightly.
        assert!((out[2] - (1.0 - 0.2265625)).abs() < 1e-6);
        assert!(out[0] < 0.0 && out[3] > 1.0);
    }
}
