//! Convolutions of the EfficientNet-Lite encoder: the depthwise convolution (the dense ones are
//! GEMMs over channel-major maps).

use super::Buffers;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Padding {
    pub top: usize,
    pub left: usize,
    pub bottom: usize,
    pub right: usize,
}

impl Padding {
    /// TensorFlow "SAME": output = ceil(input / stride), the extra pixel on the bottom/right.
    pub fn tf_same(h: usize, w: usize, k: usize, stride: usize) -> Padding {
        let pad = |n: usize| {
            let out = n.div_ceil(stride);
            ((out - 1) * stride + k).saturating_sub(n)
        };
        let (ph, pw) = (pad(h), pad(w));
        Padding { top: ph / 2, left: pw / 2, bottom: ph - ph / 2, right: pw - pw / 2 }
    }

    pub fn output_hw(&self, h: usize, w: usize, k: usize, stride: usize) -> (usize, usize) {
        ((h + self.top + self.bottom - k) / stride + 1, (w + self.left + self.right - k) / stride + 1)
    }
}

/// `n` images of `c` channels, `h × w`, each channel filtered by its own `k × k` kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwShape {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: Padding,
}

impl DwShape {
    /// The output's `(Ho, Wo)`.
    pub fn out_hw(&self) -> (usize, usize) {
        self.pad.output_hw(self.h, self.w, self.k, self.stride)
    }

    pub fn in_len(&self) -> usize {
        self.n * self.c * self.h * self.w
    }

    pub fn out_len(&self) -> usize {
        let (ho, wo) = self.out_hw();
        self.n * self.c * ho * wo
    }

    pub fn check(&self) -> Result<()> {
        let s = self;
        if s.n == 0 || s.c == 0 || s.h == 0 || s.w == 0 || s.k == 0 || s.stride == 0 {
            bail!("depthwise convolution: every size must be positive ({s:?})");
        }
        if s.h + s.pad.top + s.pad.bottom < s.k || s.w + s.pad.left + s.pad.right < s.k {
            bail!("depthwise convolution: a {0}×{0} kernel does not fit the padded input ({s:?})", s.k);
        }
        Ok(())
    }
}

/// The depthwise convolution.
pub trait Conv: Buffers {
    /// Depthwise convolution `[N, C, H, W] → [N, C, Ho, Wo]` with `w [C, k, k]`, an fp32 bias and
    /// an optional fused ReLU6.
    fn dwconv(&self, x: &Self::Buf, w: &Self::Buf, bias: &Self::Stat, s: DwShape, relu6: bool) -> Result<Self::Buf>;
}
