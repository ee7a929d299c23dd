//! PRO, the per-region overlap of MVTec AD (Bergmann et al., "The MVTec Anomaly Detection
//! Dataset", IJCV 2021), computed as the dataset's official evaluation does (`compute_pro` and
//! `trapezoid` of its `generic_util.py`), exactly, over every distinct score:
//!
//! - The pixels of all images are pooled. A pixel is *normal* when it lies outside every defect
//!   region of its mask (a normal image, given an all-background mask, contributes all of its
//!   pixels); a *region* is a connected component of one mask's defect pixels (8-connectivity,
//!   [`crate::data::mask::label_regions`]).
//! - At each distinct score `v`, highest first, the pixels scoring `≥ v` are predicted anomalous
//!   (the same as `> t` for a threshold `t` just below `v`): FPR(v) = the share of normal pixels
//!   predicted anomalous; PRO(v) = the mean over regions of the share of each region's pixels
//!   predicted anomalous (every region weighs the same, whatever its size).
//! - The curve is (0, 0), one (FPR, PRO) point per distinct score, then (1, 1). AUPRO@L is its
//!   area by the trapezoid rule up to FPR = L, the point at exactly L interpolated linearly
//!   between its neighbours, divided by L (so a perfect map scores 1, a constant one L / 2).
//!   MVTec AD reports L = 0.3 ([`FPR_LIMIT`]).
//!
//! [`Pro`] keeps 8 bytes per pixel (its score and its region) and 4 per region, and sorts them
//! once when the area is asked for; nothing else is held.

use crate::data::mask::label_regions;
use anyhow::{ensure, Result};

/// MVTec AD's integration limit: the PRO curve's area up to a false-positive rate of 0.3.
pub const FPR_LIMIT: f64 = 0.3;

/// The region number of a normal pixel.
const NORMAL: u32 = u32::MAX;

/// The accumulated pixels of many maps and masks.
#[derive(Clone, Debug, Default)]
pub struct Pro {
    /// Each pixel's score and its region (an index into `region_sizes`) or [`NORMAL`].
    pixels: Vec<(f32, u32)>,
    /// Pixels per region.
    region_sizes: Vec<u32>,
    normal: u64,
}

impl Pro {
    pub fn new() -> Pro {
        Pro::default()
    }

    /// Adds one image: its `w × h` map (row-major) and mask (`true` = defect pixel; all `false`
    /// for a normal image). The map must already have the mask's size.
    pub fn add(&mut self, map: &[f32], mask: &[bool], w: usize, h: usize) -> Result<()> {
        ensure!(
            map.len() == w * h && mask.len() == w * h,
            "PRO: a {w}×{h} image needs {} map values and mask pixels, got {} and {}",
            w * h,
            map.len(),
            mask.len()
        );
        let (labels, n) = label_regions(mask, w, h);
        let base = self.region_sizes.len();
        ensure!(base + n < NORMAL as usize, "PRO: more than {} defect regions", NORMAL - 1);
        let mut sizes = vec![0u32; n];
        self.pixels.reserve(map.len());
        for (&v, &l) in map.iter().zip(&labels) {
            // `+ 0.0` turns −0 into +0, so the two zeros are one threshold under `total_cmp`.
            let v = v + 0.0;
            if l == 0 {
                self.normal += 1;
                self.pixels.push((v, NORMAL));
            } else {
                sizes[l as usize - 1] += 1;
                self.pixels.push((v, (base + l as usize - 1) as u32));
            }
        }
        self.region_sizes.extend(sizes);
        Ok(())
    }

    /// Adds another accumulator's images (e.g. one category's into the total).
    pub fn merge(&mut self, other: Pro) {
        let base = self.region_sizes.len() as u32;
        self.pixels.extend(other.pixels.into_iter().map(|(v, r)| (v, if r == NORMAL { r } else { r + base })));
        self.region_sizes.extend(other.region_sizes);
        self.normal += other.normal;
    }

    /// Defect regions so far.
    pub fn regions(&self) -> usize {
        self.region_sizes.len()
    }

    /// Pixels so far.
    pub fn pixels(&self) -> usize {
        self.pixels.len()
    }

    /// The whole (FPR, PRO) curve, (0, 0) and (1, 1) included; `None` without a region or
    /// without a normal pixel.
    pub fn curve(&mut self) -> Option<Vec<(f64, f64)>> {
        let mut points = Vec::new();
        self.walk(|x, y| {
            points.push((x, y));
            true
        })?;
        Some(points)
    }

    /// AUPRO@`fpr_limit` (normalised by `fpr_limit`, in [0, 1]); `None` without a region or
    /// without a normal pixel. Sorts the pixels in place; the accumulator stays usable.
    pub fn aupro(&mut self, fpr_limit: f64) -> Option<f64> {
        assert!(fpr_limit > 0.0 && fpr_limit <= 1.0, "the FPR limit must be in (0, 1], got {fpr_limit}");
        let mut prev: Option<(f64, f64)> = None;
        let mut area = 0.0;
        self.walk(|x, y| {
            let Some((x0, y0)) = prev else {
                prev = Some((x, y));
                return true;
            };
            if x <= fpr_limit {
                area += 0.5 * (y0 + y) * (x - x0);
                prev = Some((x, y));
                // Points after one at exactly the limit add no area (FPR never decreases).
                return x < fpr_limit;
            }
            // x0 < limit < x: the point at the limit lies on this segment.
            let y_at = y0 + (y - y0) * (fpr_limit - x0) / (x - x0);
            area += 0.5 * (y0 + y_at) * (fpr_limit - x0);
            false
        })?;
        Some(area / fpr_limit)
    }

    /// Sorts the pixels (highest score first) and hands each curve point to `point`, (0, 0)
    /// first and (1, 1) last, until it returns false.
    fn walk(&mut self, mut point: impl FnMut(f64, f64) -> bool) -> Option<()> {
        if self.region_sizes.is_empty() || self.normal == 0 {
            return None;
        }
        self.pixels.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let inverse: Vec<f64> = self.region_sizes.iter().map(|&s| 1.0 / s as f64).collect();
        let (normal, regions) = (self.normal as f64, self.region_sizes.len() as f64);
        if !point(0.0, 0.0) {
            return Some(());
        }
        // `covered`: the sum over regions of the share of each region's pixels seen so far.
        let (mut false_positives, mut covered, mut i) = (0u64, 0f64, 0usize);
        while i < self.pixels.len() {
            let v = self.pixels[i].0;
            while i < self.pixels.len() && self.pixels[i].0.total_cmp(&v).is_eq() {
                match self.pixels[i].1 {
                    NORMAL => false_positives += 1,
                    r => covered += inverse[r as usize],
                }
                i += 1;
            }
            // The clip keeps rounding in the sum of 1/size from passing 1, as the official code does.
            if !point(false_positives as f64 / normal, (covered / regions).min(1.0)) {
                return Some(());
            }
        }
        point(1.0, 1.0);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// Two 4×4 images, one region each.
    ///
    /// Image A, region R1 = the top-left 2×2 (4 pixels, scores 0.9 0.9 0.5 0.1); its 12 normal
    /// pixels: one 0.7, three 0.5, eight 0.
    /// Image B, region R2 = (1,1) (2,2) (3,2) (3,3) (row, col): one region only because diagonal
    /// neighbours join (4-connectivity would make it three); all 0.8. Its 12 normal pixels: two
    /// 0.7, three 0.5, seven 0.
    fn two_images() -> [(Vec<f32>, Vec<bool>); 2] {
        #[rustfmt::skip]
        let a = vec![
            0.9, 0.9, 0.7, 0.0,
            0.5, 0.1, 0.5, 0.0,
            0.5, 0.5, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.0,
        ];
        #[rustfmt::skip]
        let a_mask = [
            1, 1, 0, 0,
            1, 1, 0, 0,
            0, 0, 0, 0,
            0, 0, 0, 0,
        ].map(|v| v == 1).to_vec();
        #[rustfmt::skip]
        let b = vec![
            0.7, 0.7, 0.0, 0.0,
            0.5, 0.8, 0.0, 0.0,
            0.5, 0.5, 0.8, 0.0,
            0.0, 0.0, 0.8, 0.8,
        ];
        #[rustfmt::skip]
        let b_mask = [
            0, 0, 0, 0,
            0, 1, 0, 0,
            0, 0, 1, 0,
            0, 0, 1, 1,
        ].map(|v| v == 1).to_vec();
        [(a, a_mask), (b, b_mask)]
    }

    fn pro_of(images: &[(Vec<f32>, Vec<bool>)]) -> Pro {
        let mut p = Pro::new();
        for (map, mask) in images {
            p.add(map, mask, 4, 4).unwrap();
        }
        p
    }

    #[test]
    fn hand_computed_two_images_two_regions() {
        let mut p = pro_of(&two_images());
        assert_eq!((p.regions(), p.pixels()), (2, 32));
        // 24 normal pixels, 2 regions of 4 pixels. Distinct scores, highest first:
        //   ≥ 0.9: FP 0;  R1 2/4, R2 0/4 → PRO (0.5 + 0)/2 = 0.25
        //   ≥ 0.8: FP 0;  R2 4/4         → PRO (0.5 + 1)/2 = 0.75
        //   ≥ 0.7: FP 3 → FPR 3/24 = 0.125; PRO 0.75
        //   ≥ 0.5: FP 9 → FPR 9/24 = 0.375; R1 3/4 → PRO (0.75 + 1)/2 = 0.875
        //   ≥ 0.1: FP 9;  R1 4/4 → PRO 1
        //   ≥ 0:   FP 24 → FPR 1; PRO 1
        let want = [(0.0, 0.0), (0.0, 0.25), (0.0, 0.75), (0.125, 0.75), (0.375, 0.875), (0.375, 1.0), (1.0, 1.0)];
        let curve = p.curve().unwrap();
        assert_eq!(curve.len(), want.len() + 1, "{curve:?}");
        for (got, want) in curve.iter().zip(want.iter().chain([&(1.0, 1.0)])) {
            assert!(close(got.0, want.0) && close(got.1, want.1), "{curve:?}");
        }
        // Area up to FPR 0.3: the vertical steps at FPR 0 add nothing; (0, 0.75)→(0.125, 0.75)
        // adds 0.125·0.75 = 0.09375; on (0.125, 0.75)→(0.375, 0.875) the point at 0.3 is
        // 0.75 + 0.125·(0.3 − 0.125)/0.25 = 0.8375, adding ½(0.75 + 0.8375)·0.175 = 0.13890625.
        // (0.09375 + 0.13890625)/0.3 = 0.23265625/0.3.
        let aupro = p.aupro(FPR_LIMIT).unwrap();
        assert!(close(aupro, 0.23265625 / 0.3), "{aupro}");
        // The accumulator is still usable after the sort.
        assert!(close(p.aupro(FPR_LIMIT).unwrap(), 0.23265625 / 0.3));
    }

    #[test]
    fn a_normal_image_adds_normal_pixels_only() {
        let mut images = two_images().to_vec();
        images.push((vec![0.0; 16], vec![false; 16]));
        let mut p = pro_of(&images);
        assert_eq!(p.regions(), 2);
        // 40 normal pixels: (0, 0.75) → (3/40 = 0.075, 0.75): 0.05625; → (9/40 = 0.225, 0.875):
        // ½(0.75 + 0.875)·0.15 = 0.121875; → (0.225, 1): 0; → (1, 1) cut at 0.3: 1·0.075.
        // (0.05625 + 0.121875 + 0.075)/0.3 = 0.253125/0.3 = 0.84375.
        assert!(close(p.aupro(FPR_LIMIT).unwrap(), 0.84375));
    }

    #[test]
    fn merging_is_adding_everything_to_one() {
        let [a, b] = two_images();
        let (mut one, mut two) = (pro_of(std::slice::from_ref(&a)), pro_of(std::slice::from_ref(&b)));
        // Sorted (by an area asked for) or not, either side merges.
        assert!(one.aupro(FPR_LIMIT).is_some() && two.aupro(FPR_LIMIT).is_some());
        one.merge(two);
        let mut all = pro_of(&[a, b]);
        assert_eq!(one.regions(), 2);
        assert!(close(one.aupro(FPR_LIMIT).unwrap(), all.aupro(FPR_LIMIT).unwrap()));
    }

    /// Pseudo-random maps and masks (two images with 29 regions, one normal image, many tied
    /// scores) against MVTec AD's official `compute_pro` and `trapezoid`, run once with numpy and
    /// scipy on the same numbers: 0.46404029168211597 up to FPR 0.3, 0.7581517590350935 up to 1.
    #[test]
    fn matches_the_official_evaluation_on_random_maps() {
        let mut x = 12345u32;
        let mut next = || {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            x
        };
        let (w, h) = (16, 12);
        let mut p = Pro::new();
        for img in 0..3 {
            let (mut map, mut mask) = (Vec::new(), Vec::new());
            for _ in 0..w * h {
                let on = img < 2 && (next() >> 28) < 3;
                let v = ((next() >> 8) % 50) as f32 / 50.0;
                map.push(if on { v + 0.3 } else { v });
                mask.push(on);
            }
            p.add(&map, &mask, w, h).unwrap();
        }
        assert_eq!(p.regions(), 29);
        let a = p.aupro(FPR_LIMIT).unwrap();
        assert!((a - 0.46404029168211597).abs() < 1e-9, "{a}");
        let whole = p.aupro(1.0).unwrap();
        assert!((whole - 0.7581517590350935).abs() < 1e-9, "{whole}");
    }

    #[test]
    fn edge_cases() {
        // No region: None. No normal pixel: None.
        assert_eq!(pro_of(&[(vec![0.5; 16], vec![false; 16])]).aupro(FPR_LIMIT), None);
        assert_eq!(pro_of(&[(vec![0.5; 16], vec![true; 16])]).aupro(FPR_LIMIT), None);
        // A perfect map: (0, 0) → (0, 1) at the defect score → (1, 1): area 0.3 → 1.
        let [(_, mask), _] = two_images();
        let perfect: Vec<f32> = mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect();
        assert!(close(pro_of(&[(perfect, mask.clone())]).aupro(FPR_LIMIT).unwrap(), 1.0));
        // A map equal everywhere: (0, 0) → (1, 1) in one step; the point at 0.3 is (0.3, 0.3):
        // ½·0.3·0.3 = 0.045, / 0.3 = 0.15.
        assert!(close(pro_of(&[(vec![0.2; 16], mask.clone())]).aupro(FPR_LIMIT).unwrap(), 0.15));
        // Up to FPR 1 it is the whole curve's area: ½ for the constant map.
        assert!(close(pro_of(&[(vec![0.2; 16], mask.clone())]).aupro(1.0).unwrap(), 0.5));
        // An inverted map finds the defects last: PRO is 0 until FPR 1.
        let inverted: Vec<f32> = mask.iter().map(|&m| if m { 0.0 } else { 1.0 }).collect();
        assert!(close(pro_of(&[(inverted, mask.clone())]).aupro(FPR_LIMIT).unwrap(), 0.0));
        // −0 and +0 are one score.
        let mut zeros = vec![0.0f32; 16];
        zeros[0] = -0.0;
        assert!(close(pro_of(&[(zeros, mask)]).aupro(FPR_LIMIT).unwrap(), 0.15));
        // A map of the wrong size is refused.
        assert!(Pro::new().add(&[0.0; 3], &[false; 4], 2, 2).is_err());
    }
}
