//! Patch-to-reference cosine similarity: the CPU reference of the fused min-cosine top-K kernel
//! (ARCHITECTURE.md §1, §4). For each test patch `i`, `s_i` reduces `cos(v_t[i], v_r[j])` over the
//! reference patches `j`; the K test patches with the lowest `s_i` are the anomaly candidates and
//! `1 − s_i` is the anomaly map. Zero-shot (no reference) compares the test image with itself,
//! excluding each patch's own position.

use crate::ops::gemm::{sgemm, MatRef};
use crate::ops::norm::l2_normalize_slice;
use rayon::prelude::*;

pub use crate::opset::similarity::{PatchScores, Reduce};

/// `test[P, C]` against `reference[P', C]` (row-major). `reference = None` is zero-shot.
pub fn mincos_topk(test: &[f32], reference: Option<&[f32]>, c: usize, k: usize, reduce: Reduce) -> PatchScores {
    match reference {
        Some(r) => mincos_topk_unit_reference(test, &unit_rows(r, c), c, k, reduce),
        None => {
            let t = unit_rows(test, c);
            search(&t, &t, true, c, k, reduce)
        }
    }
}

/// [`mincos_topk`] against a reference whose rows are already unit length (a memory bank
/// normalised once, rather than on every query).
pub fn mincos_topk_unit_reference(test: &[f32], reference: &[f32], c: usize, k: usize, reduce: Reduce) -> PatchScores {
    search(&unit_rows(test, c), reference, false, c, k, reduce)
}

/// `x [rows, c]` with every row scaled to unit length.
pub fn unit_rows(x: &[f32], c: usize) -> Vec<f32> {
    let mut v = x.to_vec();
    v.chunks_mut(c).for_each(l2_normalize_slice);
    v
}

/// The search over unit rows `t` and `r`; `zero_shot`: `r` is `t`, and a patch never matches itself.
fn search(t: &[f32], r: &[f32], zero_shot: bool, c: usize, k: usize, reduce: Reduce) -> PatchScores {
    let (p, pr) = (t.len() / c, r.len() / c);
    // Rows of the similarity matrix are produced in blocks and reduced at once, so the full
    // P×P' matrix never exists (the same contract as the CUDA kernel).
    const BLOCK: usize = 64;
    let mut similarity = vec![0.0f32; p];
    let mut ref_index = vec![0u32; p];
    similarity.par_chunks_mut(BLOCK).zip(ref_index.par_chunks_mut(BLOCK)).enumerate().for_each(|(b, (sims, idxs))| {
        let rows = sims.len();
        let mut tile = vec![0.0f32; rows * pr];
        let a = &t[b * BLOCK * c..(b * BLOCK + rows) * c];
        sgemm(rows, pr, c, MatRef::rows(a, c), MatRef::transposed(r, c), &mut tile, false);
        for (i, row) in tile.chunks_exact(pr).enumerate() {
            let gi = b * BLOCK + i;
            let (mut best, mut arg) = match reduce {
                Reduce::Nearest => (f32::NEG_INFINITY, 0),
                Reduce::Min => (f32::INFINITY, 0),
            };
            for (j, &v) in row.iter().enumerate() {
                if zero_shot && j == gi {
                    continue;
                }
                let better = match reduce {
                    Reduce::Nearest => v > best,
                    Reduce::Min => v < best,
                };
                if better {
                    best = v;
                    arg = j;
                }
            }
            sims[i] = if best.is_finite() { best } else { 1.0 };
            idxs[i] = arg as u32;
        }
    });
    let mut order: Vec<u32> = (0..p as u32).collect();
    order.sort_by(|&a, &b| similarity[a as usize].total_cmp(&similarity[b as usize]).then(a.cmp(&b)));
    order.truncate(k.min(p));
    PatchScores { similarity, ref_index, topk: order }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_patch_is_selected_and_nearest_index_is_right() {
        // Reference: two directions. Test: three copies of them and one orthogonal outlier.
        let c = 3;
        let reference = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
        let test = [2.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.1, 0.0];
        let s = mincos_topk(&test, Some(&reference), c, 1, Reduce::Nearest);
        assert_eq!(s.topk, vec![2]);
        assert_eq!(s.ref_index, vec![0, 1, 0, 0]);
        assert!((s.similarity[0] - 1.0).abs() < 1e-6 && s.similarity[2].abs() < 1e-6);
        let m = mincos_topk(&test, Some(&reference), c, 2, Reduce::Min);
        assert_eq!(m.ref_index[0], 1);
        // Zero-shot never matches a patch with itself.
        let z = mincos_topk(&test, None, c, 1, Reduce::Nearest);
        assert!(z.similarity[0] < 0.999 && z.ref_index[0] != 0);
    }
}
