//! Patch tokens from the two tapped feature maps (host-side, whichever op set ran the encoder):
//! a 3×3 local mean on each (PatchCore's neighbourhood aggregation), the fine map area-pooled to
//! the coarse grid, each part L2-normalised, the parts concatenated per patch.

use super::{FeatureMap, PatchTokens};
use crate::ops::norm::l2_normalize_slice;
use crate::ops::pool;

/// Tokens `[h·w, fine.c + coarse.c]` on the coarse map's `h × w` grid.
pub fn tokens_from_taps(fine: &FeatureMap, coarse: &FeatureMap) -> PatchTokens {
    let (h, w) = (coarse.h, coarse.w);
    let fine_s = pool::avg_pool_same(&fine.data, fine.c, fine.h, fine.w, 3);
    let fine_s = pool::resize_area(&fine_s, fine.c, fine.h, fine.w, h, w);
    let coarse_s = pool::avg_pool_same(&coarse.data, coarse.c, h, w, 3);
    let dim = fine.c + coarse.c;
    let mut data = vec![0.0f32; h * w * dim];
    for (p, tok) in data.chunks_exact_mut(dim).enumerate() {
        for c in 0..fine.c {
            tok[c] = fine_s[c * h * w + p];
        }
        for c in 0..coarse.c {
            tok[fine.c + c] = coarse_s[c * h * w + p];
        }
        l2_normalize_slice(&mut tok[..fine.c]);
        l2_normalize_slice(&mut tok[fine.c..]);
    }
    PatchTokens { h, w, dim, data }
}
