//! Judges score an answer against a sample's ground truth on SAGE's MLE criteria: defect type,
//! location and logic, each 1–5 (ARCHITECTURE.md §1). The request and result travel as JSON through the
//! plugin ABI; these are their shapes. Scoring a whole dataset through a judge plugin, with its cache,
//! is the `sage score` stage's ([`crate::score`]), above the plugins.

pub mod rubric;

use serde::{Deserialize, Serialize};

pub use crate::data::sample::conclusion as parse_conclusion;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Truth {
    /// "Yes" or "No": the right answer to the question.
    #[serde(default)]
    pub conclusion: Option<String>,
    #[serde(default)]
    pub defect_type: Option<String>,
    #[serde(default)]
    pub category: Option<String>,
    #[serde(default)]
    pub location: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JudgeRequest {
    pub question: String,
    pub answer: String,
    /// The best-ranked reference answer, when the dataset has one.
    #[serde(default)]
    pub reference_answer: Option<String>,
    #[serde(default)]
    pub truth: Truth,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JudgeScores {
    #[serde(rename = "type")]
    pub type_: u8,
    pub location: u8,
    pub logic: u8,
    #[serde(default)]
    pub rationale: String,
}

impl JudgeScores {
    /// The MLE score: the mean of the three.
    pub fn mean(&self) -> f32 {
        (self.type_ + self.location + self.logic) as f32 / 3.0
    }
}
