//! The fused E-DPO loss on the GPU (`kernels/edpo_loss.cu`; CPU reference `ops::edpo`): sequence
//! log-probabilities from hidden states and the LM-head weight without materialising `[N, T, V]`,
//! the margins and loss, and the gradient through `∂loss/∂z`, one answer span of rows at a time
//! followed by two cuBLASLt GEMMs (`dH = dz·W`, `dW += dzᵀ·H`).

use super::gemm::gemm;
use super::kernels::EDPO_LOSS;
use super::{blocks, cfg, int, Gpu};
use crate::opset::GemmSpec;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

/// `N` sequences of `T` positions, hidden size `C`, vocabulary `V`.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SeqShape {
    pub n: usize,
    pub t: usize,
    pub c: usize,
    pub v: usize,
}

impl SeqShape {
    pub fn rows(&self) -> usize {
        self.n * self.t
    }

    fn check(&self, hidden: usize, weight: usize, targets: usize, mask: usize) -> Result<()> {
        if self.n == 0 || self.t == 0 || self.c == 0 || self.v == 0 {
            bail!("E-DPO: every size must be positive ({self:?})");
        }
        if !self.c.is_multiple_of(8) {
            bail!("the E-DPO kernels need the hidden size to be a multiple of 8 (got {})", self.c);
        }
        let r = self.rows();
        if hidden < r * self.c || weight < self.v * self.c || targets < r || mask < r {
            bail!("E-DPO: hidden/weight/targets/mask buffers are smaller than {self:?} needs");
        }
        Ok(())
    }
}

/// Vocabulary splits of the forward: enough blocks to cover the GPU twice, at most one per
/// 64-column vocabulary tile.
pub fn default_splits(s: &SeqShape, sm_count: usize) -> usize {
    let row_blocks = s.rows().div_ceil(64).max(1);
    (2 * sm_count.max(1)).div_ceil(row_blocks).clamp(1, s.v.div_ceil(64).max(1))
}

/// Per-token `lse`, `logp` `[N·T]` (0 where masked) and per-sequence `seq = Σ_t mask·logp` `[N]`.
pub struct SeqLogprobs {
    pub lse: CudaSlice<f32>,
    pub logp: CudaSlice<f32>,
    pub seq: CudaSlice<f32>,
}

/// Forward for one model (policy or reference): `hidden [N, T, C]`, `weight [V, C]`,
/// `targets [N, T]` (shifted), `mask [N, T]` (1 on answer tokens).
pub fn sequence_logprobs(
    gpu: &Gpu,
    hidden: &CudaSlice<bf16>,
    weight: &CudaSlice<bf16>,
    targets: &CudaSlice<i32>,
    mask: &CudaSlice<u8>,
    s: SeqShape,
    nsplit: usize,
) -> Result<SeqLogprobs> {
    s.check(hidden.len(), weight.len(), targets.len(), mask.len())?;
    let nsplit = nsplit.max(1);
    let r = s.rows();
    let (ri, vi, ci, ni, ti, nsi) =
        (int("N·T", r)?, int("V", s.v)?, int("C", s.c)?, int("N", s.n)?, int("T", s.t)?, int("splits", nsplit)?);
    let part_max = gpu.zeros::<f32>(nsplit * r)?;
    let part_sum = gpu.zeros::<f32>(nsplit * r)?;
    let tgt_logit = gpu.zeros::<f32>(r)?;
    let out = SeqLogprobs { lse: gpu.zeros(r)?, logp: gpu.zeros(r)?, seq: gpu.zeros(s.n)? };
    let partial = gpu.function(&EDPO_LOSS, "edpo_logits_lse_partial")?;
    let combine = gpu.function(&EDPO_LOSS, "edpo_lse_combine_seqsum")?;
    let st = gpu.stream();
    // SAFETY: argument order and types as in kernels/edpo_loss.cu; sizes checked above; grids as
    // its header documents.
    unsafe {
        st.launch_builder(&partial)
            .arg(hidden)
            .arg(weight)
            .arg(targets)
            .arg(mask)
            .arg(&ri)
            .arg(&vi)
            .arg(&ci)
            .arg(&part_max)
            .arg(&part_sum)
            .arg(&tgt_logit)
            .launch(cfg((blocks(r, 64)?, nsplit as u32, 1), 128, 0))?;
        st.launch_builder(&combine)
            .arg(&part_max)
            .arg(&part_sum)
            .arg(&tgt_logit)
            .arg(mask)
            .arg(&nsi)
            .arg(&ni)
            .arg(&ti)
            .arg(&out.lse)
            .arg(&out.logp)
            .arg(&out.seq)
            .launch(cfg((s.n as u32, 1, 1), 256, 0))?;
    }
    Ok(out)
}

/// Pairs on the device: chosen and rejected sequence indices and `ΔH`, `[P]` each.
pub struct DevicePairs {
    pub chosen: CudaSlice<i32>,
    pub rejected: CudaSlice<i32>,
    pub delta_h: CudaSlice<f32>,
    pub len: usize,
}

impl DevicePairs {
    pub fn upload(gpu: &Gpu, pairs: &[crate::ops::edpo::Pair], n: usize) -> Result<DevicePairs> {
        if let Some(p) = pairs.iter().find(|p| p.chosen >= n || p.rejected >= n) {
            bail!("E-DPO pair {p:?} indexes past {n} sequences");
        }
        let chosen: Vec<i32> = pairs.iter().map(|p| p.chosen as i32).collect();
        let rejected: Vec<i32> = pairs.iter().map(|p| p.rejected as i32).collect();
        let delta_h: Vec<f32> = pairs.iter().map(|p| p.delta_h).collect();
        Ok(DevicePairs {
            chosen: gpu.upload(&chosen)?,
            rejected: gpu.upload(&rejected)?,
            delta_h: gpu.upload(&delta_h)?,
            len: pairs.len(),
        })
    }
}

/// Margins, per-pair losses, `∂loss/∂margin` `[P]`, the mean loss `[1]` and `grad_seq [N]`
/// (`∂loss/∂π_n`).
pub struct LossOut {
    pub margin: CudaSlice<f32>,
    pub loss_pair: CudaSlice<f32>,
    pub dloss_dmargin: CudaSlice<f32>,
    pub loss: CudaSlice<f32>,
    pub grad_seq: CudaSlice<f32>,
}

pub fn loss(
    gpu: &Gpu,
    policy_seq: &CudaSlice<f32>,
    reference_seq: &CudaSlice<f32>,
    pairs: &DevicePairs,
    n: usize,
    beta: f32,
    eta: f32,
) -> Result<LossOut> {
    if policy_seq.len() < n || reference_seq.len() < n {
        bail!("E-DPO loss: sequence log-probability buffers hold fewer than {n} values");
    }
    let p = pairs.len;
    let out = LossOut {
        margin: gpu.zeros(p)?,
        loss_pair: gpu.zeros(p)?,
        dloss_dmargin: gpu.zeros(p)?,
        loss: gpu.zeros(1)?,
        grad_seq: gpu.zeros(n)?,
    };
    let (pi, ni) = (int("P", p)?, int("N", n)?);
    let f = gpu.function(&EDPO_LOSS, "edpo_loss_fwd")?;
    // SAFETY: as in `sequence_logprobs`.
    unsafe {
        gpu.stream()
            .launch_builder(&f)
            .arg(policy_seq)
            .arg(reference_seq)
            .arg(&pairs.chosen)
            .arg(&pairs.rejected)
            .arg(&pairs.delta_h)
            .arg(&pi)
            .arg(&ni)
            .arg(&beta)
            .arg(&eta)
            .arg(&out.margin)
            .arg(&out.loss_pair)
            .arg(&out.dloss_dmargin)
            .arg(&out.loss)
            .arg(&out.grad_seq)
            .launch(cfg((1, 1, 1), 256, 0))?;
    }
    Ok(out)
}

/// Row ranges `(first row, rows)` of the flattened `[N·T]` positions that hold answer tokens: per
/// sequence, from its first to its last masked position, cut into pieces of at most `max_rows`.
/// The backward touches only these rows (prompt rows have no gradient).
pub fn answer_spans(mask: &[bool], t: usize, max_rows: usize) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    for (n, m) in mask.chunks(t.max(1)).enumerate() {
        let (Some(first), Some(last)) = (m.iter().position(|&x| x), m.iter().rposition(|&x| x)) else {
            continue;
        };
        let mut r = first;
        while r <= last {
            let rows = (last + 1 - r).min(max_rows.max(1));
            spans.push((n * t + r, rows));
            r += rows;
        }
    }
    spans
}

/// Backward, given the policy's forward `lse` and the loss's `grad_seq`: returns `dH [N, T, C]`
/// (zero outside the spans) and, when `d_weight` is given, overwrites it with `dW [V, C]`
/// (zeroed, then accumulated in bf16 across spans by cuBLASLt, `beta = 1`). Peak extra memory is
/// one `dz [rows, V]` bf16 buffer for the largest span.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    gpu: &Gpu,
    hidden: &CudaSlice<bf16>,
    weight: &CudaSlice<bf16>,
    targets: &CudaSlice<i32>,
    mask: &CudaSlice<u8>,
    lse: &CudaSlice<f32>,
    grad_seq: &CudaSlice<f32>,
    s: SeqShape,
    spans: &[(usize, usize)],
    mut d_weight: Option<&mut CudaSlice<bf16>>,
) -> Result<CudaSlice<bf16>> {
    s.check(hidden.len(), weight.len(), targets.len(), mask.len())?;
    let r = s.rows();
    if let Some(&(r0, rows)) = spans.iter().find(|&&(r0, rows)| rows == 0 || r0 + rows > r) {
        bail!("E-DPO backward: span ({r0}, {rows}) is empty or runs past {r} rows");
    }
    let mut d_hidden = gpu.zeros::<bf16>(r * s.c)?;
    if let Some(dw) = d_weight.as_deref_mut() {
        if dw.len() != s.v * s.c {
            bail!("E-DPO backward: the LM head's gradient buffer has {} values, the head {}", dw.len(), s.v * s.c);
        }
        gpu.stream().memset_zeros(dw).map_err(|e| anyhow!("zeroing the LM head's gradient: {e}"))?;
    }
    let max_rows = spans.iter().map(|s| s.1).max().unwrap_or(0);
    if max_rows == 0 {
        return Ok(d_hidden);
    }
    // SAFETY: each span's `edpo_dlogits` writes all `rows × V` values the GEMMs then read (fully
    // masked tiles write zeros).
    let dz = unsafe { gpu.uninit::<bf16>(max_rows * s.v)? };
    let f = gpu.function(&EDPO_LOSS, "edpo_dlogits")?;
    let blas = gpu.blas()?;
    let (ti, vi, ci) = (int("T", s.t)?, int("V", s.v)?, int("C", s.c)?);
    for &(r0, rows) in spans {
        let (r0i, rowsi) = (int("r0", r0)?, int("rows", rows)?);
        // SAFETY: as in `sequence_logprobs`; dz holds max_rows × V elements.
        unsafe {
            gpu.stream()
                .launch_builder(&f)
                .arg(hidden)
                .arg(weight)
                .arg(targets)
                .arg(mask)
                .arg(lse)
                .arg(grad_seq)
                .arg(&r0i)
                .arg(&rowsi)
                .arg(&ti)
                .arg(&vi)
                .arg(&ci)
                .arg(&dz)
                .launch(cfg((blocks(rows, 64)?, blocks(s.v, 64)?, 1), 128, 0))?;
        }
        let dz_rows = dz.slice(..rows * s.v);
        let mut dh = d_hidden.slice_mut(r0 * s.c..(r0 + rows) * s.c);
        gemm(blas, &GemmSpec::nn(rows, s.c, s.v), &dz_rows, &weight.slice(..), &mut dh, None)?;
        if let Some(dw) = d_weight.as_deref_mut() {
            let spec = GemmSpec { trans_a: true, accumulate: true, ..GemmSpec::nn(s.v, s.c, rows) };
            let h = hidden.slice(r0 * s.c..(r0 + rows) * s.c);
            gemm(blas, &spec, &dz_rows, &h, &mut dw.slice_mut(..), None)?;
        }
    }
    Ok(d_hidden)
}
