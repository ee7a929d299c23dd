//! The frozen encoders an anomaly map can read patch tokens from: EfficientNet-Lite0 (two
//! mid-level taps, 14×14 tokens of 152 dimensions; see `models::efficientnet`) or DINOv2 ViT-S/14
//! (the last layer's normalised patch tokens, as AnomalyDINO uses them: 16×16 of 384 at 224
//! pixels, 32×32 at 448).

use super::dinov2::{self, Dinov2, Tap};
use super::efficientnet::{EfficientNetLite, PatchTokens, PREPROCESS_FULL};
use crate::assets::Asset;
use crate::image_io;
use anyhow::Result;
use image::DynamicImage;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    Efficientnet,
    Dinov2,
}

pub enum PatchEncoder {
    EfficientNet(EfficientNetLite),
    /// The ViT and the side, in pixels, images are resized to (a multiple of 14).
    Dinov2(Dinov2, u32),
}

impl PatchEncoder {
    /// The encoder from the installed assets; `size` is DINOv2's input side (default 224).
    pub fn load(kind: EncoderKind, size: Option<u32>) -> Result<PatchEncoder> {
        Ok(match kind {
            EncoderKind::Efficientnet => {
                PatchEncoder::EfficientNet(EfficientNetLite::load(&Asset::EfficientNetPth.path()?)?)
            }
            EncoderKind::Dinov2 => {
                let size = size.unwrap_or(224);
                if size < 14 || !size.is_multiple_of(14) {
                    crate::user_bail!(
                        "--size {size}: DINOv2 takes a side that is a multiple of its 14-pixel patch (224, 448, ...)"
                    );
                }
                PatchEncoder::Dinov2(Dinov2::load(&Asset::Dinov2Onnx.path()?)?, size)
            }
        })
    }

    /// What it is, for reports: `efficientnet-lite0@224`, `dinov2-vits14@448`.
    pub fn describe(&self) -> String {
        match self {
            PatchEncoder::EfficientNet(_) => format!("efficientnet-lite0@{}", PREPROCESS_FULL.crop),
            PatchEncoder::Dinov2(_, size) => format!("dinov2-vits14@{size}"),
        }
    }

    /// Patch tokens of a batch of images (DINOv2 runs them as one batch).
    pub fn tokens(&self, images: &[&DynamicImage]) -> Result<Vec<PatchTokens>> {
        match self {
            PatchEncoder::EfficientNet(net) => {
                let size = PREPROCESS_FULL.crop as usize;
                images.iter().map(|img| net.try_patch_tokens(&image_io::to_chw(img, &PREPROCESS_FULL), size)).collect()
            }
            PatchEncoder::Dinov2(net, size) => {
                let p = dinov2::preprocess(*size);
                let chw: Vec<Vec<f32>> = images.iter().map(|img| image_io::to_chw(img, &p)).collect();
                let refs: Vec<&[f32]> = chw.iter().map(|c| c.as_slice()).collect();
                let s = *size as usize;
                let h = &net.forward(&refs, s, s, &[Tap::Normed])?[0];
                Ok((0..images.len())
                    .map(|i| PatchTokens { h: h.grid_h, w: h.grid_w, dim: h.dim, data: h.patches(i).to_vec() })
                    .collect())
            }
        }
    }
}
