//! Anomaly-map metrics (ARCHITECTURE.md §6): image AUROC from each map's maximum against the image
//! labels, and pixel AUROC from every pixel's map value against its mask, over the images that
//! have a mask. PRO, the per-region overlap, is [`super::pro`].
//!
//! Maps are fed one at a time to [`MapMetrics`], which keeps 4 bytes per masked pixel and one
//! score per image, so a whole test set never has to be held as maps. The map must already have
//! the mask's size and layout (row-major). MVTec AD's convention counts normal test images as
//! all background in pixel AUROC: pass an all-`false` mask for them to follow it; an image given
//! without a mask takes part in image AUROC only.

use crate::metrics::{auroc, auroc_split};
use anyhow::{ensure, Result};
use serde::Serialize;

/// The accumulated maps.
#[derive(Clone, Debug, Default)]
pub struct MapMetrics {
    image_scores: Vec<f32>,
    image_labels: Vec<bool>,
    positive: Vec<f32>,
    negative: Vec<f32>,
    masked_images: usize,
}

/// Image and pixel AUROC with what they were computed from; `None` when a class is missing.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MapReport {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// Images with a label (image AUROC's population).
    pub images: usize,
    pub anomalous_images: usize,
    /// Images with a mask (pixel AUROC's population) and their pixels.
    pub masked_images: usize,
    pub pixels: usize,
    pub defect_pixels: usize,
}

/// An image's anomaly score: the maximum of its map (NaNs are skipped; an all-NaN map scores NaN).
pub fn image_score(map: &[f32]) -> f32 {
    map.iter().copied().filter(|v| !v.is_nan()).reduce(f32::max).unwrap_or(f32::NAN)
}

impl MapMetrics {
    pub fn new() -> MapMetrics {
        MapMetrics::default()
    }

    /// Adds one image's map. `anomalous` is the image label (None: not in image AUROC); `mask`
    /// marks its defect pixels (None: not in pixel AUROC) and must have the map's length.
    pub fn add(&mut self, map: &[f32], anomalous: Option<bool>, mask: Option<&[bool]>) -> Result<()> {
        ensure!(!map.is_empty(), "an anomaly map has no pixels");
        if let Some(mask) = mask {
            ensure!(
                mask.len() == map.len(),
                "an anomaly map has {} pixels but its mask {}: resize the map to the mask first",
                map.len(),
                mask.len()
            );
            self.masked_images += 1;
            for (&v, &m) in map.iter().zip(mask) {
                if m { &mut self.positive } else { &mut self.negative }.push(v);
            }
        }
        if let Some(a) = anomalous {
            self.image_scores.push(image_score(map));
            self.image_labels.push(a);
        }
        Ok(())
    }

    /// Adds another accumulator's images and pixels (e.g. one category's into the total).
    pub fn merge(&mut self, other: MapMetrics) {
        self.image_scores.extend(other.image_scores);
        self.image_labels.extend(other.image_labels);
        self.positive.extend(other.positive);
        self.negative.extend(other.negative);
        self.masked_images += other.masked_images;
    }

    /// The AUROCs. Consumes the accumulator (pixel AUROC sorts the pixels in place).
    pub fn report(mut self) -> MapReport {
        self.report_in_place()
    }

    /// [`MapMetrics::report`] keeping the accumulator (its pixels sorted), e.g. to merge it next.
    pub fn report_in_place(&mut self) -> MapReport {
        MapReport {
            image_auroc: auroc(&self.image_scores, &self.image_labels),
            pixel_auroc: auroc_split(&mut self.positive, &mut self.negative),
            images: self.image_labels.len(),
            anomalous_images: self.image_labels.iter().filter(|&&l| l).count(),
            masked_images: self.masked_images,
            pixels: self.positive.len() + self.negative.len(),
            defect_pixels: self.positive.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_hand_example() {
        let mut m = MapMetrics::new();
        // Normal image, all-background mask: max 0.4; pixels 0.1 0.2 0.3 0.4 all negative.
        m.add(&[0.1, 0.2, 0.3, 0.4], Some(false), Some(&[false; 4])).unwrap();
        // Anomalous image with a mask: max 0.8; positives 0.4 0.8, negatives 0.1 0.2.
        m.add(&[0.1, 0.4, 0.2, 0.8], Some(true), Some(&[false, true, false, true])).unwrap();
        // Anomalous image without a mask: max 0.35 (NaN skipped); image AUROC only.
        m.add(&[0.35, f32::NAN, 0.1, 0.1], Some(true), None).unwrap();
        // A map with neither label nor mask counts nowhere.
        m.add(&[9.0], None, None).unwrap();
        let mut total = MapMetrics::new();
        total.merge(m.clone());
        assert_eq!(total.report_in_place(), m.clone().report());
        let r = m.report();
        // Image: positives {0.8, 0.35} vs negative {0.4}: 0.8 > 0.4, 0.35 < 0.4 → 1/2.
        assert_eq!(r.image_auroc, Some(0.5));
        // Pixel: 0.8 beats all 6 negatives (6); 0.4 beats 0.1 0.2 0.3 0.1 0.2 (5) and ties 0.4
        // (½) → 5.5. (6 + 5.5)/(2·6) = 11.5/12.
        assert_eq!(r.pixel_auroc, Some(11.5 / 12.0));
        assert_eq!((r.images, r.anomalous_images, r.masked_images, r.pixels, r.defect_pixels), (3, 2, 2, 8, 2));
    }

    #[test]
    fn missing_classes_and_bad_shapes() {
        let mut m = MapMetrics::new();
        assert!(m.add(&[0.1, 0.2], Some(true), Some(&[true])).unwrap_err().to_string().contains("resize"));
        assert!(m.add(&[], Some(true), None).is_err());
        m.add(&[0.1, 0.2], Some(true), Some(&[true, true])).unwrap();
        let r = m.report();
        assert_eq!((r.image_auroc, r.pixel_auroc), (None, None));
        assert!(image_score(&[f32::NAN]).is_nan());
    }
}
