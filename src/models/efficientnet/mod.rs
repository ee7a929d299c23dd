//! EfficientNet-Lite0 (Tan & Le; the "lite" variant: no squeeze-excitation, ReLU6, fixed stem
//! and head), the frozen vision encoder, written once against the op set ([`StepOps`]): on
//! [`HostOps`] it is the CPU encoder (`sage map`, `sage classify`, the SFE token cache), on
//! `backend::cuda::step_ops::CudaOps` the GPU one (bf16 maps).
//!
//! The checkpoint is the TensorFlow-converted one with lukemelas-style names; BatchNorm is folded
//! into the preceding convolution at load time ([`checkpoint`]); padding is TensorFlow "SAME", as
//! the weights were trained with. The stem is an im2col GEMM (the columns built on the host,
//! where the image already is), the 1×1 expand, project and head convolutions are GEMMs over
//! channel-major maps followed by `channel_bias_act` (bias, residual, ReLU6), the depthwise
//! convolutions are the op set's `dwconv`, and the classifier's global average pool and linear
//! layer are two more GEMMs.
//!
//! Patch tokens for anomaly maps: the stride-8 map after block 4 (40 channels, 28×28 at 224) and
//! the stride-16 map after block 10 (112 channels, 14×14), each smoothed with a 3×3 local mean
//! (PatchCore's neighbourhood aggregation), the first average-pooled to 14×14, each part
//! L2-normalised and concatenated: 196 tokens of 152 dimensions. Mid-level stages carry local
//! texture and part structure (cracks, scratches, missing pieces) while staying free of
//! ImageNet-class semantics that the last stages add; stride 16 keeps 196 tokens, a sequence
//! length the LLM can afford. The two tapped maps come back to the host for that
//! post-processing ([`tokens`]), so every op set shares it.

mod checkpoint;
mod tokens;

use super::WeightSource;
use crate::backend::cpu::HostOps;
use crate::image_io::Preprocess;
use crate::ops::conv::im2col;
use crate::opset::{DwShape, GemmSpec, Padding, StepOps};
use anyhow::{bail, Result};
use checkpoint::{Checkpoint, ConvBn};
use std::path::Path;

/// TF-Lite preprocessing of the lite models: RGB in [0, 255], (x − 127) / 128, 224².
pub const PREPROCESS: Preprocess = Preprocess { resize_shorter: 256, crop: 224, mean: [127.0; 3], std: [128.0; 3] };
/// Anomaly maps use the whole image (no crop) at the network's native size.
pub const PREPROCESS_FULL: Preprocess =
    Preprocess { resize_shorter: 224, crop: 224, mean: [127.0; 3], std: [128.0; 3] };

/// The blocks whose outputs become patch tokens (see the module docs).
pub const PATCH_TAPS: [usize; 2] = [4, 10];

/// A `[c, h, w]` feature map on the host.
#[derive(Clone, Debug)]
pub struct FeatureMap {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

/// Patch tokens `[h·w, dim]` on an `h × w` grid.
#[derive(Clone, Debug)]
pub struct PatchTokens {
    pub h: usize,
    pub w: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

/// A convolution with its folded BatchNorm on the op set: weight `[co, ci·k·k]` as the GEMM reads
/// it (a depthwise one `[co, k·k]`), fp32 bias.
struct Conv<O: StepOps> {
    w: O::Buf,
    b: O::Stat,
    co: usize,
    ci: usize,
    k: usize,
}

struct Block<O: StepOps> {
    expand_conv: Option<Conv<O>>,
    depthwise_conv: Conv<O>,
    project_conv: Conv<O>,
    stride: usize,
}

/// A `[c, h, w]` map on the op set.
struct Map<O: StepOps> {
    data: O::Buf,
    c: usize,
    h: usize,
    w: usize,
}

/// The encoder on an op set; `EfficientNetLite` alone is the CPU one.
pub struct EfficientNetLite<O: StepOps = HostOps> {
    ops: O,
    conv_stem: Conv<O>,
    blocks: Vec<Block<O>>,
    conv_head: Conv<O>,
    /// `[classes, head channels]`.
    fc_weight: O::Buf,
    fc_bias: O::Buf,
    classes: usize,
}

/// The CPU encoder's API. `HostOps` fails only on a shape that does not chain, which the
/// checkpoint's validation and the image-size check in [`EfficientNetLite::features`] rule out
/// before any op runs; the panics below are bugs, not input errors.
impl EfficientNetLite<HostOps> {
    /// Loads from the legacy `.pth` asset or from a `.safetensors` made by `sage convert`.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(HostOps, path)
    }

    /// Loads and validates (the checks are in `checkpoint`).
    pub fn from_weights(w: &dyn WeightSource) -> Result<Self> {
        Self::from_weights_on(HostOps, w)
    }

    /// ImageNet logits `[1000]` for a preprocessed `[3, size, size]` image.
    pub fn logits(&self, chw: &[f32], size: usize) -> Vec<f32> {
        self.try_logits(chw, size).unwrap_or_else(|e| panic!("the CPU encoder: {e:#}"))
    }

    /// Patch tokens for anomaly maps and the SAGE adapter (see the module docs).
    pub fn patch_tokens(&self, chw: &[f32], size: usize) -> PatchTokens {
        self.try_patch_tokens(chw, size).unwrap_or_else(|e| panic!("the CPU encoder: {e:#}"))
    }
}

impl<O: StepOps> EfficientNetLite<O> {
    /// Reads a checkpoint (`.pth` or `.safetensors`) and copies it to `ops`.
    pub fn load_on(ops: O, path: &Path) -> Result<Self> {
        Self::upload(ops, Checkpoint::read(path)?)
    }

    /// Validates `w` as an EfficientNet-Lite0 checkpoint and copies it to `ops`.
    pub fn from_weights_on(ops: O, w: &dyn WeightSource) -> Result<Self> {
        Self::upload(ops, Checkpoint::from_weights(w)?)
    }

    fn upload(ops: O, ck: Checkpoint) -> Result<Self> {
        let up = |c: &ConvBn| -> Result<Conv<O>> {
            Ok(Conv { w: ops.upload(&c.weight)?, b: ops.upload_stat(&c.bias)?, co: c.co, ci: c.ci, k: c.k })
        };
        let blocks = ck
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    expand_conv: b.expand_conv.as_ref().map(up).transpose()?,
                    depthwise_conv: up(&b.depthwise_conv)?,
                    project_conv: up(&b.project_conv)?,
                    stride: b.stride,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (conv_stem, conv_head) = (up(&ck.conv_stem)?, up(&ck.conv_head)?);
        let (fc_weight, fc_bias) = (ops.upload(&ck.fc_weight)?, ops.upload(&ck.fc_bias)?);
        let classes = ck.fc_bias.len();
        Ok(EfficientNetLite { ops, conv_stem, blocks, conv_head, fc_weight, fc_bias, classes })
    }

    pub fn ops(&self) -> &O {
        &self.ops
    }

    /// Width of the patch tokens: the channels of the [`PATCH_TAPS`] blocks.
    pub fn patch_dim(&self) -> usize {
        PATCH_TAPS.iter().map(|&i| self.blocks[i].project_conv.co).sum()
    }

    /// A 1×1 convolution: `y [co, h·w] = W [co, ci] · x [ci, h·w]`, then bias, residual, ReLU6.
    fn pointwise(&self, c: &Conv<O>, x: &Map<O>, residual: Option<&O::Buf>, relu6: bool) -> Result<Map<O>> {
        let p = x.h * x.w;
        let mut y = self.ops.gemm_new(&GemmSpec::nn(c.co, p, c.ci), &c.w, &x.data)?;
        self.ops.channel_bias_act(&mut y, &c.b, c.co, residual, relu6)?;
        Ok(Map { data: y, c: c.co, h: x.h, w: x.w })
    }

    /// The stride-2 stem with ReLU6: an im2col GEMM over the host image.
    fn stem(&self, chw: &[f32], size: usize) -> Result<Map<O>> {
        let c = &self.conv_stem;
        if size == 0 || chw.len() != c.ci * size * size {
            bail!("the encoder takes a [{}, {size}, {size}] image, got {} values", c.ci, chw.len());
        }
        let pad = Padding::tf_same(size, size, c.k, 2);
        let (h, w) = pad.output_hw(size, size, c.k, 2);
        let cols = self.ops.upload(&im2col(chw, c.ci, size, size, c.k, 2, pad, h, w))?;
        let mut y = self.ops.gemm_new(&GemmSpec::nn(c.co, h * w, c.ci * c.k * c.k), &c.w, &cols)?;
        self.ops.channel_bias_act(&mut y, &c.b, c.co, None, true)?;
        Ok(Map { data: y, c: c.co, h, w })
    }

    /// An MBConv block: 1×1 expand (ReLU6), depthwise (ReLU6), 1×1 project, and the residual
    /// where the shape is kept.
    fn block(&self, b: &Block<O>, x: &Map<O>) -> Result<Map<O>> {
        let expanded = match &b.expand_conv {
            Some(c) => Some(self.pointwise(c, x, None, true)?),
            None => None,
        };
        let e = expanded.as_ref().unwrap_or(x);
        let d = &b.depthwise_conv;
        let s = DwShape {
            n: 1,
            c: e.c,
            h: e.h,
            w: e.w,
            k: d.k,
            stride: b.stride,
            pad: Padding::tf_same(e.h, e.w, d.k, b.stride),
        };
        let (h, w) = s.out_hw();
        let mid = Map { data: self.ops.dwconv(&e.data, &d.w, &d.b, s, true)?, c: e.c, h, w };
        let residual = (b.stride == 1 && x.c == b.project_conv.co).then_some(&x.data);
        self.pointwise(&b.project_conv, &mid, residual, false)
    }

    /// The stem and blocks `0..=last` over one preprocessed `[3, size, size]` image; `tap` sees
    /// every block's output; the last one is returned.
    fn trunk(
        &self,
        chw: &[f32],
        size: usize,
        last: usize,
        mut tap: impl FnMut(usize, &Map<O>) -> Result<()>,
    ) -> Result<Map<O>> {
        if last >= self.blocks.len() {
            bail!("block {last} is past the encoder's {} blocks", self.blocks.len());
        }
        let mut x = self.stem(chw, size)?;
        for (i, b) in self.blocks.iter().enumerate().take(last + 1) {
            x = self.block(b, &x)?;
            tap(i, &x)?;
        }
        Ok(x)
    }

    /// The outputs of the blocks in `taps` (all blocks when empty: the last one), read back.
    pub fn features(&self, chw: &[f32], size: usize, taps: &[usize]) -> Result<Vec<FeatureMap>> {
        let last = taps.iter().copied().max().unwrap_or(self.blocks.len() - 1);
        let mut out = Vec::new();
        let x = self.trunk(chw, size, last, |i, x| {
            if taps.contains(&i) {
                out.push(FeatureMap { c: x.c, h: x.h, w: x.w, data: self.ops.download(&x.data)? });
            }
            Ok(())
        })?;
        if taps.is_empty() {
            out.push(FeatureMap { c: x.c, h: x.h, w: x.w, data: self.ops.download(&x.data)? });
        }
        Ok(out)
    }

    /// ImageNet logits `[classes]`: the head convolution (ReLU6), the global average pool as a
    /// GEMM with a `1/P` column, the linear classifier.
    pub fn try_logits(&self, chw: &[f32], size: usize) -> Result<Vec<f32>> {
        let x = self.trunk(chw, size, self.blocks.len() - 1, |_, _| Ok(()))?;
        let head = self.pointwise(&self.conv_head, &x, None, true)?;
        let p = head.h * head.w;
        let mean = self.ops.upload(&vec![1.0 / p as f32; p])?;
        let pooled = self.ops.gemm_new(&GemmSpec::nn(head.c, 1, p), &head.data, &mean)?;
        let fc = GemmSpec::linear(1, self.classes, head.c);
        self.ops.download(&self.ops.gemm_bias_new(&fc, &pooled, &self.fc_weight, &self.fc_bias)?)
    }

    /// Patch tokens (see the module docs).
    pub fn try_patch_tokens(&self, chw: &[f32], size: usize) -> Result<PatchTokens> {
        let maps = self.features(chw, size, &PATCH_TAPS)?;
        Ok(tokens::tokens_from_taps(&maps[0], &maps[1]))
    }
}
