//! `sage eval` from the command line: the MMAD protocol on the fixture tree with answers given
//! in a file (so every number is known by hand), and its refusals.

mod common;
use common::{sage, stdout_json};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmad").join(name)
}

fn close(v: &serde_json::Value, want: f64) {
    let got = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
    assert!((got - want).abs() < 1e-12, "{got} != {want}");
}

/// The 17 answers in `answers.jsonl` (one question of MVTec-AD good/001 is left unanswered), scored
/// by hand:
/// - MVTec-AD: Anomaly Detection normal 1/1 (good/000 "B."), anomalous 1/2 (broken_large right,
///   contamination wrong) → balanced (1 + 0.5)/2 = 0.75 (plain accuracy would be 2/3); Defect
///   Classification 2/2; Localization 1/2 ("top right" matches option D's text, truth A; "A) ... no
///   wait, C" takes the last letter, C, right); Description 1/1; Analysis 1/1; Object
///   Classification 1/1 (by text: "bottle"); Object Analysis = Structure (wrong) + Details ("dark
///   brown", right by text) = 1/2. Average (0.75 + 1 + 0.5 + 1 + 1 + 1 + 0.5)/7 = 23/28.
/// - VisA: AD normal 1/1, anomalous 0/1 → 0.5; Classification 1/1; Localization 0/1 ("I am not
///   sure." parses to nothing); Object Analysis 0/1 (E ≠ D). Average (0.5 + 1 + 0 + 0)/4 = 3/8.
/// - Headline: (23/28 + 3/8)/2 = 33.5/56; plain 11/17; 13 by letter, 3 by text, 1 unparsed.
#[test]
fn mmad_fixture_scores_match_the_hand_computed_ones() {
    let out = sage()
        .args(["--json", "eval", "--data"])
        .arg(fixture("mmad.json"))
        .arg("--answers")
        .arg(fixture("answers.jsonl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = stdout_json(&out);
    assert_eq!(v["format"], "mmad");
    assert_eq!(v["questions"], 18);
    let m = &v["mmad"];
    assert_eq!(m["datasets"], serde_json::json!(["MVTec-AD", "VisA"]));
    close(&m["average"], 33.5 / 56.0);
    close(&m["dataset_averages"][0], 23.0 / 28.0);
    close(&m["dataset_averages"][1], 3.0 / 8.0);
    let rows = m["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["subtask"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "Anomaly Detection",
            "Defect Classification",
            "Defect Localization",
            "Defect Description",
            "Defect Analysis",
            "Object Classification",
            "Object Analysis"
        ]
    );
    let ad = &rows[0]["cells"][0];
    close(&ad["accuracy"], 0.75);
    close(&ad["plain"]["accuracy"], 2.0 / 3.0);
    close(&rows[0]["cells"][1]["accuracy"], 0.5);
    let averages: Vec<f64> = rows.iter().map(|r| r["average"].as_f64().unwrap()).collect();
    assert_eq!(averages, [0.625, 1.0, 0.25, 1.0, 1.0, 1.0, 0.25]);
    assert_eq!(m["overall"]["correct"], 11);
    assert_eq!(m["overall"]["total"], 17);
    assert_eq!(m["parsing"], serde_json::json!({"by_letter": 13, "by_text": 3, "unparsed": 1, "no_truth": 0}));
}

#[test]
fn the_markdown_report_is_written_and_printed() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("r/report.md");
    let out = sage()
        .args(["eval", "--data"])
        .arg(fixture("mmad.json"))
        .arg("--answers")
        .arg(fixture("answers.jsonl"))
        .arg("--out")
        .arg(&report)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("| **Average** | 82.1 | 37.5 | **59.8** |"), "{text}");
    assert_eq!(std::fs::read_to_string(&report).unwrap(), text);
    assert!(report.with_extension("json").exists());
}

#[test]
fn bad_answer_files_and_missing_models_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("a.jsonl");
    std::fs::write(&bad, "{\"id\": \"nope.png\", \"question\": 0, \"answer\": \"A\"}\n").unwrap();
    let out = sage().args(["eval", "--data"]).arg(fixture("mmad.json")).arg("--answers").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 1") && err.contains("nope.png"), "{err}");

    std::fs::write(&bad, "{\"id\": \"VisA/candle/test/bad/000.png\", \"question\": 9, \"answer\": \"A\"}\n").unwrap();
    let out = sage().args(["eval", "--data"]).arg(fixture("mmad.json")).arg("--answers").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(&bad, "not json\n").unwrap();
    let out = sage().args(["eval", "--data"]).arg(fixture("mmad.json")).arg("--answers").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = sage().args(["eval", "--data"]).arg(fixture("mmad.json")).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--checkpoint"));
}

/// `sage compare` of two hand-made reports on three pairs: row A right on every question, row B
/// wrong on the standard-comparison question of two pairs; and its refusals.
#[test]
fn compare_reports_differences_and_mcnemar_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let pair = |id: &str, right: [bool; 2], p: f64| {
        serde_json::json!({"id": id, "anomalous": p > 0.5, "levels": ["standard_comparison", "defect_diagnosis"],
            "right": right, "complete": true, "p_anomalous": p, "map_score": 0.5, "sbert": [], "mle": []})
    };
    let report = |pairs: Vec<serde_json::Value>| serde_json::json!({"adpl": {"pairs": pairs}});
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    let a_pairs = vec![pair("x", [true, true], 0.9), pair("y", [true, true], 0.1), pair("z", [true, true], 0.8)];
    let b_pairs = vec![pair("x", [false, true], 0.9), pair("y", [false, true], 0.1), pair("z", [true, true], 0.8)];
    std::fs::write(&a, report(a_pairs).to_string()).unwrap();
    std::fs::write(&b, report(b_pairs).to_string()).unwrap();
    let out = sage().args(["--json", "compare"]).arg(&a).arg(&b).output().unwrap();
    let v = stdout_json(&out);
    let row = |name: &str| v.as_array().unwrap().iter().find(|r| r["metric"] == name).unwrap().clone();
    // Standard comparison: A 3/3, B 1/3 → +2/3; McNemar b = 2, c = 0, exact p = 2·(1/2)² = 0.5.
    let sc = row("standard_comparison");
    close(&sc["a"], 1.0);
    close(&sc["b"], 1.0 / 3.0);
    close(&sc["paired"]["difference"]["estimate"], 2.0 / 3.0);
    assert_eq!((sc["paired"]["mcnemar"]["b"].as_u64(), sc["paired"]["mcnemar"]["c"].as_u64()), (Some(2), Some(0)));
    close(&sc["paired"]["mcnemar"]["exact_p"], 0.5);
    // The defect-diagnosis questions agree: no difference at all.
    let dd = row("defect_diagnosis");
    close(&dd["paired"]["difference"]["lo"], 0.0);
    close(&dd["paired"]["difference"]["hi"], 0.0);
    // No generated answers: SBERT has no value and no comparison.
    assert!(row("sbert")["a"].is_null() && row("sbert")["paired"].is_null());

    // Reports on other pairs, and a report without per-pair records, are user errors.
    std::fs::write(&b, report(vec![pair("x", [true, true], 0.9)]).to_string()).unwrap();
    let out = sage().args(["compare"]).arg(&a).arg(&b).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("same image pairs"));
    std::fs::write(&b, r#"{"adpl": {"average": 0.5}}"#).unwrap();
    let out = sage().args(["compare"]).arg(&a).arg(&b).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b.json") && err.contains("evaluate again"), "{err}");
}
