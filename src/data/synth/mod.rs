//! Synthetic anomalies with pixel masks (`sage data synth`), drawn from the normal images of a
//! data set by three published recipes: [`cutpaste`], [`draem`] and [`nsa`]. [`run`] writes them
//! as an MVTec-layout tree that `sage data build --source mvtec` reads unchanged.
//!
//! Every method keeps the pixels outside its mask exactly as the source had them (checked after
//! every draw, [`generate`]), and a draw is only kept when most pixels inside the mask changed
//! (`[accept] min_changed`), so the mask is where the image differs from its source.
//! Randomness: one ChaCha8 generator per sample, keyed by (seed, method, category, index)
//! ([`sample_rng`]), so the output does not depend on thread order or on other samples.

pub mod config;
pub mod cutpaste;
pub mod draem;
pub mod nsa;
pub mod perlin;
pub mod poisson;
pub mod run;
pub mod sheet;

pub use config::SynthConfig;
pub use run::{run, Options, Summary};

use anyhow::{bail, Result};
use image::DynamicImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The recipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// CutPaste: a rectangle of the image, jittered, pasted elsewhere in it.
    Cutpaste,
    /// DRAEM: a Perlin-noise region filled with a foreign texture.
    Draem,
    /// NSA: a patch of another normal image, Poisson-blended in.
    Nsa,
}

impl Method {
    /// The folder and file name part (`test/<name>/`, `synth-<name>.json`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Cutpaste => "cutpaste",
            Method::Draem => "draem",
            Method::Nsa => "nsa",
        }
    }
}

/// An 8-bit image, row-major and interleaved: one channel (grey) or three (RGB).
#[derive(Clone, Debug, PartialEq)]
pub struct Img {
    pub w: usize,
    pub h: usize,
    pub ch: usize,
    pub px: Vec<u8>,
}

impl Img {
    /// Grey pictures (with or without alpha, any depth) become one channel, the rest RGB; alpha
    /// is dropped.
    pub fn from_dynamic(d: &DynamicImage) -> Img {
        let (w, h) = (d.width() as usize, d.height() as usize);
        if d.color().has_color() {
            Img { w, h, ch: 3, px: d.to_rgb8().into_raw() }
        } else {
            Img { w, h, ch: 1, px: d.to_luma8().into_raw() }
        }
    }

    pub fn to_dynamic(&self) -> DynamicImage {
        let (w, h) = (self.w as u32, self.h as u32);
        match self.ch {
            1 => DynamicImage::ImageLuma8(image::GrayImage::from_raw(w, h, self.px.clone()).expect("w·h pixels")),
            _ => DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, self.px.clone()).expect("w·h·3 bytes")),
        }
    }

    /// Filled with one grey value (tests).
    pub fn filled(w: usize, h: usize, ch: usize, v: u8) -> Img {
        Img { w, h, ch, px: vec![v; w * h * ch] }
    }

    pub fn get(&self, x: usize, y: usize, c: usize) -> u8 {
        self.px[(y * self.w + x) * self.ch + c]
    }

    pub fn set(&mut self, x: usize, y: usize, c: usize, v: u8) {
        self.px[(y * self.w + x) * self.ch + c] = v;
    }

    /// The same picture with `ch` channels (grey is repeated into RGB; RGB becomes luma).
    pub fn with_channels(&self, ch: usize) -> Img {
        if ch == self.ch {
            return self.clone();
        }
        let d = self.to_dynamic();
        let (w, h) = (self.w, self.h);
        match ch {
            1 => Img { w, h, ch, px: d.to_luma8().into_raw() },
            _ => Img { w, h, ch: 3, px: d.to_rgb8().into_raw() },
        }
    }

    /// Resized to `w × h` (triangle filter); the same image when the size already fits.
    pub fn resized(&self, w: usize, h: usize) -> Img {
        if (w, h) == (self.w, self.h) {
            return self.clone();
        }
        let d = self.to_dynamic().resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle);
        Img::from_dynamic(&d)
    }

    /// The `w × h` rectangle whose top-left pixel is `(x, y)`; it must lie inside.
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> Img {
        let mut px = Vec::with_capacity(w * h * self.ch);
        for row in y..y + h {
            let start = (row * self.w + x) * self.ch;
            px.extend_from_slice(&self.px[start..start + w * self.ch]);
        }
        Img { w, h, ch: self.ch, px }
    }
}

/// One drawn anomaly: the image, its mask (row-major, `true` = anomalous) and what was drawn.
#[derive(Clone, Debug)]
pub struct Synth {
    pub image: Img,
    pub mask: Vec<bool>,
    pub params: serde_json::Value,
}

impl Synth {
    /// Share of mask pixels where any channel differs from `src` (0 for an empty mask).
    pub fn changed_share(&self, src: &Img) -> f64 {
        let ch = src.ch;
        let (mut inside, mut changed) = (0usize, 0usize);
        for (i, &m) in self.mask.iter().enumerate() {
            if m {
                inside += 1;
                changed += usize::from(self.image.px[i * ch..(i + 1) * ch] != src.px[i * ch..(i + 1) * ch]);
            }
        }
        if inside == 0 {
            0.0
        } else {
            changed as f64 / inside as f64
        }
    }

    /// Index of the first pixel outside the mask that differs from `src`.
    pub fn changed_outside(&self, src: &Img) -> Option<usize> {
        let ch = src.ch;
        (0..self.mask.len())
            .find(|&i| !self.mask[i] && self.image.px[i * ch..(i + 1) * ch] != src.px[i * ch..(i + 1) * ch])
    }
}

/// What the method needs besides the source: DRAEM's texture or NSA's donor image (already with
/// the source's channel count).
pub enum Other<'a> {
    None,
    Texture(&'a Img),
    Donor(&'a Img),
}

/// One try of `method` (no acceptance rule); `None` when the draw cannot be used (a footprint that
/// does not fit, a noise field without a large enough region, a blend that left too little).
pub fn draw(method: Method, src: &Img, other: &Other, cfg: &SynthConfig, rng: &mut ChaCha8Rng) -> Option<Synth> {
    match (method, other) {
        (Method::Cutpaste, _) => cutpaste::draw(src, &cfg.cutpaste, rng),
        (Method::Draem, Other::Texture(t)) => draem::draw(src, t, &cfg.draem, rng),
        (Method::Nsa, Other::Donor(d)) => nsa::draw(src, d, &cfg.nsa, rng),
        _ => None,
    }
}

/// Draws until `[accept]` is met: a non-empty mask with at least `min_changed` of its pixels
/// changed. Returns the sample and the number of tries, or `None` after `max_tries`. A draw that
/// changed a pixel outside its mask is a bug in the method, never kept.
pub fn generate(
    method: Method,
    src: &Img,
    other: &Other,
    cfg: &SynthConfig,
    rng: &mut ChaCha8Rng,
) -> Result<Option<(Synth, u32)>> {
    for attempt in 1..=cfg.accept.max_tries {
        let Some(s) = draw(method, src, other, cfg, rng) else { continue };
        if let Some(i) = s.changed_outside(src) {
            bail!("{} changed pixel ({}, {}) outside its mask", method.name(), i % src.w, i / src.w);
        }
        if s.mask.iter().any(|&m| m) && s.changed_share(src) >= cfg.accept.min_changed {
            return Ok(Some((s, attempt)));
        }
    }
    Ok(None)
}

/// The generator of one sample (or of a category's split, `purpose = "split"`): ChaCha8 keyed by
/// the SHA-256 of all four parts, so no two samples share a stream.
pub fn sample_rng(seed: u64, purpose: &str, category: &str, index: usize) -> ChaCha8Rng {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for part in [seed.to_string().as_str(), purpose, category, index.to_string().as_str()] {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&h.finalize());
    ChaCha8Rng::from_seed(key)
}

/// Uniform in `[r[0], r[1]]` (the lower end when the range is a single value).
pub(crate) fn uniform(rng: &mut ChaCha8Rng, r: [f64; 2]) -> f64 {
    if r[0] >= r[1] {
        r[0]
    } else {
        rng.random_range(r[0]..=r[1])
    }
}

/// 8-bit value of a float, rounded and clamped.
pub(crate) fn to_u8(v: f64) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

#[cfg(test)]
pub(crate) mod test_images {
    use super::Img;

    /// A 64 × 64 grey image of hashed values: every pixel is unrelated to its neighbours, so a
    /// region moved or replaced differs almost everywhere.
    pub fn noise(w: usize, h: usize, ch: usize, salt: u32) -> Img {
        let mut px = Vec::with_capacity(w * h * ch);
        for i in 0..(w * h * ch) as u32 {
            let mut x = i.wrapping_mul(0x9E37_79B9) ^ salt.wrapping_mul(0x85EB_CA6B);
            x ^= x >> 15;
            x = x.wrapping_mul(0x2C1B_3C6D);
            x ^= x >> 12;
            px.push((x >> 8) as u8);
        }
        Img { w, h, ch, px }
    }

    /// A smooth diagonal ramp with a checkerboard on it.
    pub fn ramp_checker(w: usize, h: usize, ch: usize) -> Img {
        let mut img = Img::filled(w, h, ch, 0);
        for y in 0..h {
            for x in 0..w {
                let checker = if (x / 8 + y / 8) % 2 == 0 { 40 } else { 0 };
                for c in 0..ch {
                    img.set(x, y, c, (20 + x * 2 + y + c * 10 + checker).min(255) as u8);
                }
            }
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_streams_differ_by_every_part_and_repeat() {
        let first = |seed, p: &str, c: &str, i| sample_rng(seed, p, c, i).random::<u64>();
        let base = first(0, "cutpaste", "bottle", 3);
        assert_eq!(base, first(0, "cutpaste", "bottle", 3));
        for other in [
            first(1, "cutpaste", "bottle", 3),
            first(0, "draem", "bottle", 3),
            first(0, "cutpaste", "cable", 3),
            first(0, "cutpaste", "bottle", 4),
        ] {
            assert_ne!(base, other);
        }
    }

    #[test]
    fn images_convert_crop_and_keep_their_pixels() {
        let img = test_images::noise(5, 4, 3, 1);
        assert_eq!(Img::from_dynamic(&img.to_dynamic()), img);
        let grey = img.with_channels(1);
        assert_eq!((grey.ch, grey.px.len()), (1, 20));
        let c = img.crop(1, 2, 3, 2);
        assert_eq!((c.w, c.h), (3, 2));
        assert_eq!(c.get(0, 0, 2), img.get(1, 2, 2));
        assert_eq!(c.get(2, 1, 0), img.get(3, 3, 0));
        assert_eq!(img.resized(5, 4), img);
    }
}
