//! The multi-stage answer GRPO trains (AD-FM's format): `<think>` (candidate regions, with boxes
//! in the test image's pixel coordinates) → `<rethink>` (a focused look at them) → `<answer>` (the
//! verdict, and the defect's type and box when anomalous); the prompt that asks for it, and a
//! lenient parser that takes what it can from any text and says what it could not.

/// The three stages, in the order an answer must give them.
pub const STAGES: [&str; 3] = ["think", "rethink", "answer"];

/// What every answer begins with, fed to the model rather than sampled: an SFE model answers
/// "Yes, …"/"No, …" and would almost never open a stage by itself, which leaves the format reward
/// (and its advantage) at zero for every answer of every group. Starting the first stage for it
/// is the usual R1-style prefill; the model still has to close it and write the other two.
pub const ANSWER_PREFIX: &str = "<think>";

/// The question GRPO asks about a test image of `width`×`height` pixels (the image pair and any
/// facts come before it in the user turn, as for every question). It spells the format out with
/// an example: a small model copies a shown shape long before it learns one from rewards alone.
/// With the map cue on, `region` is the box the training-free map points at
/// (`models::sage::map_cue::region`), stated as a candidate the answer may take or leave.
pub fn prompt(width: u32, height: u32, region: Option<[f32; 4]>) -> String {
    let region =
        region.map_or(String::new(), |b| format!(" The patch comparison differs most at {}.", written_box(&b)));
    format!(
        "Test image: {width}x{height} pixels.{region} Reply as <think>regions as [x1, y1, x2, y2]</think>\
         <rethink>a closer look</rethink><answer>normal, or anomalous; type: <defect>; box: [x1, y1, x2, y2]\
         </answer>. Example: <think>dark patch [40, 60, 120, 140]</think><rethink>darker than the reference\
         </rethink><answer>anomalous; type: crack; box: [40, 60, 120, 140]</answer>"
    )
}

/// A box as the format writes it: `[x1, y1, x2, y2]` in whole pixels.
fn written_box(b: &[f32; 4]) -> String {
    format!("[{:.0}, {:.0}, {:.0}, {:.0}]", b[0], b[1], b[2], b[3])
}

/// The ground truth written in the format (the cold start's targets): the true boxes (the three
/// largest, in whole pixels) in the verdict, the type when known. The `<think>` stage lists the
/// candidate regions: with the map cue, `candidate` (the map's region, which the prompt names) for
/// both labels, so the cold start teaches the stages' roles — candidates from the comparison,
/// then a look, then the verdict and the true box — and an answer that writes numbers from the
/// first GRPO step; without it, the true boxes themselves.
pub fn written_truth(
    anomalous: bool,
    defect_type: Option<&str>,
    boxes: &[[f32; 4]],
    candidate: Option<[f32; 4]>,
) -> String {
    if !anomalous {
        return match candidate {
            Some(c) => format!(
                "<think>{}</think><rethink>it matches the reference there</rethink><answer>normal</answer>",
                written_box(&c)
            ),
            None => "<think>no region stands out</think><rethink>the test image matches the reference</rethink>\
                     <answer>normal</answer>"
                .into(),
        };
    }
    let mut largest: Vec<&[f32; 4]> = boxes.iter().collect();
    largest.sort_by(|a, b| ((b[2] - b[0]) * (b[3] - b[1])).total_cmp(&((a[2] - a[0]) * (a[3] - a[1]))));
    largest.truncate(3);
    let truth = largest.iter().map(|b| written_box(b)).collect::<Vec<_>>().join(" ");
    let regions = match candidate {
        Some(c) => written_box(&c),
        None if truth.is_empty() => "a region unlike the reference".to_string(),
        None => truth.clone(),
    };
    let mut answer = "anomalous".to_string();
    if let Some(t) = defect_type {
        answer += &format!("; type: {}", t.replace('_', " "));
    }
    if !truth.is_empty() {
        answer += &format!("; box: {truth}");
    }
    format!("<think>{regions}</think><rethink>it differs from the reference there</rethink><answer>{answer}</answer>")
}

/// What [`parse`] read from one answer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Parsed {
    /// The stages found as a complete `<tag>…</tag>`, in the order they appear.
    pub stages: Vec<&'static str>,
    /// `Some(true)`: anomalous; `Some(false)`: normal; `None`: no verdict found.
    pub verdict: Option<bool>,
    /// The defect type named after `type:` in the verdict's text (lower case, trimmed).
    pub defect_type: Option<String>,
    /// The boxes of the verdict's text, `[x_min, y_min, x_max, y_max]` (corners put in order).
    pub boxes: Vec<[f32; 4]>,
    /// What could not be read (a missing stage, a box that is not four numbers, no verdict).
    pub problems: Vec<String>,
}

/// The text between `<tag>` and the next `</tag>` after it, and where the close tag ends.
fn stage_text<'a>(text: &'a str, tag: &str, from: usize) -> Option<(&'a str, usize, usize)> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = from + text[from..].find(&open)?;
    let body = start + open.len();
    let end = body + text[body..].find(&close)?;
    Some((&text[body..end], start, end + close.len()))
}

/// Reads an answer leniently. The verdict, type and boxes come from the `<answer>` stage when it
/// is there, else from the text after the last stage found, else from the whole text. A stage
/// counts when its open and close tags both appear; it is listed in `stages` in text order.
pub fn parse(text: &str) -> Parsed {
    let lower = text.to_ascii_lowercase();
    let mut p = Parsed::default();
    let mut found: Vec<(usize, &'static str)> =
        STAGES.iter().filter_map(|&tag| stage_text(&lower, tag, 0).map(|(_, start, _)| (start, tag))).collect();
    found.sort_unstable();
    p.stages = found.iter().map(|&(_, t)| t).collect();
    for tag in STAGES {
        if !p.stages.contains(&tag) {
            p.problems.push(format!("no <{tag}>…</{tag}> stage"));
        }
    }
    let verdict_text: &str = match stage_text(&lower, "answer", 0) {
        Some((body, _, _)) => body,
        None => {
            // After the last complete stage, when there is one.
            let last_end = STAGES.iter().filter_map(|&t| stage_text(&lower, t, 0).map(|(_, _, e)| e)).max();
            &lower[last_end.unwrap_or(0)..]
        }
    };
    p.verdict = verdict(verdict_text);
    if p.verdict.is_none() {
        p.problems.push("no verdict (normal or anomalous) in the answer".into());
    }
    p.defect_type = defect_type(verdict_text);
    let (boxes, bad) = boxes(verdict_text);
    p.boxes = boxes;
    p.problems.extend(bad);
    p
}

/// Words that state a verdict, earliest first wins; "not"/"no" before an anomaly word negates it.
fn verdict(text: &str) -> Option<bool> {
    const ANOMALOUS: [&str; 5] = ["anomalous", "abnormal", "defective", "anomaly", "yes"];
    const NORMAL: [&str; 4] = ["normal", "no", "good", "ok"];
    let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphanumeric()).filter(|w| !w.is_empty()).collect();
    for (i, w) in words.iter().enumerate() {
        if ANOMALOUS.contains(w) {
            return Some(true);
        }
        if NORMAL.contains(w) || *w == "not" {
            // "no defect", "not anomalous", "no anomaly": a negated anomaly word is a normal verdict.
            let next = words.get(i + 1).copied().unwrap_or("");
            if *w == "not" && !ANOMALOUS.contains(&next) && next != "normal" {
                continue;
            }
            if *w == "not" && next == "normal" {
                return Some(true);
            }
            return Some(false);
        }
    }
    None
}

/// The words after `type:` up to `;`, `,`, `[`, `.` or a line end.
fn defect_type(text: &str) -> Option<String> {
    let at = text.find("type:")? + "type:".len();
    let rest = &text[at..];
    let end = rest.find([';', ',', '[', '.', '\n', '<']).unwrap_or(rest.len());
    let t = rest[..end].trim().trim_matches(|c: char| c == '"' || c == '\'').trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Every `[a, b, c, d]` of four numbers; brackets with another count are reported.
fn boxes(text: &str) -> (Vec<[f32; 4]>, Vec<String>) {
    let (mut out, mut bad) = (Vec::new(), Vec::new());
    let mut rest = text;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else {
            bad.push(format!("an unclosed box `{}`", rest[open..].chars().take(24).collect::<String>()));
            break;
        };
        let inner = &rest[open + 1..open + close];
        let nums: Vec<Option<f32>> = inner.split(',').map(|s| s.trim().parse::<f32>().ok()).collect();
        match nums.as_slice() {
            [Some(a), Some(b), Some(c), Some(d)] if [a, b, c, d].iter().all(|v| v.is_finite()) => {
                out.push([a.min(*c), b.min(*d), a.max(*c), b.max(*d)])
            }
            _ => bad.push(format!("a box that is not four numbers: `[{inner}]`")),
        }
        rest = &rest[open + close + 1..];
    }
    (out, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prompt_states_the_maps_region_only_when_given() {
        let plain = prompt(300, 200, None);
        assert!(plain.starts_with("Test image: 300x200 pixels. Reply as"), "{plain}");
        let cued = prompt(300, 200, Some([40.0, 20.5, 100.0, 60.0]));
        assert!(
            cued.starts_with(
                "Test image: 300x200 pixels. The patch comparison differs most at [40, 20, 100, 60]. Reply as"
            ),
            "{cued}"
        );
    }

    #[test]
    fn a_complete_answer_parses_whole() {
        let p = parse(
            "<think>dark area at [10, 20, 50, 60]</think><rethink>it is darker than the reference</rethink>\
             <answer>Anomalous; type: Crack; box: [50, 60, 10, 20]</answer>",
        );
        assert_eq!(p.stages, vec!["think", "rethink", "answer"]);
        assert_eq!(p.verdict, Some(true));
        assert_eq!(p.defect_type.as_deref(), Some("crack"));
        // Only the answer's box counts, its corners put in order.
        assert_eq!(p.boxes, vec![[10.0, 20.0, 50.0, 60.0]]);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
    }

    #[test]
    fn the_written_truth_parses_back_to_the_truth() {
        let boxes = [[1.0, 2.0, 3.0, 4.0], [10.0, 10.0, 50.0, 60.0]];
        let p = parse(&written_truth(true, Some("broken_large"), &boxes, None));
        assert_eq!(p.stages, STAGES.to_vec());
        assert_eq!((p.verdict, p.defect_type.as_deref()), (Some(true), Some("broken large")));
        assert_eq!(p.boxes, vec![[10.0, 10.0, 50.0, 60.0], [1.0, 2.0, 3.0, 4.0]]);
        let p = parse(&written_truth(false, None, &[], None));
        assert_eq!((p.stages.len(), p.verdict, p.problems.len()), (3, Some(false), 0));
    }

    #[test]
    fn with_a_candidate_the_think_stage_names_it_and_the_answer_keeps_the_truth() {
        let candidate = Some([100.4, 20.0, 160.0, 80.6]);
        let text = written_truth(true, Some("draem"), &[[10.0, 10.0, 50.0, 60.0]], candidate);
        assert!(text.starts_with("<think>[100, 20, 160, 81]</think>"), "{text}");
        let p = parse(&text);
        assert_eq!((p.stages.len(), p.verdict, p.boxes.clone()), (3, Some(true), vec![[10.0, 10.0, 50.0, 60.0]]));
        let text = written_truth(false, None, &[], candidate);
        assert!(text.starts_with("<think>[100, 20, 160, 81]</think>"), "{text}");
        // The normal verdict carries no box: the candidate is only the think stage's.
        let p = parse(&text);
        assert_eq!((p.stages.len(), p.verdict, p.boxes.len(), p.problems.len()), (3, Some(false), 0, 0));
    }

    #[test]
    fn stages_out_of_order_and_missing_ones_are_reported() {
        let p = parse("<rethink>x</rethink><think>y</think> The cell is normal.");
        assert_eq!(p.stages, vec!["rethink", "think"]);
        assert_eq!(p.verdict, Some(false));
        assert!(p.problems.iter().any(|q| q.contains("<answer>")), "{:?}", p.problems);
    }

    #[test]
    fn verdict_words_and_negations() {
        assert_eq!(parse("<answer>normal</answer>").verdict, Some(false));
        assert_eq!(parse("<answer>not anomalous</answer>").verdict, Some(false));
        assert_eq!(parse("<answer>no defect</answer>").verdict, Some(false));
        assert_eq!(parse("<answer>not normal: a crack</answer>").verdict, Some(true));
        assert_eq!(parse("Yes, there is a crack.").verdict, Some(true));
        assert_eq!(parse("<answer>I cannot tell</answer>").verdict, None);
    }

    #[test]
    fn malformed_boxes_are_reported_not_guessed() {
        let p = parse("<answer>anomalous; box: [1, 2, 3] and [4, 5, 6, 7] and [8, x, 9, 10]</answer>");
        assert_eq!(p.boxes, vec![[4.0, 5.0, 6.0, 7.0]]);
        assert_eq!(p.problems.iter().filter(|q| q.contains("four numbers")).count(), 2, "{:?}", p.problems);
        let p = parse("<answer>anomalous; box: [1, 2");
        assert!(p.problems.iter().any(|q| q.contains("unclosed")), "{:?}", p.problems);
    }
}
