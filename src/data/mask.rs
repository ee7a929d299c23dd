//! Defect masks → boxes and a coarse place, which the builder's answers state as the defect's
//! location and size (only where a ground-truth mask exists; nothing is guessed), and the
//! connected regions PRO is averaged over ([`label_regions`], `eval::pro`).

use super::templates::{place_of, Region};
use crate::image_io;
use anyhow::Result;
use std::path::Path;

/// What a mask says: one box per connected defect region (8-connectivity), and the region of all
/// defect pixels together. Both are `None`/empty for an all-background mask.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskInfo {
    /// `[x_min, y_min, x_max, y_max]` in pixel edges (a one-pixel blob at (3, 4) is `[3, 4, 4, 5]`).
    pub boxes: Vec<[f32; 4]>,
    pub region: Option<Region>,
}

/// Reads a mask image (defect = brighter than mid-grey); a corrupt file is a user error naming it.
pub fn analyze(path: &Path) -> Result<MaskInfo> {
    let img = image_io::load(path)?.to_luma8();
    let (w, h) = img.dimensions();
    let on: Vec<bool> = img.pixels().map(|p| p.0[0] > 127).collect();
    Ok(from_pixels(&on, w as usize, h as usize))
}

/// The analysis of a row-major boolean mask.
pub fn from_pixels(on: &[bool], w: usize, h: usize) -> MaskInfo {
    let (labels, regions) = label_regions(on, w, h);
    let mut bounds = vec![(usize::MAX, usize::MAX, 0, 0); regions];
    let (mut n, mut sx, mut sy) = (0usize, 0f64, 0f64);
    for (i, &l) in labels.iter().enumerate() {
        if l == 0 {
            continue;
        }
        let (x, y) = (i % w, i / w);
        let b = &mut bounds[l as usize - 1];
        *b = (b.0.min(x), b.1.min(y), b.2.max(x), b.3.max(y));
        n += 1;
        sx += x as f64 + 0.5;
        sy += y as f64 + 0.5;
    }
    let boxes =
        bounds.iter().map(|&(x0, y0, x1, y1)| [x0 as f32, y0 as f32, (x1 + 1) as f32, (y1 + 1) as f32]).collect();
    let region = (n > 0).then(|| Region {
        place: place_of((sx / n as f64 / w as f64) as f32, (sy / n as f64 / h as f64) as f32),
        area: n as f32 / (w * h) as f32,
    });
    MaskInfo { boxes, region }
}

/// The connected regions of a row-major `w × h` boolean mask, 8-connectivity (diagonal
/// neighbours join, as `scipy.ndimage.label` with a 3×3 structure): each pixel's region number
/// (0 = background, regions 1..=n numbered in the raster order of their first pixel) and n.
pub fn label_regions(on: &[bool], w: usize, h: usize) -> (Vec<u32>, usize) {
    assert_eq!(on.len(), w * h, "a {w}×{h} mask has {} pixels", on.len());
    let mut labels = vec![0u32; on.len()];
    let mut regions = 0u32;
    let mut stack = Vec::new();
    for start in 0..on.len() {
        if !on[start] || labels[start] != 0 {
            continue;
        }
        regions += 1;
        labels[start] = regions;
        stack.push(start);
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = ny * w + nx;
                    if on[j] && labels[j] == 0 {
                        labels[j] = regions;
                        stack.push(j);
                    }
                }
            }
        }
    }
    (labels, regions as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_blobs_two_boxes_and_the_centroid_place() {
        // 9×3: a 2×2 blob at the left, one pixel at the right, a diagonal neighbour joins the blob.
        #[rustfmt::skip]
        let m = [
            1, 1, 0, 0, 0, 0, 0, 0, 0,
            1, 1, 0, 0, 0, 0, 0, 0, 1,
            0, 0, 1, 0, 0, 0, 0, 0, 0,
        ].map(|v| v == 1);
        let info = from_pixels(&m, 9, 3);
        assert_eq!(info.boxes, [[0.0, 0.0, 3.0, 3.0], [8.0, 1.0, 9.0, 2.0]]);
        let r = info.region.unwrap();
        assert_eq!(r.place, "left part");
        assert!((r.area - 6.0 / 27.0).abs() < 1e-6);
        assert_eq!(from_pixels(&[false; 4], 2, 2), MaskInfo { boxes: vec![], region: None });
    }

    #[test]
    fn regions_are_numbered_in_raster_order_with_diagonals_joining() {
        // 5×4: a diagonal chain (one region under 8-connectivity, three under 4), a pair, a dot.
        #[rustfmt::skip]
        let m = [
            1, 0, 0, 0, 1,
            0, 1, 0, 0, 1,
            0, 0, 1, 0, 0,
            1, 0, 0, 0, 0,
        ].map(|v| v == 1);
        let (labels, n) = label_regions(&m, 5, 4);
        assert_eq!(n, 3);
        #[rustfmt::skip]
        assert_eq!(labels, [
            1, 0, 0, 0, 2,
            0, 1, 0, 0, 2,
            0, 0, 1, 0, 0,
            3, 0, 0, 0, 0,
        ]);
        assert_eq!(label_regions(&[false; 6], 3, 2), (vec![0; 6], 0));
        assert_eq!(label_regions(&[true; 6], 3, 2), (vec![1; 6], 1));
    }
}
