//! The op set ([`crate::opset`]) on the GPU: bf16 buffers, fp32 statistics and master weights, the kernels of
//! `kernels/` and cuBLASLt, all queued on the device's one stream.

use super::edpo::{self, SeqShape};
use super::gemm::gemm;
use super::llm::{self, MixedGrad};
use super::mincos::{self, MincosShape};
use super::qgemm::{self, QWeight};
use super::Gpu;
use super::{dwconv, fusion, head, llm_attn, llm_decode};
use crate::ops::loss::IGNORE;
use crate::opset::{
    Activations, AdamWScalars, Attention, Buffers, CausalShape, Conv, CrossEntropyOut, Decode, DecodeShape, DwShape,
    EdpoConfig, FusionShape, Gemm, GemmSpec, GradRef, Losses, Norms, Optimizer, Pair, PatchScores, QuantOps,
    Similarity, SimilarityShape,
};
use crate::quant::QMatrix;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::CudaSlice;
use half::bf16;
use std::sync::Arc;

/// Rows of `∂loss/∂logits` the cross-entropy backward holds at once (`rows × V` bf16).
const CE_CHUNK_ROWS: usize = 1024;

#[derive(Clone)]
pub struct CudaOps {
    pub gpu: Arc<Gpu>,
}

impl CudaOps {
    pub fn new(gpu: Arc<Gpu>) -> CudaOps {
        CudaOps { gpu }
    }
}

impl Buffers for CudaOps {
    type Buf = CudaSlice<bf16>;
    type Stat = CudaSlice<f32>;
    type Ids = CudaSlice<i32>;
    fn describe(&self) -> String {
        let i = self.gpu.info();
        format!("{} (sm_{}{}, CUDA kernels + cuBLASLt, bf16)", i.name, i.compute_capability.0, i.compute_capability.1)
    }

    fn upload(&self, x: &[f32]) -> Result<Self::Buf> {
        let h: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        self.gpu.upload(&h)
    }

    fn download(&self, x: &Self::Buf) -> Result<Vec<f32>> {
        Ok(self.gpu.download(x)?.into_iter().map(f32::from).collect())
    }

    fn upload_stat(&self, x: &[f32]) -> Result<Self::Stat> {
        self.gpu.upload(x)
    }

    fn download_stat(&self, x: &Self::Stat) -> Result<Vec<f32>> {
        self.gpu.download(x)
    }

    fn zeros(&self, n: usize) -> Result<Self::Buf> {
        self.gpu.zeros(n)
    }

    fn stat_zeros(&self, n: usize) -> Result<Self::Stat> {
        self.gpu.zeros(n)
    }

    fn copy(&self, x: &Self::Buf) -> Result<Self::Buf> {
        self.gpu.stream().clone_dtod(x).map_err(|e| anyhow!("copying {} elements on the GPU: {e}", x.len()))
    }

    fn fill_zero(&self, x: &mut Self::Buf) -> Result<()> {
        self.gpu.stream().memset_zeros(x).map_err(|e| anyhow!("zeroing {} elements on the GPU: {e}", x.len()))
    }

    fn embed(&self, table: &Self::Buf, ids: &[u32], dim: usize) -> Result<Self::Buf> {
        llm_attn::embedding_forward(&self.gpu, table, ids, dim)
    }

    fn embed_backward(&self, ids: &[u32], dout: &Self::Buf, dim: usize, dtable: &mut Self::Buf) -> Result<()> {
        llm_attn::embedding_backward(&self.gpu, ids, dout, dim, dtable)
    }

    fn copy_rows(
        &self,
        src: &Self::Buf,
        src_row: usize,
        dst: &mut Self::Buf,
        dst_row: usize,
        rows: usize,
        dim: usize,
    ) -> Result<()> {
        let (s, d, n) = (src_row * dim, dst_row * dim, rows * dim);
        if s + n > src.len() || d + n > dst.len() {
            bail!("copy_rows: rows {src_row}+{rows} of {} or {dst_row}+{rows} of {} (dim {dim})", src.len(), dst.len());
        }
        if n == 0 {
            return Ok(());
        }
        self.gpu
            .stream()
            .memcpy_dtod(&src.slice(s..s + n), &mut dst.slice_mut(d..d + n))
            .map_err(|e| anyhow!("copying {n} elements on the GPU: {e}"))
    }

    fn scale(&self, x: &mut Self::Buf, s: f32) -> Result<()> {
        head::scale(&self.gpu, x, s)
    }

    fn mul_stat(&self, x: &mut Self::Stat, f: &[f32]) -> Result<()> {
        head::mul(&self.gpu, x, &self.gpu.upload(f)?)
    }

    fn upload_ids(&self, ids: &[u32]) -> Result<Self::Ids> {
        llm_decode::upload_ids(&self.gpu, ids)
    }
}

impl Gemm for CudaOps {
    fn gemm(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf, c: &mut Self::Buf) -> Result<()> {
        gemm(self.gpu.blas()?, spec, &a.slice(..), &b.slice(..), &mut c.slice_mut(..), None)
    }

    fn gemm_new(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf) -> Result<Self::Buf> {
        let mut c = unsafe { self.gpu.uninit::<bf16>(spec.m * spec.n * spec.batch.max(1))? };
        self.gemm(&GemmSpec { accumulate: false, ..*spec }, a, b, &mut c)?;
        Ok(c)
    }

    fn gemm_bias_new(&self, spec: &GemmSpec, a: &Self::Buf, b: &Self::Buf, bias: &Self::Buf) -> Result<Self::Buf> {
        let mut c = unsafe { self.gpu.uninit::<bf16>(spec.m * spec.n * spec.batch.max(1))? };
        let spec = GemmSpec { accumulate: false, ..*spec };
        gemm(self.gpu.blas()?, &spec, &a.slice(..), &b.slice(..), &mut c.slice_mut(..), Some(&bias.slice(..)))?;
        Ok(c)
    }

    fn col_sum(&self, x: &Self::Buf, rows: usize, out: &mut Self::Stat) -> Result<()> {
        head::col_sum(&self.gpu, x, rows, out)
    }
}

/// Quantized weights stay in their blocks on the device (`kernels/qgemm.cu`): the products
/// dequantize each value as they load it. The losses through a frozen quantized head dequantize it
/// to a bf16 buffer that lives for the one call (the E-DPO kernels read a bf16 head).
impl QuantOps for CudaOps {
    type QBuf = QWeight;

    fn upload_quant(&self, w: &QMatrix) -> Result<Self::QBuf> {
        qgemm::upload(&self.gpu, w)
    }

    fn quant_bytes(&self, w: &Self::QBuf) -> usize {
        w.bytes()
    }

    fn qlinear(
        &self,
        x: &Self::Buf,
        w: &Self::QBuf,
        rows: usize,
        bias: Option<&Self::Buf>,
        acc: Option<Self::Buf>,
    ) -> Result<Self::Buf> {
        if acc.is_some() && bias.is_some() {
            bail!("a biased linear layer never adds into the residual stream");
        }
        qgemm::linear(&self.gpu, x, w, rows, bias, acc)
    }

    fn qlinear_input_grad(
        &self,
        dy: &Self::Buf,
        w: &Self::QBuf,
        rows: usize,
        acc: Option<Self::Buf>,
    ) -> Result<Self::Buf> {
        qgemm::input_grad(&self.gpu, dy, w, rows, acc)
    }

    fn qembed(&self, w: &Self::QBuf, ids: &[u32]) -> Result<Self::Buf> {
        qgemm::embed(&self.gpu, w, ids)
    }

    fn q_seq_logprobs(
        &self,
        hidden: &Self::Buf,
        w: &Self::QBuf,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(Self::Stat, Self::Stat)> {
        self.seq_logprobs(hidden, &qgemm::dequantize(&self.gpu, w)?, targets, seqs)
    }

    fn q_logprob_backward(
        &self,
        hidden: &Self::Buf,
        w: &Self::QBuf,
        targets: &[u32],
        lse: &Self::Stat,
        grad_seq: &Self::Stat,
        seqs: usize,
    ) -> Result<Self::Buf> {
        self.logprob_backward(hidden, &qgemm::dequantize(&self.gpu, w)?, targets, lse, grad_seq, seqs, None)
    }
}

impl Norms for CudaOps {
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, eps: f32) -> Result<(Self::Buf, Self::Stat)> {
        llm::rmsnorm_forward(&self.gpu, x, w, rows, eps)
    }

    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        rstd: &Self::Stat,
        rows: usize,
        _eps: f32,
        accumulate: bool,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Stat>,
    ) -> Result<()> {
        llm::rmsnorm_backward(&self.gpu, x, w, dy, rstd, rows, accumulate, dx, dw)
    }

    fn layernorm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        rows: usize,
        eps: f32,
    ) -> Result<(Self::Buf, Self::Stat)> {
        head::layernorm_forward(&self.gpu, x, w, b, rows, eps)
    }

    fn layernorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        stats: &Self::Stat,
        rows: usize,
        _eps: f32,
        dw: &mut Self::Stat,
        db: &mut Self::Stat,
    ) -> Result<Self::Buf> {
        head::layernorm_backward(&self.gpu, x, w, dy, stats, rows, dw, db)
    }
}

impl Activations for CudaOps {
    fn swiglu(&self, g: &Self::Buf, u: &Self::Buf) -> Result<Self::Buf> {
        llm::swiglu_forward(&self.gpu, g, u)
    }

    fn swiglu_backward(&self, dy: &Self::Buf, g: &Self::Buf, u: &Self::Buf) -> Result<(Self::Buf, Self::Buf)> {
        let (mut dg, mut du) = unsafe { (self.gpu.uninit::<bf16>(g.len())?, self.gpu.uninit::<bf16>(g.len())?) };
        llm::swiglu_backward(&self.gpu, dy, g, u, false, &mut dg, &mut du)?;
        Ok((dg, du))
    }

    fn gelu(&self, x: &Self::Buf) -> Result<Self::Buf> {
        head::gelu_forward(&self.gpu, x)
    }

    fn gelu_backward(&self, dy: &Self::Buf, x: &Self::Buf) -> Result<Self::Buf> {
        head::gelu_backward(&self.gpu, dy, x)
    }

    fn channel_bias_act(
        &self,
        y: &mut Self::Buf,
        bias: &Self::Stat,
        channels: usize,
        residual: Option<&Self::Buf>,
        relu6: bool,
    ) -> Result<()> {
        dwconv::channel_bias_act(&self.gpu, y, bias, channels, residual, relu6)
    }
}

impl Attention for CudaOps {
    fn rope_tables(&self, cos: &[f32], sin: &[f32], _half: usize) -> Result<(Self::Stat, Self::Stat)> {
        Ok((self.gpu.upload(cos)?, self.gpu.upload(sin)?))
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        tables: &(Self::Stat, Self::Stat),
        half: usize,
        rows: usize,
        t: usize,
        heads: usize,
        inverse: bool,
    ) -> Result<()> {
        llm_attn::rope(&self.gpu, x, &tables.0, &tables.1, half, rows, t, heads, inverse)
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: CausalShape,
    ) -> Result<(Self::Buf, Self::Stat)> {
        llm_attn::attention_forward(&self.gpu, q, k, v, s)
    }

    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Stat,
        dout: &Self::Buf,
        s: CausalShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        llm_attn::attention_backward(&self.gpu, q, k, v, out, lse, dout, s)
    }

    fn fusion_attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        s: FusionShape,
    ) -> Result<(Self::Buf, Self::Stat)> {
        fusion::forward(&self.gpu, q, k, v, s)
    }

    fn fusion_attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Stat,
        dout: &Self::Buf,
        s: FusionShape,
    ) -> Result<(Self::Buf, Self::Buf, Self::Buf)> {
        let g = fusion::backward(&self.gpu, q, k, v, out, lse, dout, s)?;
        Ok((g.dq, g.dk, g.dv))
    }
}

impl Decode for CudaOps {
    fn rope_at(
        &self,
        x: &mut Self::Buf,
        tables: &(Self::Stat, Self::Stat),
        half: usize,
        heads: usize,
        pos: &Self::Ids,
        rows: usize,
    ) -> Result<()> {
        let max_pos = tables.0.len() / half.max(1);
        llm_decode::rope_at(&self.gpu, x, &tables.0, &tables.1, half, heads, pos, rows, max_pos)
    }

    fn kv_append(
        &self,
        src: &Self::Buf,
        seq: &Self::Ids,
        pos: &Self::Ids,
        rows: usize,
        width: usize,
        slots: usize,
        cache: &mut Self::Buf,
    ) -> Result<()> {
        llm_decode::kv_append(&self.gpu, src, seq, pos, rows, width, slots, cache)
    }

    fn decode_attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        s: DecodeShape,
        seq: &Self::Ids,
        pos: &Self::Ids,
        rows: usize,
    ) -> Result<Self::Buf> {
        llm_decode::decode_attention(&self.gpu, q, k_cache, v_cache, s, seq, pos, rows)
    }
}

impl Losses for CudaOps {
    /// The fused E-DPO kernels with one "sequence" per batch row and `grad_seq = −seq_weights`:
    /// `∂loss/∂z = w_n·(softmax − onehot)` at counted positions, logits never stored whole.
    fn cross_entropy(
        &self,
        hidden: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        seq_weights: &[f32],
        d_weight: Option<&mut Self::Buf>,
    ) -> Result<CrossEntropyOut<Self>> {
        let SeqInputs { shape: s, targets: dev_t, mask: dev_m, host_mask: mask } =
            self.seq_inputs(hidden, w, targets, seq_weights.len())?;
        let splits = edpo::default_splits(&s, self.gpu.info().sm_count);
        let fwd = edpo::sequence_logprobs(&self.gpu, hidden, w, &dev_t, &dev_m, s, splits)?;
        let grad_seq = self.gpu.upload(&seq_weights.iter().map(|w| -w).collect::<Vec<f32>>())?;
        let spans = edpo::answer_spans(&mask, s.t, CE_CHUNK_ROWS);
        let d_hidden = edpo::backward(&self.gpu, hidden, w, &dev_t, &dev_m, &fwd.lse, &grad_seq, s, &spans, d_weight)?;
        Ok(CrossEntropyOut { seq_logp: fwd.seq, d_hidden })
    }

    fn seq_logprobs(
        &self,
        hidden: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        seqs: usize,
    ) -> Result<(Self::Stat, Self::Stat)> {
        let SeqInputs { shape: s, targets: dev_t, mask: dev_m, .. } = self.seq_inputs(hidden, w, targets, seqs)?;
        let splits = edpo::default_splits(&s, self.gpu.info().sm_count);
        let f = edpo::sequence_logprobs(&self.gpu, hidden, w, &dev_t, &dev_m, s, splits)?;
        Ok((f.seq, f.lse))
    }

    fn edpo_loss(
        &self,
        policy: &Self::Stat,
        reference: &Self::Stat,
        pairs: &[Pair],
        cfg: EdpoConfig,
    ) -> Result<(Self::Stat, Self::Stat)> {
        let n = policy.len();
        let dev_pairs = edpo::DevicePairs::upload(&self.gpu, pairs, n)?;
        let out = edpo::loss(&self.gpu, policy, reference, &dev_pairs, n, cfg.beta, cfg.eta)?;
        Ok((out.margin, out.grad_seq))
    }

    fn logprob_backward(
        &self,
        hidden: &Self::Buf,
        w: &Self::Buf,
        targets: &[u32],
        lse: &Self::Stat,
        grad_seq: &Self::Stat,
        seqs: usize,
        d_weight: Option<&mut Self::Buf>,
    ) -> Result<Self::Buf> {
        let SeqInputs { shape: s, targets: dev_t, mask: dev_m, host_mask: mask } =
            self.seq_inputs(hidden, w, targets, seqs)?;
        let spans = edpo::answer_spans(&mask, s.t, CE_CHUNK_ROWS);
        edpo::backward(&self.gpu, hidden, w, &dev_t, &dev_m, lse, grad_seq, s, &spans, d_weight)
    }
}

impl Optimizer for CudaOps {
    const SEPARATE_MASTER: bool = true;

    fn adamw(
        &self,
        x: Option<&mut Self::Stat>,
        grad: GradRef<'_, Self>,
        m: &mut Self::Stat,
        v: &mut Self::Stat,
        w: &mut Self::Buf,
        s: &AdamWScalars,
        decay: bool,
        clip: &Self::Stat,
    ) -> Result<()> {
        // The working copy is bf16: the update runs on the fp32 master.
        let x = x.ok_or_else(|| anyhow::anyhow!("AdamW on bf16 weights needs an fp32 master"))?;
        llm::adamw_step_mixed(&self.gpu, x, mixed(grad), m, v, w, s, decay, clip)
    }

    fn sum_squares(&self, g: GradRef<'_, Self>, acc: &mut Self::Stat) -> Result<()> {
        llm::sum_squares(&self.gpu, mixed(g), acc)
    }

    fn clip_factor(&self, sumsq: &Self::Stat, max_norm: Option<f32>) -> Result<Self::Stat> {
        llm::clip_factor(&self.gpu, sumsq, max_norm)
    }
}

impl Conv for CudaOps {
    fn dwconv(&self, x: &Self::Buf, w: &Self::Buf, bias: &Self::Stat, s: DwShape, relu6: bool) -> Result<Self::Buf> {
        dwconv::forward(&self.gpu, x, w, bias, s, relu6)
    }
}

impl Similarity for CudaOps {
    /// The fused min-cosine kernel (`mincos::mincos_topk`, batch 1, its kept variant where the width
    /// allows); only the scores come back.
    fn mincos_topk(&self, test: &Self::Buf, reference: Option<&Self::Buf>, s: SimilarityShape) -> Result<PatchScores> {
        let shape = MincosShape {
            batch: 1,
            patches: s.patches,
            ref_patches: if reference.is_some() { s.ref_patches } else { s.patches },
            channels: s.channels,
            // The kernel selects at least one patch; the host keeps `s.k`.
            k: s.k.clamp(1, s.patches.max(1)),
            reduce: s.reduce,
            zero_shot: reference.is_none(),
        };
        let nsplit = mincos::default_splits(&shape, self.gpu.info().sm_count);
        let out = mincos::mincos_topk(&self.gpu, test, reference, shape, mincos::default_variant(s.channels), nsplit)?;
        let similarity = self.gpu.download(&out.sim)?;
        let ref_index = self.gpu.download(&out.ref_index)?.into_iter().map(|j| j as u32).collect();
        let topk = self.gpu.download(&out.topk)?.into_iter().take(s.k).filter(|&i| i >= 0).map(|i| i as u32).collect();
        Ok(PatchScores { similarity, ref_index, topk })
    }
}

/// What the E-DPO kernels take for `seqs` sequences of targets.
struct SeqInputs {
    shape: SeqShape,
    /// `IGNORE` → 0 (masked).
    targets: CudaSlice<i32>,
    mask: CudaSlice<u8>,
    host_mask: Vec<bool>,
}

impl CudaOps {
    /// The shape, device targets and mask of `seqs` sequences of `targets`.
    fn seq_inputs(
        &self,
        hidden: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        targets: &[u32],
        seqs: usize,
    ) -> Result<SeqInputs> {
        if seqs == 0 || targets.is_empty() || !targets.len().is_multiple_of(seqs) {
            bail!("{} targets do not split into {seqs} sequences", targets.len());
        }
        let c = hidden.len() / targets.len();
        let s = SeqShape { n: seqs, t: targets.len() / seqs, c, v: w.len() / c.max(1) };
        let mask: Vec<bool> = targets.iter().map(|&x| x != IGNORE).collect();
        let tg: Vec<i32> = targets.iter().map(|&x| if x == IGNORE { 0 } else { x as i32 }).collect();
        let dev_m = self.gpu.upload(&mask.iter().map(|&m| u8::from(m)).collect::<Vec<u8>>())?;
        Ok(SeqInputs { shape: s, targets: self.gpu.upload(&tg)?, mask: dev_m, host_mask: mask })
    }
}

fn mixed(g: GradRef<'_, CudaOps>) -> MixedGrad<'_> {
    match g {
        GradRef::Buf(g) => MixedGrad::Bf16(g),
        GradRef::Stat(g) => MixedGrad::F32(g),
    }
}
