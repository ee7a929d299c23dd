//! Image loading, model preprocessing and heat-map rendering.

mod jpeg_end;
pub mod limits;

use crate::user_err;
use anyhow::{Context, Result};
use image::{imageops::FilterType, DynamicImage, GenericImageView, ImageDecoder, ImageFormat, Rgb, RgbImage};
pub use limits::ImageLimits;
use std::path::Path;

/// Decodes an image file fully under the limits set by the environment ([`ImageLimits::from_env`]);
/// a corrupt, truncated or oversized file is a user error naming the file.
pub fn load(path: &Path) -> Result<DynamicImage> {
    load_with(path, &ImageLimits::from_env()?)
}

/// [`load`] under explicit limits: the header's dimensions are checked before any pixel buffer is
/// allocated, and a JPEG without its end-of-image marker is refused unless `allow_truncated`.
pub fn load_with(path: &Path, limits: &ImageLimits) -> Result<DynamicImage> {
    let bytes = std::fs::read(path).map_err(|e| user_err!("cannot open image {}: {e}", path.display()))?;
    let corrupt = |e: image::ImageError| {
        user_err!(
            "cannot decode image {}: {e}. The file is corrupt or truncated; re-export or replace it",
            path.display()
        )
    };
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes.as_slice()))
        .with_guessed_format()
        .map_err(|e| user_err!("cannot read image {}: {e}", path.display()))?;
    reader.limits(limits.decoder_limits());
    let format = reader.format();
    let decoder = reader.into_decoder().map_err(corrupt)?;
    let (w, h) = decoder.dimensions();
    limits.check(path, w, h)?;
    if format == Some(ImageFormat::Jpeg) && !limits.allow_truncated && !jpeg_end::is_complete(&bytes) {
        return Err(user_err!(
            "cannot decode image {}: the JPEG data ends before its end-of-image marker, and the missing part would \
             decode as grey. The file is corrupt or truncated; re-export or replace it, or set {}=1 to decode it anyway",
            path.display(),
            limits::ALLOW_TRUNCATED_ENV
        ));
    }
    DynamicImage::from_decoder(decoder).map_err(corrupt)
}

/// Writes `img` to `path` atomically (encoded in memory first, in the format the extension
/// names), so a full disk or a crash never leaves a truncated picture in place of a good one.
pub fn save_atomic(img: &RgbImage, path: &Path) -> Result<()> {
    save_dynamic_atomic(&DynamicImage::ImageRgb8(img.clone()), path)
}

/// [`save_atomic`] for any pixel type the encoder takes (`Luma8` stays one channel, so a
/// grayscale picture is not tripled into RGB on the way out).
pub fn save_dynamic_atomic(img: &DynamicImage, path: &Path) -> Result<()> {
    let format = ImageFormat::from_path(path)
        .map_err(|_| user_err!("cannot write {}: give it a .png or .jpg extension", path.display()))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .map_err(|e| user_err!("cannot write {}: {e}", path.display()))?;
    crate::util::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// How an image becomes a model input.
#[derive(Clone, Copy, Debug)]
pub struct Preprocess {
    /// Resize so the shorter side is this long (keeping the aspect ratio)...
    pub resize_shorter: u32,
    /// ...then take the central square of this size.
    pub crop: u32,
    /// Per-channel `(x·255 − mean) / std`.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// RGB image → `[3, crop, crop]` f32, channels first. The resized image is as long as the aspect
/// ratio makes it, which [`load`] bounds ([`ImageLimits`]).
pub fn to_chw(img: &DynamicImage, p: &Preprocess) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let scale = p.resize_shorter as f32 / w.min(h) as f32;
    let (nw, nh) = (((w as f32 * scale).round() as u32).max(p.crop), ((h as f32 * scale).round() as u32).max(p.crop));
    let rgb = img.to_rgb8();
    let resized = image::imageops::resize(&rgb, nw, nh, FilterType::Triangle);
    let (x0, y0) = ((nw - p.crop) / 2, (nh - p.crop) / 2);
    let c = p.crop as usize;
    let mut out = vec![0.0f32; 3 * c * c];
    for y in 0..c {
        for x in 0..c {
            let px = resized.get_pixel(x0 + x as u32, y0 + y as u32);
            for ch in 0..3 {
                out[ch * c * c + y * c + x] = (px[ch] as f32 - p.mean[ch]) / p.std[ch];
            }
        }
    }
    out
}

/// The classic "jet" colour map, `v` in [0, 1].
fn jet(v: f32) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let f = |x: f32| (255.0 * (1.5 - (4.0 * v - x).abs()).clamp(0.0, 1.0)) as u8;
    [f(3.0), f(2.0), f(1.0)]
}

/// Blends a `[mh, mw]` map (scaled to [0, 1] over `lo..hi`) over the image, resized to the image.
pub fn overlay_heatmap(
    img: &DynamicImage,
    map: &[f32],
    mh: usize,
    mw: usize,
    lo: f32,
    hi: f32,
    alpha: f32,
) -> RgbImage {
    let base = img.to_rgb8();
    let (w, h) = base.dimensions();
    let up = crate::ops::pool::resize_bilinear(map, 1, mh, mw, h as usize, w as usize);
    let span = (hi - lo).max(1e-6);
    RgbImage::from_fn(w, h, |x, y| {
        let v = (up[y as usize * w as usize + x as usize] - lo) / span;
        let c = jet(v);
        let b = base.get_pixel(x, y);
        Rgb(std::array::from_fn(|i| (b[i] as f32 * (1.0 - alpha) + c[i] as f32 * alpha) as u8))
    })
}
