//! 2-D convolutions on single images in CHW layout (batching is a loop in the caller).
//!
//! `Padding` is explicit per side so that TensorFlow's asymmetric "SAME" padding (the layout
//! EfficientNet checkpoints were trained with) is representable.

use crate::ops::gemm::{sgemm, MatRef};
pub use crate::opset::Padding;
use rayon::prelude::*;

/// Dense convolution: `x[ci, h, w]`, `weight[co, ci, k, k]`, `bias[co]` → `[co, oh, ow]`.
/// im2col then one GEMM; 1×1 stride-1 convolutions skip the im2col.
#[allow(clippy::too_many_arguments)]
pub fn conv2d(
    x: &[f32],
    ci: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    co: usize,
    k: usize,
    stride: usize,
    pad: Padding,
    bias: &[f32],
) -> (Vec<f32>, usize, usize) {
    let (oh, ow) = pad.output_hw(h, w, k, stride);
    let mut out = vec![0.0f32; co * oh * ow];
    for (c, row) in out.chunks_exact_mut(oh * ow).enumerate() {
        row.fill(bias[c]);
    }
    if k == 1 && stride == 1 && pad == (Padding { top: 0, left: 0, bottom: 0, right: 0 }) {
        sgemm(co, oh * ow, ci, MatRef::rows(weight, ci), MatRef::rows(x, h * w), &mut out, true);
        return (out, oh, ow);
    }
    let cols = im2col(x, ci, h, w, k, stride, pad, oh, ow);
    sgemm(co, oh * ow, ci * k * k, MatRef::rows(weight, ci * k * k), MatRef::rows(&cols, oh * ow), &mut out, true);
    (out, oh, ow)
}

/// The columns of a dense convolution: `[ci·k·k, oh·ow]`, row `(c, ky, kx)` (the weight's order),
/// zero where the window falls in the padding.
#[allow(clippy::too_many_arguments)]
pub fn im2col(
    x: &[f32],
    ci: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: Padding,
    oh: usize,
    ow: usize,
) -> Vec<f32> {
    let mut cols = vec![0.0f32; ci * k * k * oh * ow];
    cols.par_chunks_mut(oh * ow).enumerate().for_each(|(r, dst)| {
        let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        for oy in 0..oh {
            let iy = (oy * stride + ky) as isize - pad.top as isize;
            if iy < 0 || iy >= h as isize {
                continue;
            }
            for ox in 0..ow {
                let ix = (ox * stride + kx) as isize - pad.left as isize;
                if ix >= 0 && ix < w as isize {
                    dst[oy * ow + ox] = x[c * h * w + iy as usize * w + ix as usize];
                }
            }
        }
    });
    cols
}

/// Depthwise convolution (one k×k filter per channel): `weight[c, 1, k, k]`.
///
/// Each channel is copied into a zero-bordered plane first, so the taps need no bounds checks and
/// every tap is one multiply-add over an output row (contiguous at stride 1, which vectorises).
/// This is the encoder's hottest op on the CPU. Every output sums bias, then the taps in `(ky, kx)`
/// order, as the direct form does (a tap in the padding adds `w·0`).
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv2d(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    k: usize,
    stride: usize,
    pad: Padding,
    bias: &[f32],
) -> (Vec<f32>, usize, usize) {
    let (oh, ow) = pad.output_hw(h, w, k, stride);
    let pw = w + pad.left + pad.right;
    let plane_len = (h + pad.top + pad.bottom) * pw;
    let mut out = vec![0.0f32; c * oh * ow];
    // One padded plane per rayon job: only its interior is written, so the border stays zero.
    out.par_chunks_mut(oh * ow).enumerate().for_each_init(
        || vec![0.0f32; plane_len],
        |plane, (ch, dst)| {
            for (y, row) in x[ch * h * w..(ch + 1) * h * w].chunks_exact(w).enumerate() {
                let at = (y + pad.top) * pw + pad.left;
                plane[at..at + w].copy_from_slice(row);
            }
            let f = &weight[ch * k * k..(ch + 1) * k * k];
            for (oy, orow) in dst.chunks_exact_mut(ow).enumerate() {
                orow.fill(bias[ch]);
                for ky in 0..k {
                    let prow = &plane[(oy * stride + ky) * pw..(oy * stride + ky + 1) * pw];
                    for kx in 0..k {
                        let wv = f[ky * k + kx];
                        if stride == 1 {
                            orow.iter_mut().zip(&prow[kx..kx + ow]).for_each(|(o, &v)| *o += wv * v);
                        } else {
                            orow.iter_mut().zip(prow[kx..].iter().step_by(stride)).for_each(|(o, &v)| *o += wv * v);
                        }
                    }
                }
            }
        },
    );
    (out, oh, ow)
}

/// The gradients of [`depthwise_conv2d`] from `dy [c, oh, ow]`: `(dx [c, h, w], dw [c, k, k],
/// db [c])`. Each `dx` element gathers the outputs its pixel fed (no scatter), the form the CUDA
/// kernel takes (`kernels/dwconv.cu`).
#[allow(clippy::too_many_arguments)]
pub fn depthwise_conv2d_backward(
    x: &[f32],
    dy: &[f32],
    c: usize,
    h: usize,
    w: usize,
    weight: &[f32],
    k: usize,
    stride: usize,
    pad: Padding,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (oh, ow) = pad.output_hw(h, w, k, stride);
    let mut dx = vec![0.0f32; c * h * w];
    let mut dw = vec![0.0f32; c * k * k];
    let mut db = vec![0.0f32; c];
    // Output index along one axis that input `i` reaches through tap `t`, if any.
    let out_of = |i: usize, t: usize, p: usize, n_out: usize| -> Option<usize> {
        let num = (i + p).checked_sub(t)?;
        (num % stride == 0 && num / stride < n_out).then_some(num / stride)
    };
    dx.par_chunks_mut(h * w).zip(dw.par_chunks_mut(k * k)).zip(db.par_iter_mut()).enumerate().for_each(
        |(ch, ((dxc, dwc), dbc))| {
            let (src, g) = (&x[ch * h * w..(ch + 1) * h * w], &dy[ch * oh * ow..(ch + 1) * oh * ow]);
            let f = &weight[ch * k * k..(ch + 1) * k * k];
            for iy in 0..h {
                for ix in 0..w {
                    let mut acc = 0.0;
                    for ky in 0..k {
                        let Some(oy) = out_of(iy, ky, pad.top, oh) else { continue };
                        for kx in 0..k {
                            if let Some(ox) = out_of(ix, kx, pad.left, ow) {
                                acc += g[oy * ow + ox] * f[ky * k + kx];
                            }
                        }
                    }
                    dxc[iy * w + ix] = acc;
                }
            }
            for ky in 0..k {
                for kx in 0..k {
                    let mut acc = 0.0;
                    for oy in 0..oh {
                        let iy = (oy * stride + ky) as isize - pad.top as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for ox in 0..ow {
                            let ix = (ox * stride + kx) as isize - pad.left as isize;
                            if ix >= 0 && ix < w as isize {
                                acc += g[oy * ow + ox] * src[iy as usize * w + ix as usize];
                            }
                        }
                    }
                    dwc[ky * k + kx] = acc;
                }
            }
            *dbc = g.iter().sum();
        },
    );
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct (no im2col) convolution for checking the GEMM path.
    #[allow(clippy::too_many_arguments)]
    fn conv_direct(
        x: &[f32],
        ci: usize,
        h: usize,
        w: usize,
        wt: &[f32],
        co: usize,
        k: usize,
        s: usize,
        p: Padding,
    ) -> Vec<f32> {
        let (oh, ow) = p.output_hw(h, w, k, s);
        let mut out = vec![0.0; co * oh * ow];
        for o in 0..co {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0.0;
                    for c in 0..ci {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s + ky) as isize - p.top as isize;
                                let ix = (ox * s + kx) as isize - p.left as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    acc += x[c * h * w + iy as usize * w + ix as usize]
                                        * wt[((o * ci + c) * k + ky) * k + kx];
                                }
                            }
                        }
                    }
                    out[(o * oh + oy) * ow + ox] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn tf_same_padding_is_asymmetric_for_even_inputs() {
        assert_eq!(Padding::tf_same(224, 224, 3, 2), Padding { top: 0, left: 0, bottom: 1, right: 1 });
        assert_eq!(Padding::tf_same(56, 56, 5, 2), Padding { top: 1, left: 1, bottom: 2, right: 2 });
        assert_eq!(Padding::tf_same(14, 14, 5, 1), Padding { top: 2, left: 2, bottom: 2, right: 2 });
    }

    #[test]
    fn conv_paths_match_direct_convolution() {
        let (ci, co, h, w) = (3, 4, 9, 7);
        let x: Vec<f32> = (0..ci * h * w).map(|i| ((i * 37 % 11) as f32) - 5.0).collect();
        for &(k, s) in &[(1, 1), (3, 1), (3, 2), (5, 2)] {
            let wt: Vec<f32> = (0..co * ci * k * k).map(|i| ((i * 13 % 7) as f32) * 0.1 - 0.3).collect();
            let p = Padding::tf_same(h, w, k, s);
            let (y, _, _) = conv2d(&x, ci, h, w, &wt, co, k, s, p, &vec![0.0; co]);
            let want = conv_direct(&x, ci, h, w, &wt, co, k, s, p);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "k{k} s{s}: {a} vs {b}");
            }
        }
        // Depthwise equals a dense conv with a block-diagonal weight, at every kernel and stride
        // of the encoder.
        for &(k, s) in &[(3, 1), (3, 2), (5, 1), (5, 2)] {
            let dw: Vec<f32> = (0..ci * k * k).map(|i| (i % 5) as f32 * 0.2 - 0.4).collect();
            let mut dense = vec![0.0; ci * ci * k * k];
            for c in 0..ci {
                dense[(c * ci + c) * k * k..(c * ci + c + 1) * k * k].copy_from_slice(&dw[c * k * k..(c + 1) * k * k]);
            }
            let p = Padding::tf_same(h, w, k, s);
            let (y, oh, ow) = depthwise_conv2d(&x, ci, h, w, &dw, k, s, p, &vec![0.0; ci]);
            let want = conv_direct(&x, ci, h, w, &dense, ci, k, s, p);
            assert_eq!(y.len(), ci * oh * ow);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4, "depthwise k{k} s{s}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn depthwise_backward_matches_finite_differences_grad() {
        use crate::ops::gradcheck::{assert_grad, numeric_grad, project, rng, uniform, Tol};
        let mut r = rng(17);
        let (c, h, w) = (3, 7, 6);
        for &(k, s) in &[(3, 1), (3, 2), (5, 2), (5, 1)] {
            let p = Padding::tf_same(h, w, k, s);
            let (oh, ow) = p.output_hw(h, w, k, s);
            let x = uniform(&mut r, c * h * w, -1.0, 1.0);
            let wt = uniform(&mut r, c * k * k, -1.0, 1.0);
            let b = uniform(&mut r, c, -1.0, 1.0);
            let up = uniform(&mut r, c * oh * ow, -1.0, 1.0);
            let (dx, dw, db) = depthwise_conv2d_backward(&x, &up, c, h, w, &wt, k, s, p);
            let tol = Tol { atol: 2e-3, rtol: 1e-2 };
            let f = |x: &[f32], wt: &[f32], b: &[f32]| project(&depthwise_conv2d(x, c, h, w, wt, k, s, p, b).0, &up);
            assert_grad(&format!("dx k{k} s{s}"), &dx, &numeric_grad(&x, 1e-2, |x| f(x, &wt, &b)), tol);
            assert_grad(&format!("dw k{k} s{s}"), &dw, &numeric_grad(&wt, 1e-2, |wt| f(&x, wt, &b)), tol);
            assert_grad(&format!("db k{k} s{s}"), &db, &numeric_grad(&b, 1e-2, |b| f(&x, &wt, b)), tol);
        }
    }
}
