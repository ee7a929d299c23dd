//! AnomalyDINO's zero-shot background masking (Damm et al. 2025): the first principal component
//! of one image's patch tokens separates the object from its background; patches on the
//! background side neither enter a memory bank nor score. The side is the one that holds most of
//! the image's centre, and the mask is dilated and closed (3×3) so thin parts of the object and
//! the pixels at its rim stay in.
//!
//! One change from the published recipe: AnomalyDINO thresholds the projection at a fixed 10,
//! a value tied to the scale of DINOv2's normalised last-layer tokens. Here the threshold is
//! Otsu's on the projections (the split that maximises the between-class variance), so the rule
//! holds for any layer and any encoder.

use rayon::prelude::*;

/// Whether a memory-bank map masks the background.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Masking {
    /// Every patch enters the bank and scores.
    None,
    /// AnomalyDINO's PCA mask ([`foreground_mask`]) on every reference and test image, from the
    /// encoder's mask tokens (`PatchEncoder::foreground`: DINOv2's last layer).
    Pca,
}

impl std::fmt::Display for Masking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Masking::None => "none",
            Masking::Pca => "pca",
        })
    }
}

/// [`foreground_mask`] of many images' tokens `[h·w, dim]` each, in parallel.
pub fn foreground_masks(images: &[&[f32]], dim: usize, h: usize, w: usize) -> Vec<Vec<bool>> {
    images.par_iter().map(|t| foreground_mask(t, dim, h, w)).collect()
}

/// The centre region the side choice looks at: the grid without `BORDER` of each edge.
const BORDER: f64 = 0.2;
/// The chosen side must cover more than this share of the centre, or the other side is taken.
const CENTRE_SHARE: f64 = 0.35;
/// Power iterations for the first principal component (the ratio of the first two eigenvalues of
/// a patch covariance is far from 1 when there is an object to find).
const POWER_STEPS: usize = 100;

/// `true` for the patches of the object in `tokens [h·w, dim]` (row-major grid). An image whose
/// tokens barely vary (no principal direction) is all foreground.
pub fn foreground_mask(tokens: &[f32], dim: usize, h: usize, w: usize) -> Vec<bool> {
    let n = h * w;
    assert_eq!(tokens.len(), n * dim, "tokens must be [h·w, dim]");
    let Some(proj) = first_component_projections(tokens, dim) else { return vec![true; n] };
    let t = otsu_threshold(&proj);
    let mut mask: Vec<bool> = proj.iter().map(|&p| p > t).collect();
    let (y0, y1) = ((h as f64 * BORDER) as usize, (h as f64 * (1.0 - BORDER)) as usize);
    let (x0, x1) = ((w as f64 * BORDER) as usize, (w as f64 * (1.0 - BORDER)) as usize);
    let centre = (y1 - y0) * (x1 - x0);
    let on = (y0..y1).flat_map(|y| (x0..x1).map(move |x| y * w + x)).filter(|&i| mask[i]).count();
    if centre > 0 && on as f64 <= centre as f64 * CENTRE_SHARE {
        mask = proj.iter().map(|&p| p <= t).collect();
    }
    close(&dilate(&mask, h, w), h, w)
}

/// Each token's projection on the first principal component of `tokens` (centred), or `None`
/// when the tokens do not vary.
fn first_component_projections(tokens: &[f32], dim: usize) -> Option<Vec<f64>> {
    let n = tokens.len() / dim;
    let mut mean = vec![0.0f64; dim];
    for row in tokens.chunks_exact(dim) {
        mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n as f64);
    let centred: Vec<f64> =
        tokens.chunks_exact(dim).flat_map(|row| row.iter().zip(&mean).map(|(&x, m)| x as f64 - m)).collect();
    let project = |v: &[f64]| -> Vec<f64> {
        centred.chunks_exact(dim).map(|r| r.iter().zip(v).map(|(a, b)| a * b).sum()).collect()
    };
    // Power iteration on XᵀX from a fixed start (the mean absolute deviation of each channel,
    // which cannot be orthogonal to the leading direction for real data).
    let mut v: Vec<f64> = (0..dim).map(|c| centred.iter().skip(c).step_by(dim).map(|x| x.abs()).sum()).collect();
    let mut norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
    if norm == 0.0 {
        return None;
    }
    for _ in 0..POWER_STEPS {
        v.iter_mut().for_each(|x| *x /= norm);
        let p = project(&v);
        let mut next = vec![0.0f64; dim];
        for (r, &pi) in centred.chunks_exact(dim).zip(&p) {
            next.iter_mut().zip(r).for_each(|(a, &b)| *a += pi * b);
        }
        norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-12 {
            return None;
        }
        v = next;
    }
    v.iter_mut().for_each(|x| *x /= norm);
    Some(project(&v))
}

/// Otsu's threshold over the distinct values of `x`: the cut `t` (values `> t` on one side) that
/// maximises the between-class variance.
fn otsu_threshold(x: &[f64]) -> f64 {
    let mut s = x.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    let total: f64 = s.iter().sum();
    let (mut best, mut cut, mut below) = (f64::NEG_INFINITY, s[0], 0.0);
    for i in 0..s.len() - 1 {
        below += s[i];
        if s[i] == s[i + 1] {
            continue;
        }
        let (n0, n1) = ((i + 1) as f64, n - (i + 1) as f64);
        let (m0, m1) = (below / n0, (total - below) / n1);
        let between = n0 * n1 * (m0 - m1) * (m0 - m1);
        if between > best {
            best = between;
            cut = s[i];
        }
    }
    cut
}

/// 3×3 binary dilation (outside the grid counts as off).
fn dilate(m: &[bool], h: usize, w: usize) -> Vec<bool> {
    neighbourhood(m, h, w, true)
}

/// Dilation then erosion, 3×3: fills holes narrower than the kernel. On a grid padded by one
/// off patch, so the closing never adds patches along the image's edge.
fn close(m: &[bool], h: usize, w: usize) -> Vec<bool> {
    let (ph, pw) = (h + 2, w + 2);
    let mut padded = vec![false; ph * pw];
    for y in 0..h {
        padded[(y + 1) * pw + 1..(y + 1) * pw + 1 + w].copy_from_slice(&m[y * w..(y + 1) * w]);
    }
    let closed = neighbourhood(&neighbourhood(&padded, ph, pw, true), ph, pw, false);
    (0..h).flat_map(|y| closed[(y + 1) * pw + 1..(y + 1) * pw + 1 + w].to_vec()).collect()
}

/// `any` of the 3×3 neighbourhood (dilation) or `all` of it (erosion; outside the grid counts as
/// on).
fn neighbourhood(m: &[bool], h: usize, w: usize, any: bool) -> Vec<bool> {
    (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as isize, (i % w) as isize);
            let mut cells = (-1..=1).flat_map(|dy| (-1..=1).map(move |dx| (y + dy, x + dx)));
            let inside = |(yy, xx): (isize, isize)| yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < w;
            if any {
                cells.any(|p| inside(p) && m[p.0 as usize * w + p.1 as usize])
            } else {
                cells.all(|p| !inside(p) || m[p.0 as usize * w + p.1 as usize])
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: &[&str]) -> Vec<bool> {
        rows.iter().flat_map(|r| r.chars().map(|c| c == '#')).collect()
    }

    /// Tokens of a 10×10 image: an object (direction `obj`) on a background (direction `bg`),
    /// with a little deterministic noise.
    fn image(object: &[bool], obj: [f32; 4], bg: [f32; 4]) -> Vec<f32> {
        let mut s = 7u64;
        object
            .iter()
            .flat_map(|&o| {
                let base = if o { obj } else { bg };
                base.map(|b| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    b + ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
                })
            })
            .collect()
    }

    #[test]
    fn an_object_in_the_centre_is_found_whichever_way_the_component_points() {
        let object = grid(&[
            "..........",
            "..........",
            "...####...",
            "..######..",
            "..######..",
            "..######..",
            "..######..",
            "...####...",
            "..........",
            "..........",
        ]);
        // The 3×3 dilation grows it by one patch all round; the closing keeps that shape.
        let want = grid(&[
            "..........",
            "..######..",
            ".########.",
            ".########.",
            ".########.",
            ".########.",
            ".########.",
            ".########.",
            "..######..",
            "..........",
        ]);
        for (obj, bg) in [([3.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]), ([0.0, 2.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0])] {
            assert_eq!(foreground_mask(&image(&object, obj, bg), 4, 10, 10), want, "{obj:?} on {bg:?}");
        }
    }

    #[test]
    fn uniform_tokens_are_all_foreground() {
        assert!(foreground_mask(&[1.5; 16 * 3], 3, 4, 4).iter().all(|&m| m));
    }

    #[test]
    fn otsu_splits_two_clusters_between_them() {
        let x = [0.0, 0.1, 0.2, 5.0, 5.1, 5.3, 5.2];
        assert_eq!(otsu_threshold(&x), 0.2);
    }

    #[test]
    fn closing_fills_a_one_patch_hole_and_dilation_grows_by_one() {
        let ring = grid(&[".....", ".###.", ".#.#.", ".###.", "....."]);
        let filled = grid(&[".....", ".###.", ".###.", ".###.", "....."]);
        assert_eq!(close(&ring, 5, 5), filled);
        let dot = grid(&[".....", ".....", "..#..", ".....", "....."]);
        assert_eq!(dilate(&dot, 5, 5), grid(&[".....", ".###.", ".###.", ".###.", "....."]));
    }
}
