//! DRAEM's simulated anomalies (Zavrtanik et al., ICCV 2021): a region cut out of Perlin noise
//! by a threshold, filled with a foreign texture laid over the image with opacity β:
//! `out = (1 − β)·image + β·texture` inside the region, the image itself outside. The mask is the
//! region. DRAEM's textures come from DTD, which does not reach these machines; the caller passes
//! another normal image of the data set instead (see [`super::config::TextureSource`]), which is
//! turned by a multiple of 90°, maybe mirrored, and perturbed by low-frequency Perlin noise so
//! that the same few images do not repeat as the same texture. DRAEM also rotates the noise
//! field; axis-aligned lattices at independent x and y scales already give elongated and round
//! blobs, so that step is left out.

use super::config::DraemConfig;
use super::{perlin, to_u8, uniform, Img, Synth};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// What one draw chose (written to the manifest).
#[derive(Serialize)]
struct Params {
    /// Lattice cells across the image along x and y (2^k each).
    cells: [usize; 2],
    threshold: f64,
    /// Noise fields drawn before one had a region of at least `min_area`.
    noise_draws: u32,
    /// The region's share of the image.
    area: f64,
    /// β, the texture's weight.
    opacity: f64,
    /// Quarter turns applied to the texture (0–3), then a left-right mirror when set.
    texture_quarter_turns: u32,
    texture_mirrored: bool,
    /// Amplitude of the texture's colour perturbation, in grey levels (0 = none).
    texture_noise: f64,
}

/// One draw over `src` with `texture` (same channel count, any size); `None` when no noise
/// field of `max_noise_draws` had a region of at least `min_area`.
pub fn draw(src: &Img, texture: &Img, cfg: &DraemConfig, rng: &mut ChaCha8Rng) -> Option<Synth> {
    let (w, h, ch) = (src.w, src.h, src.ch);
    let cells = |rng: &mut ChaCha8Rng| 1usize << rng.random_range(cfg.scale_exponent[0]..=cfg.scale_exponent[1]);
    let mut region = None;
    for n in 1..=cfg.max_noise_draws {
        let (cx, cy) = (cells(rng), cells(rng));
        let field = perlin::noise(w, h, cx, cy, rng);
        let mask: Vec<bool> = field.iter().map(|&v| v as f64 > cfg.threshold).collect();
        let area = mask.iter().filter(|&&m| m).count() as f64 / (w * h) as f64;
        if area > 0.0 && area >= cfg.min_area {
            region = Some((mask, [cx, cy], n, area));
            break;
        }
    }
    let (mask, cells_xy, noise_draws, area) = region?;

    let quarter_turns = rng.random_range(0..4u32);
    let mirrored = rng.random_bool(0.5);
    let mut t = texture.to_dynamic();
    t = match quarter_turns {
        1 => t.rotate90(),
        2 => t.rotate180(),
        3 => t.rotate270(),
        _ => t,
    };
    if mirrored {
        t = t.fliph();
    }
    let t = Img::from_dynamic(&t).with_channels(ch).resized(w, h);
    let mut tex: Vec<f64> = t.px.iter().map(|&v| v as f64).collect();
    // One smooth field per channel: shifts the texture's brightness (and, in colour, its hue)
    // region by region.
    let amplitude = cfg.texture_noise * 255.0;
    if amplitude > 0.0 {
        for c in 0..ch {
            let k = cells(rng);
            let field = perlin::noise(w, h, k, k, rng);
            for (i, v) in field.iter().enumerate() {
                tex[i * ch + c] += amplitude * (*v / perlin::BOUND) as f64;
            }
        }
    }

    let opacity = uniform(rng, cfg.opacity);
    let mut image = src.clone();
    for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        for c in 0..ch {
            let k = i * ch + c;
            image.px[k] = to_u8((1.0 - opacity) * src.px[k] as f64 + opacity * tex[k].clamp(0.0, 255.0));
        }
    }
    let params = Params {
        cells: cells_xy,
        threshold: cfg.threshold,
        noise_draws,
        area,
        opacity,
        texture_quarter_turns: quarter_turns,
        texture_mirrored: mirrored,
        texture_noise: amplitude,
    };
    Some(Synth { image, mask, params: serde_json::to_value(params).expect("plain numbers") })
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
    fn outside_is_kept_inside_changes_and_the_region_is_large_enough() {
        let cfg = DraemConfig::default();
        for ch in [1, 3] {
            let src = ramp_checker(64, 64, ch);
            // A texture of another size: it is resized to the image.
            let texture = noise(48, 80, ch, 9);
            for seed in 0..30 {
                let s = draw(&src, &texture, &cfg, &mut rng(seed)).expect("a region within 100 noise draws");
                assert_eq!(s.changed_outside(&src), None, "seed {seed}: a pixel outside the mask changed");
                // β ≥ 0.2 of an unrelated texture: ≥ 90 % of the region's pixels move.
                let share = s.changed_share(&src);
                assert!(share >= 0.9, "seed {seed}: only {share} of the mask changed");
                let area = s.mask.iter().filter(|&&m| m).count() as f64 / 4096.0;
                assert!(area >= cfg.min_area, "seed {seed}: region {area}");
                assert_eq!(s.params["area"].as_f64().unwrap(), area);
            }
        }
    }

    #[test]
    fn full_opacity_without_noise_lays_the_texture_itself() {
        let cfg = DraemConfig { opacity: [1.0, 1.0], texture_noise: 0.0, ..Default::default() };
        let src = ramp_checker(32, 32, 3);
        let texture = Img::filled(32, 32, 3, 7);
        let s = draw(&src, &texture, &cfg, &mut rng(1)).unwrap();
        for (i, &m) in s.mask.iter().enumerate() {
            let want = if m { [7u8; 3] } else { [src.px[i * 3], src.px[i * 3 + 1], src.px[i * 3 + 2]] };
            assert_eq!(s.image.px[i * 3..i * 3 + 3], want, "pixel {i}");
        }
    }

    #[test]
    fn an_unreachable_threshold_gives_no_sample() {
        let cfg = DraemConfig { threshold: 0.7, min_area: 0.5, max_noise_draws: 3, ..Default::default() };
        let src = ramp_checker(32, 32, 1);
        assert!(draw(&src, &src, &cfg, &mut rng(0)).is_none());
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_image() {
        let (src, texture) = (ramp_checker(64, 64, 3), noise(64, 64, 3, 4));
        let cfg = DraemConfig::default();
        let a = draw(&src, &texture, &cfg, &mut rng(8)).unwrap();
        let b = draw(&src, &texture, &cfg, &mut rng(8)).unwrap();
        assert_eq!((&a.image, &a.mask, &a.params), (&b.image, &b.mask, &b.params));
        assert_ne!(a.image, draw(&src, &texture, &cfg, &mut rng(9)).unwrap().image);
    }
}
