//! The ablation table's paired comparisons: which differences between rows are real. Each
//! comparison resamples the image pairs both rows answered (the same resample for both) and,
//! for accuracies, runs McNemar's test on the questions ([`crate::eval::intervals::compare`]).

use crate::eval::intervals::{compare, Metric, Paired};
use crate::eval::pair_record::PairRecord;

/// A row of the table as the comparisons see it: its name and the image pairs it answered.
pub struct RowPairs<'a> {
    pub row: &'a str,
    pub pairs: &'a [PairRecord],
}

/// The comparisons the method's claims rest on: (row A, row B), read as "A − B".
pub const COMPARISONS: [(&str, &str); 6] = [
    ("+Fact[FE]", "+Fact[Hard]"),
    ("+Fact[FE]", "Baseline"),
    ("Full (E-DPO)", "SFE+DPO"),
    ("+DPO", "Baseline"),
    ("SFE+DPO", "+Fact[FE]"),
    ("Full (E-DPO)", "+Fact[FE]"),
];

/// `a − b` on metric `m`, when both rows carry their pairs and the metric.
fn diff(a: &RowPairs, b: &RowPairs, m: Metric) -> Option<Paired> {
    compare(a.pairs, b.pairs, m).ok().flatten()
}

/// A difference with its interval, `*` when the interval excludes 0 (`scale` 100: points).
fn cell(p: Option<&Paired>, scale: f64, digits: usize) -> String {
    match p {
        Some(p) => {
            let d = &p.difference;
            format!(
                "{:+.digits$} [{:+.digits$}, {:+.digits$}]{}",
                d.estimate * scale,
                d.lo * scale,
                d.hi * scale,
                if d.excludes_zero() { " *" } else { "" }
            )
        }
        None => "—".into(),
    }
}

/// The markdown table of [`COMPARISONS`] between `rows` (empty when no row carries pairs).
pub fn paired_table(rows: &[RowPairs]) -> String {
    let by_name = |n: &str| rows.iter().find(|r| r.row == n && !r.pairs.is_empty());
    let mut md = String::new();
    for (a, b) in COMPARISONS {
        let (Some(ra), Some(rb)) = (by_name(a), by_name(b)) else { continue };
        let acc = diff(ra, rb, Metric::Average);
        let mc = acc.as_ref().and_then(|p| p.mcnemar);
        md.push_str(&format!(
            "| {a} − {b} | {} | {} | {} | {} | {} | {} |\n",
            cell(acc.as_ref(), 100.0, 1),
            mc.map_or("—".into(), |m| format!("{}/{}, p = {:.3}", m.b, m.c, m.exact_p)),
            cell(diff(ra, rb, Metric::AccG).as_ref(), 100.0, 1),
            cell(diff(ra, rb, Metric::ModelAuroc).as_ref(), 1.0, 3),
            cell(diff(ra, rb, Metric::Sbert).as_ref(), 1.0, 3),
            cell(diff(ra, rb, Metric::Mle).as_ref(), 1.0, 2),
        ));
    }
    if md.is_empty() {
        return md;
    }
    format!(
        "\n### Paired differences\n\nA − B on the same image pairs: the difference with its paired 95% bootstrap \
         interval (`*`: the interval excludes 0), and McNemar's exact test on the questions' conclusions (b: A right \
         and B wrong, c: the reverse). Accuracy and Acc-G in points.\n\n| A − B | Δ Accuracy | McNemar b/c, p | \
         Δ Acc-G | Δ Model AUROC | Δ SBERT | Δ MLE |\n|---|---|---|---|---|---|---|\n{md}"
    )
}
