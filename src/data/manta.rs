//! MANTA QA (ARCHITECTURE.md §5): a JSON array of items `{domain, test_image, pair_type,
//! question_answer: [{question_en, answer: bool, conclusion_en}], conclusion_en}`.
//!
//! Readings: `answer` true/false becomes the ground truth "Yes"/"No"; `domain` becomes the
//! category; a `pair_type` we know gives the questions' level, another one leaves it unset (MANTA
//! is not bound to AD-PL's three levels). MANTA has no reference image; an optional
//! `reference_image` is read when present. Paths are relative to the image root (default: the
//! file's folder) unless absolute.

use super::problems::{self, Checker, Images, Report};
use super::sample::{yes_no, Level, Question, Sample};
use anyhow::Result;
use serde_json::Value;
use std::path::Path;

/// Reads a MANTA QA file; any problem is a user error naming the file, item and field.
/// `image_root` defaults to the file's folder. Image existence is `check`'s job.
pub fn load(path: &Path, image_root: Option<&Path>) -> Result<Vec<Sample>> {
    problems::load_items(path, image_root, parse_item)
}

/// Validates a MANTA QA file, images included, and reports every problem.
pub fn check(path: &Path, image_root: Option<&Path>) -> Report {
    problems::check_items(path, image_root, parse_item)
}

fn parse_item(c: &mut Checker, item: &Value, images: &Images) -> Option<Sample> {
    if !c.is_object(item, "") {
        return None;
    }
    let domain = c.str(item, "", "domain", true);
    let test = c.str(item, "", "test_image", true).map(|p| images.path(c, "test_image", p));
    let reference = c.str(item, "", "reference_image", false).map(|p| images.path(c, "reference_image", p));
    let level = c.str(item, "", "pair_type", true).and_then(Level::from_pair_type);
    c.str(item, "", "conclusion_en", false);
    let mut questions = Vec::new();
    if let Some(qa) = c.array(item, "", "question_answer") {
        if qa.is_empty() {
            c.report("question_answer", "has no questions");
        }
        for (qi, q) in qa.iter().enumerate() {
            let prefix = format!("question_answer[{qi}].");
            if !c.is_object(q, &format!("question_answer[{qi}]")) {
                continue;
            }
            let text = c.str(q, &prefix, "question_en", true);
            let answer = c.bool(q, &prefix, "answer");
            c.str(q, &prefix, "conclusion_en", true);
            if let (Some(text), Some(answer)) = (text, answer) {
                questions.push(Question {
                    text: text.to_string(),
                    level,
                    options: Vec::new(),
                    answer: Some(yes_no(answer).to_string()),
                    ranked_answers: Vec::new(),
                    subtask: None,
                });
            }
        }
    }
    if !c.clean() {
        return None;
    }
    Some(Sample {
        id: c.index.to_string(),
        test_image: test?,
        reference_image: reference,
        category: domain.map(str::to_string),
        label: None,
        defect_type: None,
        mask: None,
        boxes: Vec::new(),
        split: None,
        questions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(items: &[Value], base: &Path, check_files: bool) -> (Vec<Sample>, Vec<super::problems::Problem>) {
        let images = Images::with_roots(base, false, check_files);
        let (s, p) = problems::parse_items(items, &images, parse_item);
        (s.into_iter().map(|(_, s)| s).collect(), p)
    }
    use serde_json::json;

    #[test]
    fn reads_bool_answers_and_domain() {
        let items = [json!({"domain": "PCB", "test_image": "a.png", "pair_type": "defect identification",
            "question_answer": [{"question_en": "Is a pin bent?", "answer": true, "conclusion_en": "Yes, pin 3."},
                                {"question_en": "Is it scratched?", "answer": false, "conclusion_en": "No."}],
            "conclusion_en": "Bent pin."})];
        let (s, p) = parse(&items, Path::new("/m"), false);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s[0].category.as_deref(), Some("PCB"));
        assert_eq!(s[0].test_image, Path::new("/m/a.png"));
        assert_eq!(s[0].questions[0].answer.as_deref(), Some("Yes"));
        assert_eq!(s[0].questions[1].answer.as_deref(), Some("No"));
        assert_eq!(s[0].questions[1].level, Some(Level::DefectIdentification));
    }

    #[test]
    fn string_answers_and_missing_fields_are_problems() {
        let items = [json!({"test_image": "a.png", "pair_type": "x",
            "question_answer": [{"question_en": "Q?", "answer": "yes", "conclusion_en": "c"}]})];
        let (s, p) = parse(&items, Path::new("/m"), true);
        assert!(s.is_empty());
        let msgs: Vec<String> = p.iter().map(|p| p.to_string()).collect();
        assert!(msgs.contains(&"item 0, field `domain`: missing".to_string()), "{msgs:?}");
        assert!(msgs.iter().any(|m| m.starts_with("item 0, field `test_image`: file /m/a.png does not exist")));
        assert!(
            msgs.contains(&"item 0, field `question_answer[0].answer`: expected true or false, found a string".into())
        );
    }
}
