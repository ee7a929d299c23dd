//! How sure the numbers of an AD-PL report are (ARCHITECTURE.md §6): 95% bootstrap intervals
//! that resample image pairs (a pair's five questions move together, [`super::stats`]), and
//! paired comparisons of two reports on the same pairs: the bootstrap interval of the difference
//! (the same resampled pairs for both) and McNemar's test on the conclusions.
//!
//! Everything is computed from the reports' [`PairRecord`]s, so `sage demo` compares rows from
//! the JSON reports alone.

use super::pair_record::PairRecord;
use super::stats::{bootstrap, mcnemar, Interval, McNemar};
use crate::data::sample::Level;
use crate::user_bail;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Bootstrap resamples and seed used everywhere (fixed: a report is reproducible).
pub const RESAMPLES: usize = 2000;
pub const SEED: u64 = 17;

/// A number of the report that can be resampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    StandardComparison,
    DefectIdentification,
    DefectDiagnosis,
    /// The mean of the levels' accuracies.
    Average,
    AccG,
    Sbert,
    Mle,
    ModelAuroc,
    /// The training-free map's image AUROC on the same pairs.
    MapAuroc,
}

impl Metric {
    pub const ALL: [Metric; 9] = [
        Metric::StandardComparison,
        Metric::DefectIdentification,
        Metric::DefectDiagnosis,
        Metric::Average,
        Metric::AccG,
        Metric::Sbert,
        Metric::Mle,
        Metric::ModelAuroc,
        Metric::MapAuroc,
    ];

    fn level(self) -> Option<Level> {
        match self {
            Metric::StandardComparison => Some(Level::StandardComparison),
            Metric::DefectIdentification => Some(Level::DefectIdentification),
            Metric::DefectDiagnosis => Some(Level::DefectDiagnosis),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::StandardComparison => "standard comparison",
            Metric::DefectIdentification => "defect identification",
            Metric::DefectDiagnosis => "defect diagnosis",
            Metric::Average => "accuracy (level mean)",
            Metric::AccG => "Acc-G",
            Metric::Sbert => "SBERT",
            Metric::Mle => "MLE",
            Metric::ModelAuroc => "model AUROC",
            Metric::MapAuroc => "map AUROC",
        }
    }
}

/// A level's accuracy over the pairs `idx` (repeats count again).
fn level_accuracy(pairs: &[PairRecord], idx: &[usize], level: Level) -> Option<f64> {
    let (mut right, mut total) = (0usize, 0usize);
    for &i in idx {
        let p = &pairs[i];
        for (l, r) in p.levels.iter().zip(&p.right) {
            if let (Some(l), Some(r)) = (l, r) {
                if *l == level {
                    right += *r as usize;
                    total += 1;
                }
            }
        }
    }
    (total > 0).then(|| right as f64 / total as f64)
}

/// The mean of `f`'s values over the pairs `idx`.
fn pooled_mean(pairs: &[PairRecord], idx: &[usize], f: fn(&PairRecord) -> &[f64]) -> Option<f64> {
    let (sum, n) = idx.iter().flat_map(|&i| f(&pairs[i])).fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The image AUROC of score `f` over the labelled pairs `idx` that have one.
fn auroc(pairs: &[PairRecord], idx: &[usize], f: fn(&PairRecord) -> Option<f64>) -> Option<f64> {
    let (s, l): (Vec<f32>, Vec<bool>) =
        idx.iter().filter_map(|&i| Some((f(&pairs[i])? as f32, pairs[i].anomalous?))).unzip();
    crate::metrics::auroc(&s, &l)
}

/// The pairs that carry metric `m`: those with a scored question (accuracies), every question
/// scored (Acc-G), generated answers (SBERT), judged answers (MLE), or a score and a label
/// (AUROCs). A metric's intervals resample these pairs only: SBERT and MLE come from the
/// generated subset, and the pairs outside it would only add empty draws.
pub fn carriers(pairs: &[PairRecord], m: Metric) -> Vec<usize> {
    let has = |p: &PairRecord| match m {
        Metric::AccG => p.complete,
        Metric::Sbert => !p.sbert.is_empty(),
        Metric::Mle => !p.mle.is_empty(),
        Metric::ModelAuroc => p.p_anomalous.is_some() && p.anomalous.is_some(),
        Metric::MapAuroc => p.map_score.is_some() && p.anomalous.is_some(),
        _ => p.right.iter().zip(&p.levels).any(|(r, l)| r.is_some() && (m.level().is_none() || *l == m.level())),
    };
    (0..pairs.len()).filter(|&i| has(&pairs[i])).collect()
}

/// The bootstrap of `stat` over the pairs `over` (indices into the report's pairs); `None` with
/// fewer than two pairs, where a resample can only repeat the one there is.
fn bootstrap_over_pairs(over: &[usize], stat: impl Fn(&[usize]) -> Option<f64>) -> Option<Interval> {
    if over.len() < 2 {
        return None;
    }
    bootstrap(over.len(), |idx| stat(&idx.iter().map(|&i| over[i]).collect::<Vec<_>>()), RESAMPLES, SEED)
}

/// Metric `m` computed over the pairs `idx` (a resample; `0..n` is the report's own number).
pub fn metric(pairs: &[PairRecord], idx: &[usize], m: Metric) -> Option<f64> {
    if let Some(l) = m.level() {
        return level_accuracy(pairs, idx, l);
    }
    match m {
        Metric::Average => super::mean_of(Level::ALL.iter().map(|&l| level_accuracy(pairs, idx, l))),
        Metric::AccG => {
            let complete: Vec<bool> = idx
                .iter()
                .filter(|&&i| pairs[i].complete)
                .map(|&i| pairs[i].right.iter().all(|r| *r == Some(true)))
                .collect();
            (!complete.is_empty()).then(|| complete.iter().filter(|&&r| r).count() as f64 / complete.len() as f64)
        }
        Metric::Sbert => pooled_mean(pairs, idx, |p| &p.sbert),
        Metric::Mle => pooled_mean(pairs, idx, |p| &p.mle),
        Metric::ModelAuroc => auroc(pairs, idx, |p| p.p_anomalous),
        Metric::MapAuroc => auroc(pairs, idx, |p| p.map_score),
        _ => unreachable!("levels handled above"),
    }
}

/// The 95% intervals of every metric a report has, over [`RESAMPLES`] resamples of its pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdplIntervals {
    pub resamples: usize,
    pub seed: u64,
    pub metrics: BTreeMap<Metric, Interval>,
    /// The model's AUROC minus the map's, on the same resampled pairs (when both exist).
    pub model_minus_map: Option<Interval>,
}

impl AdplIntervals {
    pub fn compute(pairs: &[PairRecord]) -> AdplIntervals {
        let metrics = Metric::ALL
            .iter()
            .filter_map(|&m| Some((m, bootstrap_over_pairs(&carriers(pairs, m), |idx| metric(pairs, idx, m))?)))
            .collect();
        let map = carriers(pairs, Metric::MapAuroc);
        let both: Vec<usize> = carriers(pairs, Metric::ModelAuroc).into_iter().filter(|i| map.contains(i)).collect();
        let model_minus_map = bootstrap_over_pairs(&both, |idx| {
            Some(metric(pairs, idx, Metric::ModelAuroc)? - metric(pairs, idx, Metric::MapAuroc)?)
        });
        AdplIntervals { resamples: RESAMPLES, seed: SEED, metrics, model_minus_map }
    }

    pub fn get(&self, m: Metric) -> Option<&Interval> {
        self.metrics.get(&m)
    }
}

/// Row `a` against row `b` on one metric: the difference `a − b` with its paired bootstrap
/// interval, and, for accuracies, McNemar's test on the questions (Acc-G: on the pairs) both
/// scored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Paired {
    pub metric: Metric,
    pub difference: Interval,
    pub mcnemar: Option<McNemar>,
}

/// The outcomes McNemar's test pairs up for metric `m`: per question (of a level, or all) or per
/// pair (Acc-G); `None` for metrics that are not shares of right answers.
fn outcomes(a: &[PairRecord], b: &[PairRecord], m: Metric) -> Option<(Vec<bool>, Vec<bool>)> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    match m {
        Metric::AccG => {
            for (p, q) in a.iter().zip(b) {
                if p.complete && q.complete {
                    x.push(p.right.iter().all(|r| *r == Some(true)));
                    y.push(q.right.iter().all(|r| *r == Some(true)));
                }
            }
        }
        Metric::Sbert | Metric::Mle | Metric::ModelAuroc | Metric::MapAuroc => return None,
        _ => {
            let level = m.level();
            for (p, q) in a.iter().zip(b) {
                for ((l, r), s) in p.levels.iter().zip(&p.right).zip(&q.right) {
                    if let (Some(r), Some(s)) = (r, s) {
                        if level.is_none() || *l == level {
                            x.push(*r);
                            y.push(*s);
                        }
                    }
                }
            }
        }
    }
    Some((x, y))
}

/// Compares rows `a` and `b` (two reports on the same pairs, in the same order) on metric `m`;
/// `None` when either lacks the metric. Reports on different pairs are a user error.
pub fn compare(a: &[PairRecord], b: &[PairRecord], m: Metric) -> Result<Option<Paired>> {
    if a.len() != b.len() || a.iter().zip(b).any(|(p, q)| p.id != q.id || p.right.len() != q.right.len()) {
        user_bail!(
            "the two reports were not made on the same image pairs ({} and {} pairs); compare evaluations of one \
             data file",
            a.len(),
            b.len()
        );
    }
    // The pairs both rows carry the metric on, resampled alike for both.
    let in_b = carriers(b, m);
    let over: Vec<usize> = carriers(a, m).into_iter().filter(|i| in_b.contains(i)).collect();
    let Some(difference) = bootstrap_over_pairs(&over, |idx| Some(metric(a, idx, m)? - metric(b, idx, m)?)) else {
        return Ok(None);
    };
    let mcnemar = match outcomes(a, b, m) {
        Some((x, y)) => Some(mcnemar(&x, &y)?),
        None => None,
    };
    Ok(Some(Paired { metric: m, difference, mcnemar }))
}

/// One metric of two reports side by side: each row's value on its pairs and the paired
/// comparison.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReportComparison {
    pub metric: Metric,
    pub a: Option<f64>,
    pub b: Option<f64>,
    pub paired: Option<Paired>,
}

/// The pairs of the AD-PL report `sage eval --out` wrote as JSON at `path`.
pub fn read_pairs(path: &std::path::Path) -> Result<Vec<PairRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::user_err!("cannot read {}: {e}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        crate::user_err!("{} is not JSON: {e} (give the .json report `sage eval --out` writes)", path.display())
    })?;
    let pairs = v.get("adpl").and_then(|a| a.get("pairs")).ok_or_else(|| {
        crate::user_err!(
            "{} has no per-pair records (adpl.pairs): it is not an AD-PL report, or was written before sage kept \
             them; evaluate again with this version",
            path.display()
        )
    })?;
    serde_json::from_value(pairs.clone())
        .map_err(|e| crate::user_err!("{}: adpl.pairs does not parse: {e}", path.display()))
}

/// Every metric of the reports at `a` and `b` compared (`sage compare`).
pub fn compare_reports(a: &std::path::Path, b: &std::path::Path) -> Result<Vec<ReportComparison>> {
    let (pa, pb) = (read_pairs(a)?, read_pairs(b)?);
    let (all_a, all_b): (Vec<usize>, Vec<usize>) = ((0..pa.len()).collect(), (0..pb.len()).collect());
    Metric::ALL
        .iter()
        .map(|&m| {
            Ok(ReportComparison {
                metric: m,
                a: metric(&pa, &all_a, m),
                b: metric(&pb, &all_b, m),
                paired: compare(&pa, &pb, m)
                    .map_err(|e| crate::user_err!("{} against {}: {e}", a.display(), b.display()))?,
            })
        })
        .collect()
}

/// The comparisons as a markdown table.
pub fn comparison_markdown(rows: &[ReportComparison]) -> String {
    let f = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.4}"));
    let mut md = String::from(
        "| Metric | A | B | A − B [95% paired bootstrap] | McNemar b/c, exact p |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        let d = r.paired.as_ref().map_or("—".to_string(), |p| {
            let d = &p.difference;
            let star = if d.excludes_zero() { " *" } else { "" };
            format!("{:+.4} [{:+.4}, {:+.4}]{star}", d.estimate, d.lo, d.hi)
        });
        let mc = r
            .paired
            .as_ref()
            .and_then(|p| p.mcnemar)
            .map_or("—".to_string(), |m| format!("{}/{}, p = {:.4}", m.b, m.c, m.exact_p));
        md.push_str(&format!("| {} | {} | {} | {d} | {mc} |\n", r.metric.name(), f(r.a), f(r.b)));
    }
    md.push_str("\n`*`: the interval excludes 0. Shares are fractions (0.5 = 50%).\n");
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    const SC: Option<Level> = Some(Level::StandardComparison);
    const DD: Option<Level> = Some(Level::DefectDiagnosis);

    fn pair(id: &str, right: &[Option<bool>], levels: &[Option<Level>], anomalous: bool, p: f64) -> PairRecord {
        PairRecord {
            id: id.into(),
            anomalous: Some(anomalous),
            levels: levels.to_vec(),
            right: right.to_vec(),
            complete: right.iter().all(Option::is_some),
            p_anomalous: Some(p),
            map_score: Some(1.0 - p),
            sbert: vec![p],
            mle: vec![],
        }
    }

    fn rows() -> Vec<PairRecord> {
        vec![
            pair("a", &[Some(true), Some(false)], &[SC, DD], true, 0.9),
            pair("b", &[Some(true), Some(true)], &[SC, DD], false, 0.2),
            pair("c", &[Some(false), None], &[SC, DD], true, 0.6),
        ]
    }

    #[test]
    fn metrics_over_a_resample_count_repeated_pairs_again() {
        let p = rows();
        // All pairs: SC 2/3, DD 1/2 (c's DD unscored); average (2/3 + 1/2)/2; Acc-G over the
        // complete a, b: 1/2.
        let all = [0, 1, 2];
        assert_eq!(metric(&p, &all, Metric::StandardComparison), Some(2.0 / 3.0));
        assert_eq!(metric(&p, &all, Metric::DefectDiagnosis), Some(0.5));
        assert_eq!(metric(&p, &all, Metric::DefectIdentification), None);
        assert!((metric(&p, &all, Metric::Average).unwrap() - 7.0 / 12.0).abs() < 1e-12);
        assert_eq!(metric(&p, &all, Metric::AccG), Some(0.5));
        assert_eq!(metric(&p, &all, Metric::Mle), None);
        // The resample [a, a, c]: SC 2/3, DD 0/2, Acc-G 0/2, SBERT (0.9 + 0.9 + 0.6)/3.
        let r = [0, 0, 2];
        assert_eq!(metric(&p, &r, Metric::StandardComparison), Some(2.0 / 3.0));
        assert_eq!(metric(&p, &r, Metric::DefectDiagnosis), Some(0.0));
        assert_eq!(metric(&p, &r, Metric::AccG), Some(0.0));
        assert!((metric(&p, &r, Metric::Sbert).unwrap() - 0.8).abs() < 1e-12);
        // Model AUROC: anomalous a 0.9, c 0.6 against normal b 0.2 → 1; the map (1 − p) → 0.
        assert_eq!(metric(&p, &all, Metric::ModelAuroc), Some(1.0));
        assert_eq!(metric(&p, &all, Metric::MapAuroc), Some(0.0));
        // A resample without a normal pair has no AUROC.
        assert_eq!(metric(&p, &[0, 2, 2], Metric::ModelAuroc), None);
        let i = AdplIntervals::compute(&p);
        let sc = i.get(Metric::StandardComparison).unwrap();
        assert!(sc.lo <= sc.estimate && sc.estimate <= sc.hi && sc.lo >= 0.0 && sc.hi <= 1.0, "{sc:?}");
        assert!(i.get(Metric::Mle).is_none());
        assert!(i.model_minus_map.unwrap().estimate == 1.0);
    }

    #[test]
    fn paired_comparisons_of_equal_and_opposite_rows() {
        let a = rows();
        let same = compare(&a, &a, Metric::Average).unwrap().unwrap();
        assert_eq!((same.difference.lo, same.difference.estimate, same.difference.hi), (0.0, 0.0, 0.0));
        let m = same.mcnemar.unwrap();
        assert_eq!((m.b, m.c, m.exact_p), (0, 0, 1.0));
        // b: every scored question wrong. A − B on the standard comparison is A's own accuracy.
        let b: Vec<PairRecord> = a
            .iter()
            .map(|p| PairRecord { right: p.right.iter().map(|r| r.map(|_| false)).collect(), ..p.clone() })
            .collect();
        let d = compare(&a, &b, Metric::StandardComparison).unwrap().unwrap();
        assert!((d.difference.estimate - 2.0 / 3.0).abs() < 1e-12);
        // McNemar over the SC questions both scored: A right and B wrong on a and b, never the reverse.
        let m = d.mcnemar.unwrap();
        assert_eq!((m.b, m.c), (2, 0));
        // Over all levels: a's SC, b's two → 3 discordant.
        assert_eq!(compare(&a, &b, Metric::Average).unwrap().unwrap().mcnemar.unwrap().b, 3);
        assert!(compare(&a, &b, Metric::Sbert).unwrap().unwrap().mcnemar.is_none());
        // A metric only one pair carries has no interval (a resample can only repeat it).
        let mut one = a.clone();
        one.iter_mut().skip(1).for_each(|p| p.sbert.clear());
        assert_eq!(carriers(&one, Metric::Sbert), vec![0]);
        assert!(compare(&one, &one, Metric::Sbert).unwrap().is_none());
        assert!(AdplIntervals::compute(&one).get(Metric::Sbert).is_none());
        // Reports on other pairs cannot be compared.
        let e = compare(&a, &a[..2], Metric::Average).unwrap_err();
        assert!(crate::error::is_user_error(&e) && e.to_string().contains("same image pairs"), "{e}");
    }
}
