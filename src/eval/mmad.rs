//! MMAD's multiple-choice protocol (ARCHITECTURE.md §6).
//!
//! - Answer: the last standalone capital letter `A`–`E` in the generated text (the regex
//!   `\b[A-E]\b`: a letter with no letter, digit or `_` on either side; case matters, as in MMAD),
//!   counting only letters that are options of the question. As in MMAD, the article "A" counts
//!   as a letter ("A bottle." reads as A).
//! - Fallback, when no such letter exists: the option whose text is closest to the answer (see
//!   [`closeness`]); ties go to the earlier option. An answer sharing no word with any option (or
//!   an empty one) is unparsed and counted wrong.
//! - Accuracy per subtask (the question's MMAD `type`), with "Object Structure" and "Object
//!   Details" merged into "Object Analysis". Anomaly Detection is balanced: (accuracy on normal
//!   images + accuracy on anomalous images)/2; when one class has no questions in a dataset, the
//!   other class's accuracy is the cell. Normal is MMAD's rule, the image path contains `good`:
//!   `data::mmad::load` sets [`Sample::label`] by exactly that rule; a sample without a label
//!   falls back to the rule on its id (the MMAD key).
//! - Average: over the subtasks of each source dataset ([`Sample::split`], set by
//!   `data::mmad::load` to the key's first component), then over the source datasets.
//! - Only answered questions count.

use super::{arrange, mean_of, pct, Accuracy, Generated};
use crate::data::sample::{Label, Sample};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;

/// MMAD's subtasks in the paper's order, after merging; others follow alphabetically.
pub const SUBTASKS: [&str; 7] = [
    "Anomaly Detection",
    "Defect Classification",
    "Defect Localization",
    "Defect Description",
    "Defect Analysis",
    "Object Classification",
    "Object Analysis",
];

/// The subtask a question type is reported under: Object Structure and Object Details become
/// Object Analysis.
pub fn merged_subtask(t: &str) -> &str {
    match t {
        "Object Structure" | "Object Details" => "Object Analysis",
        t => t,
    }
}

/// How an answer was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParsedBy {
    Letter,
    Text,
}

/// The option an answer chose: its index (0 = A) and how it was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub index: usize,
    pub by: ParsedBy,
}

impl Choice {
    pub fn letter(&self) -> char {
        (b'A' + self.index as u8) as char
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The index (0 = A) of the last `\b[A-E]\b` in `text` that names one of `n_options` options.
pub fn last_letter(text: &str, n_options: usize) -> Option<usize> {
    let chars: Vec<char> = text.chars().collect();
    (0..chars.len()).rev().find_map(|i| {
        let c = chars[i];
        let standalone = (i == 0 || !is_word(chars[i - 1])) && chars.get(i + 1).is_none_or(|&n| !is_word(n));
        let index = (c as u32).wrapping_sub('A' as u32) as usize;
        (standalone && ('A'..='E').contains(&c) && index < n_options).then_some(index)
    })
}

/// Lower-cased alphanumeric words.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

/// How close an answer is to an option text: the longest common subsequence of their words
/// (lower-cased, split at anything not a letter or digit), as a Dice ratio
/// `2·LCS / (words(a) + words(b))`, in 0..=1 (1: the same words in the same order). This is
/// Python's `difflib` ratio, which MMAD's fallback uses, taken over words instead of characters,
/// so that "top right" is closer to "Top right." than to "Top left.".
pub fn closeness(a: &str, b: &str) -> f64 {
    let (a, b) = (words(a), words(b));
    if a.is_empty() && b.is_empty() {
        return 0.0;
    }
    let mut row = vec![0usize; b.len() + 1];
    for x in &a {
        let mut diag = 0;
        for (j, y) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = if x == y { diag + 1 } else { up.max(row[j]) };
            diag = up;
        }
    }
    2.0 * row[b.len()] as f64 / (a.len() + b.len()) as f64
}

/// The option closest to `text` by [`closeness`]; the earlier option on ties; `None` when no
/// option shares a word with the text.
pub fn closest_option(text: &str, options: &[String]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, o) in options.iter().enumerate() {
        let c = closeness(text, o);
        if c > 0.0 && best.is_none_or(|(_, b)| c > b) {
            best = Some((i, c));
        }
    }
    best.map(|(i, _)| i)
}

/// Reads the option an answer chose: the last option letter, else the closest option text.
pub fn parse_choice(text: &str, options: &[String]) -> Option<Choice> {
    if let Some(index) = last_letter(text, options.len()) {
        return Some(Choice { index, by: ParsedBy::Letter });
    }
    closest_option(text, options).map(|index| Choice { index, by: ParsedBy::Text })
}

/// One subtask in one source dataset.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cell {
    /// The reported accuracy: balanced for Anomaly Detection, plain otherwise.
    pub accuracy: f64,
    /// Plain accuracy over the cell's questions.
    pub plain: Accuracy,
    /// Anomaly Detection only: the accuracies on normal and on anomalous images.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub normal: Option<Accuracy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub anomalous: Option<Accuracy>,
}

/// One subtask across the source datasets.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub subtask: String,
    /// One per [`MmadReport::datasets`] entry; `None` where the dataset has no answered question
    /// of this subtask.
    pub cells: Vec<Option<Cell>>,
    /// The mean of the row's cells.
    pub average: Option<f64>,
}

/// How the answers were read.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Parsing {
    pub by_letter: usize,
    pub by_text: usize,
    /// Answers no option could be read from (counted wrong).
    pub unparsed: usize,
    /// Answered questions without a valid answer letter as truth (not scored).
    pub no_truth: usize,
}

/// The MMAD table: rows = subtasks, columns = source datasets, plus averages.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MmadReport {
    /// The source datasets, sorted; samples without one are under `unknown`.
    pub datasets: Vec<String>,
    pub rows: Vec<Row>,
    /// Per dataset: the mean over its subtasks.
    pub dataset_averages: Vec<Option<f64>>,
    /// The mean of `dataset_averages`: MMAD's headline number.
    pub average: Option<f64>,
    /// Plain accuracy over every scored question.
    pub overall: Accuracy,
    pub parsing: Parsing,
}

#[derive(Default)]
struct Tally {
    all: Accuracy,
    normal: Accuracy,
    anomalous: Accuracy,
}

impl MmadReport {
    /// Scores `generated` against MMAD `samples` (as `data::mmad::load` reads them).
    pub fn compute(samples: &[Sample], generated: &[Generated]) -> Result<MmadReport> {
        let answers = arrange(samples, generated)?;
        let mut tallies: BTreeMap<(String, String), Tally> = BTreeMap::new();
        let mut parsing = Parsing::default();
        let mut overall = Accuracy::default();
        for (s, row) in samples.iter().zip(&answers) {
            let dataset = s.split.clone().unwrap_or_else(|| "unknown".to_string());
            let normal = match s.label {
                Some(l) => l == Label::Normal,
                None => s.id.contains("good"),
            };
            for (q, a) in s.questions.iter().zip(row) {
                let Some(a) = a else { continue };
                let truth = q.answer.as_deref().and_then(|t| {
                    let mut c = t.trim().chars();
                    match (c.next(), c.next()) {
                        (Some(l @ 'A'..='Z'), None) => Some(l as usize - 'A' as usize),
                        _ => None,
                    }
                });
                let Some(truth) = truth.filter(|&t| t < q.options.len()) else {
                    parsing.no_truth += 1;
                    continue;
                };
                let choice = parse_choice(a, &q.options);
                match choice.map(|c| c.by) {
                    Some(ParsedBy::Letter) => parsing.by_letter += 1,
                    Some(ParsedBy::Text) => parsing.by_text += 1,
                    None => parsing.unparsed += 1,
                }
                let right = choice.is_some_and(|c| c.index == truth);
                let subtask = merged_subtask(q.subtask.as_deref().unwrap_or("unknown")).to_string();
                let t = tallies.entry((subtask, dataset.clone())).or_default();
                t.all.add(right);
                if normal { &mut t.normal } else { &mut t.anomalous }.add(right);
                overall.add(right);
            }
        }
        let mut datasets: Vec<String> = tallies.keys().map(|(_, d)| d.clone()).collect();
        datasets.sort();
        datasets.dedup();
        let mut subtasks: Vec<&str> =
            SUBTASKS.iter().copied().filter(|s| tallies.keys().any(|(t, _)| t == s)).collect();
        for (t, _) in tallies.keys() {
            if !subtasks.contains(&t.as_str()) {
                subtasks.push(t);
            }
        }
        let rows: Vec<Row> = subtasks
            .iter()
            .map(|&subtask| {
                let cells: Vec<Option<Cell>> = datasets
                    .iter()
                    .map(|d| {
                        let t = tallies.get(&(subtask.to_string(), d.clone()))?;
                        let detection = subtask == SUBTASKS[0];
                        let accuracy = if detection {
                            mean_of([t.normal.accuracy, t.anomalous.accuracy])?
                        } else {
                            t.all.accuracy?
                        };
                        Some(Cell {
                            accuracy,
                            plain: t.all,
                            normal: detection.then_some(t.normal),
                            anomalous: detection.then_some(t.anomalous),
                        })
                    })
                    .collect();
                let average = mean_of(cells.iter().map(|c| c.as_ref().map(|c| c.accuracy)));
                Row { subtask: subtask.to_string(), cells, average }
            })
            .collect();
        let dataset_averages: Vec<Option<f64>> = (0..datasets.len())
            .map(|j| mean_of(rows.iter().map(|r| r.cells[j].as_ref().map(|c| c.accuracy))))
            .collect();
        Ok(MmadReport {
            average: mean_of(dataset_averages.iter().copied()),
            datasets,
            rows,
            dataset_averages,
            overall,
            parsing,
        })
    }

    /// The table in percent: a row per subtask, a column per source dataset and `Average`, and a
    /// last `Average` row (per dataset, then the headline average), followed by a parsing line.
    pub fn to_markdown(&self) -> String {
        let mut out = format!("| Subtask | {} | Average |\n", self.datasets.join(" | "));
        out.push_str(&format!("|---|{}\n", "---|".repeat(self.datasets.len() + 1)));
        for r in &self.rows {
            let cells: Vec<String> = r.cells.iter().map(|c| pct(c.as_ref().map(|c| c.accuracy))).collect();
            out.push_str(&format!("| {} | {} | {} |\n", r.subtask, cells.join(" | "), pct(r.average)));
        }
        let avgs: Vec<String> = self.dataset_averages.iter().map(|&a| pct(a)).collect();
        out.push_str(&format!("| **Average** | {} | **{}** |\n", avgs.join(" | "), pct(self.average)));
        let p = &self.parsing;
        out.push_str(&format!(
            "\n{} questions scored (plain accuracy {}%): {} answered by letter, {} by option text, {} unparsed.\n",
            self.overall.total,
            pct(self.overall.accuracy),
            p.by_letter,
            p.by_text,
            p.unparsed
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::mmad::{load, RefChoice};
    use std::path::Path;

    fn opts(o: &[&str]) -> Vec<String> {
        o.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn letter_parsing_edge_cases() {
        let four = opts(&["Top left.", "Top right.", "Bottom right.", "Bottom left."]);
        let letter = |t: &str| parse_choice(t, &four).map(|c| (c.letter(), c.by));
        assert_eq!(letter("The answer is B."), Some(('B', ParsedBy::Letter)));
        assert_eq!(letter("A) ... no wait, C"), Some(('C', ParsedBy::Letter)));
        assert_eq!(letter("(D)"), Some(('D', ParsedBy::Letter)));
        assert_eq!(letter("D\n"), Some(('D', ParsedBy::Letter)));
        // E is not an option of a 4-option question: the last valid letter wins.
        assert_eq!(letter("C, or maybe E"), Some(('C', ParsedBy::Letter)));
        // Letters inside words or next to digits or `_` are not standalone.
        assert_eq!(last_letter("ABC B2 _C Cat", 4), None);
        // Lower case is not a letter answer (MMAD's regex is case-sensitive) ...
        assert_eq!(last_letter("the answer is b", 4), None);
        assert_eq!(letter("b"), None);
        // ... but its text may still match an option.
        assert_eq!(letter("b) top right"), Some(('B', ParsedBy::Text)));
        // The article "A" reads as option A, as in MMAD.
        assert_eq!(letter("A defect sits at the bottom left."), Some(('A', ParsedBy::Letter)));
        // Text-only fallback: "top right" shares 2 words with "Top right." (2·2/4 = 1) and 1
        // with "Top left." and "Bottom right." (2·1/4 = 0.5).
        assert_eq!(letter("top right"), Some(('B', ParsedBy::Text)));
        assert_eq!(letter("The defect is at the bottom, on the left"), Some(('D', ParsedBy::Text)));
        // Non-ASCII letters are word characters too: "ÉB" has no standalone B.
        assert_eq!(last_letter("ÉB", 4), None);
        // Nothing to read.
        assert_eq!(letter("I am not sure."), None);
        assert_eq!(letter(""), None);
        // A 5-option question accepts E.
        assert_eq!(last_letter("E.", 5), Some(4));
    }

    #[test]
    fn closeness_is_a_word_lcs_dice_ratio() {
        assert_eq!(closeness("Top right.", "top RIGHT"), 1.0);
        // LCS("the defect is large breakage", "large breakage") = 2 → 2·2/(5 + 2).
        assert!((closeness("the defect is large breakage", "Large breakage.") - 4.0 / 7.0).abs() < 1e-12);
        // Order matters: LCS("right top", "top right") = 1 → 2·1/4.
        assert_eq!(closeness("right top", "Top right."), 0.5);
        assert_eq!(closeness("", ""), 0.0);
        assert_eq!(closeness("Yes", "No."), 0.0);
        // Ties go to the earlier option.
        assert_eq!(closest_option("top", &opts(&["Top left.", "Top right."])), Some(0));
    }

    /// The fixture's 6 images, 18 questions; one answer per question except s3q0 (not answered,
    /// so MVTec-AD's Anomaly Detection has 1 normal and 2 anomalous answers and its balanced
    /// accuracy differs from the plain one).
    #[test]
    fn fixture_scores_by_hand() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmad/mmad.json");
        let samples = load(&path, None, RefChoice::Random).unwrap();
        assert_eq!(samples.len(), 6);
        let answers: [(usize, usize, &str); 17] = [
            // s0 MVTec-AD good/000 (normal)
            (0, 0, "B. (E is not an option here)"), // AD, truth B: right by letter (normal)
            (0, 1, "The object is a bottle."),      // Object Classification, truth C: right by text
            (0, 2, "C"),                            // Object Structure → Analysis, truth A: wrong
            // s1 MVTec-AD broken_large/000 (anomalous)
            (1, 0, "A. Yes, there is a defect."), // AD, truth A: right (anomalous)
            (1, 1, "B"),                          // Defect Classification, truth B: right
            (1, 2, "The defect is in the top right."), // Localization, truth A: text → D, wrong
            (1, 3, "D"),                          // Description, truth D: right
            (1, 4, "C"),                          // Analysis, truth C: right
            // s2 MVTec-AD contamination/000 (anomalous)
            (2, 0, "B"),                 // AD, truth A: wrong (anomalous)
            (2, 1, "Answer: A"),         // Classification, truth A: right
            (2, 2, "A) ... no wait, C"), // Localization, truth C: right
            // s3 MVTec-AD good/001 (normal): q0 not answered
            (3, 1, "dark brown"), // Object Details → Analysis, truth B: right by text
            // s4 VisA good/000 (normal)
            (4, 0, "B"), // AD, truth B: right (normal)
            (4, 1, "E"), // Object Structure → Analysis, truth D: wrong
            // s5 VisA bad/000 (anomalous)
            (5, 0, "B"),              // AD, truth A: wrong (anomalous)
            (5, 1, "C"),              // Classification, truth C: right
            (5, 2, "I am not sure."), // Localization, truth D: unparsed, wrong
        ];
        let generated: Vec<Generated> =
            answers.iter().map(|&(item, question, a)| Generated { item, question, answer: a.into() }).collect();
        let r = MmadReport::compute(&samples, &generated).unwrap();
        assert_eq!(r.datasets, ["MVTec-AD", "VisA"]);
        let subtasks: Vec<&str> = r.rows.iter().map(|r| r.subtask.as_str()).collect();
        assert_eq!(subtasks, SUBTASKS);
        let cell = |row: usize, col: usize| r.rows[row].cells[col].as_ref().map(|c| c.accuracy);
        let close = |a: Option<f64>, b: f64| assert!((a.unwrap() - b).abs() < 1e-12, "{a:?} != {b}");

        // MVTec-AD:
        // AD: normal s0q0 right → 1/1; anomalous s1q0 right, s2q0 wrong → 1/2;
        //     balanced (1 + 0.5)/2 = 0.75, plain 2/3.
        let ad = r.rows[0].cells[0].as_ref().unwrap();
        assert_eq!(
            (ad.normal, ad.anomalous, ad.plain),
            (Some(Accuracy::new(1, 1)), Some(Accuracy::new(1, 2)), Accuracy::new(2, 3))
        );
        close(cell(0, 0), 0.75);
        close(cell(1, 0), 1.0); // Classification: s1q1, s2q1 right → 2/2
        close(cell(2, 0), 0.5); // Localization: s1q2 wrong, s2q2 right → 1/2
        close(cell(3, 0), 1.0); // Description: s1q3 → 1/1
        close(cell(4, 0), 1.0); // Analysis: s1q4 → 1/1
        close(cell(5, 0), 1.0); // Object Classification: s0q1 → 1/1
        close(cell(6, 0), 0.5); // Object Analysis: s0q2 wrong (Structure), s3q1 right (Details)
        assert_eq!(r.rows[6].cells[0].as_ref().unwrap().plain, Accuracy::new(1, 2));
        assert!(r.rows[1].cells[0].as_ref().unwrap().normal.is_none());
        // MVTec-AD average: (0.75 + 1 + 0.5 + 1 + 1 + 1 + 0.5)/7 = 5.75/7 = 23/28.
        close(r.dataset_averages[0], 23.0 / 28.0);

        // VisA:
        // AD: normal s4q0 right 1/1, anomalous s5q0 wrong 0/1 → (1 + 0)/2 = 0.5.
        close(cell(0, 1), 0.5);
        close(cell(1, 1), 1.0); // Classification: s5q1 right
        close(cell(2, 1), 0.0); // Localization: s5q2 unparsed
        assert_eq!((cell(3, 1), cell(4, 1), cell(5, 1)), (None, None, None));
        close(cell(6, 1), 0.0); // Object Analysis: s4q1 wrong
                                // VisA average: (0.5 + 1 + 0 + 0)/4 = 0.375.
        close(r.dataset_averages[1], 0.375);

        // Row averages (mean over the datasets having the subtask).
        let row_avg: Vec<f64> = r.rows.iter().map(|r| r.average.unwrap()).collect();
        assert_eq!(row_avg, [0.625, 1.0, 0.25, 1.0, 1.0, 1.0, 0.25]);
        // Headline: (23/28 + 3/8)/2 = (23/28 + 10.5/28)/2 = 33.5/56.
        close(r.average, 33.5 / 56.0);
        // Plain: right = s0: 2, s1: 4, s2: 2, s3: 1, s4: 1, s5: 1 = 11 of 17.
        assert_eq!(r.overall, Accuracy::new(11, 17));
        assert_eq!(r.parsing, Parsing { by_letter: 13, by_text: 3, unparsed: 1, no_truth: 0 });

        let md = r.to_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| Subtask | MVTec-AD | VisA | Average |");
        assert_eq!(lines[1], "|---|---|---|---|");
        assert_eq!(lines[2], "| Anomaly Detection | 75.0 | 50.0 | 62.5 |");
        assert_eq!(lines[5], "| Defect Description | 100.0 | — | 100.0 |");
        assert_eq!(lines[8], "| Object Analysis | 50.0 | 0.0 | 25.0 |");
        assert_eq!(lines[9], "| **Average** | 82.1 | 37.5 | **59.8** |");
        assert!(md.contains(
            "17 questions scored (plain accuracy 64.7%): 13 answered by letter, 3 by option text, 1 unparsed."
        ));

        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["rows"][0]["cells"][0]["normal"]["correct"], 1);
        assert!(v["rows"][1]["cells"][0].get("normal").is_none());
        assert_eq!(v["rows"][3]["cells"][1], serde_json::Value::Null);
    }

    #[test]
    fn balanced_detection_with_one_class_and_missing_labels() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mmad/mmad.json");
        let mut samples = load(&path, None, RefChoice::Random).unwrap();
        // Only the VisA normal image answered: the cell is the normal accuracy alone.
        let g = vec![Generated { item: 4, question: 0, answer: "A".into() }];
        let r = MmadReport::compute(&samples, &g).unwrap();
        assert_eq!((r.datasets.len(), r.rows.len()), (1, 1));
        assert_eq!(r.rows[0].cells[0].as_ref().unwrap().accuracy, 0.0);
        assert_eq!(r.average, Some(0.0));
        // Without a label the id's `good` decides; without a split the dataset is `unknown`.
        samples[4].label = None;
        samples[4].split = None;
        let r = MmadReport::compute(&samples, &g).unwrap();
        assert_eq!(r.datasets, ["unknown"]);
        assert_eq!(r.rows[0].cells[0].as_ref().unwrap().normal, Some(Accuracy::new(0, 1)));
        // A truth that is not an option letter is not scored.
        samples[4].questions[0].answer = Some("Z".into());
        let r = MmadReport::compute(&samples, &g).unwrap();
        assert_eq!((r.parsing.no_truth, r.overall.total, r.average), (1, 0, None));
    }
}
