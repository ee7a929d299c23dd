//! Evaluation metrics.

/// Area under the ROC curve for `scores` with binary `labels` (true = positive/anomalous),
/// via the Mann–Whitney U statistic with ties counted half. `None` if a class is empty.
pub fn auroc(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Average ranks over ties.
    let mut ranks = vec![0.0f64; scores.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let r = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            ranks[k] = r;
        }
        i = j + 1;
    }
    let n_pos = labels.iter().filter(|&&l| l).count() as f64;
    let n_neg = labels.len() as f64 - n_pos;
    if n_pos == 0.0 || n_neg == 0.0 {
        return None;
    }
    let rank_sum: f64 = ranks.iter().zip(labels).filter(|(_, &l)| l).map(|(r, _)| r).sum();
    Some((rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))
}

/// [`auroc`] for scores already split by class: `pos` (anomalous) and `neg` (normal), e.g. the
/// pixels of many anomaly maps. Exact (ties count half, values compared by `total_cmp`), and
/// light: it sorts both slices in place and needs no other memory, so tens of millions of pixels
/// cost 4 bytes each. `None` if a class is empty.
pub fn auroc_split(pos: &mut [f32], neg: &mut [f32]) -> Option<f64> {
    if pos.is_empty() || neg.is_empty() {
        return None;
    }
    pos.sort_unstable_by(f32::total_cmp);
    neg.sort_unstable_by(f32::total_cmp);
    // 2·U = Σ over positives of (2·negatives below + negatives equal), in integers.
    let (mut twice_u, mut j) = (0u128, 0usize);
    let mut i = 0;
    while i < pos.len() {
        let v = pos[i];
        let run = pos[i..].iter().take_while(|p| p.total_cmp(&v).is_eq()).count();
        while j < neg.len() && neg[j].total_cmp(&v).is_lt() {
            j += 1;
        }
        let equal = neg[j..].iter().take_while(|n| n.total_cmp(&v).is_eq()).count();
        twice_u += run as u128 * (2 * j as u128 + equal as u128);
        i += run;
    }
    Some(twice_u as f64 / (2.0 * pos.len() as f64 * neg.len() as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_perfect_inverse_ties_and_degenerate() {
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &[false, false, true, true]), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &[false, false, true, true]), Some(0.0));
        assert_eq!(auroc(&[0.5, 0.5], &[false, true]), Some(0.5));
        // 3 of 4 positive/negative pairs ordered correctly.
        assert_eq!(auroc(&[0.1, 0.6, 0.5, 0.9], &[false, false, true, true]), Some(0.75));
        assert_eq!(auroc(&[0.1], &[true]), None);
    }

    #[test]
    fn auroc_split_matches_auroc() {
        assert_eq!(auroc_split(&mut [0.4, 0.8], &mut [0.1, 0.2, 0.3, 0.4, 0.1, 0.2]), Some(11.5 / 12.0));
        assert_eq!(auroc_split(&mut [], &mut [0.1]), None);
        assert_eq!(auroc_split(&mut [0.5, 0.5], &mut [0.5]), Some(0.5));
        // A pseudo-random set with many ties, against the rank formula.
        let mut x = 12345u32;
        let (mut scores, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..500 {
            x = x.wrapping_mul(1664525).wrapping_add(1013904223);
            let label = x >> 31 == 1;
            scores.push(((x >> 8) % 37) as f32 / 10.0 + if label { 0.5 } else { 0.0 });
            labels.push(label);
        }
        let mut pos: Vec<f32> = scores.iter().zip(&labels).filter(|(_, &l)| l).map(|(s, _)| *s).collect();
        let mut neg: Vec<f32> = scores.iter().zip(&labels).filter(|(_, &l)| !l).map(|(s, _)| *s).collect();
        let (a, b) = (auroc(&scores, &labels).unwrap(), auroc_split(&mut pos, &mut neg).unwrap());
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        assert!(a > 0.5 && a < 1.0);
    }
}

/// The 95% Wilson score interval of a proportion of `k` successes in `n` trials (`[0, 1]` when
/// `n` is 0): unlike the normal approximation it stays inside [0, 1] and is sound near 0 and 1.
pub fn wilson(k: usize, n: usize) -> [f64; 2] {
    if n == 0 {
        return [0.0, 1.0];
    }
    let (z, n, p) = (1.959_963_984_540_054f64, n as f64, k as f64 / n as f64);
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    [(centre - half).max(0.0), (centre + half).min(1.0)]
}

#[cfg(test)]
mod wilson_tests {
    #[test]
    fn wilson_matches_hand_computed_values() {
        // 81 of 263: [0.2553, 0.3662], worked by hand from the formula.
        let [lo, hi] = super::wilson(81, 263);
        assert!((lo - 0.2553).abs() < 5e-4 && (hi - 0.3662).abs() < 5e-4, "{lo} {hi}");
        assert_eq!(super::wilson(0, 0), [0.0, 1.0]);
        let [lo, hi] = super::wilson(10, 10);
        assert!((hi - 1.0).abs() < 1e-12 && (lo - 0.7225).abs() < 5e-4, "{lo}");
    }
}
