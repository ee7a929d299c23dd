//! Reading an EfficientNet-Lite0 checkpoint into host memory: the lukemelas-style tensor names
//! (`_conv_stem`, `_blocks.N._expand_conv`, `_bn0`, ...), BatchNorm folded into the preceding
//! convolution, and the checks that every shape chains (the forward indexes by these sizes, so a
//! checkpoint that passes here cannot make an op fail). The model uploads what this returns to
//! its op set.

use crate::models::{StateDict, WeightSource};
use crate::user_bail;
use anyhow::{Context, Result};
use std::path::Path;

const BN_EPS: f32 = 1e-3;
/// (repeats, stride of the first block) per stage, from the EfficientNet-B0/Lite0 table.
const STAGES: [(usize, usize); 7] = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)];

/// A convolution with its BatchNorm folded in: weight `[co, ci·k·k]`, bias `[co]`.
pub(super) struct ConvBn {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub co: usize,
    pub ci: usize,
    pub k: usize,
}

pub(super) struct HostBlock {
    pub expand_conv: Option<ConvBn>,
    pub depthwise_conv: ConvBn,
    pub project_conv: ConvBn,
    pub stride: usize,
}

/// The whole network's folded weights, validated.
pub(super) struct Checkpoint {
    pub conv_stem: ConvBn,
    pub blocks: Vec<HostBlock>,
    pub conv_head: ConvBn,
    /// `[classes, head channels]`.
    pub fc_weight: Vec<f32>,
    pub fc_bias: Vec<f32>,
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

impl Checkpoint {
    /// Reads the legacy `.pth` asset or a `.safetensors` made by `sage convert`.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        let ckpt = if path.extension().is_some_and(|e| e == "safetensors") {
            let f = crate::formats::safetensors::SafetensorsFile::open(path)?;
            Self::from_weights(&f)
        } else {
            let tensors = crate::formats::pth::load(path)?;
            Self::from_weights(&StateDict { path: path.to_path_buf(), tensors })
        };
        ckpt.with_context(|| format!("{} is not an EfficientNet-Lite0 checkpoint sage can run", path.display()))
    }

    /// Loads and validates: every convolution's input channels are the output channels of the
    /// one before it, depthwise kernels are per channel, BatchNorm statistics match their
    /// convolution and are finite, the classifier matches the head, and no block lies beyond
    /// the architecture's 16.
    pub fn from_weights(w: &dyn WeightSource) -> Result<Checkpoint> {
        let ckpt = Self::load_unchecked(w)?;
        ckpt.check_channels()?;
        let n_blocks = ckpt.blocks.len();
        if w.contains(&format!("_blocks.{n_blocks}._depthwise_conv.weight")) {
            user_bail!("the checkpoint holds a block `_blocks.{n_blocks}`; EfficientNet-Lite0 has {n_blocks}");
        }
        Ok(ckpt)
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

    fn load_unchecked(w: &dyn WeightSource) -> Result<Checkpoint> {
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
            blocks.push(HostBlock {
                expand_conv,
                depthwise_conv: ConvBn::load(w, &format!("{p}._depthwise_conv"), &format!("{p}._bn1"))?,
                project_conv: ConvBn::load(w, &format!("{p}._project_conv"), &format!("{p}._bn2"))?,
                stride,
            });
        }
        let conv_head = ConvBn::load(w, "_conv_head", "_bn1")?;
        let fc_weight = w.get("_fc.weight")?.into_f32s()?;
        let fc_bias = w.get("_fc.bias")?.into_f32s()?;
        Ok(Checkpoint { conv_stem, blocks, conv_head, fc_weight, fc_bias })
    }
}
