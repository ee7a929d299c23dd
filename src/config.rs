//! TOML configuration files (`configs/*.toml`), parsed with serde; unknown keys are refused so a
//! typo never silently falls back to a default, and every numeric key is range-checked
//! ([`CheckRanges`]) so a value that parses but cannot work (`lr = nan`, `batch = 0`) is refused
//! before anything runs.

use crate::user_err;
use anyhow::Result;
use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads, parses and range-checks a config file; every problem names the file, the key, its line
/// and the fix.
pub fn load<T: DeserializeOwned + CheckRanges>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| user_err!("cannot read config {}: {e}", path.display()))?;
    let value: T = toml::from_str(&text).map_err(|e| {
        let msg = e.message();
        let at = e.span().map(|s| format!(" (line {})", line_at(&text, s.start)));
        user_err!(
            "config {}{}: {msg}. Fix or remove that key; see configs/ in the repository for valid examples",
            path.display(),
            at.unwrap_or_default()
        )
    })?;
    let mut check = RangeCheck::default();
    value.check_ranges(&mut check);
    check.into_result(path, &text)?;
    Ok(value)
}

/// `skip_serializing_if` predicates for options added after a stage's first runs: at their
/// defaults they are left out of a config as written back (a checkpoint's record of it), so runs
/// made before the option existed still match their config and resume.
pub fn is_false(b: &bool) -> bool {
    !*b
}

/// See [`is_false`] (a zero count or weight).
pub fn is_zero<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// See [`is_false`].
pub fn is_one(v: &f32) -> bool {
    *v == 1.0
}

/// A config's numeric invariants: each key's range, and the constraints between keys.
pub trait CheckRanges {
    fn check_ranges(&self, c: &mut RangeCheck);
}

/// The out-of-range keys found so far; each names its dotted key (`train.lr`), the value and the
/// range it must be in.
#[derive(Default, Debug)]
pub struct RangeCheck {
    problems: Vec<(String, String)>,
}

impl RangeCheck {
    /// A finite float in `[lo, hi]`.
    pub fn float(&mut self, key: &str, v: f64, lo: f64, hi: f64) {
        if !(v.is_finite() && v >= lo && v <= hi) {
            self.fail(key, format!("= {v}, must be a finite number in [{lo}, {hi}]"));
        }
    }

    /// A finite float in `(0, hi]`.
    pub fn positive_float(&mut self, key: &str, v: f64, hi: f64) {
        if !(v.is_finite() && v > 0.0 && v <= hi) {
            self.fail(key, format!("= {v}, must be a finite number in (0, {hi}]"));
        }
    }

    /// A whole number in `[lo, hi]`.
    pub fn int(&mut self, key: &str, v: u64, lo: u64, hi: u64) {
        if !(lo..=hi).contains(&v) {
            self.fail(key, format!("= {v}, must be in [{lo}, {hi}]"));
        }
    }

    /// A constraint the range checks cannot say (`why`: what the value must satisfy).
    pub fn require(&mut self, key: &str, ok: bool, why: String) {
        if !ok {
            self.fail(key, why);
        }
    }

    fn fail(&mut self, key: &str, why: String) {
        self.problems.push((key.to_string(), why));
    }

    /// Every problem, one a line, each with the key's line in `text` (or "default" when the key
    /// is absent from the file).
    pub fn into_result(self, path: &Path, text: &str) -> Result<()> {
        if self.problems.is_empty() {
            return Ok(());
        }
        let lines: Vec<String> = self
            .problems
            .iter()
            .map(|(key, why)| {
                let at = match key_line(text, key) {
                    Some(l) => format!("line {l}"),
                    None => "default".into(),
                };
                format!("  {key} ({at}) {why}")
            })
            .collect();
        Err(user_err!("config {}: value out of range:\n{}", path.display(), lines.join("\n")))
    }
}

/// 1-based line of byte offset `at`.
fn line_at(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// The line where the dotted `key` is set in the TOML `text` (`None` when absent), from the
/// parser's spans.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == *part)?;
        if i + 1 == parts.len() {
            return Some(line_at(text, k.span().start));
        }
        match v.get_ref() {
            toml::de::DeValue::Table(t) => table = t,
            _ => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct C {
        k: usize,
        #[serde(default)]
        s: Option<Inner>,
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        lr: f32,
    }

    impl CheckRanges for C {
        fn check_ranges(&self, c: &mut RangeCheck) {
            c.int("k", self.k as u64, 1, 10);
            if let Some(s) = &self.s {
                c.positive_float("s.lr", s.lr as f64, 1.0);
            }
        }
    }

    #[test]
    fn unknown_key_is_a_user_error_naming_file_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "k = 3\ntopk = 4\n").unwrap();
        let err = load::<C>(&p).unwrap_err();
        let s = format!("{err:#}");
        assert!(crate::error::is_user_error(&err));
        assert!(s.contains("c.toml") && s.contains("topk") && s.contains("line 2"), "{s}");
    }

    #[test]
    fn out_of_range_values_name_key_line_and_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "k = 3\n\n[s]\n# comment\nlr = nan\n").unwrap();
        let err = load::<C>(&p).unwrap_err();
        let s = format!("{err:#}");
        assert!(crate::error::is_user_error(&err));
        assert!(s.contains("c.toml") && s.contains("s.lr (line 5)") && s.contains("(0, 1]"), "{s}");
        std::fs::write(&p, "k = 0\n[s]\nlr = -1e-3\n").unwrap();
        let s = format!("{:#}", load::<C>(&p).unwrap_err());
        assert!(s.contains("k (line 1) = 0, must be in [1, 10]") && s.contains("s.lr (line 3)"), "{s}");
        std::fs::write(&p, "k = 2\n[s]\nlr = 1e-3\n").unwrap();
        assert_eq!(load::<C>(&p).unwrap().k, 2);
    }
}
