//! Validation that collects every problem instead of stopping at the first, so one `sage data
//! check` run lists all that is wrong with a file (like SAGE's check_format.py). The readers
//! share it: a reader validates with the same code and refuses a file with the first few problems.

use super::duplicate_keys;
use super::image_paths::{allow_outside_root, Roots};
use super::sample::Sample;
use crate::user_err;
use anyhow::Result;
use serde::de::{DeserializeOwned, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;
use std::fmt;
use std::path::{Path, PathBuf};

/// One thing wrong with one item (or with the whole file when `index` is `None`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    /// The item's 0-based position in the file.
    pub index: Option<usize>,
    /// Where in the item, e.g. `question_answer[2].answer_options`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.index, self.field.is_empty()) {
            (Some(i), false) => write!(f, "item {i}, field `{}`: {}", self.field, self.message),
            (Some(i), true) => write!(f, "item {i}: {}", self.message),
            (None, false) => write!(f, "field `{}`: {}", self.field, self.message),
            (None, true) => f.write_str(&self.message),
        }
    }
}

/// The outcome of validating one file.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub path: PathBuf,
    pub ok: bool,
    pub items: usize,
    pub problems: Vec<Problem>,
}

impl Report {
    pub fn new(path: &Path, items: usize, problems: Vec<Problem>) -> Report {
        Report { path: path.to_path_buf(), ok: problems.is_empty(), items, problems }
    }

    /// A user error listing at most `max` problems (all of them when `max` is `None`).
    pub fn to_error(&self, max: Option<usize>) -> anyhow::Error {
        let n = self.problems.len();
        let shown = max.unwrap_or(n).min(n);
        let mut msg = format!(
            "{}: {n} problem{} in {} item{}:",
            self.path.display(),
            if n == 1 { "" } else { "s" },
            self.items,
            if self.items == 1 { "" } else { "s" }
        );
        for p in &self.problems[..shown] {
            msg.push_str(&format!("\n  {p}"));
        }
        if shown < n {
            msg.push_str(&format!("\n  ... and {} more; `sage data check` lists them all", n - shown));
        }
        user_err!("{msg}")
    }

    /// `Ok` when clean, else the user error from [`Report::to_error`] with the first 20 problems.
    pub fn into_result(self) -> Result<()> {
        if self.ok {
            Ok(())
        } else {
            Err(self.to_error(Some(20)))
        }
    }
}

/// Reads and parses a JSON file; a syntax or shape error is a user error naming the file, line
/// and column.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| user_err!("cannot read {}: {e}", path.display()))?;
    parse_json(path, &text)
}

fn parse_json<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| {
        let what = if e.is_data() { "unexpected JSON shape" } else { "not valid JSON" };
        user_err!("{}: {what}: {e}", path.display())
    })
}

/// A JSON object's entries in file order (serde_json's own map sorts them), so item indices match
/// what a person sees in the file; duplicated keys are kept for the checker to report.
#[derive(Debug, Default)]
pub struct Entries(pub Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, Value>()? {
                    v.push((k, val));
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

/// A path from a data file: absolute as is, otherwise relative to `base`.
pub fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The folder a data file's relative paths start from: the file's own folder.
pub fn base_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A long value shortened for a message.
pub fn clip(s: &str) -> String {
    let mut c: String = s.chars().take(48).collect();
    if c.len() < s.len() {
        c.push('…');
    }
    format!("{c:?}")
}

/// What a JSON value is, for messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Collects the problems of one item; every accessor reports what is wrong and returns `None`.
pub struct Checker<'p> {
    pub index: usize,
    problems: &'p mut Vec<Problem>,
    start: usize,
}

impl<'p> Checker<'p> {
    pub fn new(index: usize, problems: &'p mut Vec<Problem>) -> Checker<'p> {
        let start = problems.len();
        Checker { index, problems, start }
    }

    pub fn report(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem { index: Some(self.index), field: field.into(), message: message.into() });
    }

    /// Whether this item has produced no problem so far.
    pub fn clean(&self) -> bool {
        self.problems.len() == self.start
    }

    fn present<'v>(&mut self, obj: &'v Value, field: &str, key: &str, required: bool) -> Option<&'v Value> {
        match obj.get(key) {
            None | Some(Value::Null) => {
                if required {
                    self.report(field, "missing");
                }
                None
            }
            Some(v) => Some(v),
        }
    }

    /// A string field; `required` ones must be present and non-blank.
    pub fn str<'v>(&mut self, obj: &'v Value, prefix: &str, key: &str, required: bool) -> Option<&'v str> {
        let field = format!("{prefix}{key}");
        match self.present(obj, &field, key, required)? {
            Value::String(s) if required && s.trim().is_empty() => {
                self.report(field, "is empty");
                None
            }
            Value::String(s) => Some(s),
            v => {
                self.report(field, format!("expected a string, found {}", kind(v)));
                None
            }
        }
    }

    /// An array field (required).
    pub fn array<'v>(&mut self, obj: &'v Value, prefix: &str, key: &str) -> Option<&'v Vec<Value>> {
        let field = format!("{prefix}{key}");
        match self.present(obj, &field, key, true)? {
            Value::Array(a) => Some(a),
            v => {
                self.report(field, format!("expected an array, found {}", kind(v)));
                None
            }
        }
    }

    /// A boolean field (required).
    pub fn bool(&mut self, obj: &Value, prefix: &str, key: &str) -> Option<bool> {
        let field = format!("{prefix}{key}");
        match self.present(obj, &field, key, true)? {
            Value::Bool(b) => Some(*b),
            v => {
                self.report(field, format!("expected true or false, found {}", kind(v)));
                None
            }
        }
    }

    /// Reports a missing file.
    pub fn file_exists(&mut self, field: impl Into<String>, path: &Path) {
        if !path.is_file() {
            self.report(field, format!("file {} does not exist", path.display()));
        }
    }

    /// Reports `v` when it is not a JSON object; returns whether it is one.
    pub fn is_object(&mut self, v: &Value, field: &str) -> bool {
        if v.is_object() {
            true
        } else {
            self.report(field, format!("expected an object, found {}", kind(v)));
            false
        }
    }
}

/// How a reader treats the image paths in a file: where relative ones start, where every one must
/// lie ([`Roots`]), and whether the files must exist (`sage data check` looks; the stages open
/// the images later and say so then).
pub struct Images {
    pub base: PathBuf,
    roots: Roots,
    check_files: bool,
}

impl Images {
    /// For the data file at `path`: relative paths start at `image_root`, default the file's
    /// folder; `--allow-outside-root` (process-wide) decides whether paths may leave it.
    pub fn new(path: &Path, image_root: Option<&Path>, check_files: bool) -> Images {
        let base = image_root.map(Path::to_path_buf).unwrap_or_else(|| base_dir(path));
        Images::with_roots(&base, allow_outside_root(), check_files)
    }

    pub fn with_roots(base: &Path, allow_outside: bool, check_files: bool) -> Images {
        Images { base: base.to_path_buf(), roots: Roots::new(base, allow_outside), check_files }
    }

    /// The image path `raw` resolved against the base; reports one outside the roots, and a
    /// missing file when checking files.
    pub fn path(&self, c: &mut Checker, field: &str, raw: &str) -> PathBuf {
        let p = resolve(&self.base, raw);
        if let Some(why) = self.roots.refusal(&p) {
            c.report(field, why);
        } else if self.check_files {
            c.file_exists(field, &p);
        }
        p
    }
}

/// Parses one item of a JSON-array dataset (AD-PL, MANTA), recording problems in the checker.
pub type ItemParser = fn(&mut Checker, &Value, &Images) -> Option<Sample>;

/// Samples (with their item index) for the clean items of a JSON array, and every problem found.
pub fn parse_items(items: &[Value], images: &Images, parse_item: ItemParser) -> (Vec<(usize, Sample)>, Vec<Problem>) {
    let mut found = Vec::new();
    let mut samples = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let mut c = Checker::new(index, &mut found);
        if let Some(s) = parse_item(&mut c, item, images) {
            samples.push((index, s));
        }
    }
    (samples, found)
}

/// What one file parsed into: how many items it holds, the clean ones' samples with their item
/// index, and every problem of the items.
pub struct Parsed {
    pub items: usize,
    pub samples: Vec<(usize, Sample)>,
    pub problems: Vec<Problem>,
}

/// A validated dataset: the samples of its clean items and the report of every problem.
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub report: Report,
}

impl Dataset {
    /// The samples when the report is clean, else the user error with the first problems.
    pub fn into_samples(self) -> Result<Vec<Sample>> {
        self.report.into_result()?;
        Ok(self.samples)
    }
}

/// The one validation every dataset reader runs, for `sage data check` (`check_files`) and for
/// the stages alike: reads `path`, finds keys given twice in an object (serde_json would keep the
/// last without a word), parses the content with `parse` (which checks each item, image paths
/// included), then refuses two items with the same id and a file with no item. An unreadable
/// file or invalid JSON is the `Err`; everything else is in the report.
pub fn validate<T: DeserializeOwned>(
    path: &Path,
    image_root: Option<&Path>,
    check_files: bool,
    parse: impl FnOnce(T, &Images) -> Parsed,
) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| user_err!("cannot read {}: {e}", path.display()))?;
    let content: T = parse_json(path, &text)?;
    let duplicated = duplicate_keys::find(&text).map_err(|e| user_err!("{}: not valid JSON: {e}", path.display()))?;
    let images = Images::new(path, image_root, check_files);
    let Parsed { items, samples, mut problems } = parse(content, &images);
    // A duplicated top-level key is an MMAD entry given twice, which its reader reports itself
    // with the entry's position.
    problems.extend(duplicated.into_iter().filter(|d| d.item.is_some()).map(|d| Problem {
        index: d.item,
        field: if d.within.is_empty() { d.key.clone() } else { format!("{}.{}", d.within, d.key) },
        message: format!(
            "the key {:?} appears twice in one object (a reader would silently keep the last); keep one",
            d.key
        ),
    }));
    problems.extend(duplicate_ids(&samples));
    if items == 0 {
        problems.push(Problem {
            index: None,
            field: String::new(),
            message: "the dataset has no items; a stage has nothing to train, score or evaluate on".into(),
        });
    }
    // Item order, file-wide problems first, so a person reads the file top to bottom.
    problems.sort_by_key(|p| p.index.map_or(0, |i| i + 1));
    let samples = samples.into_iter().map(|(_, s)| s).collect();
    Ok(Dataset { samples, report: Report::new(path, items, problems) })
}

/// Items whose id an earlier item already has (scores, facts and answers are keyed by id).
fn duplicate_ids(samples: &[(usize, Sample)]) -> Vec<Problem> {
    let mut first = std::collections::HashMap::new();
    let mut found = Vec::new();
    for (index, s) in samples {
        if let Some(earlier) = first.insert(s.id.as_str(), *index) {
            first.insert(s.id.as_str(), earlier);
            found.push(Problem {
                index: Some(*index),
                field: "id".into(),
                message: format!("duplicate id {}: item {earlier} has it too; give every item its own id", clip(&s.id)),
            });
        }
    }
    found
}

/// [`validate`] as a report: a file that cannot be read or parsed is a one-problem report.
pub fn check_report(path: &Path, validated: Result<Dataset>) -> Report {
    match validated {
        Ok(d) => d.report,
        Err(e) => Report::new(path, 0, vec![Problem { index: None, field: String::new(), message: format!("{e:#}") }]),
    }
}

/// Reads a JSON-array dataset; any problem is a user error naming the file, item and field.
pub fn load_items(path: &Path, image_root: Option<&Path>, parse_item: ItemParser) -> Result<Vec<Sample>> {
    validate_items(path, image_root, false, parse_item)?.into_samples()
}

/// Validates a JSON-array dataset, images included, and reports every problem.
pub fn check_items(path: &Path, image_root: Option<&Path>, parse_item: ItemParser) -> Report {
    check_report(path, validate_items(path, image_root, true, parse_item))
}

fn validate_items(
    path: &Path,
    image_root: Option<&Path>,
    check_files: bool,
    parse_item: ItemParser,
) -> Result<Dataset> {
    validate(path, image_root, check_files, |items: Vec<Value>, images: &Images| {
        let (samples, problems) = parse_items(&items, images, parse_item);
        Parsed { items: items.len(), samples, problems }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_keep_file_order_and_duplicates() {
        let e: Entries = serde_json::from_str(r#"{"b": 1, "a": 2, "b": 3}"#).unwrap();
        let keys: Vec<&str> = e.0.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "b"]);
    }

    #[test]
    fn report_error_names_file_item_and_field() {
        let r = Report::new(
            Path::new("/x/d.json"),
            3,
            vec![
                Problem { index: Some(1), field: "pair_type".into(), message: "unknown".into() },
                Problem { index: Some(2), field: "test_image".into(), message: "missing".into() },
            ],
        );
        let s = format!("{:#}", r.to_error(Some(1)));
        assert!(s.contains("/x/d.json: 2 problems in 3 items"), "{s}");
        assert!(s.contains("item 1, field `pair_type`: unknown"), "{s}");
        assert!(s.contains("1 more"), "{s}");
    }

    #[test]
    fn checker_reports_missing_wrong_type_and_blank() {
        let mut problems = Vec::new();
        let v: Value = serde_json::json!({"a": "", "b": 3, "c": "ok"});
        let mut c = Checker::new(4, &mut problems);
        assert_eq!(c.str(&v, "", "a", true), None);
        assert_eq!(c.str(&v, "q.", "b", true), None);
        assert_eq!(c.str(&v, "", "c", true), Some("ok"));
        assert_eq!(c.str(&v, "", "d", false), None);
        assert_eq!(c.str(&v, "", "e", true), None);
        let msgs: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        assert_eq!(
            msgs,
            [
                "item 4, field `a`: is empty",
                "item 4, field `q.b`: expected a string, found a number",
                "item 4, field `e`: missing"
            ]
        );
    }
}
