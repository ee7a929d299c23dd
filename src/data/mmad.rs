//! MMAD's `mmad.json` (ARCHITECTURE.md §5): a JSON object mapping a query image path, relative to the
//! image root, to `{conversation: [{Question, Options: {A: .., B: .., ...}, Answer, type}],
//! mask_path, similar_templates: [..], random_templates: [..]}`.
//!
//! Readings:
//! - Reference: the first of `random_templates` (MMAD's one-shot protocol, the default) or of
//!   `similar_templates`; none when the list is empty.
//! - Label: normal when the path contains `good` (MMAD's own rule), else anomalous; the defect
//!   type of an anomalous image is its folder name (`.../test/broken_large/000.png`).
//! - Category: the path's second component (`MVTec-AD/bottle/...` → `bottle`).
//! - The source dataset (the first component, `MVTec-AD`) goes into [`Sample::split`]: MMAD is
//!   evaluation-only, so it has no train/test split, and its scoring averages over source
//!   datasets, which is then a grouping by `split`.
//! - Options are kept in letter order; the ground truth is the `Answer` letter; `type` becomes
//!   the question's subtask. MMAD questions have no AD-PL level.
//! - Item indices count entries in file order; messages also name the entry's image path.

use super::problems::{self, Checker, Dataset, Entries, Images, Parsed, Problem, Report};
use super::sample::{Label, Question, Sample};
use anyhow::Result;
use serde_json::Value;
use std::collections::HashSet;
use std::path::Path;

/// Which template list gives the one-shot reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefChoice {
    /// `random_templates[0]`, MMAD's one-shot protocol.
    #[default]
    Random,
    /// `similar_templates[0]`, the retrieved most similar normal image.
    Similar,
}

/// Reads `mmad.json`; any problem is a user error naming the file, item and field.
/// `image_root` defaults to the file's folder.
pub fn load(path: &Path, image_root: Option<&Path>, reference: RefChoice) -> Result<Vec<Sample>> {
    validate(path, image_root, reference, false)?.into_samples()
}

/// Validates `mmad.json`, query images, masks and every template included; reports every problem.
pub fn check(path: &Path, image_root: Option<&Path>) -> Report {
    problems::check_report(path, validate(path, image_root, RefChoice::Random, true))
}

fn validate(path: &Path, image_root: Option<&Path>, reference: RefChoice, check_files: bool) -> Result<Dataset> {
    problems::validate(path, image_root, check_files, |entries: Entries, images: &Images| {
        let (samples, problems) = parse(&entries, images, reference);
        Parsed { items: entries.0.len(), samples, problems }
    })
}

/// Samples (with their entry index) for the clean entries, and every problem found.
pub fn parse(entries: &Entries, images: &Images, reference: RefChoice) -> (Vec<(usize, Sample)>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut samples = Vec::new();
    let mut seen = HashSet::new();
    for (index, (key, value)) in entries.0.iter().enumerate() {
        let start = found.len();
        let mut c = Checker::new(index, &mut found);
        if !seen.insert(key.as_str()) {
            c.report("key", "duplicate entry: an earlier entry has the same image path; keep one");
        }
        if let Some(s) = parse_entry(&mut c, key, value, images, reference) {
            samples.push((index, s));
        }
        for p in &mut found[start..] {
            p.message.push_str(&format!(" [entry {key:?}]"));
        }
    }
    (samples, found)
}

fn parse_entry(c: &mut Checker, key: &str, v: &Value, images: &Images, reference: RefChoice) -> Option<Sample> {
    // The entry's key is its query image path; problems with it are reported as field `key`.
    if key.trim().is_empty() {
        c.report("key", "the image path is empty");
    }
    let test = images.path(c, "key", key);
    if !c.is_object(v, "") {
        return None;
    }
    let mask = c.str(v, "", "mask_path", false).filter(|m| !m.is_empty()).map(|m| images.path(c, "mask_path", m));
    let mut lists = [None, None];
    for (slot, key) in lists.iter_mut().zip(["random_templates", "similar_templates"]) {
        let Some(a) = c.array(v, "", key) else { continue };
        let mut paths = Vec::new();
        for (i, t) in a.iter().enumerate() {
            match t.as_str() {
                Some(t) if !t.trim().is_empty() => paths.push(images.path(c, &format!("{key}[{i}]"), t)),
                _ => c.report(format!("{key}[{i}]"), format!("expected an image path, found {}", problems::kind(t))),
            }
        }
        *slot = Some(paths);
    }
    let chosen = match reference {
        RefChoice::Random => &lists[0],
        RefChoice::Similar => &lists[1],
    };
    let reference_image = chosen.as_ref().and_then(|l| l.first().cloned());
    let mut questions = Vec::new();
    if let Some(conv) = c.array(v, "", "conversation") {
        if conv.is_empty() {
            c.report("conversation", "has no questions");
        }
        for (qi, q) in conv.iter().enumerate() {
            if let Some(q) = parse_question(c, q, qi) {
                questions.push(q);
            }
        }
    }
    if !c.clean() {
        return None;
    }
    let parts: Vec<&str> = key.split('/').filter(|p| !p.is_empty()).collect();
    let label = if key.contains("good") { Label::Normal } else { Label::Anomalous };
    let defect_type = match (label, parts.len()) {
        (Label::Anomalous, n) if n >= 3 => Some(parts[n - 2].to_string()),
        _ => None,
    };
    Some(Sample {
        id: key.to_string(),
        test_image: test,
        reference_image,
        category: (parts.len() >= 3).then(|| parts[1].to_string()),
        label: Some(label),
        defect_type,
        mask,
        boxes: Vec::new(),
        split: (parts.len() >= 2).then(|| parts[0].to_string()),
        questions,
    })
}

fn parse_question(c: &mut Checker, q: &Value, qi: usize) -> Option<Question> {
    let prefix = format!("conversation[{qi}].");
    if !c.is_object(q, &format!("conversation[{qi}]")) {
        return None;
    }
    let text = c.str(q, &prefix, "Question", true);
    let answer = c.str(q, &prefix, "Answer", true);
    let subtask = c.str(q, &prefix, "type", true);
    let field = format!("{prefix}Options");
    let options: Option<Vec<(String, String)>> = match q.get("Options") {
        None | Some(Value::Null) => {
            c.report(&field, "missing");
            None
        }
        Some(Value::Object(m)) if m.is_empty() => {
            c.report(&field, "has no options");
            None
        }
        Some(Value::Object(m)) => {
            let mut opts = Vec::new();
            for (letter, t) in m {
                let is_letter = letter.len() == 1 && letter.chars().all(|ch| ch.is_ascii_uppercase());
                if !is_letter {
                    c.report(format!("{field}.{letter}"), "option keys must be single capital letters (A, B, ...)");
                }
                match t.as_str() {
                    Some(t) => opts.push((letter.clone(), t.to_string())),
                    None => {
                        c.report(format!("{field}.{letter}"), format!("expected a string, found {}", problems::kind(t)))
                    }
                }
            }
            opts.sort();
            Some(opts)
        }
        Some(v) => {
            c.report(&field, format!("expected an object of lettered options, found {}", problems::kind(v)));
            None
        }
    };
    if let (Some(a), Some(opts)) = (answer, &options) {
        if !opts.iter().any(|(l, _)| l == a) {
            let letters: Vec<&str> = opts.iter().map(|(l, _)| l.as_str()).collect();
            c.report(
                format!("{prefix}Answer"),
                format!("{} is not one of the option letters {}", problems::clip(a), letters.join(", ")),
            );
        }
    }
    Some(Question {
        text: text?.to_string(),
        level: None,
        options: options?.into_iter().map(|(_, t)| t).collect(),
        answer: Some(answer?.to_string()),
        ranked_answers: Vec::new(),
        subtask: Some(subtask?.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse_at(e: &Entries, root: &str, reference: RefChoice) -> (Vec<Sample>, Vec<Problem>) {
        let (s, p) = parse(e, &Images::with_roots(Path::new(root), false, false), reference);
        (s.into_iter().map(|(_, s)| s).collect(), p)
    }

    fn entries(v: Value) -> Entries {
        serde_json::from_value(v).unwrap()
    }

    fn entry(answer: &str) -> Value {
        json!({"conversation": [{"Question": "Is there any defect?", "Options": {"B": "No.", "A": "Yes."},
               "Answer": answer, "type": "Anomaly Detection"}],
               "mask_path": null, "similar_templates": ["MVTec-AD/bottle/train/good/001.png"],
               "random_templates": ["MVTec-AD/bottle/train/good/002.png", "MVTec-AD/bottle/train/good/003.png"]})
    }

    #[test]
    fn reads_label_category_dataset_and_reference() {
        let e = entries(json!({"MVTec-AD/bottle/test/broken_large/000.png": entry("A"),
                                "MVTec-AD/bottle/test/good/000.png": entry("B")}));
        let (s, p) = parse_at(&e, "/r", RefChoice::Random);
        assert!(p.is_empty(), "{p:?}");
        assert_eq!(s[0].label, Some(Label::Anomalous));
        assert_eq!(s[0].defect_type.as_deref(), Some("broken_large"));
        assert_eq!(s[0].category.as_deref(), Some("bottle"));
        assert_eq!(s[0].split.as_deref(), Some("MVTec-AD"));
        assert_eq!(s[0].reference_image.as_deref(), Some(Path::new("/r/MVTec-AD/bottle/train/good/002.png")));
        assert_eq!(s[0].questions[0].options, ["Yes.", "No."]);
        assert_eq!(s[1].label, Some(Label::Normal));
        assert_eq!(s[1].defect_type, None);
        let (s, _) = parse_at(&e, "/r", RefChoice::Similar);
        assert_eq!(s[0].reference_image.as_deref(), Some(Path::new("/r/MVTec-AD/bottle/train/good/001.png")));
    }

    #[test]
    fn bad_answer_letter_names_item_field_and_entry() {
        // Built by hand: `json!` would sort the keys, and the index must follow file order.
        let e = Entries(vec![("a/b/good/0.png".into(), entry("A")), ("a/b/bad/0.png".into(), entry("F"))]);
        let (s, p) = parse_at(&e, "/r", RefChoice::Random);
        assert_eq!(s.len(), 1);
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].to_string(),
            "item 1, field `conversation[0].Answer`: \"F\" is not one of the option letters A, B [entry \"a/b/bad/0.png\"]"
        );
    }
}
