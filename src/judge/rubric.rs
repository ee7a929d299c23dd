//! The `rubric` judge: offline and deterministic, a proxy for an LLM judge in CI and on machines
//! without an endpoint. Its scores are rules over the ground truth, not opinions:
//! - **type**: 1 if the conclusion is wrong or missing; 5 if it is right and the answer names the
//!   defect type (any word of it) or, for a normal sample, claims no defect; otherwise 3.
//! - **location**: 1 if the conclusion is wrong; 5 if there is nothing to locate; otherwise
//!   2 + 3 × the share of the truth's location words (left, upper, corner, edge, ...; from the
//!   sample's location, else from the reference answer) that the answer also uses.
//! - **logic**: MiniLM cosine similarity to the best reference answer, mapped linearly from
//!   [0.3, 0.9] to [1, 5]; capped at 2 when the conclusion is wrong.
//!
//! Graded (config `graded = true`): an expert reads a hedge ("I am not sure", "hard to tell",
//! "low confidence", "may be wrong", ...) as reasoning the answer does not stand behind, so each
//! hedge phrase lowers logic by 2 and location by 1 (never below 1). Without it, the right
//! conclusion said vaguely (AD-PL's rank 2) and said with a hedge (rank 3) score alike (3.70 and
//! 3.69 on ELPV), and the entropy gap between adjacent ranks, which E-DPO's ΔH_min pair is chosen
//! by, is noise.

use super::{parse_conclusion, JudgeRequest, JudgeScores};
use crate::models::bert::{cosine, SentenceEncoder};
use anyhow::Result;
use std::collections::BTreeSet;

const LOCATION_WORDS: &[&str] = &[
    "left",
    "right",
    "top",
    "bottom",
    "upper",
    "lower",
    "center",
    "centre",
    "middle",
    "corner",
    "edge",
    "edges",
    "border",
    "side",
    "across",
    "diagonal",
    "diagonally",
    "horizontal",
    "vertical",
    "busbar",
    "busbars",
    "finger",
    "fingers",
    "periphery",
    "inner",
    "outer",
    "near",
];

fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase).collect()
}

fn location_words(text: &str) -> BTreeSet<String> {
    words(text).into_iter().filter(|w| LOCATION_WORDS.contains(&w.as_str())).collect()
}

/// Phrases that hedge a claim (lower-case; matched on word boundaries of the lower-cased answer).
const HEDGES: &[&str] = &[
    "not sure",
    "hard to tell",
    "hard to say",
    "low confidence",
    "may be wrong",
    "might be wrong",
    "i think",
    "possibly",
    "perhaps",
    "unclear",
];

/// How many hedge phrases `text` contains.
pub fn hedges(text: &str) -> usize {
    let t = format!(" {} ", words(text).join(" "));
    HEDGES.iter().filter(|h| t.contains(&format!(" {h} "))).count()
}

pub struct RubricJudge {
    encoder: SentenceEncoder,
    graded: bool,
    /// Embeddings of reference answers: every ranked answer of a question is judged against the
    /// same one.
    references: std::sync::Mutex<std::collections::HashMap<String, Vec<f32>>>,
}

impl RubricJudge {
    /// The judge; `graded` turns on the hedge rule (see the module's doc).
    pub fn new(encoder: SentenceEncoder, graded: bool) -> Self {
        RubricJudge { encoder, graded, references: Default::default() }
    }

    fn reference_embedding(&self, text: &str) -> Result<Vec<f32>> {
        let mut cache = self.references.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = cache.get(text) {
            return Ok(e.clone());
        }
        let e = self.encoder.embed(text)?;
        if cache.len() >= 4096 {
            cache.clear();
        }
        cache.insert(text.to_string(), e.clone());
        Ok(e)
    }

    pub fn score(&self, r: &JudgeRequest) -> Result<JudgeScores> {
        let said = parse_conclusion(&r.answer);
        let truth = r.truth.conclusion.as_deref().and_then(parse_conclusion);
        let right = match (said, truth) {
            (Some(a), Some(b)) => a == b,
            // No ground truth: judge on content alone.
            (_, None) => said.is_some(),
            (None, Some(_)) => false,
        };
        let mut why = vec![format!(
            "conclusion {}",
            match (said, right) {
                (None, _) => "missing",
                (_, true) => "right",
                (_, false) => "wrong",
            }
        )];
        let answer_words: BTreeSet<String> = words(&r.answer).into_iter().collect();

        let type_ = if !right {
            1
        } else if let Some(d) = r.truth.defect_type.as_deref().filter(|d| !d.is_empty() && *d != "good") {
            let terms: Vec<String> = words(d).into_iter().filter(|w| w.len() >= 3).collect();
            if terms.iter().any(|t| answer_words.iter().any(|w| w.starts_with(t.as_str()))) {
                why.push(format!("names the defect ({d})"));
                5
            } else {
                why.push(format!("does not name the defect ({d})"));
                3
            }
        } else {
            5
        };

        // The ground-truth location when the sample has one, else the reference answer's words.
        let mut ref_locs = location_words(r.truth.location.as_deref().unwrap_or(""));
        if ref_locs.is_empty() {
            ref_locs = location_words(r.reference_answer.as_deref().unwrap_or(""));
        }
        let location = if !right {
            1
        } else if ref_locs.is_empty() {
            5
        } else {
            let ans_locs = location_words(&r.answer);
            let shared = ref_locs.intersection(&ans_locs).count();
            why.push(format!("{shared}/{} reference location words", ref_locs.len()));
            2 + (3.0 * shared as f32 / ref_locs.len() as f32).round() as u8
        };

        let logic = match r.reference_answer.as_deref().filter(|a| !a.trim().is_empty()) {
            Some(reference) => {
                let cos = cosine(&self.encoder.embed(&r.answer)?, &self.reference_embedding(reference)?);
                why.push(format!("similarity to the reference {cos:.2}"));
                let l = 1 + (4.0 * ((cos - 0.3) / 0.6).clamp(0.0, 1.0)).round() as u8;
                if right {
                    l
                } else {
                    l.min(2)
                }
            }
            None => {
                if right {
                    3
                } else {
                    1
                }
            }
        };
        let (mut location, mut logic) = (location, logic);
        let n = if self.graded { hedges(&r.answer) } else { 0 };
        if n > 0 {
            why.push(format!("{n} hedge(s)"));
            logic = logic.saturating_sub(2 * n as u8).max(1);
            location = location.saturating_sub(n as u8).max(1);
        }
        Ok(JudgeScores { type_, location, logic, rationale: why.join("; ") })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hedges_are_counted_on_word_boundaries() {
        assert_eq!(hedges("Yes, although I am not sure: a crack crosses the cell."), 1);
        assert_eq!(hedges("Yes, but it is hard to tell; perhaps a crack."), 2);
        assert_eq!(hedges("Yes, a crack crosses the upper left corner."), 0);
        // "notsure" and "perhapsx" are not the phrases.
        assert_eq!(hedges("notsure perhapsx unclearly"), 0);
    }
}
