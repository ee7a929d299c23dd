//! The ablation table (`demo.md`): one row per evaluated checkpoint, read back from its eval
//! report.

use super::compare::{paired_table, RowPairs};
use super::profile::Profile;
use crate::eval::intervals::{AdplIntervals, Metric};
use crate::eval::pair_record::PairRecord;
use crate::eval::{num, pct};
use serde::Serialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize)]
pub struct TableRow {
    pub row: String,
    pub checkpoint: PathBuf,
    pub accuracy: Option<f64>,
    pub acc_g: Option<f64>,
    pub sbert: Option<f64>,
    pub mle: Option<f64>,
    pub questions: usize,
    /// The report's 95% intervals (reports made before intervals existed have none).
    pub intervals: Option<AdplIntervals>,
    pub yes_share: Option<f64>,
    pub truth_yes_share: Option<f64>,
    pub model_auroc: Option<f64>,
    /// What the paired comparisons resample.
    #[serde(skip)]
    pub pairs: Vec<PairRecord>,
}

impl TableRow {
    /// Row `name` from the JSON report `sage eval --out` wrote for `checkpoint`.
    pub fn from_report(name: &str, checkpoint: PathBuf, report: &Value) -> TableRow {
        let ad = &report["adpl"];
        TableRow {
            row: name.to_string(),
            checkpoint,
            accuracy: ad["average"].as_f64(),
            acc_g: ad["acc_g"]["accuracy"].as_f64(),
            sbert: ad["sbert"]["mean"].as_f64(),
            mle: ad["mle"]["mean"].as_f64(),
            questions: report["questions"].as_u64().unwrap_or(0) as usize,
            intervals: serde_json::from_value(ad["intervals"].clone()).ok(),
            yes_share: ad["yes_share"].as_f64(),
            truth_yes_share: ad["truth_yes_share"].as_f64(),
            model_auroc: ad["model_auroc"]["auroc"].as_f64(),
            pairs: serde_json::from_value(ad["pairs"].clone()).unwrap_or_default(),
        }
    }

    /// `value` of metric `m` with its interval: `82.1 [78.0, 85.9]` (`scale` 100 for shares).
    fn with_ci(&self, m: Metric, value: Option<f64>, scale: f64, digits: usize) -> String {
        let Some(v) = value else { return "—".into() };
        match self.intervals.as_ref().and_then(|i| i.get(m)) {
            Some(i) => format!("{:.digits$} [{:.digits$}, {:.digits$}]", v * scale, i.lo * scale, i.hi * scale),
            None => format!("{:.digits$}", v * scale),
        }
    }
}

/// The table with intervals (reports made with them): every number with its 95% interval, the
/// model's image AUROC, the share of Yes answers beside the truth's, and the map's AUROC on the
/// same pairs.
fn interval_table(rows: &[TableRow]) -> String {
    let mut md = String::from(
        "| Row | Accuracy (%) | Acc-G (%) | SBERT | MLE | Model AUROC | Map AUROC (same pairs) | Says Yes (%) | Truth Yes (%) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for t in rows {
        let map = t.intervals.as_ref().and_then(|i| i.get(Metric::MapAuroc)).map(|i| i.estimate);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            t.row,
            t.with_ci(Metric::Average, t.accuracy, 100.0, 1),
            t.with_ci(Metric::AccG, t.acc_g, 100.0, 1),
            t.with_ci(Metric::Sbert, t.sbert, 1.0, 3),
            t.with_ci(Metric::Mle, t.mle, 1.0, 2),
            t.with_ci(Metric::ModelAuroc, t.model_auroc, 1.0, 3),
            t.with_ci(Metric::MapAuroc, map, 1.0, 3),
            pct(t.yes_share),
            pct(t.truth_yes_share),
        ));
    }
    md
}

/// How long a demo took, in seconds: this invocation, and — when it resumed a folder — the
/// recorded times of the stages that ran in the invocations before it.
#[derive(Clone, Copy, Debug, Default)]
pub struct WallTime {
    pub this_run: f64,
    pub earlier_stages: f64,
}

impl WallTime {
    /// The sentence `demo.md` ends with (before where everything is).
    fn sentence(&self) -> String {
        let min = |s: f64| s / 60.0;
        if self.earlier_stages > 0.0 {
            format!(
                "Wall time: {:.1} min in this invocation, which resumed the run; the stages of the invocations \
                 before it took {:.1} min, so {:.1} min in all.",
                min(self.this_run),
                min(self.earlier_stages),
                min(self.this_run + self.earlier_stages)
            )
        } else {
            format!("Wall time: {:.1} min.", min(self.this_run))
        }
    }
}

/// `demo.md`: the table, the majority class of the evaluated questions (`majority`, from an
/// eval report), the anomaly map's AUROC (`map`, `sage map --eval-elpv --json`), the wall time
/// and where everything is.
pub fn markdown(p: &Profile, rows: &[TableRow], majority: &Value, map: &Value, wall: WallTime, out: &Path) -> String {
    let all_or = |n: usize| if n == 0 { "all".to_string() } else { n.to_string() };
    let mut md = format!(
        "# sage demo ({} profile)\n\nELPV, backbone `{}` ({}){}, LoRA r8; {} training items, \
         {} evaluated questions ({} test items{}), rubric judge. Accuracy is the mean of the three levels' conclusion \
         accuracies.\n\n",
        p.name,
        p.backbone,
        crate::models::backbone::builtin(p.backbone).map_or("an external backbone plugin", |b| b.description),
        if p.map_cue { ", the map's score stated in the prompt (model.map_cue)" } else { "" },
        all_or(p.train_items),
        rows.first().map_or(0, |r| r.questions),
        all_or(p.eval_items),
        if p.balanced_eval && p.eval_items > 0 { ", half of them anomalous" } else { "" },
    );
    if rows.iter().any(|r| r.intervals.is_some()) {
        md.push_str(&format!(
            "Conclusions {}; SBERT and MLE on {}. Brackets: 95% bootstrap intervals over image pairs.\n\n",
            if p.first_token { "from the first token's Yes/No probabilities" } else { "from the generated answers" },
            match p.generate_items {
                Some(n) => format!("the generated answers of the first {n} test items"),
                None => "every generated answer".into(),
            }
        ));
        md.push_str(&interval_table(rows));
        let pairs: Vec<RowPairs> = rows.iter().map(|r| RowPairs { row: &r.row, pairs: &r.pairs }).collect();
        md.push_str(&paired_table(&pairs));
    } else {
        md.push_str("| Row | Accuracy (%) | Acc-G (%) | SBERT | MLE |\n|---|---|---|---|---|\n");
        for t in rows {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} |\n",
                t.row,
                pct(t.accuracy),
                pct(t.acc_g),
                num(t.sbert, 3),
                num(t.mle, 2)
            ));
        }
    }
    md.push_str(&format!(
        "\nMajority class of the evaluated questions: {} {}%.\nTraining-free anomaly map (all {} ELPV cells): image AUROC {}.\n\n{} Reports, answers, configs and logs: {}\n",
        majority["answer"].as_str().unwrap_or("—"),
        pct(majority["rate"].as_f64()),
        map["cells"].as_u64().unwrap_or(0),
        num(map["image_auroc"].as_f64(), 4),
        wall.sentence(),
        out.display()
    ));
    md
}

#[cfg(test)]
mod tests {
    use super::super::profile::{Profile, QUICK, ROWS};
    use super::*;

    fn wall(this_run: f64) -> WallTime {
        WallTime { this_run, earlier_stages: 0.0 }
    }

    #[test]
    fn a_resumed_demo_states_both_times_and_their_sum() {
        let resumed = WallTime { this_run: 90.0, earlier_stages: 3600.0 };
        assert_eq!(
            resumed.sentence(),
            "Wall time: 1.5 min in this invocation, which resumed the run; the stages of the invocations \
             before it took 60.0 min, so 61.5 min in all."
        );
        assert_eq!(wall(90.0).sentence(), "Wall time: 1.5 min.");
    }

    fn read(p: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    /// The committed quick demo's eval reports and map log give back its demo.md byte for byte
    /// (the wall time, which no report holds, is read from demo.md itself).
    #[test]
    fn the_committed_quick_demo_table_is_rebuilt_from_its_reports() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/results/demo-quick");
        let mut majority = Value::Null;
        let rows: Vec<TableRow> = ROWS
            .iter()
            .map(|r| {
                let stem = match r.pref {
                    None => format!("sfe-{}", r.sfe),
                    Some((_, name)) => format!("edpo-{name}"),
                };
                let report = read(&dir.join("eval").join(format!("{stem}.json")));
                majority = report["adpl"]["majority"].clone();
                TableRow::from_report(r.name, stem.into(), &report)
            })
            .collect();
        let map = read(&dir.join("logs/map-elpv.txt"));
        let committed = std::fs::read_to_string(dir.join("demo.md")).unwrap();
        let minutes: f64 = committed
            .split("Wall time: ")
            .nth(1)
            .and_then(|rest| rest.split(" min").next())
            .and_then(|m| m.parse().ok())
            .expect("demo.md states its wall time");
        // That run evaluated the first ten test items, before the quick profile balanced them.
        let then = Profile { balanced_eval: false, ..QUICK };
        let md = markdown(&then, &rows, &majority, &map, wall(minutes * 60.0), Path::new("runs/demo-quick"));
        // That demo.md was written before the header named the backbone by its registry entry.
        let committed = committed.replace(
            "ELPV, SmolLM2-135M-Instruct + EfficientNet-Lite0 (`lite`)",
            "ELPV, backbone `lite` (EfficientNet-Lite0 patch features (14x14 x 152) + SmolLM2-135M-Instruct (GGUF Q4_1))",
        );
        assert_eq!(md, committed);
    }

    #[test]
    fn missing_numbers_print_as_dashes() {
        let rows = [TableRow::from_report("+DPO", "b".into(), &serde_json::json!({"adpl": {}}))];
        let md = markdown(&QUICK, &rows, &Value::Null, &Value::Null, wall(6.0), Path::new("o"));
        assert!(md.contains("| +DPO | — | — | — | — |\n"), "{md}");
        assert!(md.contains("0 evaluated questions (10 test items, half of them anomalous)"), "{md}");
        assert!(md.contains("questions: — —%.\nTraining-free anomaly map (all 0 ELPV cells): image AUROC —."), "{md}");
    }
}
