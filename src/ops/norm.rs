//! Normalisations over the last dimension: RMSNorm (LLaMA), LayerNorm (BERT, the SAGE
//! projection) and L2 normalisation (sentence embeddings, cosine similarity).

use super::expect_last_dim;
use super::vmath;
use crate::tensor::{DType, Tensor};
use anyhow::Result;
use rayon::prelude::*;

/// CPU reference: `y = x / sqrt(mean(x²) + eps) · w`, row by row.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let c = w.len();
    y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(yr, xr)| {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
            *o = v * inv * g;
        }
    });
}

/// Backward of [`rms_norm_rows`], accumulating into `dx` and `dw`. The per-row `1/rms` is
/// recomputed (one pass over `x`) rather than saved by the forward.
pub fn rms_norm_backward(dx: &mut [f32], dw: Option<&mut [f32]>, dy: &[f32], x: &[f32], w: &[f32], eps: f32) {
    let c = w.len();
    let rows = x.len() / c;
    let mut rstd = vec![0.0f32; rows];
    // y_j = x_j·r·w_j, r = (Σx²/c + eps)^-½  ⇒  dx_j = r·w_j·dy_j − r³·x_j·(Σ_i dy_i·w_i·x_i)/c.
    dx.par_chunks_mut(c).zip(x.par_chunks(c)).zip(dy.par_chunks(c)).zip(rstd.par_iter_mut()).for_each(
        |(((dxr, xr), dyr), rs)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let r = 1.0 / (ms + eps).sqrt();
            *rs = r;
            let dot: f32 = dyr.iter().zip(w).zip(xr).map(|((g, w), v)| g * w * v).sum();
            let k = r * r * r * dot / c as f32;
            for (((d, &g), &wj), &v) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                *d += r * wj * g - k * v;
            }
        },
    );
    if let Some(dw) = dw {
        accumulate_columns(dw, rows, |r, j| dy[r * c + j] * x[r * c + j] * rstd[r]);
    }
}

/// `acc[j] += Σ_r f(r, j)`: parallel over column chunks so each element has one writer and a
/// fixed summation order (deterministic under any thread count).
fn accumulate_columns(acc: &mut [f32], rows: usize, f: impl Fn(usize, usize) -> f32 + Sync) {
    const CHUNK: usize = 64;
    acc.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, a)| {
        for r in 0..rows {
            for (jj, v) in a.iter_mut().enumerate() {
                *v += f(r, ci * CHUNK + jj);
            }
        }
    });
}

/// CPU reference: `y = (x − mean) / sqrt(var + eps) · w + b`, row by row.
pub fn layer_norm_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let c = w.len();
    y.par_chunks_mut(c).zip(x.par_chunks(c)).with_min_len(16).for_each(|(yr, xr)| {
        #[cfg(target_arch = "x86_64")]
        {
            if vmath::avx512() {
                // SAFETY: the CPU has AVX-512F and FMA (checked).
                return unsafe { layer_norm_row_avx512(xr, w, b, eps, yr) };
            }
            if vmath::avx2_fma() {
                // SAFETY: the CPU has AVX2 and FMA (checked).
                return unsafe { layer_norm_row_avx2(xr, w, b, eps, yr) };
            }
        }
        layer_norm_row(xr, w, b, eps, yr)
    });
}

/// One row of [`layer_norm_rows`]; inlined into a build for each instruction set below, where
/// the compiler widens its loops (sixteen or eight lanes; the same sums in the same lanes, so the
/// same result).
#[inline(always)]
fn layer_norm_row(xr: &[f32], w: &[f32], b: &[f32], eps: f32, yr: &mut [f32]) {
    let c = w.len();
    // Eight-lane sums: a serial chain of f32 adds cannot be vectorized.
    let mean = vmath::sum(xr) / c as f32;
    let var = vmath::sum_sq_dev(xr, mean) / c as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for (i, o) in yr.iter_mut().enumerate() {
        *o = (xr[i] - mean) * inv * w[i] + b[i];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn layer_norm_row_avx512(xr: &[f32], w: &[f32], b: &[f32], eps: f32, yr: &mut [f32]) {
    layer_norm_row(xr, w, b, eps, yr)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn layer_norm_row_avx2(xr: &[f32], w: &[f32], b: &[f32], eps: f32, yr: &mut [f32]) {
    layer_norm_row(xr, w, b, eps, yr)
}

/// Backward of [`layer_norm_rows`], accumulating into `dx`, `dw` and `db`; mean and `1/σ` are
/// recomputed per row.
pub fn layer_norm_backward(
    dx: &mut [f32],
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    eps: f32,
) {
    let c = w.len();
    let rows = x.len() / c;
    let mut stats = vec![(0.0f32, 0.0f32); rows];
    dx.par_chunks_mut(c).zip(x.par_chunks(c)).zip(dy.par_chunks(c)).zip(stats.par_iter_mut()).for_each(
        |(((dxr, xr), dyr), st)| {
            let mean = xr.iter().sum::<f32>() / c as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / c as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            *st = (mean, rstd);
            // dx = rstd·(ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)), ĝ = dy·w.
            let (mut m_g, mut m_gx) = (0.0f32, 0.0f32);
            for ((&g, &wj), &v) in dyr.iter().zip(w).zip(xr) {
                let gh = g * wj;
                m_g += gh;
                m_gx += gh * (v - mean) * rstd;
            }
            m_g /= c as f32;
            m_gx /= c as f32;
            for (((d, &g), &wj), &v) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                let xh = (v - mean) * rstd;
                *d += rstd * (g * wj - m_g - xh * m_gx);
            }
        },
    );
    if let Some(dw) = dw {
        accumulate_columns(dw, rows, |r, j| {
            let (mean, rstd) = stats[r];
            dy[r * c + j] * (x[r * c + j] - mean) * rstd
        });
    }
    if let Some(db) = db {
        accumulate_columns(db, rows, |r, j| dy[r * c + j]);
    }
}

pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<Tensor> {
    expect_last_dim(x, w.numel(), "rms_norm")?;
    let (x, w) = (x.to_dtype(DType::F32), w.to_dtype(DType::F32));
    let mut y = vec![0.0; x.numel()];
    rms_norm_rows(x.f32s()?, w.f32s()?, eps, &mut y);
    Tensor::from_vec(y, x.shape())
}

pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    expect_last_dim(x, w.numel(), "layer_norm")?;
    let x = x.to_dtype(DType::F32);
    let (w, b) = (w.to_dtype(DType::F32), b.to_dtype(DType::F32));
    let mut y = vec![0.0; x.numel()];
    layer_norm_rows(x.f32s()?, w.f32s()?, b.f32s()?, eps, &mut y);
    Tensor::from_vec(y, x.shape())
}

/// Scales each row to unit L2 norm (rows of zeros stay zero).
pub fn l2_normalize_slice(row: &mut [f32]) {
    let n = row.iter().map(|v| v * v).sum::<f32>().sqrt();
    if n > 0.0 {
        row.iter_mut().for_each(|v| *v /= n);
    }
}

pub fn l2_normalize_rows(x: &Tensor) -> Result<Tensor> {
    let (_, c) = x.rows_cols();
    let mut y = x.to_dtype(DType::F32).into_f32s()?;
    y.chunks_mut(c.max(1)).for_each(l2_normalize_slice);
    Tensor::from_vec(y, x.shape())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::gradcheck::{check, project, rng, uniform, Tol};

    #[test]
    fn rms_norm_backward_matches_finite_differences_grad() {
        let (rows, c, eps) = (3, 7, 1e-5);
        let mut g = rng(21);
        let x = uniform(&mut g, rows * c, -2.0, 2.0);
        let w = uniform(&mut g, c, 0.5, 1.5);
        let r = uniform(&mut g, rows * c, -1.0, 1.0);
        let f = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; rows * c];
            rms_norm_rows(x, w, eps, &mut y);
            project(&y, &r)
        };
        let (mut dx, mut dw) = (vec![0.0; x.len()], vec![0.0; c]);
        rms_norm_backward(&mut dx, Some(&mut dw), &r, &x, &w, eps);
        let tol = Tol { atol: 1e-3, rtol: 1e-2 };
        check("dx", &x, &dx, 1e-2, tol, |x| f(x, &w));
        check("dw", &w, &dw, 1e-2, tol, |w| f(&x, w));
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences_grad() {
        let (rows, c, eps) = (4, 9, 1e-5);
        let mut g = rng(22);
        let x = uniform(&mut g, rows * c, -2.0, 2.0);
        let w = uniform(&mut g, c, 0.5, 1.5);
        let b = uniform(&mut g, c, -0.5, 0.5);
        let r = uniform(&mut g, rows * c, -1.0, 1.0);
        let f = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * c];
            layer_norm_rows(x, w, b, eps, &mut y);
            project(&y, &r)
        };
        let (mut dx, mut dw, mut db) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        layer_norm_backward(&mut dx, Some(&mut dw), Some(&mut db), &r, &x, &w, eps);
        let tol = Tol { atol: 1e-3, rtol: 1e-2 };
        check("dx", &x, &dx, 1e-2, tol, |x| f(x, &w, &b));
        check("dw", &w, &dw, 1e-2, tol, |w| f(&x, w, &b));
        check("db", &b, &db, 1e-2, tol, |b| f(&x, &w, b));
    }

    #[test]
    fn norms_match_hand_computed_values() {
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[1, 4]).unwrap();
        let w = Tensor::from_vec(vec![1.0; 4], &[4]).unwrap();
        let b = Tensor::from_vec(vec![0.0; 4], &[4]).unwrap();
        let r = rms_norm(&x, &w, 0.0).unwrap();
        let rms = (30.0f32 / 4.0).sqrt();
        assert!((r.f32s().unwrap()[3] - 4.0 / rms).abs() < 1e-6);
        let l = layer_norm(&x, &w, &b, 0.0).unwrap();
        let sd = 1.25f32.sqrt();
        assert!((l.f32s().unwrap()[0] + 1.5 / sd).abs() < 1e-6);
        let n = l2_normalize_rows(&x).unwrap();
        assert!((n.f32s().unwrap().iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
