//! NSA, Natural Synthetic Anomalies (Schlüter et al., ECCV 2022): a patch of *another* normal
//! image of the same category, resized, Poisson-blended into the image at a random place, so the
//! anomaly has no sharp seam — only content that does not belong.
//!
//! The mask. Poisson blending keeps the patch's gradients but lifts it to the destination's
//! values on the rectangle's edge, so parts of the patch (and always its outer ring) end up equal,
//! or nearly, to what was there; NSA itself therefore labels by how much the blend changed each
//! pixel. Here the mask is the rectangle's pixels that changed by more than `threshold` grey
//! levels in some channel, minus 8-connected specks smaller than `min_component` pixels. Only
//! mask pixels receive blended values; every other pixel (the faint rest of the rectangle
//! included) keeps the source's value, so outside the mask the image is the source exactly and
//! inside it differs by construction. A blend whose mask covers less than `min_coverage` of the
//! patch is drawn again.

use super::config::{Gradients, NsaConfig};
use super::{poisson, to_u8, uniform, Img, Synth};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What one draw chose (written to the manifest).
#[derive(Serialize)]
struct Params {
    /// `[x, y, w, h]` of the cut rectangle in the donor image.
    cut: [usize; 4],
    /// The resize factor of the patch.
    scale: f64,
    /// `[x, y, w, h]` of the blended rectangle in the image.
    paste: [usize; 4],
    gradients: Gradients,
    /// Conjugate-gradient iterations, per channel.
    iterations: Vec<u32>,
    /// The largest final relative residual over the channels.
    relative_residual: f64,
    threshold: f64,
    /// The mask's share of the blended rectangle.
    coverage: f64,
}

/// One draw of a patch of `donor` (same channel count, any size) into `src`; `None` when the
/// resized patch does not fit (or has no interior) or the blend left too little visible.
pub fn draw(src: &Img, donor: &Img, cfg: &NsaConfig, rng: &mut ChaCha8Rng) -> Option<Synth> {
    let (w, h, ch) = (src.w, src.h, src.ch);
    let sw = ((uniform(rng, cfg.width) * donor.w as f64).round() as usize).clamp(1, donor.w);
    let sh = ((uniform(rng, cfg.height) * donor.h as f64).round() as usize).clamp(1, donor.h);
    let scale = uniform(rng, cfg.scale);
    let (tw, th) = ((sw as f64 * scale).round() as usize, (sh as f64 * scale).round() as usize);
    // A 3 × 3 rectangle is the smallest with an interior pixel to solve for.
    if tw < 3 || th < 3 || tw > w || th > h {
        return None;
    }
    let (sx, sy) = (rng.random_range(0..=donor.w - sw), rng.random_range(0..=donor.h - sh));
    let (dx, dy) = (rng.random_range(0..=w - tw), rng.random_range(0..=h - th));
    let patch = donor.crop(sx, sy, sw, sh).resized(tw, th);
    let region = src.crop(dx, dy, tw, th);

    let n = tw * th;
    let mut blended = vec![0u8; n * ch];
    let (mut iterations, mut residual) = (Vec::with_capacity(ch), 0.0f64);
    for c in 0..ch {
        let plane = |img: &Img| (0..n).map(|i| img.px[i * ch + c] as f64).collect::<Vec<f64>>();
        let mixed = cfg.gradients == Gradients::Mixed;
        let s = poisson::blend(&plane(&region), &plane(&patch), tw, th, mixed, cfg.tolerance, cfg.max_iterations);
        for (i, v) in s.values.iter().enumerate() {
            blended[i * ch + c] = to_u8(*v);
        }
        iterations.push(s.iterations);
        residual = residual.max(s.relative_residual);
    }

    // Differences are between whole grey levels, so `> threshold ≥ 0` means "differs".
    let mut local: Vec<bool> = (0..n)
        .map(|i| (0..ch).any(|c| (blended[i * ch + c] as f64 - region.px[i * ch + c] as f64).abs() > cfg.threshold))
        .collect();
    drop_small_components(&mut local, tw, th, cfg.min_component as usize);
    let kept = local.iter().filter(|&&m| m).count();
    let coverage = kept as f64 / n as f64;
    if kept == 0 || coverage < cfg.min_coverage {
        return None;
    }

    let mut image = src.clone();
    let mut mask = vec![false; w * h];
    for j in 0..th {
        for i in 0..tw {
            if local[j * tw + i] {
                let (x, y) = (dx + i, dy + j);
                mask[y * w + x] = true;
                for c in 0..ch {
                    image.set(x, y, c, blended[(j * tw + i) * ch + c]);
                }
            }
        }
    }
    let params = Params {
        cut: [sx, sy, sw, sh],
        scale,
        paste: [dx, dy, tw, th],
        gradients: cfg.gradients,
        iterations,
        relative_residual: residual,
        threshold: cfg.threshold,
        coverage,
    };
    Some(Synth { image, mask, params: serde_json::to_value(params).expect("plain numbers") })
}

/// Clears the 8-connected regions of `mask` (`w × h`) smaller than `min` pixels.
fn drop_small_components(mask: &mut [bool], w: usize, h: usize, min: usize) {
    let mut seen = vec![false; mask.len()];
    let (mut stack, mut component) = (Vec::new(), Vec::new());
    for start in 0..mask.len() {
        if !mask[start] || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        component.clear();
        while let Some(i) = stack.pop() {
            component.push(i);
            let (x, y) = (i % w, i / w);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = ny * w + nx;
                    if mask[j] && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        if component.len() < min {
            for &i in &component {
                mask[i] = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_images::{noise, ramp_checker};
    use super::*;
    use rand::SeedableRng;

    fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    #[test]
    fn outside_is_kept_and_every_mask_pixel_changed_beyond_the_threshold() {
        let cfg = NsaConfig::default();
        for ch in [1, 3] {
            let src = ramp_checker(64, 64, ch);
            let donor = noise(64, 64, ch, 3);
            let mut drawn = 0;
            for seed in 0..30 {
                let Some(s) = draw(&src, &donor, &cfg, &mut rng(seed)) else { continue };
                drawn += 1;
                assert_eq!(s.changed_outside(&src), None, "seed {seed}: a pixel outside the mask changed");
                // By construction all (100 %) of the mask differs, by more than the threshold.
                for (i, _) in s.mask.iter().enumerate().filter(|(_, &m)| m) {
                    let d = (0..ch).map(|c| (s.image.px[i * ch + c] as f64 - src.px[i * ch + c] as f64).abs());
                    assert!(d.fold(0.0, f64::max) > cfg.threshold, "seed {seed}: pixel {i} barely changed");
                }
                // The mask lies in the blended rectangle, and the solve converged.
                let p: Vec<usize> =
                    s.params["paste"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
                for (i, _) in s.mask.iter().enumerate().filter(|(_, &m)| m) {
                    let (x, y) = (i % 64, i / 64);
                    assert!(x > p[0] && x + 1 < p[0] + p[2] && y > p[1] && y + 1 < p[1] + p[3], "outside the interior");
                }
                assert!(s.params["relative_residual"].as_f64().unwrap() <= cfg.tolerance);
            }
            assert!(drawn >= 20, "only {drawn} of 30 draws kept");
        }
    }

    #[test]
    fn a_blend_that_changes_nothing_gives_no_sample() {
        // A flat patch into a flat image: the solution is the destination, so no pixel changes.
        let cfg = NsaConfig::default();
        let src = Img::filled(40, 40, 1, 100);
        let donor = Img::filled(40, 40, 1, 200);
        for seed in 0..5 {
            assert!(draw(&src, &donor, &cfg, &mut rng(seed)).is_none());
        }
    }

    #[test]
    fn specks_are_dropped_and_regions_kept() {
        #[rustfmt::skip]
        let mut m = [
            1, 1, 0, 0, 1,
            1, 1, 0, 0, 0,
            0, 0, 0, 0, 0,
            0, 0, 0, 1, 1,
        ].map(|v| v == 1);
        drop_small_components(&mut m, 5, 4, 3);
        let kept: Vec<usize> = (0..20).filter(|&i| m[i]).collect();
        assert_eq!(kept, [0, 1, 5, 6]);
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_image() {
        let (src, donor) = (ramp_checker(64, 64, 3), noise(64, 64, 3, 5));
        let cfg = NsaConfig::default();
        let first = |seed| (seed..seed + 20).find_map(|s| draw(&src, &donor, &cfg, &mut rng(s))).unwrap();
        let (a, b) = (first(0), first(0));
        assert_eq!((&a.image, &a.mask, &a.params), (&b.image, &b.mask, &b.params));
        assert_ne!(a.image, first(100).image);
    }
}
