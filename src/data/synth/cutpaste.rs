//! CutPaste (Li et al., CVPR 2021): cut a rectangle out of the image, jitter its brightness and
//! contrast, optionally rotate it, and paste it back somewhere else in the same image. The
//! anomaly is a piece of the object where it does not belong, so the mask is exactly the pasted
//! footprint: the rotated rectangle's pixels (a pixel belongs to it when its centre, rotated back,
//! falls inside the cut rectangle).

use super::config::{CutPasteConfig, Variant};
use super::{to_u8, uniform, Img, Synth};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What one draw chose (written to the manifest).
#[derive(Serialize)]
struct Params {
    variant: Variant,
    /// `[x, y, w, h]` of the cut rectangle in the source.
    cut: [usize; 4],
    /// `[x, y, w, h]` of the pasted footprint's bounding box.
    paste: [usize; 4],
    /// Degrees, counter-clockwise in image coordinates (y down).
    rotation: f64,
    brightness: f64,
    contrast: f64,
}

/// One draw; `None` when the rotated footprint does not fit in the image, or when it would land
/// unrotated on the very place it was cut from.
pub fn draw(src: &Img, cfg: &CutPasteConfig, rng: &mut ChaCha8Rng) -> Option<Synth> {
    let (w, h, ch) = (src.w, src.h, src.ch);
    let (pw, ph, rotation) = match cfg.variant {
        Variant::Normal => {
            let area = uniform(rng, cfg.area) * (w * h) as f64;
            // Log-uniform, so that 1/3 and 3 are equally likely.
            let aspect = uniform(rng, [cfg.aspect[0].ln(), cfg.aspect[1].ln()]).exp();
            let (pw, ph) = ((area * aspect).sqrt().round(), (area / aspect).sqrt().round());
            (pw as usize, ph as usize, uniform(rng, cfg.rotation))
        }
        Variant::Scar => {
            let side = w.min(h) as f64;
            let pw = (uniform(rng, cfg.scar_width) * side).round() as usize;
            let ph = (uniform(rng, cfg.scar_length) * side).round() as usize;
            (pw, ph, uniform(rng, cfg.scar_rotation))
        }
    };
    let (pw, ph) = (pw.max(1), ph.max(1));
    if pw > w || ph > h {
        return None;
    }
    let (sx, sy) = (rng.random_range(0..=w - pw), rng.random_range(0..=h - ph));
    let patch = src.crop(sx, sy, pw, ph);

    // Colour jitter as torchvision's ColorJitter does it for brightness and contrast: contrast
    // scales the deviation from the patch's mean grey, brightness scales the result.
    let brightness = uniform(rng, [1.0 - cfg.brightness, 1.0 + cfg.brightness]);
    let contrast = uniform(rng, [1.0 - cfg.contrast, 1.0 + cfg.contrast]);
    let mean = patch.px.iter().map(|&v| v as f64).sum::<f64>() / patch.px.len() as f64;
    let jittered: Vec<f64> =
        patch.px.iter().map(|&v| (((v as f64 - mean) * contrast + mean) * brightness).clamp(0.0, 255.0)).collect();

    let (cos, sin) = (rotation.to_radians().cos(), rotation.to_radians().sin());
    // The rotated rectangle's bounding box (the small subtraction keeps 0° and 90° exact).
    let bw = ((pw as f64 * cos.abs() + ph as f64 * sin.abs() - 1e-9).ceil() as usize).max(1);
    let bh = ((pw as f64 * sin.abs() + ph as f64 * cos.abs() - 1e-9).ceil() as usize).max(1);
    if bw > w || bh > h {
        return None;
    }
    let (dx, dy) = (rng.random_range(0..=w - bw), rng.random_range(0..=h - bh));
    if rotation == 0.0 && (dx, dy) == (sx, sy) {
        return None;
    }

    let mut image = src.clone();
    let mut mask = vec![false; w * h];
    let (half_bw, half_bh, half_pw, half_ph) = (bw as f64 / 2.0, bh as f64 / 2.0, pw as f64 / 2.0, ph as f64 / 2.0);
    for j in 0..bh {
        for i in 0..bw {
            // The pixel centre relative to the footprint's centre, rotated back into the patch.
            let (ox, oy) = (i as f64 + 0.5 - half_bw, j as f64 + 0.5 - half_bh);
            let u = cos * ox + sin * oy + half_pw;
            let v = -sin * ox + cos * oy + half_ph;
            if !(0.0..pw as f64).contains(&u) || !(0.0..ph as f64).contains(&v) {
                continue;
            }
            let (x, y) = (dx + i, dy + j);
            mask[y * w + x] = true;
            for c in 0..ch {
                image.set(x, y, c, to_u8(bilinear(&jittered, pw, ph, ch, c, u - 0.5, v - 0.5)));
            }
        }
    }
    let params =
        Params { variant: cfg.variant, cut: [sx, sy, pw, ph], paste: [dx, dy, bw, bh], rotation, brightness, contrast };
    Some(Synth { image, mask, params: serde_json::to_value(params).expect("plain numbers") })
}

/// Channel `c` of an interleaved `w × h` float image at `(x, y)` (pixel centres at integers),
/// bilinear, clamped to the edge. At integer coordinates it is the pixel itself, so an unrotated
/// paste copies exactly.
fn bilinear(px: &[f64], w: usize, h: usize, ch: usize, c: usize, x: f64, y: f64) -> f64 {
    let (x, y) = (x.clamp(0.0, (w - 1) as f64), y.clamp(0.0, (h - 1) as f64));
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (tx, ty) = (x - x0 as f64, y - y0 as f64);
    let at = |x: usize, y: usize| px[(y * w + x) * ch + c];
    let top = at(x0, y0) * (1.0 - tx) + at(x1, y0) * tx;
    let bottom = at(x0, y1) * (1.0 - tx) + at(x1, y1) * tx;
    top * (1.0 - ty) + bottom * ty
}

#[cfg(test)]
mod tests {
    use super::super::test_images::{noise, ramp_checker};
    use super::super::{generate, Method, Other, SynthConfig};
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn outside_is_kept_inside_changes_and_the_area_is_in_range() {
        let cfg = CutPasteConfig::default();
        for ch in [1, 3] {
            let src = noise(64, 64, ch, 1);
            let mut drawn = 0;
            for seed in 0..40 {
                let Some(s) = draw(&src, &cfg, &mut rng(seed)) else { continue };
                drawn += 1;
                assert_eq!(s.changed_outside(&src), None, "seed {seed}: a pixel outside the mask changed");
                // A patch of unrelated pixel values moved elsewhere: ≥ 90 % of its pixels differ.
                let share = s.changed_share(&src);
                assert!(share >= 0.9, "seed {seed}: only {share} of the mask changed");
                let n = s.mask.iter().filter(|&&m| m).count();
                let cut = s.params["cut"].as_array().unwrap();
                let (pw, ph) = (cut[2].as_u64().unwrap() as usize, cut[3].as_u64().unwrap() as usize);
                assert_eq!(n, pw * ph, "seed {seed}: the unrotated footprint is the cut rectangle");
                // Rounding each side to whole pixels moves the area by at most (pw + ph + 1) / 2 px.
                let slack = (pw + ph + 1) as f64 / 2.0;
                let (lo, hi) = (cfg.area[0] * 4096.0 - slack, cfg.area[1] * 4096.0 + slack);
                assert!((lo..=hi).contains(&(n as f64)), "seed {seed}: {n} px outside [{lo}, {hi}]");
                let paste = s.params["paste"].as_array().unwrap();
                let (dx, dy) = (paste[0].as_u64().unwrap() as usize, paste[1].as_u64().unwrap() as usize);
                assert!(s.mask[dy * 64 + dx] && s.mask[(dy + ph - 1) * 64 + dx + pw - 1]);
            }
            assert!(drawn >= 35, "only {drawn} of 40 draws fitted");
        }
    }

    #[test]
    fn rotated_and_scar_footprints_keep_the_outside() {
        let src = ramp_checker(64, 64, 3);
        let rotated = CutPasteConfig { rotation: [-60.0, 60.0], ..Default::default() };
        let scar = CutPasteConfig { variant: Variant::Scar, ..Default::default() };
        for cfg in [rotated, scar] {
            for seed in 0..20 {
                let Some(s) = draw(&src, &cfg, &mut rng(seed)) else { continue };
                assert_eq!(s.changed_outside(&src), None);
                let n = s.mask.iter().filter(|&&m| m).count() as f64;
                let cut = s.params["cut"].as_array().unwrap();
                let (pw, ph) = (cut[2].as_f64().unwrap(), cut[3].as_f64().unwrap());
                // A rotated raster of the rectangle: its area up to about one pixel per edge pixel.
                assert!((n - pw * ph).abs() <= 2.0 * (pw + ph) + 4.0, "seed {seed}: {n} px for {pw} × {ph}");
                let p = s.params["paste"].as_array().unwrap();
                let (dx, dy, bw, bh) =
                    (p[0].as_u64().unwrap(), p[1].as_u64().unwrap(), p[2].as_u64().unwrap(), p[3].as_u64().unwrap());
                for (i, _) in s.mask.iter().enumerate().filter(|(_, &m)| m) {
                    let (x, y) = ((i % 64) as u64, (i / 64) as u64);
                    assert!(
                        (dx..dx + bw).contains(&x) && (dy..dy + bh).contains(&y),
                        "mask pixel outside the footprint box"
                    );
                }
            }
        }
    }

    #[test]
    fn accepted_samples_on_a_ramp_change_most_of_the_mask() {
        // The ramp-and-checker image has look-alike regions; the acceptance rule redraws those.
        let cfg = SynthConfig::default();
        let src = ramp_checker(64, 64, 1);
        for seed in 0..10 {
            let (s, _) = generate(Method::Cutpaste, &src, &Other::None, &cfg, &mut rng(seed)).unwrap().unwrap();
            assert_eq!(s.changed_outside(&src), None);
            assert!(s.changed_share(&src) >= 0.9);
        }
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_image() {
        let src = noise(64, 64, 3, 2);
        let cfg = CutPasteConfig::default();
        let a = draw(&src, &cfg, &mut rng(5)).unwrap();
        let b = draw(&src, &cfg, &mut rng(5)).unwrap();
        assert_eq!((&a.image, &a.mask, &a.params), (&b.image, &b.mask, &b.params));
        let c = draw(&src, &cfg, &mut rng(6)).unwrap();
        assert_ne!(a.image, c.image);
    }
}
