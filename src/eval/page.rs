//! The HTML page of one evaluation (`sage eval --html`): the report's numbers with their
//! intervals, then every image pair with its images, its anomaly map and selected patches, and
//! each question with the answer and whether it was right. [`super::html`] renders it.

use super::adpl::{truth, AdplReport};
use super::generate::PairMap;
use super::html::{Cell, HeatMap, PairView, QuestionView, ReportPage, SummaryTable};
use super::intervals::Metric;
use super::{FirstToken, Generated};
use crate::data::sample::{yes_no, Label, Sample};
use std::path::Path;

/// A number with its interval from the report, when it has one.
fn cell(r: &AdplReport, m: Metric, value: Option<f64>, digits: usize, percent: bool) -> Cell {
    let Some(v) = value else { return Cell::text("—") };
    let c = if percent { Cell::percent(v, digits) } else { Cell::num(v, digits) };
    match r.intervals.as_ref().and_then(|i| i.get(m)) {
        Some(i) => c.with_interval(i.lo, i.hi),
        None => c,
    }
}

/// The report's numbers as one table: metric, value [95% interval].
pub fn summary_table(r: &AdplReport) -> SummaryTable {
    let level = |i: usize| r.levels.get(i).and_then(|l| l.accuracy.accuracy);
    let mut rows = vec![
        ("Standard comparison (%)", cell(r, Metric::StandardComparison, level(0), 1, true)),
        ("Defect identification (%)", cell(r, Metric::DefectIdentification, level(1), 1, true)),
        ("Defect diagnosis (%)", cell(r, Metric::DefectDiagnosis, level(2), 1, true)),
        ("Accuracy, level mean (%)", cell(r, Metric::Average, r.average, 1, true)),
        ("Acc-G (%)", cell(r, Metric::AccG, r.acc_g.accuracy, 1, true)),
        ("SBERT", cell(r, Metric::Sbert, r.sbert.as_ref().map(|s| s.mean), 3, false)),
        ("MLE", cell(r, Metric::Mle, r.mle.as_ref().map(|m| m.mean), 2, false)),
        ("Model image AUROC", cell(r, Metric::ModelAuroc, r.model_auroc.as_ref().map(|m| m.auroc), 4, false)),
    ];
    let map = r.intervals.as_ref().and_then(|i| i.get(Metric::MapAuroc)).map(|i| i.estimate);
    rows.push(("Anomaly map image AUROC", cell(r, Metric::MapAuroc, map, 4, false)));
    rows.push(("Says Yes (%)", r.yes_share.map_or(Cell::text("—"), |v| Cell::percent(v, 1))));
    rows.push(("Truth is Yes (%)", r.truth_yes_share.map_or(Cell::text("—"), |v| Cell::percent(v, 1))));
    SummaryTable {
        caption: "Summary (brackets: 95% bootstrap intervals over image pairs)".into(),
        columns: vec!["Metric".into(), "Value".into()],
        rows: rows.into_iter().map(|(name, c)| vec![Cell::text(name), c]).collect(),
    }
}

/// The page of an evaluation of `data`: `texts` are the generated answers, `first` the
/// first-token records, `maps` each pair's anomaly map.
pub fn page(
    data: &Path,
    samples: &[Sample],
    r: &AdplReport,
    texts: &[Generated],
    first: Option<&[FirstToken]>,
    maps: Option<&[Option<PairMap>]>,
) -> ReportPage {
    // Both were arranged once already by the report (which refuses bad indices), so these cannot fail.
    let by_text = super::arrange(samples, texts).unwrap_or_default();
    let by_first = first.and_then(|f| super::adpl::arrange_first(samples, f).ok()).unwrap_or_default();
    let find_text = |i: usize, j: usize| by_text.get(i).and_then(|r| r.get(j).copied().flatten());
    let find_first = |i: usize, j: usize| by_first.get(i).and_then(|r| r.get(j).copied().flatten());
    let pairs = samples
        .iter()
        .enumerate()
        .map(|(i, s)| PairView {
            id: s.id.clone(),
            label: s.label.map(|l| Label::as_str(l).to_string()),
            test_image: s.test_image.clone(),
            reference_image: s.reference_image.clone(),
            map: maps.and_then(|m| m.get(i)).and_then(Option::as_ref).map(|m| HeatMap {
                w: m.w,
                h: m.h,
                values: m.values.clone(),
                selected: m.selected.iter().map(|&k| k as usize).collect(),
                image_score: Some(m.score),
            }),
            questions: s
                .questions
                .iter()
                .enumerate()
                .map(|(j, q)| {
                    let ft = find_first(i, j);
                    let answer = match (find_text(i, j), ft) {
                        (Some(text), _) => text.to_string(),
                        (None, Some(f)) => format!("{} (first token)", f.choice()),
                        (None, None) => String::new(),
                    };
                    QuestionView {
                        level: q.level.map(|l| l.pair_type().to_string()),
                        text: q.text.clone(),
                        answer,
                        truth: truth(q).map(|t| yes_no(t).to_string()),
                        p_yes: ft.and_then(|f| f.p_of("Yes")),
                        right: r.pairs.get(i).and_then(|p| p.right.get(j).copied().flatten()),
                    }
                })
                .collect(),
        })
        .collect();
    ReportPage {
        title: format!("sage eval: {}", data.display()),
        intro: format!(
            "{} image pairs, {} questions; conclusions from {}; {} generated answers.",
            samples.len(),
            samples.iter().map(|s| s.questions.len()).sum::<usize>(),
            match first {
                Some(_) => "the first token's Yes/No probabilities",
                None => "the generated answers",
            },
            texts.len()
        ),
        summary: vec![summary_table(r)],
        pairs,
    }
}
