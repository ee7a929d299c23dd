//! Matrix products: the GEMM and the linear layer with bias, and the bias gradient.

use super::Buffers;
use anyhow::{bail, Result};

/// Row-major `c [batch, m, n] = op(a)·op(b) (+ bias) (→ GELU) (+ c when accumulate)`, where
/// `op(a)` is `a [m, k]` or, with `trans_a`, `a [k, m]` transposed; `op(b)` is `b [k, n]` or, with
/// `trans_b`, `b [n, k]` transposed (a linear layer's weight: `y = x·Wᵀ` is `trans_b`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct GemmSpec {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Strided batches (1 = plain GEMM); each operand advances by its own size per batch, except
    /// a shared `b` when `broadcast_b`.
    pub batch: usize,
    pub broadcast_b: bool,
    /// `c += …` instead of `c = …` (gradient accumulation).
    pub accumulate: bool,
    /// cuBLASLt's GELU epilogue (tanh approximation), after the bias.
    pub gelu: bool,
    /// `b` came from [`Gemm::prepare_linear_weight`] (a linear layer's frozen weight, so
    /// `trans_b`), in whatever layout this op set prepared it.
    pub b_prepared: bool,
}

impl GemmSpec {
    /// `c [m, n] = a [m, k] · b [k, n]`.
    pub fn nn(m: usize, n: usize, k: usize) -> GemmSpec {
        GemmSpec { m, n, k, batch: 1, ..Default::default() }
    }

    /// `y [m, n] = x [m, k] · W [n, k]ᵀ`: a linear layer.
    pub fn linear(m: usize, n: usize, k: usize) -> GemmSpec {
        GemmSpec { trans_b: true, ..GemmSpec::nn(m, n, k) }
    }

    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch.max(1) as f64
    }

    pub fn check(&self, a: usize, b: usize, c: usize, bias: Option<usize>) -> Result<()> {
        let batch = self.batch.max(1);
        if self.m == 0 || self.n == 0 || self.k == 0 {
            bail!("GEMM sizes must be positive ({self:?})");
        }
        if self.accumulate && self.gelu {
            // cuBLASLt would apply GELU to the accumulated sum; no caller wants that.
            bail!("GEMM: accumulate and gelu together are not supported");
        }
        let b_need = if self.broadcast_b { self.k * self.n } else { batch * self.k * self.n };
        if a < batch * self.m * self.k || b < b_need || c < batch * self.m * self.n {
            bail!("GEMM buffers ({a}, {b}, {c} elements) are smaller than {self:?} needs");
        }
        if let Some(len) = bias {
            if len < self.n {
                bail!("GEMM bias has {len} elements, needs n = {}", self.n);
            }
        }
        Ok(())
    }
}

/// GEMMs (cuBLASLt on the GPU) and the column sums of a bias gradient.
pub trait Gemm: Buffers {
    /// `c = op(a)·op(b)` (`+ c` when `spec.accumulate`), row-major as [`GemmSpec`] says.
    fn gemm(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()>;
    /// A new `c = op(a)·op(b)`.
    fn gemm_new(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf> {
        let mut c = self.zeros(spec.m * spec.n * spec.batch.max(1))?;
        self.gemm(&GemmSpec { accumulate: false, ..*spec }, a, b, &mut c)?;
        Ok(c)
    }
    /// A frozen linear layer's weight `W [n, k]` in the layout this op set's GEMM reads fastest
    /// as `b` with [`GemmSpec::b_prepared`] (the host op set packs it once for its AVX-512 GEMM;
    /// by default it stays as it is). Only GEMMs may read the result.
    fn prepare_linear_weight(&self, w: Self::Buf, n: usize, k: usize) -> Result<Self::Buf> {
        let _ = (n, k);
        Ok(w)
    }
    /// A linear layer with bias: `op(a)·op(b) + bias` (one bias value per output column), new.
    fn gemm_bias_new(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf, bias: &Self::Buf) -> Result<Self::Buf>;
    /// Column sums `out[j] += Σ_r x[r, j]` over `rows` rows of `out.len()` (a bias gradient).
    fn col_sum(&self, x: &Self::Buf, rows: usize, out: &mut Self::Stat) -> Result<()>;
}
