//! AD-PL, SAGE's preference dataset format (ARCHITECTURE.md §5): a JSON array of items
//! `{test_image, reference_image, pair_type, question_answer}` where `question_answer` holds 5
//! questions `{question_en, answer_options: [4 × {answer_en}]}`, answers ranked best first.
//!
//! Readings:
//! - The ground-truth conclusion of a question is the leading Yes/No of its best answer.
//! - A question's level is its own optional `level` field (our extension, spelled like
//!   `pair_type`), else the item's `pair_type` (AD-PL has one `pair_type` per item).
//! - Image paths are relative to the image root (default: the JSON file's folder) unless
//!   absolute. `sage data build` writes absolute paths, so its files can be moved freely.
//! - Optional extra fields we write and read: `id`, `category`, `label` (`normal`/`anomalous`),
//!   `defect_type`, `mask`, `boxes`, `split`. Other unknown fields (`question_cn`, ...) are kept
//!   out of the way, not refused, since SAGE's files carry more than we use.

use super::problems::{self, Checker, Images, Report};
use super::sample::{conclusion, yes_no, Label, Level, Question, Sample};
use crate::user_err;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Questions per item and answers per question, fixed by the format.
pub const QUESTIONS: usize = 5;
pub const ANSWERS: usize = 4;

/// One AD-PL item, as written by `sage data build`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdplItem {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub test_image: String,
    pub reference_image: String,
    /// The level of the item's first question (AD-PL has one per item).
    pub pair_type: String,
    pub question_answer: Vec<AdplQa>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Label>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defect_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boxes: Vec<[f32; 4]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

/// One question with its ranked answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdplQa {
    pub question_en: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub question_cn: Option<String>,
    pub answer_options: Vec<AdplOption>,
    /// This question's level, spelled like `pair_type` (our extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
}

/// One answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdplOption {
    pub answer_en: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_cn: Option<String>,
}

impl AdplItem {
    /// The AD-PL item for a sample with a reference and ranked answers (what the builder made).
    pub fn from_sample(s: &Sample) -> Result<AdplItem> {
        let reference = s
            .reference_image
            .as_ref()
            .ok_or_else(|| user_err!("sample {} has no reference image; AD-PL is one-shot", s.id))?;
        let first = s.questions.first().ok_or_else(|| user_err!("sample {} has no questions", s.id))?;
        let level = first.level.ok_or_else(|| user_err!("sample {}: its first question has no level", s.id))?;
        Ok(AdplItem {
            id: Some(s.id.clone()),
            test_image: s.test_image.display().to_string(),
            reference_image: reference.display().to_string(),
            pair_type: level.pair_type().to_string(),
            question_answer: s
                .questions
                .iter()
                .map(|q| AdplQa {
                    question_en: q.text.clone(),
                    question_cn: None,
                    answer_options: q
                        .ranked_answers
                        .iter()
                        .map(|a| AdplOption { answer_en: a.clone(), answer_cn: None })
                        .collect(),
                    level: q.level.map(|l| l.pair_type().to_string()),
                })
                .collect(),
            category: s.category.clone(),
            label: s.label,
            defect_type: s.defect_type.clone(),
            mask: s.mask.as_ref().map(|m| m.display().to_string()),
            boxes: s.boxes.clone(),
            split: s.split.clone(),
        })
    }
}

/// Reads an AD-PL file; any problem is a user error naming the file, item and field.
/// `image_root` defaults to the file's folder. Image existence is `check`'s job.
pub fn load(path: &Path, image_root: Option<&Path>) -> Result<Vec<Sample>> {
    problems::load_items(path, image_root, parse_item)
}

/// Validates an AD-PL file, images included, and reports every problem.
pub fn check(path: &Path, image_root: Option<&Path>) -> Report {
    problems::check_items(path, image_root, parse_item)
}

/// Accepts the `pair_type` spelling and the snake_case one of [`Level`].
fn parse_level(s: &str) -> Option<Level> {
    Level::from_pair_type(s).or_else(|| serde_json::from_value(Value::String(s.to_string())).ok())
}

fn parse_item(c: &mut Checker, item: &Value, images: &Images) -> Option<Sample> {
    if !c.is_object(item, "") {
        return None;
    }
    let test = c.str(item, "", "test_image", true).map(|p| images.path(c, "test_image", p));
    let reference = c.str(item, "", "reference_image", true).map(|p| images.path(c, "reference_image", p));
    let mask = c.str(item, "", "mask", false).map(|p| images.path(c, "mask", p));
    let level = c.str(item, "", "pair_type", true).and_then(|t| {
        let l = Level::from_pair_type(t);
        if l.is_none() {
            c.report(
                "pair_type",
                format!(
                    "unknown pair_type {}; expected \"standard comparison\", \"defect identification\" or \"defect diagnosis\"",
                    problems::clip(t)
                ),
            );
        }
        l
    });
    let label = c.str(item, "", "label", false).and_then(|l| match l {
        "normal" => Some(Label::Normal),
        "anomalous" => Some(Label::Anomalous),
        _ => {
            c.report("label", format!("unknown label {}; expected \"normal\" or \"anomalous\"", problems::clip(l)));
            None
        }
    });
    let boxes = parse_boxes(c, item);
    let questions = match c.array(item, "", "question_answer") {
        Some(qa) => {
            if qa.len() != QUESTIONS {
                c.report("question_answer", format!("expected {QUESTIONS} questions, found {}", qa.len()));
            }
            qa.iter().enumerate().filter_map(|(qi, q)| parse_question(c, q, qi, level)).collect()
        }
        None => Vec::new(),
    };
    let id = c.str(item, "", "id", false).map(str::to_string).unwrap_or_else(|| c.index.to_string());
    let category = c.str(item, "", "category", false).map(str::to_string);
    let defect_type = c.str(item, "", "defect_type", false).map(str::to_string);
    let split = c.str(item, "", "split", false).map(str::to_string);
    if !c.clean() {
        return None;
    }
    Some(Sample {
        id,
        test_image: test?,
        reference_image: reference,
        category,
        label,
        defect_type,
        mask,
        boxes,
        split,
        questions,
    })
}

fn parse_boxes(c: &mut Checker, item: &Value) -> Vec<[f32; 4]> {
    let Some(v) = item.get("boxes").filter(|v| !v.is_null()) else { return Vec::new() };
    let parsed: Option<Vec<[f32; 4]>> = serde_json::from_value(v.clone()).ok();
    parsed.unwrap_or_else(|| {
        c.report("boxes", "expected an array of [x_min, y_min, x_max, y_max] number quadruples");
        Vec::new()
    })
}

fn parse_question(c: &mut Checker, q: &Value, qi: usize, item_level: Option<Level>) -> Option<Question> {
    let prefix = format!("question_answer[{qi}].");
    if !c.is_object(q, &format!("question_answer[{qi}]")) {
        return None;
    }
    let text = c.str(q, &prefix, "question_en", true);
    let level = match c.str(q, &prefix, "level", false) {
        Some(l) => {
            let parsed = parse_level(l);
            if parsed.is_none() {
                c.report(format!("{prefix}level"), format!("unknown level {}", problems::clip(l)));
            }
            parsed
        }
        None => item_level,
    };
    let options = c.array(q, &prefix, "answer_options")?;
    if options.len() != ANSWERS {
        c.report(
            format!("{prefix}answer_options"),
            format!("expected {ANSWERS} answer options, found {}", options.len()),
        );
    }
    let mut answers = Vec::new();
    for (ai, o) in options.iter().enumerate() {
        let field = format!("{prefix}answer_options[{ai}]");
        if !c.is_object(o, &field) {
            continue;
        }
        if let Some(a) = c.str(o, &format!("{field}."), "answer_en", true) {
            answers.push(a.to_string());
        }
    }
    let truth = match options.first().and_then(|o| o.get("answer_en")).and_then(Value::as_str) {
        Some(best) if !best.trim().is_empty() => {
            let t = conclusion(best);
            if t.is_none() {
                c.report(
                    format!("{prefix}answer_options[0].answer_en"),
                    format!("the best answer must start with Yes or No, found {}", problems::clip(best)),
                );
            }
            t
        }
        _ => None,
    };
    Some(Question {
        text: text?.to_string(),
        level,
        options: Vec::new(),
        answer: truth.map(|t| yes_no(t).to_string()),
        ranked_answers: answers,
        subtask: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(items: &[Value], base: &Path, check_files: bool) -> (Vec<Sample>, Vec<super::problems::Problem>) {
        // Paths outside the base are allowed here: these tests are about the fields.
        let images = Images::with_roots(base, true, check_files);
        let (s, p) = problems::parse_items(items, &images, parse_item);
        (s.into_iter().map(|(_, s)| s).collect(), p)
    }
    use serde_json::json;

    fn qa(level: &str) -> Value {
        json!({"question_en": "Is there a defect?", "level": level, "question_cn": "有缺陷吗？",
               "answer_options": [{"answer_en": "Yes, a crack."}, {"answer_en": "Yes."},
                                  {"answer_en": "Maybe."}, {"answer_en": "No."}]})
    }

    fn item() -> Value {
        json!({"test_image": "t.png", "reference_image": "/abs/r.png", "pair_type": "defect diagnosis",
               "question_answer": [qa("standard comparison"), qa("standard_comparison"), qa("defect identification"),
                                   qa("defect identification"), {"question_en": "Q?", "answer_options": [
                                       {"answer_en": "No, fine."}, {"answer_en": "No."}, {"answer_en": "x"}, {"answer_en": "Yes"}]}],
               "category": "bottle", "label": "anomalous", "extra": 1})
    }

    #[test]
    fn reads_levels_truth_and_paths() {
        let (s, p) = parse(&[item()], Path::new("/data"), false);
        assert!(p.is_empty(), "{p:?}");
        let s = &s[0];
        assert_eq!(s.test_image, Path::new("/data/t.png"));
        assert_eq!(s.reference_image.as_deref(), Some(Path::new("/abs/r.png")));
        assert_eq!(s.id, "0");
        assert_eq!(s.label, Some(Label::Anomalous));
        assert_eq!(s.questions[1].level, Some(Level::StandardComparison));
        assert_eq!(s.questions[4].level, Some(Level::DefectDiagnosis), "falls back to pair_type");
        assert_eq!(s.questions[0].answer.as_deref(), Some("Yes"));
        assert_eq!(s.questions[4].answer.as_deref(), Some("No"));
        assert_eq!(s.questions[0].ranked_answers.len(), 4);
    }

    #[test]
    fn reports_every_problem_with_its_field() {
        let mut bad = item();
        bad["pair_type"] = json!("comparison");
        bad["question_answer"][2]["answer_options"] = json!([{"answer_en": "Perhaps."}, {"answer_en": ""}]);
        bad["question_answer"].as_array_mut().unwrap().pop();
        let (s, p) = parse(&[item(), bad, json!(3)], Path::new("/"), false);
        assert_eq!(s.len(), 1);
        let msgs: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        let want = [
            "item 1, field `pair_type`: unknown pair_type \"comparison\"",
            "item 1, field `question_answer`: expected 5 questions, found 4",
            "item 1, field `question_answer[2].answer_options`: expected 4 answer options, found 2",
            "item 1, field `question_answer[2].answer_options[1].answer_en`: is empty",
            "item 1, field `question_answer[2].answer_options[0].answer_en`: the best answer must start with Yes or No",
            "item 2: expected an object, found a number",
        ];
        for w in want {
            assert!(msgs.iter().any(|m| m.starts_with(w)), "missing {w:?} in {msgs:#?}");
        }
    }

    #[test]
    fn from_sample_round_trips() {
        let (s, _) = parse(&[item()], Path::new("/data"), false);
        let mut s = s[0].clone();
        s.questions.iter_mut().for_each(|q| q.level = q.level.or(Some(Level::DefectDiagnosis)));
        let written = serde_json::to_value(AdplItem::from_sample(&s).unwrap()).unwrap();
        assert_eq!(written["pair_type"], "standard comparison", "the first question's level");
        let (back, p) = parse(&[written], Path::new("/elsewhere"), false);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(back[0], s);
    }
}
