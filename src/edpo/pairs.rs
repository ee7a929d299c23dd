//! Which answers of an instance face each other (ARCHITECTURE.md §1, stage 2).
//!
//! An instance is one AD-PL question with its `L` ranked answers, best first, and the judge's
//! entropy `H(a_i)` of each answer's three scores. Two pairs per instance, the winner always the
//! better-ranked answer:
//! - **ΔH_max**: the best against the worst, `(a_1, a_L)`;
//! - **ΔH_min**: the adjacent pair `(a_i, a_{i+1})` with the smallest `|H(a_i) − H(a_{i+1})|`
//!   (the first such pair on a tie).
//!
//! With `L = 2` both are the same pair, which is then used once.

use crate::ops::edpo::Pair;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum PairChoice {
    /// Both pairs (the paper's setting).
    Both,
    /// Only (best, worst).
    Max,
    /// Only the adjacent pair with the smallest entropy gap.
    Min,
}

/// The pairs of one instance; `Pair` indices are answer ranks (0 = best) and
/// `delta_h = H(winner) − H(loser)`.
pub fn instance_pairs(entropies: &[f32], choice: PairChoice) -> Vec<Pair> {
    let l = entropies.len();
    if l < 2 {
        return vec![];
    }
    let pair = |w: usize, r: usize| Pair { chosen: w, rejected: r, delta_h: entropies[w] - entropies[r] };
    let max = pair(0, l - 1);
    let min_i = (0..l - 1)
        .min_by(|&a, &b| {
            let gap = |i: usize| (entropies[i] - entropies[i + 1]).abs();
            gap(a).total_cmp(&gap(b))
        })
        .expect("l ≥ 2");
    let min = pair(min_i, min_i + 1);
    match choice {
        PairChoice::Max => vec![max],
        PairChoice::Min => vec![min],
        PairChoice::Both if min == max => vec![max],
        PairChoice::Both => vec![max, min],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_is_best_against_worst_and_min_the_closest_adjacent_entropies() {
        // Gaps between neighbours: |0.2−0.9| = 0.7, |0.9−0.85| = 0.05, |0.85−0.3| = 0.55.
        let h = [0.2, 0.9, 0.85, 0.3];
        let both = instance_pairs(&h, PairChoice::Both);
        assert_eq!(both.len(), 2);
        assert_eq!((both[0].chosen, both[0].rejected), (0, 3));
        assert!((both[0].delta_h - (0.2 - 0.3)).abs() < 1e-6);
        assert_eq!((both[1].chosen, both[1].rejected), (1, 2));
        assert!((both[1].delta_h - 0.05).abs() < 1e-6);
        assert_eq!(instance_pairs(&h, PairChoice::Max), vec![both[0]]);
        assert_eq!(instance_pairs(&h, PairChoice::Min), vec![both[1]]);
    }

    #[test]
    fn ties_take_the_first_pair_and_two_answers_give_one_pair() {
        let h = [1.0, 1.0, 1.0, 1.0];
        let p = instance_pairs(&h, PairChoice::Min);
        assert_eq!((p[0].chosen, p[0].rejected), (0, 1));
        assert_eq!(instance_pairs(&[0.5, 0.1], PairChoice::Both).len(), 1);
        assert!(instance_pairs(&[0.5], PairChoice::Both).is_empty());
    }
}
