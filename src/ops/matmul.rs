//! Matrix products: `linear` (x·Wᵀ + b, the layout of every checkpoint's linear layers) and
//! batched `matmul`. CPU path: [`crate::ops::gemm::sgemm`].

use super::expect_last_dim;
use crate::ops::gemm::{sgemm, MatRef};
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use rayon::prelude::*;

/// `y[.., out] = x[.., in] · w[out, in]ᵀ + b[out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if w.rank() != 2 {
        bail!("linear: weight must be 2-D, got {:?}", w.shape());
    }
    let (out_f, in_f) = (w.shape()[0], w.shape()[1]);
    expect_last_dim(x, in_f, "linear input")?;
    let (rows, _) = x.rows_cols();
    let w = w.to_dtype(DType::F32);
    let x = x.to_dtype(DType::F32);
    let b = b.map(|b| b.to_dtype(DType::F32));
    let bias = match &b {
        Some(b) if b.numel() != out_f => bail!("linear: bias has {} elements, weight has {out_f} outputs", b.numel()),
        Some(b) => Some(b.f32s()?),
        None => None,
    };
    let mut y = vec![0.0f32; rows * out_f];
    linear_forward(&mut y, x.f32s()?, w.f32s()?, bias, rows, in_f, out_f);
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = out_f;
    Tensor::from_vec(y, &shape)
}

/// CPU reference on slices: `y[rows, out] = x[rows, in] · w[out, in]ᵀ + b[out]` (overwrites `y`).
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, rows: usize, in_f: usize, out_f: usize) {
    if let Some(bias) = b {
        for row in y[..rows * out_f].chunks_exact_mut(out_f) {
            row.copy_from_slice(bias);
        }
    }
    sgemm(rows, out_f, in_f, MatRef::rows(x, in_f), MatRef::transposed(w, in_f), y, b.is_some());
}

/// Backward of [`linear_forward`], accumulating: `dx += dy·w`, `dw += dyᵀ·x`, `db += Σ_rows dy`.
/// A `None` gradient is skipped (frozen weights, or an input that needs no gradient), which
/// saves its GEMM.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: Option<&mut [f32]>,
    db: Option<&mut [f32]>,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    rows: usize,
    in_f: usize,
    out_f: usize,
) {
    if let Some(dx) = dx {
        // [rows, out] · [out, in]
        sgemm(rows, in_f, out_f, MatRef::rows(dy, out_f), MatRef::rows(w, in_f), dx, true);
    }
    if let Some(dw) = dw {
        // [out, rows] · [rows, in]
        sgemm(out_f, in_f, rows, MatRef::transposed(dy, out_f), MatRef::rows(x, in_f), dw, true);
    }
    if let Some(db) = db {
        // Parallel over output columns so every element is summed by one task in row order.
        db[..out_f].par_chunks_mut(256).enumerate().for_each(|(c, dbc)| {
            let (c0, len) = (c * 256, dbc.len());
            for r in dy[..rows * out_f].chunks_exact(out_f) {
                dbc.iter_mut().zip(&r[c0..c0 + len]).for_each(|(d, g)| *d += g);
            }
        });
    }
}

/// `c[b, m, n] = a[b, m, k] · b[b, k, n]`, or with `b` of rank 2 shared across the batch.
/// `transpose_b` reads `b` as `[.., n, k]`.
pub fn matmul(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    if a.rank() < 2 || b.rank() < 2 {
        bail!("matmul: operands must be at least 2-D, got {:?} and {:?}", a.shape(), b.shape());
    }
    let (m, k) = (a.shape()[a.rank() - 2], a.shape()[a.rank() - 1]);
    let (bk, n) = {
        let (r, c) = (b.shape()[b.rank() - 2], b.shape()[b.rank() - 1]);
        if transpose_b {
            (c, r)
        } else {
            (r, c)
        }
    };
    if bk != k {
        bail!("matmul: inner dimensions differ: {:?} · {:?} (transpose_b={transpose_b})", a.shape(), b.shape());
    }
    let batch = a.numel() / (m * k).max(1);
    let b_batch = b.numel() / (bk * n).max(1);
    if b_batch != 1 && b_batch != batch {
        bail!("matmul: batch sizes differ: {:?} · {:?}", a.shape(), b.shape());
    }
    let (a32, b32) = (a.to_dtype(DType::F32), b.to_dtype(DType::F32));
    let (ad, bd) = (a32.f32s()?, b32.f32s()?);
    let mut c = vec![0.0f32; batch * m * n];
    for i in 0..batch {
        let am = MatRef::rows(&ad[i * m * k..(i + 1) * m * k], k);
        let bs = if b_batch == 1 { 0 } else { i * k * n };
        let bslice = &bd[bs..bs + k * n];
        let bm = if transpose_b { MatRef::transposed(bslice, k) } else { MatRef::rows(bslice, n) };
        sgemm(m, n, k, am, bm, &mut c[i * m * n..(i + 1) * m * n], false);
    }
    let mut shape = a.shape()[..a.rank() - 2].to_vec();
    shape.extend([m, n]);
    Tensor::from_vec(c, &shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::gradcheck::{check, project, rng, uniform, Tol};

    #[test]
    fn linear_backward_matches_finite_differences_grad() {
        let (rows, in_f, out_f) = (5, 7, 3);
        let mut g = rng(11);
        let x = uniform(&mut g, rows * in_f, -1.0, 1.0);
        let w = uniform(&mut g, out_f * in_f, -1.0, 1.0);
        let b = uniform(&mut g, out_f, -1.0, 1.0);
        let r = uniform(&mut g, rows * out_f, -1.0, 1.0);
        let f = |x: &[f32], w: &[f32], b: &[f32]| {
            let mut y = vec![0.0; rows * out_f];
            linear_forward(&mut y, x, w, Some(b), rows, in_f, out_f);
            project(&y, &r)
        };
        // Start from non-zero buffers: the backward must add, not overwrite.
        let (mut dx, mut dw, mut db) = (vec![0.5; x.len()], vec![-0.25; w.len()], vec![1.0; b.len()]);
        linear_backward(Some(&mut dx), Some(&mut dw), Some(&mut db), &r, &x, &w, rows, in_f, out_f);
        dx.iter_mut().for_each(|v| *v -= 0.5);
        dw.iter_mut().for_each(|v| *v += 0.25);
        db.iter_mut().for_each(|v| *v -= 1.0);
        let tol = Tol { atol: 1e-3, rtol: 1e-2 };
        check("dx", &x, &dx, 1e-2, tol, |x| f(x, &w, &b));
        check("dw", &w, &dw, 1e-2, tol, |w| f(&x, w, &b));
        check("db", &b, &db, 1e-2, tol, |b| f(&x, &w, b));
    }

    #[test]
    fn linear_applies_weight_transpose_and_bias() {
        let x = Tensor::from_vec(vec![1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
        let w = Tensor::from_vec(vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0], &[3, 2]).unwrap();
        let b = Tensor::from_vec(vec![0.5, 0.0, -1.0], &[3]).unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.f32s().unwrap(), &[1.5, 2.0, 2.0, 3.5, 4.0, 6.0]);
    }

    #[test]
    fn matmul_transpose_b_equals_explicit_transpose() {
        let a = Tensor::from_vec((0..12).map(|x| x as f32).collect(), &[2, 2, 3]).unwrap();
        let b = Tensor::from_vec((0..12).map(|x| (x as f32) * 0.5).collect(), &[2, 2, 3]).unwrap();
        let c1 = matmul(&a, &b, true).unwrap();
        let c2 = matmul(&a, &b.transpose_last2().unwrap(), false).unwrap();
        assert_eq!(c1.shape(), &[2, 2, 2]);
        assert_eq!(c1.f32s().unwrap(), c2.f32s().unwrap());
    }
}
