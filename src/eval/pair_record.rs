//! The per-image-pair record an AD-PL report keeps ([`super::adpl`] writes it; [`super::intervals`]
//! resamples it), in a module of its own so that the two depend on it and not on each other.

use crate::data::sample::Level;
use serde::{Deserialize, Serialize};

/// One image pair's part of the report, kept so that intervals and paired comparisons can
/// resample pairs (the questions of a pair move together) from the JSON report alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PairRecord {
    pub id: String,
    /// The pair's label, when the data has one.
    pub anomalous: Option<bool>,
    /// Per question: its level, and whether its conclusion was right (`None`: not scored).
    pub levels: Vec<Option<Level>>,
    pub right: Vec<Option<bool>>,
    /// Every question was scored (the pair counts in Acc-G).
    pub complete: bool,
    /// The model's probability that the pair is anomalous: the mean, over its scored questions,
    /// of the probability of the answer that means "anomalous" (from the first token; with
    /// generated conclusions, 1 or 0). Which answer means "anomalous" is fixed by the question's
    /// wording; it is read from the data as the truth of an anomalous pair (truth == label).
    pub p_anomalous: Option<f64>,
    /// The training-free anomaly map's image score of the same pair (its maximum), when the
    /// evaluation computed maps.
    #[serde(default)]
    pub map_score: Option<f64>,
    /// SBERT cosines and judge means of this pair's generated answers.
    pub sbert: Vec<f64>,
    pub mle: Vec<f64>,
}
