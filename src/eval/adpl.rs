//! AD-PL and MANTA scoring (ARCHITECTURE.md §6): every question has a Yes/No truth, and an answer is
//! right when its leading Yes/No ([`conclusion`]) matches it.
//!
//! - Truth: the question's `answer` when it reads Yes/No, else the leading Yes/No of its best
//!   ranked answer (AD-PL). A question with neither is not scored (counted in `no_truth` when it
//!   was answered).
//! - Prediction: the leading Yes/No of the generated answer; an answer without one is `unparsed`
//!   and counted wrong.
//! - Accuracy per level, their average (the mean of the per-level accuracies of the levels that
//!   have scored questions), and overall (every scored question, levelled or not: MANTA's
//!   questions may have no level).
//! - Acc-G: the share of image pairs (samples) whose questions are all right. Only samples whose
//!   questions were all scored (each has a truth and a generated answer) count; a sample with a
//!   question left unanswered or without a truth is left out of both sides of the share.
//! - SBERT: the mean cosine between embeddings of the generated answer and the question's best
//!   ranked answer, over answered questions that have ranked answers.
//! - MLE: the means of the judge's type, location and logic scores and of their per-answer mean.
//! - Majority: the rate of the more frequent truth among the scored questions, the accuracy of
//!   always giving that answer (a reference line).

use super::{arrange, mean_of, num, pct, Accuracy, Generated};
use crate::data::sample::{conclusion, yes_no, Level, Question, Sample};
use crate::judge::JudgeScores;
use crate::models::bert::cosine;
use anyhow::Result;
use serde::Serialize;
use std::collections::HashMap;

/// Accuracy on the questions of one level.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LevelAccuracy {
    pub level: Level,
    #[serde(flatten)]
    pub accuracy: Accuracy,
}

/// SBERT similarity: the mean cosine over `pairs` (generated, best ranked answer) pairs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sbert {
    pub mean: f64,
    pub pairs: usize,
}

/// MLE judge scores (1–5): the means over `answers` judged answers.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mle {
    #[serde(rename = "type")]
    pub type_: f64,
    pub location: f64,
    pub logic: f64,
    /// The mean of each answer's three-score mean, which equals the mean of the three means.
    pub mean: f64,
    pub answers: usize,
}

impl Mle {
    /// The means of `scores`; `None` when there are none (no judge, or nothing judged).
    pub fn from_scores(scores: &[JudgeScores]) -> Option<Mle> {
        if scores.is_empty() {
            return None;
        }
        let n = scores.len() as f64;
        let avg = |f: fn(&JudgeScores) -> f64| scores.iter().map(f).sum::<f64>() / n;
        Some(Mle {
            type_: avg(|s| s.type_ as f64),
            location: avg(|s| s.location as f64),
            logic: avg(|s| s.logic as f64),
            mean: avg(|s| s.mean() as f64),
            answers: scores.len(),
        })
    }
}

/// The more frequent truth among the scored questions and its rate (ties go to "Yes").
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Majority {
    pub answer: &'static str,
    pub rate: f64,
}

/// The AD-PL / MANTA report; serialises as `--json` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdplReport {
    /// One entry per level, in [`Level::ALL`] order (levels without questions have no accuracy).
    pub levels: Vec<LevelAccuracy>,
    /// The mean of the per-level accuracies of the levels that have scored questions.
    pub average: Option<f64>,
    /// Every scored question, levelled or not.
    pub overall: Accuracy,
    /// Scored answers without a leading Yes/No (counted wrong).
    pub unparsed: usize,
    /// Answered questions left unscored because they have no truth.
    pub no_truth: usize,
    /// Image pairs whose questions are all right, over those whose questions were all scored.
    pub acc_g: Accuracy,
    pub sbert: Option<Sbert>,
    pub mle: Option<Mle>,
    pub majority: Option<Majority>,
}

/// A question's ground-truth conclusion: its `answer`'s Yes/No, else its best ranked answer's.
pub fn truth(q: &Question) -> Option<bool> {
    q.answer.as_deref().and_then(conclusion).or_else(|| q.ranked_answers.first().and_then(|a| conclusion(a)))
}

/// A closure that embeds a text (e.g. `|t| encoder.embed(t)` with a `SentenceEncoder`).
pub type Embed<'a> = &'a mut dyn FnMut(&str) -> Result<Vec<f32>>;

impl AdplReport {
    /// Scores `generated` against `samples`. `embed` gives SBERT (None: no SBERT); `judge` gives
    /// MLE (None or empty: no MLE). Bad answer indices are user errors (see [`arrange`]).
    pub fn compute(
        samples: &[Sample],
        generated: &[Generated],
        embed: Option<Embed>,
        judge: Option<&[JudgeScores]>,
    ) -> Result<AdplReport> {
        let answers = arrange(samples, generated)?;
        let mut levels: Vec<LevelAccuracy> =
            Level::ALL.iter().map(|&level| LevelAccuracy { level, accuracy: Accuracy::default() }).collect();
        let (mut overall, mut acc_g) = (Accuracy::default(), Accuracy::default());
        let (mut unparsed, mut no_truth, mut yes) = (0, 0, 0);
        for (s, row) in samples.iter().zip(&answers) {
            let (mut complete, mut all_right) = (!s.questions.is_empty(), true);
            for (q, a) in s.questions.iter().zip(row) {
                let (t, Some(a)) = (truth(q), a) else {
                    complete = false;
                    continue;
                };
                let Some(t) = t else {
                    no_truth += 1;
                    complete = false;
                    continue;
                };
                let p = conclusion(a);
                unparsed += p.is_none() as usize;
                let right = p == Some(t);
                all_right &= right;
                yes += t as usize;
                overall.add(right);
                if let Some(l) = levels.iter_mut().find(|l| Some(l.level) == q.level) {
                    l.accuracy.add(right);
                }
            }
            if complete {
                acc_g.add(all_right);
            }
        }
        let majority = (overall.total > 0).then(|| {
            let y = yes * 2 >= overall.total;
            let n = if y { yes } else { overall.total - yes };
            Majority { answer: yes_no(y), rate: n as f64 / overall.total as f64 }
        });
        Ok(AdplReport {
            average: mean_of(levels.iter().map(|l| l.accuracy.accuracy)),
            levels,
            overall,
            unparsed,
            no_truth,
            acc_g,
            sbert: match embed {
                Some(e) => sbert(samples, generated, e)?,
                None => None,
            },
            mle: judge.and_then(Mle::from_scores),
            majority,
        })
    }

    /// One table row: per-level accuracy, average, Acc-G (%), SBERT, MLE type/location/logic/mean,
    /// then a line with overall accuracy, unparsed answers and the majority-class rate.
    pub fn to_markdown(&self) -> String {
        let mle = |f: fn(&Mle) -> f64| num(self.mle.as_ref().map(f), 2);
        let mut cells: Vec<String> = self.levels.iter().map(|l| pct(l.accuracy.accuracy)).collect();
        cells.push(pct(self.average));
        cells.push(pct(self.acc_g.accuracy));
        cells.push(num(self.sbert.as_ref().map(|s| s.mean), 3));
        cells.extend([mle(|m| m.type_), mle(|m| m.location), mle(|m| m.logic), mle(|m| m.mean)]);
        let mut out = String::from(
            "| Standard comparison | Defect identification | Defect diagnosis | Average | Acc-G | SBERT \
             | MLE type | MLE location | MLE logic | MLE mean |\n",
        );
        out.push_str(&format!("|{}\n", "---|".repeat(cells.len())));
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
        out.push_str(&format!(
            "\nOverall {}% ({}/{}); unparsed {}; Acc-G over {} image pairs; majority class {}.\n",
            pct(self.overall.accuracy),
            self.overall.correct,
            self.overall.total,
            self.unparsed,
            self.acc_g.total,
            self.majority.as_ref().map_or("—".to_string(), |m| format!("{} {}%", m.answer, pct(Some(m.rate)))),
        ));
        out
    }
}

/// SBERT over answered questions that have ranked answers: the mean cosine between the embedding
/// of the generated answer and of the best ranked answer. `None` when there is no such pair.
/// Each distinct text is embedded once.
pub fn sbert(samples: &[Sample], generated: &[Generated], embed: Embed) -> Result<Option<Sbert>> {
    let answers = arrange(samples, generated)?;
    let mut cache: HashMap<String, Vec<f32>> = HashMap::new();
    let (mut sum, mut pairs) = (0.0f64, 0usize);
    for (s, row) in samples.iter().zip(&answers) {
        for (q, a) in s.questions.iter().zip(row) {
            let (Some(a), Some(best)) = (a, q.ranked_answers.first()) else { continue };
            for t in [*a, best.as_str()] {
                if !cache.contains_key(t) {
                    cache.insert(t.to_string(), embed(t)?);
                }
            }
            sum += cosine(&cache[*a], &cache[best.as_str()]) as f64;
            pairs += 1;
        }
    }
    Ok((pairs > 0).then(|| Sbert { mean: sum / pairs as f64, pairs }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::anyhow;

    fn q(level: Option<Level>, answer: Option<&str>, ranked: &[&str]) -> Question {
        Question {
            text: "Is the test image the same as the reference?".into(),
            level,
            options: vec![],
            answer: answer.map(str::to_string),
            ranked_answers: ranked.iter().map(|s| s.to_string()).collect(),
            subtask: None,
        }
    }

    fn sample(id: &str, questions: Vec<Question>) -> Sample {
        let s: Sample = serde_json::from_value(serde_json::json!({"id": id, "test_image": "t.png"})).unwrap();
        Sample { questions, ..s }
    }

    fn gen(item: usize, question: usize, answer: &str) -> Generated {
        Generated { item, question, answer: answer.into() }
    }

    const SC: Option<Level> = Some(Level::StandardComparison);
    const DI: Option<Level> = Some(Level::DefectIdentification);
    const DD: Option<Level> = Some(Level::DefectDiagnosis);

    /// Four image pairs. Truth / generated / verdict per question:
    /// - s0: q0 SC Yes / "Yes, ..." right; q1 DI No (from its best ranked answer) / "No." right;
    ///   q2 DD Yes / "Yes" right. All scored, all right.
    /// - s1: q0 SC No / "Yes, ..." wrong; q1 DI Yes / "Maybe ..." unparsed, wrong; q2 DD Yes /
    ///   "yes" right. All scored, not all right.
    /// - s2: q0 SC Yes / "**Yes**" right; q1 DD No / not generated. Not complete.
    /// - s3: q0 no level, No / "No" right; q1 DI without any truth / "Yes" not scored (no_truth).
    ///   Not complete.
    fn fixture() -> (Vec<Sample>, Vec<Generated>) {
        let samples = vec![
            sample(
                "s0",
                vec![
                    q(SC, Some("Yes"), &[]),
                    q(DI, None, &["No, nothing is missing.", "Yes, a screw is missing."]),
                    q(DD, Some("Yes"), &[]),
                ],
            ),
            sample(
                "s1",
                vec![
                    q(SC, Some("No"), &["No, they match.", "Yes, they differ."]),
                    q(DI, Some("Yes"), &[]),
                    q(DD, Some("Yes"), &[]),
                ],
            ),
            sample("s2", vec![q(SC, Some("Yes"), &[]), q(DD, Some("No"), &[])]),
            sample("s3", vec![q(None, Some("No"), &[]), q(DI, None, &[])]),
        ];
        let generated = vec![
            gen(0, 0, "Yes, the test image differs."),
            gen(0, 1, "No."),
            gen(0, 2, "Yes"),
            gen(1, 0, "Yes, they differ."),
            gen(1, 1, "Maybe there is something."),
            gen(1, 2, "yes"),
            gen(2, 0, "**Yes**"),
            gen(3, 1, "Yes"),
            gen(3, 0, "No"),
        ];
        (samples, generated)
    }

    #[test]
    fn truth_prefers_the_answer_then_the_best_ranked_answer() {
        assert_eq!(truth(&q(None, Some("No"), &["Yes, it differs."])), Some(false));
        assert_eq!(truth(&q(None, None, &["Yes, it differs.", "No."])), Some(true));
        assert_eq!(truth(&q(None, Some("B"), &["No."])), Some(false));
        assert_eq!(truth(&q(None, None, &["It differs."])), None);
        assert_eq!(truth(&q(None, None, &[])), None);
    }

    #[test]
    fn hand_computed_report() {
        let (samples, generated) = fixture();
        // Fake embeddings: "No." and its reference coincide (cosine 1); "Yes, they differ." =
        // [0, 1] against "No, they match." = [1, 1] gives 1/√2. SBERT = (1 + 1/√2)/2.
        let mut calls = Vec::new();
        let mut embed = |t: &str| -> Result<Vec<f32>> {
            calls.push(t.to_string());
            match t {
                "No." | "No, nothing is missing." => Ok(vec![1.0, 0.0]),
                "Yes, they differ." => Ok(vec![0.0, 1.0]),
                "No, they match." => Ok(vec![1.0, 1.0]),
                _ => Err(anyhow!("unexpected text {t:?}")),
            }
        };
        let judge = [
            JudgeScores { type_: 5, location: 4, logic: 3, rationale: String::new() },
            JudgeScores { type_: 3, location: 2, logic: 1, rationale: String::new() },
        ];
        let r = AdplReport::compute(&samples, &generated, Some(&mut embed), Some(&judge)).unwrap();
        assert_eq!(calls.len(), 4, "{calls:?}");
        // SC: s0q0 right, s1q0 wrong, s2q0 right → 2/3. DI: s0q1 right, s1q1 unparsed → 1/2
        // (s3q1 has no truth). DD: s0q2 right, s1q2 right → 2/2 (s2q1 not generated).
        assert_eq!(r.levels[0], LevelAccuracy { level: Level::StandardComparison, accuracy: Accuracy::new(2, 3) });
        assert_eq!(r.levels[1], LevelAccuracy { level: Level::DefectIdentification, accuracy: Accuracy::new(1, 2) });
        assert_eq!(r.levels[2], LevelAccuracy { level: Level::DefectDiagnosis, accuracy: Accuracy::new(2, 2) });
        // Average = (2/3 + 1/2 + 1)/3 = 13/18.
        assert!((r.average.unwrap() - 13.0 / 18.0).abs() < 1e-12);
        // Overall: 8 scored (3 + 3 + 1 + 1), right 3 + 1 + 1 + 1 = 6.
        assert_eq!(r.overall, Accuracy::new(6, 8));
        assert_eq!((r.unparsed, r.no_truth), (1, 1));
        // Acc-G: s0 and s1 complete, only s0 all right → 1/2.
        assert_eq!(r.acc_g, Accuracy::new(1, 2));
        let s = r.sbert.as_ref().unwrap();
        assert_eq!(s.pairs, 2);
        assert!((s.mean - (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0).abs() < 1e-6, "{}", s.mean);
        // MLE: type (5+3)/2 = 4, location (4+2)/2 = 3, logic (3+1)/2 = 2, mean (4+2)/2 = 3.
        let m = r.mle.as_ref().unwrap();
        assert_eq!((m.type_, m.location, m.logic, m.answers), (4.0, 3.0, 2.0, 2));
        assert!((m.mean - 3.0).abs() < 1e-6);
        // Truths of the 8 scored: Y N Y, N Y Y, Y, N → 5 Yes → majority Yes 5/8.
        assert_eq!(r.majority, Some(Majority { answer: "Yes", rate: 0.625 }));

        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["levels"][1]["level"], "defect_identification");
        assert_eq!(v["levels"][1]["correct"], 1);
        assert_eq!(v["acc_g"]["accuracy"], 0.5);
        assert_eq!(v["mle"]["type"], 4.0);
        assert_eq!(v["majority"]["answer"], "Yes");

        let md = r.to_markdown();
        let row = md.lines().nth(2).unwrap();
        assert_eq!(row, "| 66.7 | 50.0 | 100.0 | 72.2 | 50.0 | 0.854 | 4.00 | 3.00 | 2.00 | 3.00 |");
        assert!(
            md.contains("Overall 75.0% (6/8); unparsed 1; Acc-G over 2 image pairs; majority class Yes 62.5%."),
            "{md}"
        );
    }

    #[test]
    fn without_embedder_or_judge_those_columns_are_empty() {
        let (samples, generated) = fixture();
        let r = AdplReport::compute(&samples, &generated, None, Some(&[])).unwrap();
        assert_eq!((r.sbert.clone(), r.mle.clone()), (None, None));
        assert!(r.to_markdown().lines().nth(2).unwrap().ends_with("| 50.0 | — | — | — | — | — |"));
        let empty = AdplReport::compute(&samples, &[], None, None).unwrap();
        assert_eq!((empty.average, empty.overall.accuracy, empty.acc_g.total), (None, None, 0));
        assert_eq!(empty.majority, None);
        // An embedder error surfaces.
        let mut failing = |_: &str| -> Result<Vec<f32>> { Err(anyhow!("no model")) };
        assert!(AdplReport::compute(&samples, &generated, Some(&mut failing), None).is_err());
    }
}
