//! The map cue (ARCHITECTURE.md §1): the training-free map's image score, put into the prompt as
//! one line of words.
//!
//! Why words: in every measured row the `lite` model's answers did not depend on its images
//! (image AUROC 0.50 while the map scores 0.80 on the same pairs), and handing the adapter the
//! map as one more input channel did not change that within the steps two CPU cores give. A phrase
//! such as "larger than almost every normal image" is a token pattern the LLM can tie to its
//! conclusion in a few dozen steps, as it ties the facts' text to it. Like the expert maps that
//! Myriad and AnomalyGPT give their LLM, the cue is an input, not a verdict: the model is trained
//! on the ground truth, and the cue's levels are quantiles of the score on normal pairs only.
//!
//! The score is the maximum over the test image of `1 − s_i` (each test patch's distance to its
//! nearest reference patch: the patch selection's map, the training-free map's image score). The
//! levels are calibrated once, on the training split's normal pairs, when the SFE run starts, and
//! saved in the model config, so every later stage, eval and checkpoint uses the same ones.

use anyhow::{ensure, Result};

/// Quantiles of the normal pairs' scores that separate the phrases.
pub const LEVEL_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

/// At most this many normal training pairs are scored to calibrate the levels (file order).
pub const CALIBRATION_PAIRS: usize = 256;

/// Fewer normal pairs than this cannot place a 99th percentile meaningfully.
pub const MIN_CALIBRATION_PAIRS: usize = 16;

/// What the cue says for each band: below the first level, …, above the last.
const PHRASES: [&str; 4] = [
    "the test image matches the reference as closely as a typical normal image does",
    "the largest difference is within the range normal images show",
    "the largest difference is larger than most normal images show",
    "the largest difference is larger than almost every normal image shows",
];

/// Levels a config gives: three finite values in ascending order.
pub fn check_levels(levels: &[f32]) -> Result<()> {
    ensure!(
        levels.len() == PHRASES.len() - 1,
        "model.map_cue_levels holds {} values; it needs {} (leave it empty and the SFE run calibrates it)",
        levels.len(),
        PHRASES.len() - 1
    );
    ensure!(
        levels.iter().all(|l| l.is_finite()) && levels.windows(2).all(|w| w[0] <= w[1]),
        "model.map_cue_levels = {levels:?} must be finite and ascending (leave it empty and the SFE run calibrates it)"
    );
    Ok(())
}

/// The prompt line for an image score `score` under the calibrated `levels` (ascending).
pub fn line(score: f32, levels: &[f32]) -> Result<String> {
    check_levels(levels)?;
    let band = levels.iter().filter(|&&l| score >= l).count();
    Ok(format!("\nPatch comparison: {}.", PHRASES[band]))
}

/// The levels from the scores of normal pairs: the [`LEVEL_QUANTILES`] of `scores` (linear
/// interpolation between order statistics, numpy's default).
pub fn calibrate(scores: &[f32]) -> Result<Vec<f32>> {
    ensure!(
        scores.len() >= MIN_CALIBRATION_PAIRS,
        "model.map_cue calibrates on the training split's normal pairs with a reference image, and found {} (needs \
         {MIN_CALIBRATION_PAIRS}); label more normal items, or give model.map_cue_levels yourself",
        scores.len()
    );
    ensure!(scores.iter().all(|s| s.is_finite()), "a normal pair's map score is not finite");
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    Ok(LEVEL_QUANTILES.iter().map(|&q| quantile(&sorted, q)).collect())
}

/// The region the map points at, for answers that name boxes (GRPO's): the bounding box of the
/// 4-connected patches around the highest-scoring one that score at least `min(threshold, max)`,
/// in the pixels of a `width`×`height` image whose patch grid `grid` (rows, columns) covers it
/// whole, rounded to whole pixels. `threshold` is a level (the 90th percentile of normal images'
/// scores), so where no patch reaches it, as on most normal images, the region is the top patch.
pub fn region(map: &[f32], grid: (usize, usize), threshold: f32, width: u32, height: u32) -> Result<[f32; 4]> {
    let (gh, gw) = grid;
    ensure!(gh * gw == map.len() && !map.is_empty(), "a map of {} values for a {gh}x{gw} patch grid", map.len());
    let top = (0..map.len()).max_by(|&a, &b| map[a].total_cmp(&map[b])).expect("non-empty");
    let floor = threshold.min(map[top]);
    let (mut seen, mut stack) = (vec![false; map.len()], vec![top]);
    seen[top] = true;
    let (mut r0, mut r1, mut c0, mut c1) = (top / gw, top / gw, top % gw, top % gw);
    while let Some(i) = stack.pop() {
        let (r, c) = (i / gw, i % gw);
        (r0, r1, c0, c1) = (r0.min(r), r1.max(r), c0.min(c), c1.max(c));
        let neighbours = [
            (r > 0).then(|| i - gw),
            (r + 1 < gh).then(|| i + gw),
            (c > 0).then(|| i - 1),
            (c + 1 < gw).then(|| i + 1),
        ];
        for j in neighbours.into_iter().flatten() {
            if !seen[j] && map[j] >= floor {
                seen[j] = true;
                stack.push(j);
            }
        }
    }
    let (sx, sy) = (width as f32 / gw as f32, height as f32 / gh as f32);
    Ok([
        (c0 as f32 * sx).round(),
        (r0 as f32 * sy).round(),
        ((c1 + 1) as f32 * sx).round(),
        ((r1 + 1) as f32 * sy).round(),
    ])
}

fn quantile(sorted: &[f32], q: f64) -> f32 {
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    let frac = (pos - lo as f64) as f32;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_the_normal_scores_quantiles() {
        // 0.00, 0.01, …, 1.00: the q-quantile is q itself.
        let scores: Vec<f32> = (0..=100).map(|i| i as f32 / 100.0).collect();
        let levels = calibrate(&scores).unwrap();
        for (l, want) in levels.iter().zip([0.5, 0.9, 0.99]) {
            assert!((l - want).abs() < 1e-6, "{levels:?}");
        }
        // numpy.quantile([1, 2, 3, …, 20], 0.9) = 18.1 (between the 18th and 19th values).
        let twenty: Vec<f32> = (1..=20).rev().map(|i| i as f32).collect();
        assert!((calibrate(&twenty).unwrap()[1] - 18.1).abs() < 1e-5);
        assert!(calibrate(&scores[..10]).is_err(), "too few normal pairs");
        assert!(calibrate(&[f32::NAN; 20]).is_err());
    }

    #[test]
    fn the_region_is_the_box_of_the_connected_patches_around_the_top_one() {
        // A 4×5 grid on a 100×80 image: patches are 20×20 pixels. The top patch (row 1, column 3)
        // and its connected neighbours at ≥ 0.5: (1,2), (2,3), (2,4); (0,0) scores high but is
        // not connected; (3,2) touches (2,3) only diagonally.
        #[rustfmt::skip]
        let map = [
            0.9, 0.1, 0.1, 0.1, 0.1,
            0.1, 0.1, 0.6, 0.95, 0.1,
            0.1, 0.1, 0.1, 0.7, 0.55,
            0.1, 0.1, 0.8, 0.1, 0.1,
        ];
        assert_eq!(region(&map, (4, 5), 0.5, 100, 80).unwrap(), [40.0, 20.0, 100.0, 60.0]);
        // Above every neighbour's score, the region is the top patch alone; a threshold above
        // the top patch's score falls back to it.
        assert_eq!(region(&map, (4, 5), 0.96, 100, 80).unwrap(), [60.0, 20.0, 80.0, 40.0]);
        assert_eq!(region(&map, (4, 5), 0.9, 100, 80).unwrap(), [60.0, 20.0, 80.0, 40.0]);
        assert!(region(&map[..19], (4, 5), 0.5, 100, 80).is_err());
    }

    #[test]
    fn each_band_has_its_phrase_and_a_level_counts_as_reached() {
        let levels = [0.2, 0.4, 0.6];
        let band = |s: f32| PHRASES.iter().position(|p| line(s, &levels).unwrap().contains(p)).unwrap();
        assert_eq!([band(0.0), band(0.2), band(0.39), band(0.5), band(0.6), band(3.0)], [0, 1, 1, 2, 3, 3]);
        assert!(line(0.1, &[0.2]).is_err(), "uncalibrated levels are refused");
        assert!(check_levels(&[0.5, 0.4, 0.6]).is_err() && check_levels(&[0.1, f32::NAN, 0.6]).is_err());
    }
}
