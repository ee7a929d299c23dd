//! The EfficientNet-Lite0 encoder's forward on a device op set ([`StepOps`]): the same layers as
//! [`EfficientNetLite::features`], with the stem as an im2col GEMM (the columns built on the host,
//! where the image already is), the 1×1 expand and project convolutions as GEMMs over
//! channel-major maps followed by `channel_bias_act` (bias, residual, ReLU6), and the depthwise
//! convolutions on `kernels/dwconv.cu`. The two tapped maps come back to the host for the
//! patch-token post-processing ([`EfficientNetLite::tokens_from_taps`]), so both engines share it.
//!
//! On `HostOps` this equals the CPU encoder (tested below); on the GPU the maps are bf16. The
//! pipeline keeps the CPU encoder: it runs once per image and its tokens are cached, and bf16
//! tokens would move the min-cosine patch selection between runs on different engines.

use super::{ConvBn, EfficientNetLite, FeatureMap, PatchTokens, PATCH_TAPS};
use crate::ops::conv::{im2col, Padding};
use crate::opset::GemmSpec;
use crate::opset::{DwShape, StepOps};
use anyhow::{bail, Result};

/// A convolution with its folded BatchNorm: weight `[co, ci·k·k]` as the GEMM reads it, fp32 bias.
struct DevConv<O: StepOps> {
    w: O::Buf,
    b: O::Stat,
    co: usize,
    ci: usize,
    k: usize,
}

struct DevBlock<O: StepOps> {
    expand_conv: Option<DevConv<O>>,
    depthwise_conv: DevConv<O>,
    project_conv: DevConv<O>,
    stride: usize,
}

/// A `[c, h, w]` map on the device.
struct DevMap<O: StepOps> {
    data: O::Buf,
    c: usize,
    h: usize,
    w: usize,
}

pub struct DeviceEfficientNet<O: StepOps> {
    pub ops: O,
    conv_stem: DevConv<O>,
    /// The blocks up to the last tap (the later ones do not feed the patch tokens).
    blocks: Vec<DevBlock<O>>,
}

impl<O: StepOps> DeviceEfficientNet<O> {
    /// Copies the stem and the blocks the patch tokens need to the device.
    pub fn new(ops: O, net: &EfficientNetLite) -> Result<Self> {
        let up = |c: &ConvBn| -> Result<DevConv<O>> {
            Ok(DevConv { w: ops.upload(&c.weight)?, b: ops.upload_stat(&c.bias)?, co: c.co, ci: c.ci, k: c.k })
        };
        let last = PATCH_TAPS.iter().copied().max().unwrap_or(0);
        let blocks = net
            .blocks
            .iter()
            .take(last + 1)
            .map(|b| {
                Ok(DevBlock {
                    expand_conv: b.expand_conv.as_ref().map(up).transpose()?,
                    depthwise_conv: up(&b.depthwise_conv)?,
                    project_conv: up(&b.project_conv)?,
                    stride: b.stride,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_stem = up(&net.conv_stem)?;
        Ok(DeviceEfficientNet { ops, conv_stem, blocks })
    }

    /// A 1×1 convolution: `y [co, h·w] = W [co, ci] · x [ci, h·w]`, then bias, residual, ReLU6.
    fn pointwise(&self, c: &DevConv<O>, x: &DevMap<O>, residual: Option<&O::Buf>, relu6: bool) -> Result<DevMap<O>> {
        let p = x.h * x.w;
        let mut y = self.ops.gemm_new(&GemmSpec::nn(c.co, p, c.ci), &c.w, &x.data)?;
        self.ops.channel_bias_act(&mut y, &c.b, c.co, residual, relu6)?;
        Ok(DevMap { data: y, c: c.co, h: x.h, w: x.w })
    }

    fn block(&self, b: &DevBlock<O>, x: &DevMap<O>) -> Result<DevMap<O>> {
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
        let mid = DevMap { data: self.ops.dwconv(&e.data, &d.w, &d.b, s, true)?, c: e.c, h, w };
        let residual = (b.stride == 1 && x.c == b.project_conv.co).then_some(&x.data);
        self.pointwise(&b.project_conv, &mid, residual, false)
    }

    fn download(&self, m: &DevMap<O>) -> Result<FeatureMap> {
        Ok(FeatureMap { c: m.c, h: m.h, w: m.w, data: self.ops.download(&m.data)? })
    }

    /// The stem and blocks `0..=max(taps)` over one preprocessed `[3, size, size]` image; the
    /// outputs of the blocks in `taps`, read back.
    pub fn features(&self, chw: &[f32], size: usize, taps: &[usize]) -> Result<Vec<FeatureMap>> {
        let c = &self.conv_stem;
        if chw.len() != c.ci * size * size {
            bail!("the encoder takes a [{}, {size}, {size}] image, got {} values", c.ci, chw.len());
        }
        let last = taps.iter().copied().max().unwrap_or(0);
        if last >= self.blocks.len() {
            bail!("block {last} is past the {} blocks this device encoder holds", self.blocks.len());
        }
        let pad = Padding::tf_same(size, size, c.k, 2);
        let (h, w) = pad.output_hw(size, size, c.k, 2);
        let cols = self.ops.upload(&im2col(chw, c.ci, size, size, c.k, 2, pad, h, w))?;
        let mut y = self.ops.gemm_new(&GemmSpec::nn(c.co, h * w, c.ci * c.k * c.k), &c.w, &cols)?;
        drop(cols);
        self.ops.channel_bias_act(&mut y, &c.b, c.co, None, true)?;
        let mut x = DevMap { data: y, c: c.co, h, w };
        let mut out = Vec::new();
        for (i, b) in self.blocks.iter().enumerate().take(last + 1) {
            x = self.block(b, &x)?;
            if taps.contains(&i) {
                out.push(self.download(&x)?);
            }
        }
        Ok(out)
    }

    /// Patch tokens as [`EfficientNetLite::patch_tokens`] makes them, the encoder run on the op
    /// set (`net` supplies the shared post-processing).
    pub fn patch_tokens(&self, net: &EfficientNetLite, chw: &[f32], size: usize) -> Result<PatchTokens> {
        Ok(net.tokens_from_taps(&self.features(chw, size, &PATCH_TAPS)?))
    }
}
