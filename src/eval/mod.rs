//! `sage eval` (ARCHITECTURE.md §6): a model's answers to a dataset, scored.
//!
//! The scoring modules are pure: running the model, embedding texts and judging answers happen
//! elsewhere and reach them as plain values or closures, so every number can be checked by hand
//! in the tests.
//!
//! - [`adpl`]: AD-PL and MANTA (Yes/No conclusions): accuracy per level, Acc-G, SBERT, MLE.
//! - [`mmad`]: MMAD's multiple-choice protocol: per-subtask accuracy, averaged per source dataset.
//! - [`maps`]: anomaly maps: image AUROC (max of the map) and pixel AUROC.
//! - [`pro`]: anomaly maps: PRO, MVTec AD's per-region overlap (AUPRO up to FPR 0.3).
//! - [`stats`]: uncertainty: cluster bootstrap intervals (paired for differences), McNemar's test.
//!
//! Around them: [`generate`] runs the model, [`answers`] reads and writes answers files,
//! [`report`] is the report (markdown and JSON), [`html`] one self-contained HTML page of the
//! pairs, their maps and answers, and [`run`] is one evaluation end to end, the function `sage
//! eval` calls. [`elpv`] is the anomaly map's AUROC over ELPV (`sage map --eval-elpv`);
//! [`map_eval`] its general form over any labelled dataset, with pixel AUROC and PRO where masks
//! exist (`sage map --eval --data D`).

pub mod adpl;
pub mod answers;
pub mod elpv;
pub mod generate;
pub mod html;
pub mod intervals;
pub mod map_eval;
pub mod maps;
pub mod mmad;
pub mod page;
pub mod pair_record;
pub mod pro;
pub mod report;
pub mod run;
pub mod shots;
pub mod stats;

use crate::data::sample::Sample;
use crate::user_bail;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// One generated answer: `item` indexes the evaluated `&[Sample]`, `question` that sample's
/// `questions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generated {
    pub item: usize,
    pub question: usize,
    pub answer: String,
}

/// A conclusion read from one forward pass instead of generated: the probabilities of the
/// candidate first tokens of the answer (`Yes`/`No`, or the option letters), normalised over the
/// candidates, and the share of the whole vocabulary's probability they hold (`mass`: how sure
/// the model is that the answer starts with a conclusion at all).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FirstToken {
    pub item: usize,
    pub question: usize,
    pub candidates: Vec<String>,
    pub probs: Vec<f64>,
    pub mass: f64,
}

impl FirstToken {
    /// From the candidates' log-probabilities under the whole vocabulary.
    pub fn from_logprobs(item: usize, question: usize, candidates: &[&str], logp: &[f64]) -> FirstToken {
        let max = logp.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        let e: Vec<f64> = logp.iter().map(|&v| (v - max).exp()).collect();
        let z: f64 = e.iter().sum();
        FirstToken {
            item,
            question,
            candidates: candidates.iter().map(|c| c.to_string()).collect(),
            probs: e.iter().map(|v| v / z).collect(),
            mass: logp.iter().map(|v| v.exp()).sum(),
        }
    }

    /// The most probable candidate (the first of equals).
    pub fn choice(&self) -> &str {
        let mut best = 0;
        for (i, &p) in self.probs.iter().enumerate() {
            if p > self.probs[best] {
                best = i;
            }
        }
        self.candidates.get(best).map_or("", String::as_str)
    }

    /// The probability of candidate `c` (among the candidates).
    pub fn p_of(&self, c: &str) -> Option<f64> {
        self.candidates.iter().position(|x| x == c).map(|i| self.probs[i])
    }
}

/// A share of right answers, with its counts. `accuracy` is `None` when `total` is 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Accuracy {
    pub correct: usize,
    pub total: usize,
    pub accuracy: Option<f64>,
}

impl Accuracy {
    pub fn new(correct: usize, total: usize) -> Accuracy {
        Accuracy { correct, total, accuracy: (total > 0).then(|| correct as f64 / total as f64) }
    }

    /// Counts one more answer.
    pub fn add(&mut self, right: bool) {
        *self = Accuracy::new(self.correct + right as usize, self.total + 1);
    }
}

/// The generated answers arranged like the samples' questions: `answers[item][question]`.
/// An index out of range or a question answered twice is a user error naming the record.
pub fn arrange<'a>(samples: &[Sample], generated: &'a [Generated]) -> Result<Vec<Vec<Option<&'a str>>>> {
    let mut out: Vec<Vec<Option<&str>>> = samples.iter().map(|s| vec![None; s.questions.len()]).collect();
    for (i, g) in generated.iter().enumerate() {
        let Some(row) = out.get_mut(g.item) else {
            user_bail!("generated answer {i}: item {} is out of range (there are {} samples)", g.item, samples.len())
        };
        let n = row.len();
        let Some(slot) = row.get_mut(g.question) else {
            user_bail!(
                "generated answer {i}: question {} is out of range (sample {} `{}` has {n} questions)",
                g.question,
                g.item,
                samples[g.item].id
            )
        };
        if slot.is_some() {
            user_bail!("generated answer {i}: item {} question {} was already answered", g.item, g.question);
        }
        *slot = Some(g.answer.as_str());
    }
    Ok(out)
}

/// The mean of the values present; `None` when there are none.
pub fn mean_of(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let (sum, n) = values.into_iter().flatten().fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// A share as a percentage with one decimal (`0.8214` → `82.1`), or `—` when absent.
pub fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{:.1}", v * 100.0))
}

/// A score with `digits` decimals, or `—` when absent.
pub fn num(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "—".to_string(), |v| format!("{v:.digits$}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sample::Question;

    fn sample(n: usize) -> Sample {
        let q = Question {
            text: "q".into(),
            level: None,
            options: vec![],
            answer: None,
            ranked_answers: vec![],
            subtask: None,
        };
        serde_json::from_value::<Sample>(serde_json::json!({"id": "s", "test_image": "t.png"}))
            .map(|s| Sample { questions: vec![q; n], ..s })
            .unwrap()
    }

    #[test]
    fn arrange_places_answers_and_refuses_bad_records() {
        let s = [sample(2), sample(1)];
        let g = |item, question| Generated { item, question, answer: format!("{item}.{question}") };
        let records = [g(1, 0), g(0, 1)];
        let a = arrange(&s, &records).unwrap();
        assert_eq!(a, vec![vec![None, Some("0.1")], vec![Some("1.0")]]);
        let e = arrange(&s, &[g(2, 0)]).unwrap_err();
        assert!(crate::error::is_user_error(&e) && e.to_string().contains("item 2 is out of range"), "{e}");
        let e = arrange(&s, &[g(1, 1)]).unwrap_err();
        assert!(e.to_string().contains("question 1 is out of range"), "{e}");
        let e = arrange(&s, &[g(0, 0), g(0, 0)]).unwrap_err();
        assert!(e.to_string().contains("generated answer 1: item 0 question 0 was already answered"), "{e}");
    }

    #[test]
    fn accuracy_mean_and_formatting() {
        let mut a = Accuracy::default();
        assert_eq!(a.accuracy, None);
        a.add(true);
        a.add(false);
        assert_eq!(a, Accuracy::new(1, 2));
        assert_eq!(a.accuracy, Some(0.5));
        assert_eq!(mean_of([Some(1.0), None, Some(0.5)]), Some(0.75));
        assert_eq!(mean_of([None]), None);
        assert_eq!(pct(Some(23.0 / 28.0)), "82.1");
        assert_eq!(pct(None), "—");
        assert_eq!(num(Some(0.85355), 3), "0.854");
    }
}
