//! The contact sheet (`--contact-sheet`): a grid of samples for a person to look over, each the
//! source image beside the anomalous one, whose mask's contour is drawn in red. Images are fitted
//! into square thumbnails first (shrunk with a triangle filter, enlarged with nearest neighbours
//! so small pictures stay legible) and the mask is scaled with them, so the contour is one
//! thumbnail pixel wide whatever the image's size.

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, Luma, Rgb, RgbImage};

/// Thumbnail side in pixels.
pub const THUMB: u32 = 160;
const GAP: u32 = 8;
const BACKGROUND: Rgb<u8> = Rgb([40, 40, 40]);
const RED: Rgb<u8> = Rgb([255, 0, 0]);

/// One sample: its source, the anomalous image and its mask (row-major, the image's size).
pub struct Tile {
    pub source: DynamicImage,
    pub image: DynamicImage,
    pub mask: Vec<bool>,
}

/// The mask pixels with a background 4-neighbour, or on the image's edge: the contour.
pub fn contour(mask: &[bool], w: usize, h: usize) -> Vec<bool> {
    let on = |x: usize, y: usize| mask[y * w + x];
    (0..w * h)
        .map(|i| {
            let (x, y) = (i % w, i / w);
            mask[i]
                && (x == 0
                    || y == 0
                    || x + 1 == w
                    || y + 1 == h
                    || !on(x - 1, y)
                    || !on(x + 1, y)
                    || !on(x, y - 1)
                    || !on(x, y + 1))
        })
        .collect()
}

/// `img` fitted into `side × side`, keeping its aspect ratio.
fn fit(img: &DynamicImage, side: u32) -> RgbImage {
    let (w, h) = (img.width().max(1), img.height().max(1));
    let scale = side as f64 / w.max(h) as f64;
    let (nw, nh) = (((w as f64 * scale).round() as u32).max(1), ((h as f64 * scale).round() as u32).max(1));
    let filter = if scale < 1.0 { FilterType::Triangle } else { FilterType::Nearest };
    img.resize_exact(nw, nh, filter).to_rgb8()
}

/// The anomalous image's thumbnail with its mask's contour in red.
fn outlined(t: &Tile, side: u32) -> RgbImage {
    let mut thumb = fit(&t.image, side);
    let (tw, th) = thumb.dimensions();
    let m = GrayImage::from_fn(t.image.width(), t.image.height(), |x, y| {
        Luma([if t.mask[(y * t.image.width() + x) as usize] { 255 } else { 0 }])
    });
    let m = image::imageops::resize(&m, tw, th, FilterType::Nearest);
    let on: Vec<bool> = m.pixels().map(|p| p.0[0] > 127).collect();
    for (i, &edge) in contour(&on, tw as usize, th as usize).iter().enumerate() {
        if edge {
            thumb.put_pixel(i as u32 % tw, i as u32 / tw, RED);
        }
    }
    thumb
}

fn paste(canvas: &mut RgbImage, img: &RgbImage, x0: u32, y0: u32) {
    for (x, y, p) in img.enumerate_pixels() {
        canvas.put_pixel(x0 + x, y0 + y, *p);
    }
}

/// The grid: about square, tiles in reading order, each `[source | anomaly]`.
pub fn sheet(tiles: &[Tile], side: u32) -> RgbImage {
    let n = tiles.len().max(1) as u32;
    let cols = (n as f64).sqrt().ceil() as u32;
    let rows = n.div_ceil(cols);
    let tile_w = 2 * side + GAP / 2;
    let mut canvas = RgbImage::from_pixel(cols * tile_w + (cols + 1) * GAP, rows * side + (rows + 1) * GAP, BACKGROUND);
    for (k, t) in tiles.iter().enumerate() {
        let (col, row) = (k as u32 % cols, k as u32 / cols);
        let (x0, y0) = (GAP + col * (tile_w + GAP), GAP + row * (side + GAP));
        let (src, anomalous) = (fit(&t.source, side), outlined(t, side));
        // Centred in their squares.
        paste(&mut canvas, &src, x0 + (side - src.width()) / 2, y0 + (side - src.height()) / 2);
        let x1 = x0 + side + GAP / 2;
        paste(&mut canvas, &anomalous, x1 + (side - anomalous.width()) / 2, y0 + (side - anomalous.height()) / 2);
    }
    canvas
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contour_is_the_ring_of_a_square_and_includes_the_image_edge() {
        let mut m = vec![false; 25];
        for y in 1..4 {
            for x in 1..4 {
                m[y * 5 + x] = true;
            }
        }
        let c = contour(&m, 5, 5);
        assert_eq!(c.iter().filter(|&&v| v).count(), 8);
        assert!(!c[2 * 5 + 2], "the centre is inside");
        // A mask filling the image: its contour is the image's edge.
        let c = contour(&[true; 9], 3, 3);
        assert_eq!(c.iter().filter(|&&v| v).count(), 8);
        assert!(!c[4]);
    }

    #[test]
    fn sheet_lays_tiles_in_a_grid_with_red_contours() {
        let grey = DynamicImage::ImageLuma8(GrayImage::from_pixel(8, 8, Luma([100])));
        let mut mask = vec![false; 64];
        for y in 2..6 {
            for x in 2..6 {
                mask[y * 8 + x] = true;
            }
        }
        let tiles: Vec<Tile> =
            (0..3).map(|_| Tile { source: grey.clone(), image: grey.clone(), mask: mask.clone() }).collect();
        let s = sheet(&tiles, 32);
        // Three tiles: two columns, two rows.
        assert_eq!(s.dimensions(), (2 * (64 + GAP / 2) + 3 * GAP, 2 * 32 + 3 * GAP));
        let red = s.pixels().filter(|p| **p == RED).count();
        // Each 4 × 4 mask becomes 16 × 16 in a 32 px thumbnail: a 60-pixel contour per tile.
        assert_eq!(red, 3 * 60);
        // The source thumbnail has no outline.
        assert_eq!(*s.get_pixel(GAP + 10, GAP + 10), Rgb([100, 100, 100]));
    }
}
