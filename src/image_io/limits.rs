//! How large a decoded image may be, checked against the header's dimensions before any pixel
//! buffer is allocated: a few hundred bytes of PNG can declare 60000×60000 pixels, and a 1×60000
//! strip scaled so its short side is 256 pixels would need gigabytes in [`super::to_chw`].

use crate::user_err;
use anyhow::Result;
use std::path::Path;

/// Raises the pixel limit (a whole number of pixels, width × height).
pub const MAX_PIXELS_ENV: &str = "SAGE_MAX_IMAGE_PIXELS";
/// Raises the aspect-ratio limit (long side / short side).
pub const MAX_ASPECT_ENV: &str = "SAGE_MAX_IMAGE_ASPECT";
/// Decodes a JPEG that lacks its end-of-image marker (grey-filled where the data stops).
pub const ALLOW_TRUNCATED_ENV: &str = "SAGE_ALLOW_TRUNCATED_IMAGES";

/// 64 megapixels (8192×8192): four times the largest image of any supported dataset, and at
/// most 512 MiB for the decoded buffer even at 16 bits per RGBA channel.
pub const DEFAULT_MAX_PIXELS: u64 = 1 << 26;
/// 32:1. Preprocessing scales the short side to 256 pixels, so this bounds the resized image to
/// 256 × 8192 pixels.
pub const DEFAULT_MAX_ASPECT: u64 = 32;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ImageLimits {
    pub max_pixels: u64,
    pub max_aspect: u64,
    pub allow_truncated: bool,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits { max_pixels: DEFAULT_MAX_PIXELS, max_aspect: DEFAULT_MAX_ASPECT, allow_truncated: false }
    }
}

impl ImageLimits {
    /// The defaults, with whatever the environment raises or relaxes.
    pub fn from_env() -> Result<ImageLimits> {
        let d = ImageLimits::default();
        Ok(ImageLimits {
            max_pixels: env_u64(MAX_PIXELS_ENV)?.unwrap_or(d.max_pixels),
            max_aspect: env_u64(MAX_ASPECT_ENV)?.unwrap_or(d.max_aspect),
            allow_truncated: std::env::var_os(ALLOW_TRUNCATED_ENV).is_some_and(|v| v == "1"),
        })
    }

    /// Refuses `w × h` (from the file's header) when it exceeds a limit, naming the limit and the
    /// variable that raises it.
    pub fn check(&self, path: &Path, w: u32, h: u32) -> Result<()> {
        let (w64, h64) = (w as u64, h as u64);
        if w == 0 || h == 0 {
            return Err(user_err!("image {} declares {w}×{h} pixels: it has no pixels", path.display()));
        }
        if w64 * h64 > self.max_pixels {
            return Err(user_err!(
                "image {} declares {w}×{h} = {} pixels, over the limit of {} pixels; downscale it, or raise the limit \
                 with {MAX_PIXELS_ENV}=<pixels> (decoding needs up to 8 bytes per pixel)",
                path.display(),
                w64 * h64,
                self.max_pixels
            ));
        }
        let (long, short) = (w64.max(h64), w64.min(h64));
        if long > short * self.max_aspect {
            return Err(user_err!(
                "image {} is {w}×{h} pixels, an aspect ratio over the limit of {}:1 (preprocessing scales the short \
                 side to 256 pixels); crop it, or raise the limit with {MAX_ASPECT_ENV}=<ratio>",
                path.display(),
                self.max_aspect
            ));
        }
        Ok(())
    }

    /// The decoder's own allocation cap: enough for the largest image the pixel limit admits.
    pub fn decoder_limits(&self) -> image::Limits {
        let mut l = image::Limits::default();
        let need = self.max_pixels.saturating_mul(8).saturating_add(1 << 20);
        l.max_alloc = Some(l.max_alloc.unwrap_or(0).max(need));
        l
    }
}

fn env_u64(name: &str) -> Result<Option<u64>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => Err(user_err!("{name}={v:?}: expected a positive whole number")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_refuse_huge_and_thin_images_naming_the_variable() {
        let l = ImageLimits::default();
        let p = Path::new("x.png");
        assert!(l.check(p, 8192, 8192).is_ok() && l.check(p, 256, 8192).is_ok());
        let big = format!("{:#}", l.check(p, 60000, 60000).unwrap_err());
        assert!(big.contains("x.png") && big.contains(MAX_PIXELS_ENV) && big.contains("67108864"), "{big}");
        let thin = format!("{:#}", l.check(p, 1, 60000).unwrap_err());
        assert!(thin.contains("32:1") && thin.contains(MAX_ASPECT_ENV), "{thin}");
        assert!(l.check(p, 0, 10).is_err());
    }
}
