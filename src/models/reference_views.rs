//! Augmented references for a few-shot memory bank, as AnomalyDINO (Damm et al. 2025) augments
//! its k normal samples: each reference image enters the bank as several views, so a test patch
//! that is a rotated or mirrored copy of a normal one still finds a near neighbour.
//!
//! Only the lossless views are offered: right-angle rotations and mirror images (the dihedral
//! group of the square), which move pixels without resampling and leave no empty corners.
//! AnomalyDINO also rotates by 45° steps for the object categories it knows to be
//! rotation-invariant; an arbitrary angle needs an interpolation and a fill rule, so it is not
//! here. Whether a view helps depends on the data: a solar cell's busbars run one way, so a
//! quarter turn of a normal cell is not a normal cell.

use image::DynamicImage;

/// Which views of each reference image a memory bank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceViews {
    /// The image as it is.
    Identity,
    /// The image turned by 0°, 90°, 180° and 270°.
    Rotations,
    /// The four rotations and their mirror images (left–right).
    Dihedral,
}

impl ReferenceViews {
    /// Views per reference image.
    pub fn count(self) -> usize {
        match self {
            ReferenceViews::Identity => 1,
            ReferenceViews::Rotations => 4,
            ReferenceViews::Dihedral => 8,
        }
    }

    /// The views of `img`, the image itself first.
    pub fn of(self, img: &DynamicImage) -> Vec<DynamicImage> {
        let rotations = |i: &DynamicImage| match self {
            ReferenceViews::Identity => vec![i.clone()],
            _ => vec![i.clone(), i.rotate90(), i.rotate180(), i.rotate270()],
        };
        let mut views = rotations(img);
        if self == ReferenceViews::Dihedral {
            views.extend(rotations(&img.fliph()));
        }
        views
    }
}

impl ReferenceViews {
    /// Its name on the command line and in reports.
    pub fn label(self) -> &'static str {
        match self {
            ReferenceViews::Identity => "identity",
            ReferenceViews::Rotations => "rotations",
            ReferenceViews::Dihedral => "dihedral",
        }
    }
}

impl std::fmt::Display for ReferenceViews {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{GrayImage, Luma};

    /// A 3×2 image whose six pixels are 1..=6, row-major.
    fn numbered() -> DynamicImage {
        DynamicImage::ImageLuma8(GrayImage::from_fn(3, 2, |x, y| Luma([(1 + x + 3 * y) as u8])))
    }

    /// Pixel values row by row, with the image's size.
    fn pixels(i: &DynamicImage) -> (u32, u32, Vec<u8>) {
        (i.width(), i.height(), i.to_luma8().into_raw())
    }

    /// Each view placed by hand:
    /// ```text
    /// 1 2 3   rot90: 4 1   rot180: 6 5 4   rot270: 3 6   mirror: 3 2 1
    /// 4 5 6          5 2           3 2 1           2 5           6 5 4
    ///                6 3                           1 4
    /// ```
    #[test]
    fn views_are_the_square_symmetries_placed_by_hand() {
        let img = numbered();
        let id = ReferenceViews::Identity.of(&img);
        assert_eq!(id.len(), 1);
        assert_eq!(pixels(&id[0]), (3, 2, vec![1, 2, 3, 4, 5, 6]));
        let r = ReferenceViews::Rotations.of(&img);
        let want = [
            (3, 2, vec![1, 2, 3, 4, 5, 6]),
            (2, 3, vec![4, 1, 5, 2, 6, 3]),
            (3, 2, vec![6, 5, 4, 3, 2, 1]),
            (2, 3, vec![3, 6, 2, 5, 1, 4]),
        ];
        assert_eq!(r.iter().map(pixels).collect::<Vec<_>>(), want);
        let d = ReferenceViews::Dihedral.of(&img);
        assert_eq!(d.len(), ReferenceViews::Dihedral.count());
        assert_eq!(d[..4].iter().map(pixels).collect::<Vec<_>>(), want);
        assert_eq!(pixels(&d[4]), (3, 2, vec![3, 2, 1, 6, 5, 4]));
        // Eight distinct arrangements: no view is another twice.
        let mut all: Vec<_> = d.iter().map(pixels).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 8);
    }
}
