//! Uncertainty of evaluation numbers (ARCHITECTURE.md §6): cluster bootstrap intervals and
//! McNemar's test. Pure functions, deterministic given a seed.
//!
//! - [`bootstrap`]: the 95% percentile interval of a statistic over resamples of *clusters* (image
//!   pairs: the five questions of a pair move together), drawn with replacement.
//! - [`bootstrap_difference`]: the same for the difference of two rows scored on the same
//!   clusters, both evaluated on the *same* resampled clusters (a paired bootstrap).
//! - [`mcnemar`]: McNemar's test on two rows' right/wrong outcomes for the same questions, exact
//!   (binomial) and χ² with continuity correction.
//!
//! The reference values of the tests come from `scripts/stats_reference.py` (scipy, statsmodels
//! and numpy).

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Bootstrap resamples when there is no reason to choose another number.
pub const DEFAULT_RESAMPLES: usize = 2000;

/// A 95% interval around an estimate (the statistic on the full sample). `lo ≤ hi`, but the
/// estimate need not lie between them (a percentile interval is not centred on it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub estimate: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// Whether 0 lies outside `[lo, hi]` (for a difference: the two rows differ at the 95% level
    /// of the bootstrap).
    pub fn excludes_zero(&self) -> bool {
        self.lo > 0.0 || self.hi < 0.0
    }

    /// `hi − lo`.
    pub fn width(&self) -> f64 {
        self.hi - self.lo
    }
}

/// The `q`-quantile (`0 ≤ q ≤ 1`) of `sorted` (ascending, non-empty) by linear interpolation
/// between the two closest ranks: with `h = (m − 1)·q`, `sorted[⌊h⌋] + (h − ⌊h⌋)·(sorted[⌊h⌋ + 1]
/// − sorted[⌊h⌋])`. This is numpy's default (`np.percentile(x, 100·q)`, method "linear", type 7
/// of Hyndman and Fan).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    assert!(!sorted.is_empty(), "quantile of an empty sample");
    let h = (sorted.len() - 1) as f64 * q.clamp(0.0, 1.0);
    let i = h.floor() as usize;
    match sorted.get(i + 1) {
        Some(&next) => sorted[i] + (h - i as f64) * (next - sorted[i]),
        None => sorted[i],
    }
}

/// The bootstrap's resamples: `resamples` lists of `n` cluster indices each, drawn uniformly with
/// replacement from `0..n` by a ChaCha8 generator seeded with `seed` (the same seed gives the same
/// lists on every machine).
pub fn resample_indices(n: usize, resamples: usize, seed: u64) -> impl Iterator<Item = Vec<usize>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..resamples).map(move |_| (0..n).map(|_| rng.random_range(0..n)).collect())
}

/// The 95% percentile interval of `stat` over the given resamples of `n` clusters: the estimate
/// is `stat(0..n)`, the bounds the 2.5% and 97.5% [`quantile`]s of `stat` over the resamples.
/// `stat` receives a resample's cluster indices (with repeats, in drawing order).
///
/// A resample on which `stat` is `None` (or NaN), e.g. one that holds no question of a level, is
/// skipped; `None` when the estimate is `None` (or NaN), when no resample is given, or when more
/// than half of the resamples are skipped (the interval would describe another population).
pub fn bootstrap_over<R: AsRef<[usize]>>(
    n: usize,
    resamples: impl IntoIterator<Item = R>,
    stat: impl Fn(&[usize]) -> Option<f64>,
) -> Option<Interval> {
    let all: Vec<usize> = (0..n).collect();
    let estimate = stat(&all).filter(|v| !v.is_nan())?;
    let (mut values, mut skipped) = (Vec::new(), 0usize);
    for r in resamples {
        match stat(r.as_ref()).filter(|v| !v.is_nan()) {
            Some(v) => values.push(v),
            None => skipped += 1,
        }
    }
    if values.is_empty() || skipped > values.len() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(Interval { estimate, lo: quantile(&values, 0.025), hi: quantile(&values, 0.975) })
}

/// The cluster bootstrap: [`bootstrap_over`] on `resamples` resamples of `n_clusters` clusters
/// drawn by [`resample_indices`] with `seed` ([`DEFAULT_RESAMPLES`] is the usual count).
pub fn bootstrap(
    n_clusters: usize,
    stat: impl Fn(&[usize]) -> Option<f64>,
    resamples: usize,
    seed: u64,
) -> Option<Interval> {
    bootstrap_over(n_clusters, resample_indices(n_clusters, resamples, seed), stat)
}

/// The paired cluster bootstrap of `stat_a − stat_b`, two rows scored on the same `n_clusters`
/// clusters: both statistics see the *same* resampled indices, so what the rows share cancels.
/// The estimate is `stat_a(0..n) − stat_b(0..n)`; a resample where either is `None` is skipped,
/// as in [`bootstrap_over`]. With the same `seed` the resamples are those of [`bootstrap`].
pub fn bootstrap_difference(
    n_clusters: usize,
    stat_a: impl Fn(&[usize]) -> Option<f64>,
    stat_b: impl Fn(&[usize]) -> Option<f64>,
    resamples: usize,
    seed: u64,
) -> Option<Interval> {
    bootstrap(n_clusters, |idx| Some(stat_a(idx)? - stat_b(idx)?), resamples, seed)
}

/// McNemar's test of two rows' outcomes on the same questions. Only the discordant questions
/// count: `b` where row A is right and row B wrong, `c` the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct McNemar {
    /// A right, B wrong.
    pub b: usize,
    /// A wrong, B right.
    pub c: usize,
    /// Two-sided exact p: `min(1, 2·P(X ≤ min(b, c)))` for `X ~ Bin(b + c, ½)`; 1 when `b + c = 0`.
    pub exact_p: f64,
    /// `(|b − c| − 1)² / (b + c)` (Edwards' continuity correction, as statsmodels computes it);
    /// 0 when `b + c = 0`.
    pub chi2: f64,
    /// The upper tail of χ²(1) at `chi2`: `erfc(√(chi2 / 2))`.
    pub chi2_p: f64,
}

/// McNemar's test on `a_right[i]` and `b_right[i]`, row A's and row B's outcome on question `i`.
/// Outcome lists of different lengths are an error (they cannot be paired).
pub fn mcnemar(a_right: &[bool], b_right: &[bool]) -> Result<McNemar> {
    if a_right.len() != b_right.len() {
        bail!(
            "McNemar's test pairs the outcomes of the same questions, but row A has {} and row B {}",
            a_right.len(),
            b_right.len()
        );
    }
    let b = a_right.iter().zip(b_right).filter(|(&x, &y)| x && !y).count();
    let c = a_right.iter().zip(b_right).filter(|(&x, &y)| !x && y).count();
    Ok(mcnemar_counts(b, c))
}

/// McNemar's test from the discordant counts (see [`McNemar`]).
pub fn mcnemar_counts(b: usize, c: usize) -> McNemar {
    let n = b + c;
    if n == 0 {
        return McNemar { b, c, exact_p: 1.0, chi2: 0.0, chi2_p: 1.0 };
    }
    let exact_p = (2.0 * binomial_half_cdf(b.min(c) as u64, n as u64)).min(1.0);
    let d = (b as f64 - c as f64).abs() - 1.0;
    let chi2 = d * d / n as f64;
    McNemar { b, c, exact_p, chi2, chi2_p: erfc((chi2 / 2.0).sqrt()) }
}

/// `P(X ≤ k)` for `X ~ Bin(n, ½)` and `2k ≤ n`, summed exactly in f64 without overflow or
/// underflow on the way: the largest term `P(X = k) = C(n, k)·2⁻ⁿ` as a product of the ratios
/// `(n − i)/(i + 1)` kept as a mantissa and a power of two, times `Σ_{i ≤ k} P(X = i)/P(X = k)`
/// from the ratios `P(X = i − 1)/P(X = i) = i/(n − i + 1) ≤ 1`. Relative error about `k·ε`.
fn binomial_half_cdf(k: u64, n: u64) -> f64 {
    if k >= n {
        return 1.0;
    }
    debug_assert!(2 * k <= n, "the ratios below k are at most 1 only for 2k ≤ n");
    let big = 2f64.powi(512);
    let (mut m, mut e) = (1.0f64, -(n as i64));
    for i in 0..k {
        m *= (n - i) as f64 / (i + 1) as f64;
        if m > big {
            m /= big;
            e += 512;
        }
    }
    let (mut sum, mut r) = (1.0f64, 1.0f64);
    for i in (1..=k).rev() {
        r *= i as f64 / (n - i + 1) as f64;
        if r < sum * 1e-20 {
            break;
        }
        sum += r;
    }
    (scale(m * sum, e)).min(1.0)
}

/// `v·2^e` for `v ≥ 0` and any `e`, in steps that never underflow before the end (the result is
/// 0 only where `v·2^e` is below f64's range).
fn scale(mut v: f64, mut e: i64) -> f64 {
    while e > 1000 {
        v *= 2f64.powi(1000);
        e -= 1000;
    }
    while e < -1000 {
        v *= 2f64.powi(-1000);
        e += 1000;
    }
    v * 2f64.powi(e as i32)
}

/// The complementary error function, to about 1e-15 relative: `erfc(x) = Q(½, x²)` for `x ≥ 0`,
/// the regularised upper incomplete gamma function (a series for `x² < 1.5`, a continued fraction
/// by the modified Lentz method above, as in Numerical Recipes' `gammq`), and `2 − erfc(−x)`
/// below 0.
pub fn erfc(x: f64) -> f64 {
    if x.is_nan() {
        return f64::NAN;
    }
    if x < 0.0 {
        return 2.0 - erfc(-x);
    }
    let z = x * x;
    if z == 0.0 {
        return 1.0;
    }
    const A: f64 = 0.5;
    const EPS: f64 = f64::EPSILON;
    const TINY: f64 = 1e-300;
    // The prefactor e^{−z} z^a / Γ(a) with Γ(½) = √π; e^{−z} on its own keeps the rounding of
    // a large exponent out of it.
    let front = (-z).exp() * z.sqrt() / std::f64::consts::PI.sqrt();
    if z < A + 1.0 {
        // P(a, z) = e^{−z} z^a / Γ(a + 1) · Σ zⁿ / ((a + 1)…(a + n)); Γ(a + 1) = a Γ(a).
        let (mut ap, mut del) = (A, 1.0 / A);
        let mut sum = del;
        for _ in 0..1000 {
            ap += 1.0;
            del *= z / ap;
            sum += del;
            if del.abs() < sum.abs() * EPS {
                break;
            }
        }
        1.0 - sum * front
    } else {
        // Q(a, z) = e^{−z} z^a / Γ(a) · 1 / (z + 1 − a − 1·(1 − a) / (z + 3 − a − …)).
        let mut b = z + 1.0 - A;
        let mut c = 1.0 / TINY;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1000 {
            let an = -(i as f64) * (i as f64 - A);
            b += 2.0;
            d = an * d + b;
            if d.abs() < TINY {
                d = TINY;
            }
            c = b + an / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            let del = d * c;
            h *= del;
            if (del - 1.0).abs() < EPS {
                break;
            }
        }
        front * h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= rel * want.abs().max(f64::MIN_POSITIVE)
    }

    // Values printed by `python3 scripts/stats_reference.py` (numpy 2.4.6, scipy 1.17.1,
    // statsmodels 0.15.0): statsmodels' `mcnemar(exact=True)` and `mcnemar(exact=False,
    // correction=True)`, checked there against scipy's `binomtest` and `chi2.sf`.
    // (b, c, exact p, chi2, chi2 p)
    const MCNEMAR: [(usize, usize, f64, f64, f64); 9] = [
        (0, 0, 1.0, 0.0, 1.0),
        (1, 0, 1.0, 0.0, 1.0),
        (5, 1, 0.21875, 1.5, 0.22067136191984324),
        (10, 3, 0.09228515625, 2.769230769230769, 0.0960923294556734),
        (25, 40, 0.08168153394154003, 3.0153846153846153, 0.08247788747320971),
        (100, 130, 0.05561357778139238, 3.6565217391304348, 0.055850113675743426),
        (3, 3, 1.0, 0.16666666666666666, 0.6830913983096086),
        (0, 7, 0.015625, 5.142857142857143, 0.02334220201289086),
        (1000, 1100, 0.03072070786424249, 4.667142857142857, 0.030745034758993192),
    ];

    #[test]
    fn mcnemar_matches_statsmodels() {
        for (b, c, exact_p, chi2, chi2_p) in MCNEMAR {
            let m = mcnemar_counts(b, c);
            assert_eq!((m.b, m.c), (b, c));
            assert!(close(m.exact_p, exact_p, 1e-12), "({b}, {c}): exact p {} vs {exact_p}", m.exact_p);
            assert!(close(m.chi2, chi2, 1e-14), "({b}, {c}): chi2 {} vs {chi2}", m.chi2);
            assert!(close(m.chi2_p, chi2_p, 1e-13), "({b}, {c}): chi2 p {} vs {chi2_p}", m.chi2_p);
            // Swapping the rows swaps b and c and changes no p.
            let s = mcnemar_counts(c, b);
            assert_eq!((s.b, s.c, s.exact_p, s.chi2, s.chi2_p), (c, b, m.exact_p, m.chi2, m.chi2_p));
        }
    }

    #[test]
    fn mcnemar_counts_only_discordant_questions() {
        // Questions: both right ×2, A only ×3, B only ×1, both wrong ×2.
        let a = [true, true, true, true, true, false, false, false];
        let b = [true, true, false, false, false, true, false, false];
        let m = mcnemar(&a, &b).unwrap();
        assert_eq!((m.b, m.c), (3, 1));
        // Exact p by hand: 2·P(X ≤ 1), X ~ Bin(4, ½) = 2·(1 + 4)/16.
        assert_eq!(m.exact_p, 0.625);
        // (|3 − 1| − 1)² / 4.
        assert_eq!(m.chi2, 0.25);
        let m = mcnemar(&b, &a).unwrap();
        assert_eq!((m.b, m.c), (1, 3));
    }

    #[test]
    fn mcnemar_refuses_outcome_lists_of_different_lengths() {
        let err = mcnemar(&[true, false], &[true]).unwrap_err().to_string();
        assert!(err.contains("row A has 2 and row B 1"), "{err}");
        assert_eq!(mcnemar(&[], &[]).unwrap(), McNemar { b: 0, c: 0, exact_p: 1.0, chi2: 0.0, chi2_p: 1.0 });
    }

    #[test]
    fn binomial_tail_matches_scipy() {
        // P(X ≤ k), X ~ Bin(n, ½) = Σ C(n, i) / 2ⁿ, by hand for n = 10.
        let binom = [1.0, 10.0, 45.0, 120.0, 210.0];
        let mut cum = 0.0;
        for (k, c) in binom.iter().enumerate() {
            cum += c;
            assert_eq!(binomial_half_cdf(k as u64, 10), cum / 1024.0, "k = {k}");
        }
        assert_eq!(binomial_half_cdf(10, 10), 1.0);
        // scipy.stats.binom.cdf(k, n, 0.5) from scripts/stats_reference.py (scipy 1.17.1): every
        // term of the n = 2000 tail is below 1e-41, 2^-5000 is below f64's range.
        let want = [
            (0, 1, 0.5),
            (3, 10, 0.171875),
            (30, 100, 3.925069822796835e-05),
            (700, 2000, 8.146748513801326e-42),
            (2400, 5000, 0.002441824868758747),
        ];
        for (k, n, p) in want {
            let got = binomial_half_cdf(k, n);
            assert!(close(got, p, 1e-12), "P(X ≤ {k}), n = {n}: {got} vs {p}");
        }
    }

    #[test]
    fn scale_reaches_the_whole_range() {
        assert_eq!(scale(1.5, 3), 12.0);
        assert_eq!(scale(1.0, -1074), f64::from_bits(1));
        assert_eq!(scale(2f64.powi(1000), -2000), 2f64.powi(-1000));
        assert_eq!(scale(1.0, -1080), 0.0);
        assert_eq!(scale(0.75, 1024), 0.75 * 2f64.powi(1023) * 2.0);
    }

    #[test]
    fn erfc_matches_scipy() {
        // scipy.special.erfc, from scripts/stats_reference.py (scipy 1.17.1); 1.2247 sits at the
        // switch from the series (x² < 1.5) to the continued fraction.
        let want = [
            (-2.0, 1.9953222650189528),
            (-0.5, 1.5204998778130465),
            (0.0, 1.0),
            (0.001, 0.9988716212090307),
            (0.1, 0.8875370839817152),
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028516),
            (1.2247, 0.08327581479808639),
            (1.3, 0.06599205505934758),
            (2.0, 0.004677734981047266),
            (3.0, 2.2090496998585445e-05),
            (5.0, 1.5374597944280347e-12),
            (10.0, 2.0884875837625446e-45),
            (26.0, 5.663192408856145e-296),
        ];
        for (x, e) in want {
            assert!(close(erfc(x), e, 1e-14), "erfc({x}) = {} vs {e}", erfc(x));
        }
        assert_eq!(erfc(40.0), 0.0);
        assert_eq!(erfc(-40.0), 2.0);
        assert!(erfc(f64::NAN).is_nan());
    }

    #[test]
    fn quantile_matches_numpy_percentile() {
        // np.percentile([3, 1, 4, 1.5, 9, 2.6, 5], 100·q) from scripts/stats_reference.py.
        let mut data = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0];
        data.sort_by(f64::total_cmp);
        let want = [(0.0, 1.0), (0.025, 1.075), (0.25, 2.05), (0.5, 3.0), (0.975, 8.399999999999999), (1.0, 9.0)];
        for (q, e) in want {
            assert!(close(quantile(&data, q), e, 1e-14), "q = {q}: {} vs {e}", quantile(&data, q));
        }
        assert_eq!(quantile(&[7.0], 0.3), 7.0);
    }

    /// A pooled accuracy over clusters of (right, questions): questions of a repeated cluster
    /// count again.
    fn pooled(clusters: &[(u32, u32)]) -> impl Fn(&[usize]) -> Option<f64> + '_ {
        move |idx| {
            let right: u32 = idx.iter().map(|&i| clusters[i].0).sum();
            let total: u32 = idx.iter().map(|&i| clusters[i].1).sum();
            (total > 0).then(|| right as f64 / total as f64)
        }
    }

    #[test]
    fn bootstrap_over_explicit_resamples_matches_numpy() {
        // The clusters, resamples and np.percentile(values, [2.5, 97.5]) of
        // scripts/stats_reference.py (numpy 2.4.6).
        let clusters = [(5, 5), (4, 5), (3, 5), (5, 5), (2, 5), (0, 5), (4, 5), (1, 5)];
        let resamples = [
            [1, 5, 0, 1, 2, 2, 7, 6],
            [7, 7, 0, 1, 6, 0, 1, 1],
            [7, 2, 2, 1, 3, 4, 6, 4],
            [7, 0, 3, 4, 5, 0, 1, 3],
            [0, 7, 5, 6, 4, 4, 2, 2],
            [1, 1, 6, 3, 6, 2, 5, 6],
            [6, 1, 2, 2, 6, 6, 3, 2],
            [0, 2, 1, 0, 6, 3, 7, 2],
            [3, 7, 4, 2, 2, 6, 2, 3],
            [3, 3, 3, 7, 1, 7, 1, 0],
            [2, 1, 5, 1, 1, 7, 6, 4],
            [7, 2, 0, 6, 0, 2, 3, 5],
        ];
        let stat = pooled(&clusters);
        assert_eq!(stat(&resamples[3]), Some(0.675));
        let i = bootstrap_over(clusters.len(), resamples, &stat).unwrap();
        assert_eq!(i.estimate, 0.6);
        assert!(close(i.lo, 0.51375, 1e-14) && close(i.hi, 0.75, 1e-14), "{i:?}");
    }

    #[test]
    fn bootstrap_by_hand_on_a_tiny_sample() {
        // Cluster 0: 2 questions, both right; cluster 1: 3 questions, 1 right.
        let clusters = [(2, 2), (1, 3)];
        let stat = pooled(&clusters);
        // A resample pools its clusters' questions, repeats included: (2 + 1 + 1) / (2 + 3 + 3).
        assert_eq!(stat(&[0, 1, 1]), Some(0.5));
        // Resample values: [0,0] → 1, [0,1] → 0.6, [1,1] → 1/3, [1,0] → 0.6, [1,1] → 1/3; sorted
        // [1/3, 1/3, 0.6, 0.6, 1]: 2.5% at rank 0.1 → 1/3, 97.5% at rank 3.9 → 0.6 + 0.9·0.4.
        let i = bootstrap_over(2, [[0, 0], [0, 1], [1, 1], [1, 0], [1, 1]], &stat).unwrap();
        assert_eq!(i.estimate, 0.6);
        assert!(close(i.lo, 1.0 / 3.0, 1e-15), "{i:?}");
        assert!(close(i.hi, 0.96, 1e-15), "{i:?}");
        assert!(i.excludes_zero());
    }

    #[test]
    fn equal_clusters_give_a_zero_width_interval() {
        let clusters = [(3, 5); 40];
        let i = bootstrap(clusters.len(), pooled(&clusters), DEFAULT_RESAMPLES, 1).unwrap();
        assert_eq!(i, Interval { estimate: 0.6, lo: 0.6, hi: 0.6 });
        assert_eq!(i.width(), 0.0);
    }

    #[test]
    fn resamples_where_the_statistic_is_undefined_are_skipped() {
        // The statistic is undefined on resamples without cluster 0.
        let defined_with_0 = |idx: &[usize]| idx.contains(&0).then_some(idx.len() as f64);
        let lists = [vec![0, 1], vec![1, 1], vec![0, 0]];
        assert_eq!(bootstrap_over(2, &lists, defined_with_0), Some(Interval { estimate: 2.0, lo: 2.0, hi: 2.0 }));
        // More than half skipped: no interval.
        let lists = [vec![0, 1], vec![1, 1], vec![1, 1]];
        assert_eq!(bootstrap_over(2, &lists, defined_with_0), None);
        // Undefined on the full sample, or no resample at all: no interval.
        assert_eq!(bootstrap_over(2, &lists, |_| None), None);
        assert_eq!(bootstrap_over(2, Vec::<Vec<usize>>::new(), |_| Some(1.0)), None);
        assert_eq!(bootstrap_over(2, &lists, |_| Some(f64::NAN)), None);
    }

    #[test]
    fn resamples_are_deterministic_and_uniform() {
        let a: Vec<Vec<usize>> = resample_indices(7, 50, 3).collect();
        let b: Vec<Vec<usize>> = resample_indices(7, 50, 3).collect();
        let c: Vec<Vec<usize>> = resample_indices(7, 50, 4).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().all(|r| r.len() == 7 && r.iter().all(|&i| i < 7)));
        // Each index is drawn about 1/7 of the time: 350 draws, expected 50 each.
        let mut counts = [0usize; 7];
        a.iter().flatten().for_each(|&i| counts[i] += 1);
        assert!(counts.iter().all(|&k| (30..=70).contains(&k)), "{counts:?}");
    }

    #[test]
    fn bootstrap_is_deterministic_given_the_seed_and_its_width_is_plausible() {
        // 200 clusters of one question each, 60% right: the interval of the accuracy should be
        // about ±1.96·√(0.6·0.4/200) = ±0.068 around 0.6.
        let clusters: Vec<(u32, u32)> = (0..200).map(|i| ((i % 5 < 3) as u32, 1)).collect();
        let run = |seed| bootstrap(clusters.len(), pooled(&clusters), DEFAULT_RESAMPLES, seed).unwrap();
        let i = run(5);
        assert_eq!(i, run(5));
        assert_eq!(i.estimate, 0.6);
        assert!(i.lo < 0.6 && 0.6 < i.hi, "{i:?}");
        assert!((i.width() - 2.0 * 0.068).abs() < 0.02, "{i:?}");
        assert!(i.excludes_zero());
    }

    #[test]
    fn another_seed_gives_another_interval() {
        // Clusters of 1 to 5 questions: pooled accuracies on a fine grid, so the quantiles of two
        // seeds' resamples differ.
        let clusters: Vec<(u32, u32)> = (0..50u32).map(|i| (i * 7 % (2 + i % 5), 1 + i % 5)).collect();
        let run = |seed| bootstrap(clusters.len(), pooled(&clusters), 400, seed).unwrap();
        let (a, b) = (run(5), run(6));
        assert_eq!(a.estimate, b.estimate);
        assert_ne!((a.lo, a.hi), (b.lo, b.hi));
        assert_eq!(a, run(5));
    }

    #[test]
    fn the_paired_difference_uses_the_same_resamples_for_both_rows() {
        let a: Vec<(u32, u32)> = (0..60).map(|i| ((i * 7 % 11 < 6) as u32, 1)).collect();
        let b: Vec<(u32, u32)> = (0..60).map(|i| ((i * 5 % 13 < 5) as u32, 1)).collect();
        let (sa, sb) = (pooled(&a), pooled(&b));
        // A row against itself: every resample's difference is exactly 0.
        let same = bootstrap_difference(a.len(), &sa, &sa, 500, 9).unwrap();
        assert_eq!(same, Interval { estimate: 0.0, lo: 0.0, hi: 0.0 });
        assert!(!same.excludes_zero());
        // Against a constant row: the interval of A alone, shifted (the resamples of `bootstrap`
        // with the same seed).
        let alone = bootstrap(a.len(), &sa, 500, 9).unwrap();
        let shifted = bootstrap_difference(a.len(), &sa, |_| Some(0.25), 500, 9).unwrap();
        assert!(close(shifted.estimate, alone.estimate - 0.25, 1e-15));
        assert!(close(shifted.lo, alone.lo - 0.25, 1e-14) && close(shifted.hi, alone.hi - 0.25, 1e-14));
        // Two different rows: the percentile of the per-resample differences, by hand.
        let d = bootstrap_difference(a.len(), &sa, &sb, 500, 9).unwrap();
        let mut diffs: Vec<f64> =
            resample_indices(a.len(), 500, 9).map(|r| sa(&r).unwrap() - sb(&r).unwrap()).collect();
        diffs.sort_by(f64::total_cmp);
        assert_eq!(d.estimate, sa(&(0..60).collect::<Vec<_>>()).unwrap() - sb(&(0..60).collect::<Vec<_>>()).unwrap());
        assert_eq!((d.lo, d.hi), (quantile(&diffs, 0.025), quantile(&diffs, 0.975)));
        assert!(d.width() > 0.0);
    }
}
