//! EfficientNet-Lite0 (Tan & Le; the "lite" variant: no squeeze-excitation, ReLU6, fixed stem
//! and head), loading the TensorFlow-converted checkpoint with lukemelas-style names
//! (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`, ...). BatchNorm is folded into the preceding
//! convolution at load time; padding is TensorFlow "SAME", as the weights were trained with.
//!
//! Patch tokens for anomaly maps: the stride-8 map after block 4 (40 channels, 28×28 at 224) and
//! the stride-16 map after block 10 (112 channels, 14×14), each smoothed with a 3×3 local mean
//! (PatchCore's neighbourhood aggregation), the first average-pooled to 14×14, each part
//! L2-normalised and concatenated: 196 tokens of 152 dimensions. Mid-level stages carry local
//! texture and part structure (cracks, scratches, missing pieces) while staying free of
//! ImageNet-class semantics that the last stages add; stride 16 keeps 196 tokens, a sequence
//! length the LLM can afford.

use super::{StateDict, WeightSource};
use crate::image_io::Preprocess;
use crate::ops::conv::{conv2d, depthwise_conv2d, Padding};
use crate::ops::{pool, relu6_};
use crate::user_bail;
use anyhow::{Context, Result};
use std::path::Path;

mod step;
pub use step::DeviceEfficientNet;

const BN_EPS: f32 = 1e-3;
/// (repeats, stride of the first block) per stage, from the EfficientNet-B0/Lite0 table.
const STAGES: [(usize, usize); 7] = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)];

/// TF-Lite preprocessing of the lite models: RGB in [0, 255], (x − 127) / 128, 224².
pub const PREPROCESS: Preprocess = Preprocess { resize_shorter: 256, crop: 224, mean: [127.0; 3], std: [128.0; 3] };
/// Anomaly maps use the whole image (no crop) at the network's native size.
pub const PREPROCESS_FULL: Preprocess =
    Preprocess { resize_shorter: 224, crop: 224, mean: [127.0; 3], std: [128.0; 3] };

/// The blocks whose outputs become patch tokens (see the module docs).
pub const PATCH_TAPS: [usize; 2] = [4, 10];

/// A convolution with its BatchNorm folded in.
struct ConvBn {
    weight: Vec<f32>,
    bias: Vec<f32>,
    co: usize,
    ci: usize,
    k: usize,
}

impl ConvBn {
    fn load(w: &dyn WeightSource, conv: &str, bn: &str) -> Result<ConvBn> {
        let wt = w.get(&format!("{conv}.weight"))?;
        let s = wt.shape().to_vec();
        if s.len() != 4 || s[2] != s[3] || s.contains(&0) {
            user_bail!("tensor `{conv}.weight` has shape {s:?}, expected [out, in, k, k] with every size ≥ 1");
        }
        let (co, ci, k) = (s[0], s[1], s[2]);
        let stat = |name: &str| -> Result<Vec<f32>> {
            let v = w.get(&format!("{bn}.{name}"))?.into_f32s()?;
            if v.len() != co {
                user_bail!("tensor `{bn}.{name}` has {} values, but `{conv}.weight` has {co} output channels", v.len());
            }
            if v.iter().any(|x| !x.is_finite()) {
                user_bail!("tensor `{bn}.{name}` holds a non-finite value");
            }
            Ok(v)
        };
        let (gamma, beta, mean, var) = (stat("weight")?, stat("bias")?, stat("running_mean")?, stat("running_var")?);
        if let Some(v) = var.iter().find(|&&v| v < 0.0) {
            user_bail!("tensor `{bn}.running_var` holds {v}; a variance is ≥ 0");
        }
        let mut weight = wt.into_f32s()?;
        let per_out = ci * k * k;
        let mut bias = vec![0.0; co];
        for o in 0..co {
            let scale = gamma[o] / (var[o] + BN_EPS).sqrt();
            weight[o * per_out..(o + 1) * per_out].iter_mut().for_each(|v| *v *= scale);
            bias[o] = beta[o] - mean[o] * scale;
        }
        Ok(ConvBn { weight, bias, co, ci, k })
    }
}

struct MbConvBlock {
    expand_conv: Option<ConvBn>,
    depthwise_conv: ConvBn,
    project_conv: ConvBn,
    stride: usize,
}

pub struct EfficientNetLite {
    conv_stem: ConvBn,
    blocks: Vec<MbConvBlock>,
    conv_head: ConvBn,
    fc_weight: Vec<f32>,
    fc_bias: Vec<f32>,
}

/// A `[c, h, w]` feature map.
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

impl EfficientNetLite {
    /// Loads from the legacy `.pth` asset or from a `.safetensors` made by `sage convert`.
    pub fn load(path: &Path) -> Result<Self> {
        let net = if path.extension().is_some_and(|e| e == "safetensors") {
            let f = crate::formats::safetensors::SafetensorsFile::open(path)?;
            Self::from_weights(&f)
        } else {
            let tensors = crate::formats::pth::load(path)?;
            Self::from_weights(&StateDict { path: path.to_path_buf(), tensors })
        };
        net.with_context(|| format!("{} is not an EfficientNet-Lite0 checkpoint sage can run", path.display()))
    }

    /// Loads and validates: every convolution's input channels are the output channels of the
    /// one before it, depthwise kernels are per channel, BatchNorm statistics match their
    /// convolution and are finite, the classifier matches the head, and no block lies beyond
    /// the architecture's 16 (the convolution ops index by these sizes and would panic).
    pub fn from_weights(w: &dyn WeightSource) -> Result<Self> {
        let net = Self::load_unchecked(w)?;
        net.check_channels()?;
        let n_blocks = net.blocks.len();
        if w.contains(&format!("_blocks.{n_blocks}._depthwise_conv.weight")) {
            user_bail!("the checkpoint holds a block `_blocks.{n_blocks}`; EfficientNet-Lite0 has {n_blocks}");
        }
        Ok(net)
    }

    fn check_channels(&self) -> Result<()> {
        let expect_in = |c: &ConvBn, name: &str, channels: usize| -> Result<()> {
            if c.ci != channels {
                user_bail!("tensor `{name}.weight` takes {} input channels, but {channels} arrive there", c.ci);
            }
            Ok(())
        };
        expect_in(&self.conv_stem, "_conv_stem", 3)?;
        let mut channels = self.conv_stem.co;
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("_blocks.{i}");
            if let Some(e) = &b.expand_conv {
                expect_in(e, &format!("{p}._expand_conv"), channels)?;
                channels = e.co;
            }
            let d = &b.depthwise_conv;
            if d.ci != 1 || d.co != channels {
                user_bail!(
                    "tensor `{p}._depthwise_conv.weight` has shape [{}, {}, {k}, {k}], expected [{channels}, 1, {k}, {k}] (one kernel per channel)",
                    d.co,
                    d.ci,
                    k = d.k
                );
            }
            expect_in(&b.project_conv, &format!("{p}._project_conv"), channels)?;
            channels = b.project_conv.co;
        }
        expect_in(&self.conv_head, "_conv_head", channels)?;
        let n_in = self.conv_head.co;
        let classes = self.fc_bias.len();
        if classes == 0 || self.fc_weight.len() != classes * n_in {
            user_bail!(
                "tensor `_fc.weight` has {} values and `_fc.bias` {classes}, expected [{classes}, {n_in}] and [{classes}] with ≥ 1 class",
                self.fc_weight.len()
            );
        }
        Ok(())
    }

    fn load_unchecked(w: &dyn WeightSource) -> Result<Self> {
        let conv_stem = ConvBn::load(w, "_conv_stem", "_bn0")?;
        let mut blocks = Vec::new();
        let strides = STAGES.iter().flat_map(|&(n, s)| (0..n).map(move |i| if i == 0 { s } else { 1 }));
        for (i, stride) in strides.enumerate() {
            let p = format!("_blocks.{i}");
            let expand_conv = if w.contains(&format!("{p}._expand_conv.weight")) {
                Some(ConvBn::load(w, &format!("{p}._expand_conv"), &format!("{p}._bn0"))?)
            } else {
                None
            };
            blocks.push(MbConvBlock {
                expand_conv,
                depthwise_conv: ConvBn::load(w, &format!("{p}._depthwise_conv"), &format!("{p}._bn1"))?,
                project_conv: ConvBn::load(w, &format!("{p}._project_conv"), &format!("{p}._bn2"))?,
                stride,
            });
        }
        let conv_head = ConvBn::load(w, "_conv_head", "_bn1")?;
        let fc_weight = w.get("_fc.weight")?.into_f32s()?;
        let fc_bias = w.get("_fc.bias")?.into_f32s()?;
        Ok(EfficientNetLite { conv_stem, blocks, conv_head, fc_weight, fc_bias })
    }

    fn dense(c: &ConvBn, x: &FeatureMap, stride: usize, act: bool) -> FeatureMap {
        let pad = Padding::tf_same(x.h, x.w, c.k, stride);
        let (mut data, h, w) = conv2d(&x.data, c.ci, x.h, x.w, &c.weight, c.co, c.k, stride, pad, &c.bias);
        if act {
            relu6_(&mut data);
        }
        FeatureMap { c: c.co, h, w, data }
    }

    fn block(b: &MbConvBlock, x: &FeatureMap) -> FeatureMap {
        let e = match &b.expand_conv {
            Some(c) => Self::dense(c, x, 1, true),
            None => x.clone(),
        };
        let d = &b.depthwise_conv;
        let pad = Padding::tf_same(e.h, e.w, d.k, b.stride);
        let (mut data, h, w) = depthwise_conv2d(&e.data, e.c, e.h, e.w, &d.weight, d.k, b.stride, pad, &d.bias);
        relu6_(&mut data);
        let mut y = Self::dense(&b.project_conv, &FeatureMap { c: e.c, h, w, data }, 1, false);
        if b.stride == 1 && x.c == y.c {
            y.data.iter_mut().zip(&x.data).for_each(|(a, b)| *a += b);
        }
        y
    }

    /// Runs the stem and blocks `0..=last`, returning the outputs of the blocks in `taps`.
    pub fn features(&self, chw: &[f32], size: usize, taps: &[usize]) -> Vec<FeatureMap> {
        let last = taps.iter().copied().max().unwrap_or(self.blocks.len() - 1);
        let mut x = Self::dense(&self.conv_stem, &FeatureMap { c: 3, h: size, w: size, data: chw.to_vec() }, 2, true);
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate().take(last + 1) {
            x = Self::block(b, &x);
            if taps.contains(&i) {
                out.push(x.clone());
            }
        }
        out
    }

    /// ImageNet logits `[1000]` for a preprocessed `[3, size, size]` image.
    pub fn logits(&self, chw: &[f32], size: usize) -> Vec<f32> {
        let last = self.blocks.len() - 1;
        let x = self.features(chw, size, &[last]).pop().expect("one tap");
        let x = Self::dense(&self.conv_head, &x, 1, true);
        let pooled = pool::global_avg_pool(&x.data, x.c);
        let n_in = pooled.len();
        self.fc_bias
            .iter()
            .enumerate()
            .map(|(o, b)| {
                b + self.fc_weight[o * n_in..(o + 1) * n_in].iter().zip(&pooled).map(|(w, x)| w * x).sum::<f32>()
            })
            .collect()
    }

    /// Width of [`EfficientNetLite::patch_tokens`]: the channels of the tapped blocks.
    pub fn patch_dim(&self) -> usize {
        PATCH_TAPS.iter().map(|&i| self.blocks[i].project_conv.co).sum()
    }

    /// Patch tokens for anomaly maps and the SAGE adapter (see the module docs).
    pub fn patch_tokens(&self, chw: &[f32], size: usize) -> PatchTokens {
        self.tokens_from_taps(&self.features(chw, size, &PATCH_TAPS))
    }

    /// The patch tokens from the outputs of the [`PATCH_TAPS`] blocks (on whichever engine ran
    /// them): smoothing, pooling to the coarse grid, per-part L2 normalisation.
    pub fn tokens_from_taps(&self, maps: &[FeatureMap]) -> PatchTokens {
        let (fine, coarse) = (&maps[0], &maps[1]);
        let (h, w) = (coarse.h, coarse.w);
        let fine_s = pool::avg_pool_same(&fine.data, fine.c, fine.h, fine.w, 3);
        let fine_s = pool::resize_area(&fine_s, fine.c, fine.h, fine.w, h, w);
        let coarse_s = pool::avg_pool_same(&coarse.data, coarse.c, h, w, 3);
        let dim = self.patch_dim();
        debug_assert_eq!(dim, fine.c + coarse.c);
        let mut data = vec![0.0f32; h * w * dim];
        for (p, tok) in data.chunks_exact_mut(dim).enumerate() {
            for c in 0..fine.c {
                tok[c] = fine_s[c * h * w + p];
            }
            for c in 0..coarse.c {
                tok[fine.c + c] = coarse_s[c * h * w + p];
            }
            crate::ops::norm::l2_normalize_slice(&mut tok[..fine.c]);
            crate::ops::norm::l2_normalize_slice(&mut tok[fine.c..]);
        }
        PatchTokens { h, w, dim, data }
    }
}
