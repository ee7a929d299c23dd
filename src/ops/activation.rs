//! Activations and the row softmax.

use super::vmath;
use crate::tensor::{DType, Tensor};
use anyhow::{bail, Result};
use rayon::prelude::*;

fn map(x: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Result<Tensor> {
    let mut y = x.to_dtype(DType::F32).into_f32s()?;
    y.par_iter_mut().with_min_len(4096).for_each(|v| *v = f(*v));
    Tensor::from_vec(y, x.shape())
}

pub fn silu_scalar(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

/// GELU with the exact erf form (BERT's `gelu`). Inlined into [`gelu_forward`]'s AVX2 loop.
#[inline(always)]
pub fn gelu_scalar(v: f32) -> f32 {
    0.5 * v * (1.0 + erf(v / std::f32::consts::SQRT_2))
}

/// GELU with the tanh approximation (GPT-2's `gelu_new`; cuBLASLt's GELU epilogue).
pub fn gelu_tanh(v: f32) -> f32 {
    const C: f32 = 0.797_884_6; // √(2/π)
    0.5 * v * (1.0 + (C * (v + 0.044_715 * v * v * v)).tanh())
}

/// The error function in f32 (within 2 ulp; [`super::vmath::erf`]): a branch-free polynomial the
/// GELU loops vectorize. It replaced libm's f64 `erf`, which took 12 % of a ViT forward's CPU
/// time (`sage bench encoder`, perf), one call per element.
pub use super::vmath::erf;

pub fn silu(x: &Tensor) -> Result<Tensor> {
    map(x, silu_scalar)
}

/// `d silu / dx = σ(x)·(1 + x·(1 − σ(x)))`.
pub fn silu_grad_scalar(v: f32) -> f32 {
    let s = 1.0 / (1.0 + (-v).exp());
    s * (1.0 + v * (1.0 - s))
}

/// CPU reference on slices: `y = silu(x)`.
pub fn silu_forward(y: &mut [f32], x: &[f32]) {
    y.par_iter_mut().zip(x.par_iter()).with_min_len(4096).for_each(|(o, &v)| *o = silu_scalar(v));
}

/// Backward of [`silu_forward`]: `dx += dy · silu'(x)`.
pub fn silu_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    dx.par_iter_mut().zip(dy.par_iter().zip(x.par_iter())).with_min_len(4096).for_each(|(d, (&g, &v))| {
        *d += g * silu_grad_scalar(v);
    });
}

pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let x32 = x.to_dtype(DType::F32);
    let xs = x32.f32s()?;
    let mut y = vec![0.0; xs.len()];
    gelu_forward(&mut y, xs);
    Tensor::from_vec(y, x.shape())
}

/// `d gelu / dx = Φ(x) + x·φ(x)` (exact erf form).
pub fn gelu_grad_scalar(v: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(v / std::f32::consts::SQRT_2));
    let pdf = (-0.5 * v * v).exp() / (2.0 * std::f32::consts::PI).sqrt();
    cdf + v * pdf
}

/// CPU reference on slices: `y = gelu(x)`.
pub fn gelu_forward(y: &mut [f32], x: &[f32]) {
    const CHUNK: usize = 4096;
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, v)| vmath::map(o, v, gelu_scalar));
}

/// Backward of [`gelu_forward`]: `dx += dy · gelu'(x)`.
pub fn gelu_backward(dx: &mut [f32], dy: &[f32], x: &[f32]) {
    dx.par_iter_mut().zip(dy.par_iter().zip(x.par_iter())).with_min_len(4096).for_each(|(d, (&g, &v))| {
        *d += g * gelu_grad_scalar(v);
    });
}

/// ReLU6 in place on a slice (EfficientNet-Lite).
pub fn relu6_(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
}

/// SwiGLU: `silu(gate) · up`, elementwise.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        bail!("swiglu: shapes differ: {:?} vs {:?}", gate.shape(), up.shape());
    }
    let mut y = gate.to_dtype(DType::F32).into_f32s()?;
    let up = up.to_dtype(DType::F32);
    y.par_iter_mut().zip(up.f32s()?.par_iter()).with_min_len(4096).for_each(|(g, &u)| *g = silu_scalar(*g) * u);
    Tensor::from_vec(y, gate.shape())
}

/// CPU reference on slices: `y = silu(gate) · up`.
pub fn swiglu_forward(y: &mut [f32], gate: &[f32], up: &[f32]) {
    y.par_iter_mut().zip(gate.par_iter().zip(up.par_iter())).with_min_len(4096).for_each(|(o, (&g, &u))| {
        *o = silu_scalar(g) * u;
    });
}

/// Backward of [`swiglu_forward`]: `dgate += dy·up·silu'(gate)`, `dup += dy·silu(gate)`.
pub fn swiglu_backward(dgate: &mut [f32], dup: &mut [f32], dy: &[f32], gate: &[f32], up: &[f32]) {
    dgate
        .par_iter_mut()
        .zip(dup.par_iter_mut())
        .zip(dy.par_iter().zip(gate.par_iter().zip(up.par_iter())))
        .with_min_len(4096)
        .for_each(|((dg, du), (&g, (&x, &u)))| {
            *dg += g * u * silu_grad_scalar(x);
            *du += g * silu_scalar(x);
        });
}

/// Numerically stable softmax over one row, in place (an all −∞ row becomes zeros).
pub fn softmax_(row: &mut [f32]) {
    let (_, sum) = vmath::softmax_numerators_(row, 1.0);
    if sum > 0.0 {
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Softmax over every row of a `[rows, cols]` buffer, in place.
pub fn softmax_rows_(x: &mut [f32], cols: usize) {
    x.par_chunks_mut(cols).for_each(softmax_);
}

/// Backward of a row softmax given its output `y`: `dx += y·(dy − Σ dy·y)` per row.
pub fn softmax_backward(dx: &mut [f32], dy: &[f32], y: &[f32], cols: usize) {
    dx.par_chunks_mut(cols).zip(dy.par_chunks(cols).zip(y.par_chunks(cols))).for_each(|(d, (g, p))| {
        let dot: f32 = g.iter().zip(p).map(|(a, b)| a * b).sum();
        d.iter_mut().zip(g.iter().zip(p)).for_each(|(d, (&g, &p))| *d += p * (g - dot));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ops::gradcheck::{check, project, rng, uniform, Tol};

    const TOL: Tol = Tol { atol: 1e-3, rtol: 1e-2 };

    #[test]
    fn silu_and_gelu_backward_match_finite_differences_grad() {
        let mut g = rng(31);
        // Wide range: covers both erf branches (|x/√2| above and below 2.5).
        let x = uniform(&mut g, 37, -5.0, 5.0);
        let r = uniform(&mut g, 37, -1.0, 1.0);
        type Fwd = fn(&mut [f32], &[f32]);
        type Bwd = fn(&mut [f32], &[f32], &[f32]);
        for (name, fwd, bwd) in
            [("silu", silu_forward as Fwd, silu_backward as Bwd), ("gelu", gelu_forward, gelu_backward)]
        {
            let mut dx = vec![0.0; x.len()];
            bwd(&mut dx, &r, &x);
            check(name, &x, &dx, 1e-2, TOL, |x| {
                let mut y = vec![0.0; x.len()];
                fwd(&mut y, x);
                project(&y, &r)
            });
        }
    }

    #[test]
    fn swiglu_backward_matches_finite_differences_grad() {
        let mut g = rng(32);
        let n = 23;
        let gate = uniform(&mut g, n, -4.0, 4.0);
        let up = uniform(&mut g, n, -2.0, 2.0);
        let r = uniform(&mut g, n, -1.0, 1.0);
        let f = |gate: &[f32], up: &[f32]| {
            let mut y = vec![0.0; n];
            swiglu_forward(&mut y, gate, up);
            project(&y, &r)
        };
        let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
        swiglu_backward(&mut dg, &mut du, &r, &gate, &up);
        check("dgate", &gate, &dg, 1e-2, TOL, |g| f(g, &up));
        check("dup", &up, &du, 1e-2, TOL, |u| f(&gate, u));
    }

    #[test]
    fn softmax_backward_matches_finite_differences_grad() {
        let (rows, cols) = (3, 11);
        let mut g = rng(33);
        let x = uniform(&mut g, rows * cols, -3.0, 3.0);
        let r = uniform(&mut g, rows * cols, -1.0, 1.0);
        let mut y = x.clone();
        softmax_rows_(&mut y, cols);
        let mut dx = vec![0.0; x.len()];
        softmax_backward(&mut dx, &r, &y, cols);
        check("dx", &x, &dx, 1e-2, Tol { atol: 2e-4, rtol: 1e-2 }, |x| {
            let mut y = x.to_vec();
            softmax_rows_(&mut y, cols);
            project(&y, &r)
        });
    }

    #[test]
    fn erf_and_activations_match_known_values() {
        for (x, e) in [
            (0.0, 0.0),
            (0.5, 0.5204998778_f64),
            (1.0, 0.8427007929_f64),
            (2.0, 0.995322265_f64),
            (3.0, 0.9999779095_f64),
            (-1.0, -0.8427007929_f64),
        ] {
            assert!((erf(x) as f64 - e).abs() < 1e-6, "erf({x}) = {} want {e}", erf(x));
        }
        assert!((gelu_scalar(1.0) - 0.8413447).abs() < 1e-6);
        assert!((silu_scalar(1.0) - 0.7310586).abs() < 1e-6);
        let mut r = [1.0, 2.0, 3.0];
        softmax_(&mut r);
        assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6 && r[2] > r[1]);
    }
}
