//! The frozen encoders an anomaly map can read patch tokens from: EfficientNet-Lite0 (two
//! mid-level taps, 14×14 tokens of 152 dimensions; see `models::efficientnet`) or DINOv2 ViT-S/14
//! (a block's output tokens: 16×16 of 384 at 224 pixels, 32×32 at 448). DINOv2 reads block 6 by
//! default, not the last layer after the final LayerNorm that AnomalyDINO reads: this checkpoint's
//! late blocks were fine-tuned for saliency, and on ELPV and its synthetic anomalies block 6's
//! tokens localise and rank far better (docs/results/map-shots, docs/results/synth-elpv) — the
//! mid-level features PatchCore takes from its CNN, for the same reason.

use super::dinov2::{self, Dinov2, Tap};
use super::efficientnet::{EfficientNetLite, PatchTokens, PREPROCESS_FULL};
use super::foreground;
use crate::assets::Asset;
use crate::backend::cpu::HostOps;
use crate::image_io;
use crate::opset::StepOps;
use anyhow::Result;
use image::DynamicImage;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    Efficientnet,
    Dinov2,
}

/// Which DINOv2 hidden state a map reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DinoLayer {
    /// The output of block 1–12.
    Block(usize),
    /// The last block after the final LayerNorm (HF's `last_hidden_state`; AnomalyDINO's choice).
    Last,
}

impl std::str::FromStr for DinoLayer {
    type Err = String;
    fn from_str(s: &str) -> Result<DinoLayer, String> {
        match s.trim() {
            "last" => Ok(DinoLayer::Last),
            t => t
                .parse()
                .map(DinoLayer::Block)
                .map_err(|_| format!("`{t}` is neither a block number (1–12) nor `last`")),
        }
    }
}

/// A frozen encoder on the op set `O` (the CPU's by default; `load_on` puts it on another).
pub enum PatchEncoder<O: StepOps = HostOps> {
    EfficientNet(EfficientNetLite<O>),
    /// The ViT, the side in pixels images are resized to (a multiple of 14), and the hidden
    /// state read.
    Dinov2(Dinov2<O>, u32, Tap),
}

impl PatchEncoder<HostOps> {
    /// The encoder from the installed assets; `size` is DINOv2's input side (default 224), `layer`
    /// the hidden state it reads.
    pub fn load(kind: EncoderKind, size: Option<u32>, layer: DinoLayer) -> Result<PatchEncoder> {
        PatchEncoder::load_on(HostOps, kind, size, layer)
    }

    /// [`PatchEncoder::load`] from a weights file of `kind` (a `.pth` for EfficientNet-Lite0, an
    /// ONNX graph or safetensors for DINOv2).
    pub fn load_from(kind: EncoderKind, weights: &Path, size: Option<u32>, layer: DinoLayer) -> Result<PatchEncoder> {
        PatchEncoder::load_from_on(HostOps, kind, weights, size, layer)
    }
}

impl<O: StepOps> PatchEncoder<O> {
    /// [`PatchEncoder::load`] on `ops`.
    pub fn load_on(ops: O, kind: EncoderKind, size: Option<u32>, layer: DinoLayer) -> Result<Self> {
        let weights = match kind {
            EncoderKind::Efficientnet => Asset::EfficientNetPth.path()?,
            EncoderKind::Dinov2 => Asset::Dinov2Onnx.path()?,
        };
        PatchEncoder::load_from_on(ops, kind, &weights, size, layer)
    }

    /// [`PatchEncoder::load_from`] on `ops`.
    pub fn load_from_on(
        ops: O,
        kind: EncoderKind,
        weights: &Path,
        size: Option<u32>,
        layer: DinoLayer,
    ) -> Result<Self> {
        Ok(match kind {
            EncoderKind::Efficientnet => PatchEncoder::EfficientNet(EfficientNetLite::load_on(ops, weights)?),
            EncoderKind::Dinov2 => {
                let size = size.unwrap_or(224);
                if size < 14 || !size.is_multiple_of(14) {
                    crate::user_bail!(
                        "--size {size}: DINOv2 takes a side that is a multiple of its 14-pixel patch (224, 448, ...)"
                    );
                }
                let net = Dinov2::load_on(ops, weights)?;
                let tap = match layer {
                    DinoLayer::Last => Tap::Normed,
                    DinoLayer::Block(i) if (1..=net.layers()).contains(&i) => Tap::Hidden(i),
                    DinoLayer::Block(i) => {
                        crate::user_bail!("--layer {i}: DINOv2 ViT-S/14 has blocks 1 to {} (or `last`)", net.layers())
                    }
                };
                PatchEncoder::Dinov2(net, size, tap)
            }
        })
    }

    /// The op set it runs on (the anomaly map's search runs there too).
    pub fn ops(&self) -> &O {
        match self {
            PatchEncoder::EfficientNet(net) => net.ops(),
            PatchEncoder::Dinov2(net, ..) => net.ops(),
        }
    }

    /// What it is, for reports: `efficientnet-lite0@224`, `dinov2-vits14@448`.
    pub fn describe(&self) -> String {
        match self {
            PatchEncoder::EfficientNet(_) => format!("efficientnet-lite0@{}", PREPROCESS_FULL.crop),
            PatchEncoder::Dinov2(_, size, Tap::Hidden(i)) => format!("dinov2-vits14@{size}/block{i}"),
            PatchEncoder::Dinov2(_, size, _) => format!("dinov2-vits14@{size}/last"),
        }
    }

    /// Width of a patch token (152 for EfficientNet-Lite0's taps, 384 for ViT-S/14).
    pub fn dim(&self) -> usize {
        match self {
            PatchEncoder::EfficientNet(net) => net.patch_dim(),
            PatchEncoder::Dinov2(net, ..) => net.dim(),
        }
    }

    /// The patch grid `(h, w)` of one image: EfficientNet's stride-16 grid (its taps are pooled
    /// to it), DINOv2's `side / patch`.
    pub fn grid(&self) -> (usize, usize) {
        let g = match self {
            PatchEncoder::EfficientNet(_) => PREPROCESS_FULL.crop as usize / 16,
            PatchEncoder::Dinov2(net, size, _) => *size as usize / net.patch(),
        };
        (g, g)
    }

    /// How an image becomes the encoder's input (resize, crop, normalisation).
    pub fn preprocess(&self) -> image_io::Preprocess {
        match self {
            PatchEncoder::EfficientNet(_) => PREPROCESS_FULL,
            PatchEncoder::Dinov2(_, size, _) => dinov2::preprocess(*size),
        }
    }

    /// Patch tokens of one preprocessed image `[3, side, side]` ([`PatchEncoder::preprocess`]).
    pub fn tokens_chw(&self, chw: &[f32]) -> Result<PatchTokens> {
        let side = self.preprocess().crop as usize;
        anyhow::ensure!(chw.len() == 3 * side * side, "pixels must be [3, {side}, {side}], got {} values", chw.len());
        match self {
            PatchEncoder::EfficientNet(net) => net.try_patch_tokens(chw, side),
            PatchEncoder::Dinov2(net, _, tap) => {
                let h = &net.forward(&[chw], side, side, &[*tap])?[0];
                Ok(PatchTokens { h: h.grid_h, w: h.grid_w, dim: h.dim, data: h.patches(0).to_vec() })
            }
        }
    }

    /// Patch tokens of a batch of images and AnomalyDINO's foreground masks
    /// ([`foreground::foreground_mask`]), from one pass of the encoder. The masks come from the
    /// tokens AnomalyDINO reads them from: DINOv2's last layer after the final LayerNorm whichever
    /// layer the map reads (block 6's first component follows texture, not the object: on a mug on
    /// a table it cut away half the mug where the last layer outlined it), and EfficientNet's own
    /// patch tokens.
    pub fn tokens_and_foreground(&self, images: &[&DynamicImage]) -> Result<(Vec<PatchTokens>, Vec<Vec<bool>>)> {
        let (tokens, mask_tokens) = match self {
            PatchEncoder::EfficientNet(_) => (self.tokens(images)?, None),
            PatchEncoder::Dinov2(net, size, tap) => {
                let mut taps = dinov2_tokens(net, *size, images, &[*tap, Tap::Normed])?;
                let normed = taps.pop();
                (taps.pop().expect("two taps"), normed)
            }
        };
        let source = mask_tokens.as_ref().unwrap_or(&tokens);
        let rows: Vec<&[f32]> = source.iter().map(|t| t.data.as_slice()).collect();
        let masks = source.first().map_or_else(Vec::new, |t| foreground::foreground_masks(&rows, t.dim, t.h, t.w));
        Ok((tokens, masks))
    }

    /// The foreground masks of [`PatchEncoder::tokens_and_foreground`] alone.
    pub fn foreground(&self, images: &[&DynamicImage]) -> Result<Vec<Vec<bool>>> {
        Ok(self.tokens_and_foreground(images)?.1)
    }

    /// Patch tokens of a batch of images (DINOv2 runs them as one batch).
    pub fn tokens(&self, images: &[&DynamicImage]) -> Result<Vec<PatchTokens>> {
        match self {
            PatchEncoder::EfficientNet(net) => {
                let size = PREPROCESS_FULL.crop as usize;
                images.iter().map(|img| net.try_patch_tokens(&image_io::to_chw(img, &PREPROCESS_FULL), size)).collect()
            }
            PatchEncoder::Dinov2(net, size, tap) => Ok(dinov2_tokens(net, *size, images, &[*tap])?.remove(0)),
        }
    }
}

/// Each of `taps`' patch tokens of a batch of images, from one DINOv2 forward at `size` pixels.
fn dinov2_tokens<O: StepOps>(
    net: &Dinov2<O>,
    size: u32,
    images: &[&DynamicImage],
    taps: &[Tap],
) -> Result<Vec<Vec<PatchTokens>>> {
    let p = dinov2::preprocess(size);
    let chw: Vec<Vec<f32>> = images.iter().map(|img| image_io::to_chw(img, &p)).collect();
    let refs: Vec<&[f32]> = chw.iter().map(|c| c.as_slice()).collect();
    let s = size as usize;
    Ok(net
        .forward(&refs, s, s, taps)?
        .iter()
        .map(|h| {
            (0..images.len())
                .map(|i| PatchTokens { h: h.grid_h, w: h.grid_w, dim: h.dim, data: h.patches(i).to_vec() })
                .collect()
        })
        .collect())
}
