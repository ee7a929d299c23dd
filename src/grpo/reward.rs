//! GRPO's fine-grained rewards (AD-FM): format, classification and localisation, each a pure
//! function of a parsed answer and the sample's ground truth, and their weighted total.

use super::format::{Parsed, STAGES};
use serde::{Deserialize, Serialize};

/// What an answer is scored against.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Truth {
    pub anomalous: bool,
    /// The dataset's defect type (`None`: unknown, the verdict alone is scored).
    pub defect_type: Option<String>,
    /// Defect boxes in the test image's pixels (from the mask's connected components or the
    /// dataset's box annotations); empty: localisation is not scored.
    pub boxes: Vec<[f32; 4]>,
}

/// The reward's settings (`[grpo.reward]`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RewardConfig {
    pub format_weight: f32,
    pub class_weight: f32,
    pub loc_weight: f32,
    /// The classification reward of the right verdict with the wrong defect type (AD-FM: 0.8).
    pub partial_type: f32,
    /// The share of the localisation reward given to the box count (`1 − |n̂ − n| / max(n̂, n)`);
    /// the rest is the matched boxes' mean GIoU mapped to [0, 1].
    pub count_share: f32,
    /// Score the verdict, type and boxes only from a complete `<answer>…</answer>` stage. The
    /// parser also finds a verdict in the text after the last stage, which is right for reading
    /// a model's answer but wrong to reward: a policy learns that "<think>no</think>" followed by
    /// rambling until the token cap passes for a normal verdict (seen on ELPV, where the answers
    /// grew to the cap and the held-out accuracy fell).
    pub answer_only: bool,
    /// DAPO's soft overlong punishment: over the last `overlong_buffer` tokens before
    /// `grpo.max_new` the total falls linearly, by up to `overlong_penalty`, which an answer cut
    /// off at the cap gets in full. 0 tokens: only a cut-off answer is punished.
    pub overlong_buffer: usize,
    pub overlong_penalty: f32,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            format_weight: 0.2,
            class_weight: 1.0,
            loc_weight: 0.5,
            partial_type: 0.8,
            count_share: 0.2,
            answer_only: true,
            overlong_buffer: 16,
            overlong_penalty: 0.5,
        }
    }
}

/// One answer's reward: each part in [0, 1], the length penalty, and the total (the weighted mean
/// of the parts that apply, less the penalty).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Reward {
    pub format: f32,
    pub class: f32,
    /// `None` when the truth has no boxes (a normal image, or an anomaly without a mask).
    pub loc: Option<f32>,
    /// What [`overlong_penalty`] took off the total.
    pub overlong: f32,
    pub total: f32,
}

impl Reward {
    /// The reward less a length penalty.
    pub fn less_overlong(self, penalty: f32) -> Reward {
        Reward { overlong: penalty, total: self.total - penalty, ..self }
    }
}

/// How long an answer was: tokens generated (the prefilled prefix not counted), whether it ended
/// by itself, and the cap it was sampled under.
#[derive(Clone, Copy, Debug)]
pub struct Length {
    pub generated: usize,
    pub stopped: bool,
    pub max_new: usize,
}

/// DAPO's soft overlong punishment (Yu et al. 2025): 0 up to `max_new − overlong_buffer` tokens,
/// then rising linearly to `overlong_penalty` at the cap; an answer cut off by the cap gets the
/// full penalty. Without it a cut-off answer is scored on a fragment, and the rambling that
/// reaches the cap is never pushed back.
pub fn overlong_penalty(len: Length, cfg: &RewardConfig) -> f32 {
    if !len.stopped {
        return cfg.overlong_penalty;
    }
    let buffer = cfg.overlong_buffer.min(len.max_new);
    let start = len.max_new - buffer;
    if buffer == 0 || len.generated <= start {
        return 0.0;
    }
    cfg.overlong_penalty * ((len.generated - start) as f32 / buffer as f32).min(1.0)
}

/// The share of the three stages present as complete tags and in order: the longest
/// subsequence of `think → rethink → answer` that the answer's stages follow, over three.
pub fn format_reward(p: &Parsed) -> f32 {
    // The longest common subsequence of the found stages and STAGES (at most 3 × 3).
    let (a, b) = (&p.stages, &STAGES);
    let mut table = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in 0..a.len() {
        for j in 0..b.len() {
            table[i + 1][j + 1] = if a[i] == b[j] { table[i][j] + 1 } else { table[i][j + 1].max(table[i + 1][j]) };
        }
    }
    table[a.len()][b.len()] as f32 / STAGES.len() as f32
}

/// 1 for the right verdict (and, for an anomaly of known type, the right type), `partial_type`
/// for the right verdict with a wrong or missing type, 0 for a wrong or missing verdict.
pub fn class_reward(p: &Parsed, truth: &Truth, partial_type: f32) -> f32 {
    match p.verdict {
        Some(v) if v == truth.anomalous => match (&truth.defect_type, truth.anomalous) {
            (Some(t), true) => {
                let said = p.defect_type.as_deref().map(normalize_type);
                if said.as_deref() == Some(normalize_type(t).as_str()) {
                    1.0
                } else {
                    partial_type
                }
            }
            _ => 1.0,
        },
        _ => 0.0,
    }
}

/// Lower case, `_`/`-` as spaces, single spaces: `"Broken_Large"` and `"broken large"` agree.
fn normalize_type(t: &str) -> String {
    t.to_ascii_lowercase().replace(['_', '-'], " ").split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Boxes `[x_min, y_min, x_max, y_max]`: predicted matched to true ones by the Hungarian
/// algorithm (maximum total GIoU), then `(1 − count_share)·mean((GIoU + 1)/2 over the matches) +
/// count_share·(1 − |n̂ − n| / max(n̂, n))`. No prediction scores 0; `None` when there is no true
/// box.
pub fn loc_reward(pred: &[[f32; 4]], truth: &[[f32; 4]], count_share: f32) -> Option<f32> {
    if truth.is_empty() {
        return None;
    }
    if pred.is_empty() {
        return Some(0.0);
    }
    let gain: Vec<Vec<f64>> = pred.iter().map(|p| truth.iter().map(|t| giou(p, t)).collect()).collect();
    let matches = hungarian_max(&gain);
    let mean = matches.iter().map(|&(i, j)| (gain[i][j] + 1.0) / 2.0).sum::<f64>() / matches.len() as f64;
    let (np, nt) = (pred.len() as f64, truth.len() as f64);
    let count = 1.0 - (np - nt).abs() / np.max(nt);
    Some(((1.0 - count_share as f64) * mean + count_share as f64 * count) as f32)
}

/// The weighted mean of the parts that apply (no length penalty: see [`Reward::less_overlong`]).
/// With `answer_only`, an answer without a complete `<answer>` stage has no verdict and no boxes.
pub fn reward(p: &Parsed, truth: &Truth, cfg: &RewardConfig) -> Reward {
    let format = format_reward(p);
    let answered = !cfg.answer_only || p.stages.contains(&"answer");
    let class = if answered { class_reward(p, truth, cfg.partial_type) } else { 0.0 };
    let loc = loc_reward(if answered { &p.boxes } else { &[] }, &truth.boxes, cfg.count_share);
    let mut sum = cfg.format_weight * format + cfg.class_weight * class;
    let mut weights = cfg.format_weight + cfg.class_weight;
    if let Some(l) = loc {
        sum += cfg.loc_weight * l;
        weights += cfg.loc_weight;
    }
    Reward { format, class, loc, overlong: 0.0, total: if weights > 0.0 { sum / weights } else { 0.0 } }
}

/// Generalised IoU (Rezatofighi et al. 2019): IoU minus the share of the smallest enclosing box
/// that neither box covers; in [−1, 1], 1 for identical boxes. Degenerate (zero-area) boxes
/// count by their enclosing box alone.
pub fn giou(a: &[f32; 4], b: &[f32; 4]) -> f64 {
    let [ax0, ay0, ax1, ay1] = a.map(|v| v as f64);
    let [bx0, by0, bx1, by1] = b.map(|v| v as f64);
    let area = |x0: f64, y0: f64, x1: f64, y1: f64| (x1 - x0).max(0.0) * (y1 - y0).max(0.0);
    let inter = area(ax0.max(bx0), ay0.max(by0), ax1.min(bx1), ay1.min(by1));
    let union = area(ax0, ay0, ax1, ay1) + area(bx0, by0, bx1, by1) - inter;
    let hull = area(ax0.min(bx0), ay0.min(by0), ax1.max(bx1), ay1.max(by1));
    let iou = if union > 0.0 { inter / union } else { 0.0 };
    if hull > 0.0 {
        iou - (hull - union) / hull
    } else {
        iou
    }
}

/// The assignment of rows to columns (each used at most once, `min(rows, cols)` pairs) with the
/// largest total `gain`: the Hungarian algorithm (shortest augmenting paths with potentials,
/// O(n²·m)) on the costs `−gain`, the matrix padded square with zeros. Written here rather than
/// taken from a crate: the graph crates that have it want integer weights, and boxes per image
/// are few.
pub fn hungarian_max(gain: &[Vec<f64>]) -> Vec<(usize, usize)> {
    let rows = gain.len();
    let cols = gain.first().map_or(0, Vec::len);
    let n = rows.max(cols);
    if n == 0 {
        return Vec::new();
    }
    let cost = |i: usize, j: usize| if i < rows && j < cols { -gain[i][j] } else { 0.0 };
    // 1-based potentials u (rows), v (columns); way/p as in the classic e-maxx formulation.
    let (mut u, mut v) = (vec![0.0f64; n + 1], vec![0.0f64; n + 1]);
    let (mut p, mut way) = (vec![0usize; n + 1], vec![0usize; n + 1]);
    for i in 1..=n {
        p[0] = i;
        let mut j0 = 0;
        let mut minv = vec![f64::INFINITY; n + 1];
        let mut used = vec![false; n + 1];
        loop {
            used[j0] = true;
            let i0 = p[j0];
            let (mut delta, mut j1) = (f64::INFINITY, 0);
            for j in 1..=n {
                if !used[j] {
                    let cur = cost(i0 - 1, j - 1) - u[i0] - v[j];
                    if cur < minv[j] {
                        minv[j] = cur;
                        way[j] = j0;
                    }
                    if minv[j] < delta {
                        delta = minv[j];
                        j1 = j;
                    }
                }
            }
            for j in 0..=n {
                if used[j] {
                    u[p[j]] += delta;
                    v[j] -= delta;
                } else {
                    minv[j] -= delta;
                }
            }
            j0 = j1;
            if p[j0] == 0 {
                break;
            }
        }
        loop {
            let j1 = way[j0];
            p[j0] = p[j1];
            j0 = j1;
            if j0 == 0 {
                break;
            }
        }
    }
    let mut out: Vec<(usize, usize)> =
        (1..=n).filter(|&j| p[j] >= 1 && p[j] <= rows && j <= cols).map(|j| (p[j] - 1, j - 1)).collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::super::format::parse;
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn giou_of_hand_drawn_pairs() {
        // Identical: IoU 1, the hull is the box.
        assert!(close(giou(&[0., 0., 2., 2.], &[0., 0., 2., 2.]), 1.0));
        // Nested: a 1×1 inside a 2×2: IoU 1/4, the hull is the outer box (no empty share).
        assert!(close(giou(&[0., 0., 2., 2.], &[0.5, 0.5, 1.5, 1.5]), 0.25));
        // Partial: [0,2]² and [1,3]²: intersection 1, union 7, hull 9 → 1/7 − 2/9.
        assert!(close(giou(&[0., 0., 2., 2.], &[1., 1., 3., 3.]), 1.0 / 7.0 - 2.0 / 9.0));
        // Disjoint side by side with a gap: [0,1]² and [2,0,3,1]: union 2, hull 3 → −1/3.
        assert!(close(giou(&[0., 0., 1., 1.], &[2., 0., 3., 1.]), -1.0 / 3.0));
        // Disjoint far apart diagonally: [0,1]² and [9,10]²: union 2, hull 100 → −0.98.
        assert!(close(giou(&[0., 0., 1., 1.], &[9., 9., 10., 10.]), -0.98));
    }

    #[test]
    fn hungarian_beats_greedy_where_greedy_is_wrong() {
        // Greedy takes the largest entry (0,0) = 0.9 and is left with (1,1) = 0.1: total 1.0.
        // The optimum crosses over: (0,1) + (1,0) = 0.8 + 0.8 = 1.6.
        let gain = vec![vec![0.9, 0.8], vec![0.8, 0.1]];
        assert_eq!(hungarian_max(&gain), vec![(0, 1), (1, 0)]);
    }

    #[test]
    fn hungarian_matches_brute_force_on_rectangular_matrices() {
        let mut seed = 12345u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f64) / (1u64 << 31) as f64 * 2.0 - 1.0
        };
        for (rows, cols) in [(1, 1), (2, 3), (3, 2), (4, 4), (5, 3), (2, 5)] {
            for _ in 0..20 {
                let gain: Vec<Vec<f64>> = (0..rows).map(|_| (0..cols).map(|_| next()).collect()).collect();
                let got: f64 = hungarian_max(&gain).iter().map(|&(i, j)| gain[i][j]).sum();
                assert_eq!(hungarian_max(&gain).len(), rows.min(cols));
                assert!(close(got, best_by_brute_force(&gain)), "{rows}x{cols}: {got} for {gain:?}");
            }
        }
    }

    /// The best total over every injective map of the smaller side into the larger.
    fn best_by_brute_force(gain: &[Vec<f64>]) -> f64 {
        fn go(gain: &[Vec<f64>], i: usize, used: &mut Vec<bool>, transpose: bool) -> f64 {
            let (rows, cols) = if transpose { (gain[0].len(), gain.len()) } else { (gain.len(), gain[0].len()) };
            if i == rows {
                return 0.0;
            }
            let mut best = f64::NEG_INFINITY;
            for j in 0..cols {
                if !used[j] {
                    used[j] = true;
                    let g = if transpose { gain[j][i] } else { gain[i][j] };
                    best = best.max(g + go(gain, i + 1, used, transpose));
                    used[j] = false;
                }
            }
            best
        }
        let transpose = gain.len() > gain[0].len();
        let cols = if transpose { gain.len() } else { gain[0].len() };
        go(gain, 0, &mut vec![false; cols], transpose)
    }

    #[test]
    fn loc_reward_scores_matches_and_counts() {
        let truth = [[0., 0., 2., 2.], [10., 10., 12., 12.]];
        // Both found exactly, in the other order: GIoU 1 each, counts equal.
        assert_eq!(loc_reward(&[[10., 10., 12., 12.], [0., 0., 2., 2.]], &truth, 0.2), Some(1.0));
        // One exact box of two: mean (1+1)/2 = 1 over the one match, count 1 − 1/2.
        let one = loc_reward(&[[0., 0., 2., 2.]], &truth, 0.2).unwrap();
        assert!((one - (0.8 + 0.2 * 0.5)).abs() < 1e-6, "{one}");
        assert_eq!(loc_reward(&[], &truth, 0.2), Some(0.0));
        assert_eq!(loc_reward(&[[0., 0., 1., 1.]], &[], 0.2), None);
    }

    #[test]
    fn class_reward_full_partial_and_none() {
        let crack = Truth { anomalous: true, defect_type: Some("Crack".into()), boxes: vec![] };
        let right = parse("<answer>anomalous; type: crack</answer>");
        let wrong_type = parse("<answer>anomalous; type: scratch</answer>");
        let no_type = parse("<answer>anomalous</answer>");
        let normal = parse("<answer>normal</answer>");
        assert_eq!(class_reward(&right, &crack, 0.8), 1.0);
        assert_eq!(class_reward(&wrong_type, &crack, 0.8), 0.8);
        assert_eq!(class_reward(&no_type, &crack, 0.8), 0.8);
        assert_eq!(class_reward(&normal, &crack, 0.8), 0.0);
        let good = Truth { anomalous: false, ..Truth::default() };
        assert_eq!(class_reward(&normal, &good, 0.8), 1.0);
        assert_eq!(class_reward(&right, &good, 0.8), 0.0);
        assert_eq!(class_reward(&parse("I cannot tell"), &good, 0.8), 0.0);
        // "broken_large" in the data and "broken large" in the answer agree.
        let t = Truth { anomalous: true, defect_type: Some("broken_large".into()), boxes: vec![] };
        assert_eq!(class_reward(&parse("<answer>anomalous; type: Broken large</answer>"), &t, 0.8), 1.0);
    }

    #[test]
    fn format_reward_counts_stages_in_order() {
        assert_eq!(format_reward(&parse("<think>a</think><rethink>b</rethink><answer>c</answer>")), 1.0);
        assert!((format_reward(&parse("<think>a</think><answer>c</answer>")) - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(format_reward(&parse("<answer>c</answer><think>a</think>")), 1.0 / 3.0);
        assert_eq!(format_reward(&parse("Yes.")), 0.0);
    }

    #[test]
    fn total_is_the_weighted_mean_of_the_parts_that_apply() {
        let cfg = RewardConfig::default();
        let p = parse("<think>a</think><rethink>b</rethink><answer>anomalous; type: crack; box: [0, 0, 2, 2]</answer>");
        let t = Truth { anomalous: true, defect_type: Some("crack".into()), boxes: vec![[0., 0., 2., 2.]] };
        assert_eq!(reward(&p, &t, &cfg).total, 1.0);
        let no_boxes = Truth { boxes: vec![], ..t };
        let r = reward(&parse("<answer>normal</answer>"), &no_boxes, &cfg);
        assert_eq!(r.loc, None);
        let want = (0.2 * (1.0 / 3.0)) / 1.2;
        assert!((r.total - want).abs() < 1e-6, "{r:?}");
    }

    #[test]
    fn only_a_complete_answer_stage_is_scored_when_answer_only() {
        let t = Truth { anomalous: false, ..Truth::default() };
        // The exploit seen on ELPV: a verdict word outside any answer stage, then text until
        // the cap.
        let p = parse("<think>a dark line</think> no, it looks good and the");
        assert_eq!(p.verdict, Some(false), "the parser still reads the verdict");
        let strict = RewardConfig::default();
        let lenient = RewardConfig { answer_only: false, ..strict };
        assert_eq!(reward(&p, &t, &strict).class, 0.0);
        assert_eq!(reward(&p, &t, &lenient).class, 1.0);
        let boxed = Truth { anomalous: true, defect_type: None, boxes: vec![[0., 0., 2., 2.]] };
        let p = parse("<think>a</think> anomalous [0, 0, 2, 2]");
        assert_eq!((reward(&p, &boxed, &strict).class, reward(&p, &boxed, &strict).loc), (0.0, Some(0.0)));
        assert_eq!((reward(&p, &boxed, &lenient).class, reward(&p, &boxed, &lenient).loc), (1.0, Some(1.0)));
    }

    #[test]
    fn overlong_penalty_ramps_over_the_buffer_and_is_full_when_cut_off() {
        let cfg = RewardConfig { overlong_buffer: 16, overlong_penalty: 0.5, ..RewardConfig::default() };
        let at = |generated, stopped| overlong_penalty(Length { generated, stopped, max_new: 80 }, &cfg);
        assert_eq!(at(64, true), 0.0);
        assert_eq!(at(72, true), 0.25);
        assert_eq!(at(79, true), 0.5 * 15.0 / 16.0);
        assert_eq!(at(80, false), 0.5);
        assert_eq!(at(10, false), 0.5, "cut off is cut off, however short the cap");
        let none = RewardConfig { overlong_buffer: 0, ..cfg };
        assert_eq!(overlong_penalty(Length { generated: 79, stopped: true, max_new: 80 }, &none), 0.0);
        let r = Reward { total: 0.9, ..Reward::default() }.less_overlong(0.25);
        assert!((r.total - 0.65).abs() < 1e-6 && r.overlong == 0.25, "{r:?}");
    }
}
