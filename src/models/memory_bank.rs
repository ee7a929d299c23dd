//! A memory bank of normal patch tokens, the nearest-neighbour anomaly map of PatchCore (Roth et
//! al. 2022) and AnomalyDINO (Damm et al. 2025): a test patch scores `1 − max cos` to the bank,
//! the bank being every patch of k normal reference images (few-shot) or a greedy coreset of
//! many (full-shot). The search is `ops::similarity::mincos_topk`, the CPU reference of the fused
//! min-cosine kernel, with the bank as its reference patches.
//!
//! The coreset is PatchCore's greedy k-center selection: points projected to 128 dimensions by a
//! seeded Gaussian matrix (Johnson–Lindenstrauss: distances kept within a small factor, the
//! selection ~3× cheaper at 384 dimensions), then repeatedly the point farthest from everything
//! chosen so far. Points are L2-normalised first, so Euclidean distance ranks as cosine does.

use crate::ops::similarity::{mincos_topk_unit_reference, unit_rows};
use crate::opset::{Buffers, Reduce, Similarity, SimilarityShape};
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

/// Width of the coreset's random projection (PatchCore's default).
pub const PROJECTION_DIM: usize = 128;

/// How a map's patch scores become the image's score.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ImageScore {
    /// The largest patch score (PatchCore).
    Max,
    /// The mean of the top 1% of patch scores, at least one (AnomalyDINO).
    Top1Percent,
}

impl ImageScore {
    pub fn of(self, map: &[f32]) -> f32 {
        let mut v: Vec<f32> = map.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return f32::NAN;
        }
        match self {
            ImageScore::Max => v.into_iter().fold(f32::NEG_INFINITY, f32::max),
            ImageScore::Top1Percent => {
                let n = v.len().div_ceil(100);
                v.sort_unstable_by(|a, b| b.total_cmp(a));
                v[..n].iter().sum::<f32>() / n as f32
            }
        }
    }
}

/// Normal patch tokens `[len, dim]`, each scaled to unit length as it is pushed: the search
/// compares directions only, so the bank is normalised once rather than on every query.
#[derive(Clone, Debug)]
pub struct MemoryBank {
    pub dim: usize,
    data: Vec<f32>,
}

impl MemoryBank {
    pub fn new(dim: usize) -> MemoryBank {
        MemoryBank { dim, data: Vec::new() }
    }

    /// Adds one image's patch tokens `[patches, dim]`.
    pub fn push(&mut self, tokens: &[f32]) -> Result<()> {
        ensure!(
            tokens.len().is_multiple_of(self.dim),
            "patch tokens of width {} do not divide {} values",
            self.dim,
            tokens.len()
        );
        self.data.extend(unit_rows(tokens, self.dim));
        Ok(())
    }

    /// Adds the rows of one image's tokens `[patches, dim]` whose `keep` is true (a foreground
    /// mask).
    pub fn push_masked(&mut self, tokens: &[f32], keep: &[bool]) -> Result<()> {
        ensure!(
            tokens.len() == keep.len() * self.dim,
            "a mask of {} patches does not fit {} values of width {}",
            keep.len(),
            tokens.len(),
            self.dim
        );
        for (row, _) in tokens.chunks_exact(self.dim).zip(keep).filter(|(_, &k)| k) {
            self.push(row)?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The greedy coreset of `fraction` of the patches (at least one).
    pub fn coreset(&self, fraction: f64, seed: u64) -> MemoryBank {
        let m = ((self.len() as f64 * fraction).ceil() as usize).clamp(1, self.len().max(1));
        let keep = greedy_coreset(&self.data, self.dim, m, seed);
        let mut data = Vec::with_capacity(keep.len() * self.dim);
        for i in keep {
            data.extend_from_slice(&self.data[i * self.dim..(i + 1) * self.dim]);
        }
        MemoryBank { dim: self.dim, data }
    }

    /// `1 − max cos` of each test patch `[patches, dim]` to the bank.
    pub fn anomaly_map(&self, test: &[f32]) -> Result<Vec<f32>> {
        ensure!(!self.is_empty(), "the memory bank is empty");
        ensure!(test.len().is_multiple_of(self.dim), "test tokens do not have the bank's width {}", self.dim);
        Ok(mincos_topk_unit_reference(test, &self.data, self.dim, 0, Reduce::Nearest).anomaly_map())
    }

    /// The bank copied to `ops`' memory once, to score many test images there.
    pub fn on<'o, O: Buffers + Similarity>(&self, ops: &'o O) -> Result<DeviceBank<'o, O>> {
        ensure!(!self.is_empty(), "the memory bank is empty");
        Ok(DeviceBank { ops, buf: ops.upload(&self.data)?, len: self.len(), dim: self.dim })
    }
}

/// A [`MemoryBank`] in a backend's memory: the search is the op set's [`Similarity`] (on the GPU
/// the fused min-cosine kernel; on the CPU its reference, as [`MemoryBank::anomaly_map`]).
pub struct DeviceBank<'o, O: Buffers> {
    ops: &'o O,
    buf: O::Buf,
    len: usize,
    dim: usize,
}

impl<O: Buffers + Similarity> DeviceBank<'_, O> {
    /// `1 − max cos` to the bank of each patch of each test image, every image `[patches, dim]`:
    /// one search over all their rows (a patch's nearest neighbour does not depend on the others).
    pub fn anomaly_maps(&self, tests: &[&[f32]]) -> Result<Vec<Vec<f32>>> {
        let mut rows = Vec::with_capacity(tests.iter().map(|t| t.len()).sum());
        for t in tests {
            ensure!(t.len().is_multiple_of(self.dim), "test tokens do not have the bank's width {}", self.dim);
            rows.extend_from_slice(t);
        }
        if rows.is_empty() {
            return Ok(vec![Vec::new(); tests.len()]);
        }
        let shape = SimilarityShape {
            patches: rows.len() / self.dim,
            ref_patches: self.len,
            channels: self.dim,
            k: 0,
            reduce: Reduce::Nearest,
        };
        let map = self.ops.mincos_topk(&self.ops.upload(&rows)?, Some(&self.buf), shape)?.anomaly_map();
        let mut at = 0;
        Ok(tests
            .iter()
            .map(|t| {
                let n = t.len() / self.dim;
                at += n;
                map[at - n..at].to_vec()
            })
            .collect())
    }
}

fn l2_normalised(points: &[f32], dim: usize) -> Vec<f32> {
    let mut v = points.to_vec();
    for row in v.chunks_mut(dim) {
        let n = row.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// Indices of `m` points of `points [n, dim]` chosen by greedy k-center selection (see the module
/// docs), the first one drawn with `seed`.
pub fn greedy_coreset(points: &[f32], dim: usize, m: usize, seed: u64) -> Vec<usize> {
    let n = points.len() / dim;
    if m >= n {
        return (0..n).collect();
    }
    let unit = l2_normalised(points, dim);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (q, proj) = if dim > PROJECTION_DIM {
        // A Gaussian matrix [dim, q] scaled by 1/√q; Box–Muller from the seeded generator.
        let mut g = vec![0.0f32; dim * PROJECTION_DIM];
        for pair in g.chunks_mut(2) {
            let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
            let r = (-2.0 * u1.ln()).sqrt() / (PROJECTION_DIM as f32).sqrt();
            pair[0] = r * (std::f32::consts::TAU * u2).cos();
            if let Some(b) = pair.get_mut(1) {
                *b = r * (std::f32::consts::TAU * u2).sin();
            }
        }
        let mut out = vec![0.0f32; n * PROJECTION_DIM];
        out.par_chunks_mut(PROJECTION_DIM).zip(unit.par_chunks(dim)).for_each(|(o, x)| {
            for (k, &xv) in x.iter().enumerate() {
                let row = &g[k * PROJECTION_DIM..(k + 1) * PROJECTION_DIM];
                o.iter_mut().zip(row).for_each(|(a, b)| *a += xv * b);
            }
        });
        (PROJECTION_DIM, out)
    } else {
        (dim, unit)
    };
    let mut min_dist = vec![f32::INFINITY; n];
    let mut chosen = Vec::with_capacity(m);
    let mut next = rng.random_range(0..n);
    for _ in 0..m {
        chosen.push(next);
        let c = proj[next * q..(next + 1) * q].to_vec();
        min_dist.par_iter_mut().zip(proj.par_chunks(q)).for_each(|(d, x)| {
            let s: f32 = x.iter().zip(&c).map(|(a, b)| (a - b) * (a - b)).sum();
            *d = d.min(s);
        });
        // The farthest point (lowest index among ties) is the next center; a chosen point has
        // distance 0 and is never picked again while any other point is farther.
        next = min_dist.iter().enumerate().fold(0, |best, (i, &d)| if d > min_dist[best] { i } else { best });
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_scores() {
        let map: Vec<f32> = (0..250).map(|i| i as f32).collect();
        assert_eq!(ImageScore::Max.of(&map), 249.0);
        // 250 patches: top 1% is ⌈2.5⌉ = 3 → (249 + 248 + 247)/3.
        assert_eq!(ImageScore::Top1Percent.of(&map), 248.0);
        assert_eq!(ImageScore::Top1Percent.of(&[0.2, f32::NAN]), 0.2);
        assert!(ImageScore::Max.of(&[]).is_nan());
    }

    #[test]
    fn the_coreset_covers_every_cluster_first() {
        // Three tight clusters of 50 points in 3-D (directions x, y, z) and one outlier
        // direction: greedy k-center with 4 centers takes one point of each cluster and the
        // outlier, whichever point it starts from.
        let mut pts = Vec::new();
        for axis in 0..3 {
            for i in 0..50 {
                let mut p = [0.01 * (i % 7) as f32, 0.01 * (i % 5) as f32, 0.01 * (i % 3) as f32];
                p[axis] = 1.0;
                pts.extend_from_slice(&p);
            }
        }
        pts.extend_from_slice(&[-1.0, -1.0, -1.0]);
        for seed in 0..5 {
            let c = greedy_coreset(&pts, 3, 4, seed);
            let mut groups: Vec<usize> = c.iter().map(|&i| i / 50).collect();
            groups.sort();
            assert_eq!(groups, [0, 1, 2, 3], "seed {seed}: {c:?}");
        }
        assert_eq!(greedy_coreset(&pts, 3, 500, 0).len(), 151);
    }

    #[test]
    fn a_bank_of_the_test_itself_scores_zero_and_the_coreset_keeps_it_close() {
        let dim = 200; // above the projection width, so the projection runs
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let pts: Vec<f32> = (0..dim * 300).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut bank = MemoryBank::new(dim);
        bank.push(&pts).unwrap();
        let m = bank.anomaly_map(&pts[..dim * 10]).unwrap();
        assert!(m.iter().all(|v| v.abs() < 1e-5), "{m:?}");
        let core = bank.coreset(0.1, 0);
        assert_eq!(core.len(), 30);
        // Every coreset point is a bank point: it scores 0.
        assert!(core.anomaly_map(&core.data[..dim * 3]).unwrap().iter().all(|v| v.abs() < 1e-5));
        assert!(bank.push(&[0.0; 3]).is_err());
    }

    #[test]
    fn the_normalised_bank_scores_as_the_search_over_raw_tokens() {
        // Tokens of very different lengths: the bank keeps directions, the map is unchanged.
        let dim = 8;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mut draw =
            |n: usize, scale: f32| -> Vec<f32> { (0..n * dim).map(|_| rng.random_range(-1.0..1.0) * scale).collect() };
        let (a, b, test) = (draw(20, 0.01), draw(30, 50.0), draw(10, 1.0));
        let mut bank = MemoryBank::new(dim);
        bank.push(&a).unwrap();
        bank.push(&b).unwrap();
        let raw: Vec<f32> = a.iter().chain(&b).copied().collect();
        let want = crate::ops::similarity::mincos_topk(&test, Some(&raw), dim, 0, Reduce::Nearest).anomaly_map();
        let got = bank.anomaly_map(&test).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
    }
}
