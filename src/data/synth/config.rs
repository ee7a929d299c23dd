//! `sage data synth --config F.toml`: the split shares, the acceptance rule and each method's
//! parameters. Every table and key is optional (the defaults are `configs/synth.toml`, written
//! out); unknown keys are refused and every range is checked ([`CheckRanges`]), so a typo or an
//! empty range is an error naming the file and the key, never a silent default.

use crate::config::{CheckRanges, RangeCheck};
use serde::{Deserialize, Serialize};

/// The whole file: `[split]`, `[accept]`, `[cutpaste]`, `[draem]`, `[nsa]`.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SynthConfig {
    pub split: SplitConfig,
    pub accept: AcceptConfig,
    pub cutpaste: CutPasteConfig,
    pub draem: DraemConfig,
    pub nsa: NsaConfig,
}

/// How each category's normal images are shared out; the rest are the anomalies' sources.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SplitConfig {
    /// Share copied to `train/good` (the references; at least one image).
    pub train: f64,
    /// Share copied to `test/good` (held-out normals).
    pub test: f64,
}

impl Default for SplitConfig {
    fn default() -> Self {
        SplitConfig { train: 0.2, test: 0.2 }
    }
}

/// When a drawn anomaly is kept: a draw whose mask is empty, or where fewer than `min_changed`
/// of the mask's pixels differ from the source (a patch pasted onto a look-alike region), is drawn
/// again, at most `max_tries` times; after that the sample is skipped and listed as such.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcceptConfig {
    pub min_changed: f64,
    pub max_tries: u32,
}

impl Default for AcceptConfig {
    fn default() -> Self {
        AcceptConfig { min_changed: 0.9, max_tries: 20 }
    }
}

/// CutPaste's two shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// A rectangle of `area` and `aspect`, rotated by `rotation`.
    Normal,
    /// A long thin rectangle (`scar_width` × `scar_length`), rotated by `scar_rotation`.
    Scar,
}

/// CutPaste (Li et al., CVPR 2021). The defaults are the paper's: area 2–15 % of the image,
/// aspect ratio 0.3–3.3 (drawn log-uniform, so tall and wide are equally likely), colour jitter
/// 0.1, no rotation for the rectangle; scars 2–16 × 10–25 px at 256 px (here as shares of the
/// shorter side) rotated by ±45°.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CutPasteConfig {
    pub variant: Variant,
    /// Patch area as a share of the image's area.
    pub area: [f64; 2],
    /// Patch width / height.
    pub aspect: [f64; 2],
    /// Rotation in degrees (the pasted footprint is the rotated rectangle).
    pub rotation: [f64; 2],
    /// Scar width and length as shares of the image's shorter side.
    pub scar_width: [f64; 2],
    pub scar_length: [f64; 2],
    pub scar_rotation: [f64; 2],
    /// Brightness jitter: the patch is scaled by a factor in `[1 − b, 1 + b]`.
    pub brightness: f64,
    /// Contrast jitter: the patch's deviation from its mean is scaled by a factor in `[1 − c, 1 + c]`.
    pub contrast: f64,
}

impl Default for CutPasteConfig {
    fn default() -> Self {
        CutPasteConfig {
            variant: Variant::Normal,
            area: [0.02, 0.15],
            aspect: [0.3, 3.3],
            rotation: [0.0, 0.0],
            scar_width: [2.0 / 256.0, 16.0 / 256.0],
            scar_length: [10.0 / 256.0, 25.0 / 256.0],
            scar_rotation: [-45.0, 45.0],
            brightness: 0.1,
            contrast: 0.1,
        }
    }
}

/// Where DRAEM's foreign texture comes from. No texture data set (DRAEM used DTD) reaches these
/// machines, so the textures are other normal images of the data set being synthesised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextureSource {
    /// A normal image of another category (ELPV: the other cell type); the same category when
    /// there is only one.
    OtherCategory,
    /// Another normal image of the same category.
    SameCategory,
}

/// DRAEM (Zavrtanik et al., ICCV 2021), as its reference code draws it: Perlin noise at scale
/// 2^k (k in `scale_exponent`, independently along x and y), thresholded at 0.5, and a texture
/// laid over the region with opacity in [0.2, 1] (the code's `beta` in [0, 0.8] weighs the image).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DraemConfig {
    /// Lattice cells across the image: 2^k, k drawn from this range (whole numbers).
    pub scale_exponent: [u32; 2],
    /// Noise above this value is anomalous (the noise lies in [−0.71, 0.71]).
    pub threshold: f64,
    /// Smallest mask kept, as a share of the image; smaller noise draws are drawn again...
    pub min_area: f64,
    /// ...at most this many times per try.
    pub max_noise_draws: u32,
    /// The texture's weight β: `out = (1 − β)·image + β·texture` inside the mask.
    pub opacity: [f64; 2],
    pub texture: TextureSource,
    /// Amplitude of the Perlin colour perturbation added to the texture, as a share of 255
    /// (0 = none); one noise field per channel.
    pub texture_noise: f64,
}

impl Default for DraemConfig {
    fn default() -> Self {
        DraemConfig {
            scale_exponent: [0, 5],
            threshold: 0.5,
            min_area: 0.01,
            max_noise_draws: 100,
            opacity: [0.2, 1.0],
            texture: TextureSource::OtherCategory,
            texture_noise: 0.1,
        }
    }
}

/// The guidance field of the Poisson blend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Gradients {
    /// The patch's own gradients (OpenCV's NORMAL_CLONE, which NSA uses).
    Patch,
    /// At each pixel pair the larger of the patch's and the destination's (MIXED_CLONE).
    Mixed,
}

/// NSA, Natural Synthetic Anomalies (Schlüter et al., ECCV 2022): a patch of another normal image
/// of the same category, resized by `scale`, Poisson-blended in at a random place.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NsaConfig {
    /// Patch width and height as shares of the donor image's width and height.
    pub width: [f64; 2],
    pub height: [f64; 2],
    /// Resize factor applied to the patch before it is blended in.
    pub scale: [f64; 2],
    pub gradients: Gradients,
    /// The solve stops when the residual's norm is below this share of the right-hand side's.
    pub tolerance: f64,
    pub max_iterations: u32,
    /// A blended pixel belongs to the mask when it differs from the destination by more than this
    /// many grey levels (in any channel).
    pub threshold: f64,
    /// Connected mask regions (8-connectivity) smaller than this many pixels are dropped (and their
    /// pixels left as they were), so the mask holds no specks.
    pub min_component: u32,
    /// Smallest mask kept, as a share of the patch's area; a fainter blend is drawn again.
    pub min_coverage: f64,
}

impl Default for NsaConfig {
    fn default() -> Self {
        NsaConfig {
            width: [0.1, 0.4],
            height: [0.1, 0.4],
            scale: [0.7, 1.3],
            gradients: Gradients::Patch,
            tolerance: 1e-5,
            max_iterations: 5000,
            threshold: 4.0,
            min_component: 4,
            min_coverage: 0.2,
        }
    }
}

/// `[lo, hi]` with both ends finite and in `[min, max]`, and `lo ≤ hi`.
fn range(c: &mut RangeCheck, key: &str, r: [f64; 2], min: f64, max: f64) {
    let inside = r.iter().all(|v| v.is_finite() && *v >= min && *v <= max);
    c.require(key, inside, format!("= [{}, {}], both ends must be finite numbers in [{min}, {max}]", r[0], r[1]));
    c.require(key, !inside || r[0] <= r[1], format!("= [{}, {}], the minimum must not exceed the maximum", r[0], r[1]));
}

/// [`range`] for shares: both ends in `(0, max]`.
fn share_range(c: &mut RangeCheck, key: &str, r: [f64; 2], max: f64) {
    let inside = r.iter().all(|v| v.is_finite() && *v > 0.0 && *v <= max);
    c.require(key, inside, format!("= [{}, {}], both ends must be finite numbers in (0, {max}]", r[0], r[1]));
    c.require(key, !inside || r[0] <= r[1], format!("= [{}, {}], the minimum must not exceed the maximum", r[0], r[1]));
}

impl CheckRanges for SynthConfig {
    fn check_ranges(&self, c: &mut RangeCheck) {
        let s = &self.split;
        c.positive_float("split.train", s.train, 1.0);
        c.float("split.test", s.test, 0.0, 1.0);
        c.require(
            "split.test",
            s.train + s.test < 1.0,
            format!(
                "= {}: split.train + split.test must be below 1, so that images are left as anomaly sources",
                s.test
            ),
        );

        c.float("accept.min_changed", self.accept.min_changed, 0.0, 1.0);
        c.int("accept.max_tries", self.accept.max_tries as u64, 1, 10_000);

        let cp = &self.cutpaste;
        share_range(c, "cutpaste.area", cp.area, 1.0);
        share_range(c, "cutpaste.aspect", cp.aspect, 100.0);
        range(c, "cutpaste.rotation", cp.rotation, -180.0, 180.0);
        share_range(c, "cutpaste.scar_width", cp.scar_width, 1.0);
        share_range(c, "cutpaste.scar_length", cp.scar_length, 1.0);
        range(c, "cutpaste.scar_rotation", cp.scar_rotation, -180.0, 180.0);
        c.float("cutpaste.brightness", cp.brightness, 0.0, 1.0);
        c.float("cutpaste.contrast", cp.contrast, 0.0, 1.0);

        let d = &self.draem;
        let k = d.scale_exponent;
        c.require(
            "draem.scale_exponent",
            k[0] <= k[1] && k[1] <= 10,
            format!("= [{}, {}], must be whole numbers with min ≤ max ≤ 10", k[0], k[1]),
        );
        // Two-dimensional gradient noise never exceeds √½ ≈ 0.707 in magnitude.
        c.float("draem.threshold", d.threshold, -0.7, 0.7);
        c.positive_float("draem.min_area", d.min_area, 1.0);
        c.int("draem.max_noise_draws", d.max_noise_draws as u64, 1, 100_000);
        share_range(c, "draem.opacity", d.opacity, 1.0);
        c.float("draem.texture_noise", d.texture_noise, 0.0, 1.0);

        let n = &self.nsa;
        share_range(c, "nsa.width", n.width, 1.0);
        share_range(c, "nsa.height", n.height, 1.0);
        share_range(c, "nsa.scale", n.scale, 10.0);
        c.positive_float("nsa.tolerance", n.tolerance, 0.1);
        c.int("nsa.max_iterations", n.max_iterations as u64, 1, 1_000_000);
        c.float("nsa.threshold", n.threshold, 0.0, 254.0);
        c.int("nsa.min_component", n.min_component as u64, 1, 1_000_000);
        c.positive_float("nsa.min_coverage", n.min_coverage, 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn shipped_config_is_the_defaults_written_out() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/synth.toml");
        let c: SynthConfig = crate::config::load(&p).unwrap();
        assert_eq!(c, SynthConfig::default(), "configs/synth.toml and the Default impls disagree");
    }

    #[test]
    fn empty_ranges_and_unknown_keys_name_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.toml");
        std::fs::write(&p, "[cutpaste]\narea = [0.3, 0.1]\n\n[draem]\nscale_exponent = [4, 2]\n").unwrap();
        let s = format!("{:#}", crate::config::load::<SynthConfig>(&p).unwrap_err());
        assert!(s.contains("s.toml") && s.contains("cutpaste.area (line 2)") && s.contains("must not exceed"), "{s}");
        assert!(s.contains("draem.scale_exponent (line 5)"), "{s}");
        std::fs::write(&p, "[nsa]\nwidht = [0.1, 0.2]\n").unwrap();
        let s = format!("{:#}", crate::config::load::<SynthConfig>(&p).unwrap_err());
        assert!(s.contains("s.toml") && s.contains("widht") && s.contains("line 2"), "{s}");
        std::fs::write(&p, "[split]\ntrain = 0.6\ntest = 0.4\n").unwrap();
        let s = format!("{:#}", crate::config::load::<SynthConfig>(&p).unwrap_err());
        assert!(s.contains("split.test (line 3)"), "{s}");
        std::fs::write(&p, "[draem]\ntexture = \"same-category\"\n").unwrap();
        let c: SynthConfig = crate::config::load(&p).unwrap();
        assert_eq!(c.draem.texture, TextureSource::SameCategory);
        assert_eq!(c.cutpaste, CutPasteConfig::default());
    }
}
