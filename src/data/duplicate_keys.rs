//! Duplicate keys in a JSON text. serde_json keeps the last of two equal keys without a word, so
//! an item with `test_image` twice silently trains on the second; this pass over the raw text
//! finds every such key before the file is read for its content.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;

/// One key that appears twice in the same object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateKey {
    /// Position of the top-level array element or object entry the object lies in (`None` when
    /// the duplicate is a top-level key itself).
    pub item: Option<usize>,
    /// Path from that item to the object holding the key, e.g. `question_answer[2]` (empty for
    /// the item itself).
    pub within: String,
    pub key: String,
}

/// Every duplicated key in `text`, in file order; `Err` when `text` is not JSON (the reader that
/// follows reports that with line and column). serde_json bounds the nesting depth (128), so a
/// deeply nested file is an error here, not a stack overflow.
pub fn find(text: &str) -> Result<Vec<DuplicateKey>, serde_json::Error> {
    let found = RefCell::new(Vec::new());
    let mut de = serde_json::Deserializer::from_str(text);
    Walk { item: None, path: String::new(), depth: 0, found: &found }.deserialize(&mut de)?;
    de.end()?;
    Ok(found.into_inner())
}

/// Visits one JSON value at `path`, recording duplicated keys of the objects inside it.
struct Walk<'a> {
    item: Option<usize>,
    path: String,
    depth: usize,
    found: &'a RefCell<Vec<DuplicateKey>>,
}

impl<'a> Walk<'a> {
    fn child(&self, index: usize, segment: String) -> Walk<'a> {
        // Depth 0 is the file itself: its elements or entries are the items messages count.
        let (item, path) = if self.depth == 0 { (Some(index), String::new()) } else { (self.item, segment) };
        Walk { item, path, depth: self.depth + 1, found: self.found }
    }

    fn joined(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut i = 0;
        while seq.next_element_seed(self.child(i, format!("{}[{i}]", self.path)))?.is_some() {
            i += 1;
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut seen = HashSet::new();
        let mut i = 0;
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                let item = if self.depth == 0 { None } else { self.item };
                self.found.borrow_mut().push(DuplicateKey { item, within: self.path.clone(), key: key.clone() });
            }
            let child = self.child(i, self.joined(&key));
            map.next_value_seed(child)?;
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dup(item: Option<usize>, within: &str, key: &str) -> DuplicateKey {
        DuplicateKey { item, within: within.into(), key: key.into() }
    }

    #[test]
    fn finds_keys_twice_in_items_and_nested_objects() {
        let text = r#"[{"a": 1, "b": [{"x": 1, "x": 2}]}, {"a": 1, "c": {"d": 0}, "a": 3}]"#;
        assert_eq!(find(text).unwrap(), [dup(Some(0), "b[0]", "x"), dup(Some(1), "", "a")]);
    }

    #[test]
    fn top_level_object_keys_count_as_items() {
        let text = r#"{"p.png": {"q": 1, "q": 1}, "p.png": {}}"#;
        assert_eq!(find(text).unwrap(), [dup(Some(0), "", "q"), dup(None, "", "p.png")]);
    }

    #[test]
    fn clean_files_and_escaped_keys() {
        assert!(find(r#"[{"a\u0062": 1, "ab2": 2}, 3, "s", null, true, -1.5]"#).unwrap().is_empty());
        assert_eq!(find(r#"[{"ab": 1, "a\u0062": 2}]"#).unwrap(), [dup(Some(0), "", "ab")]);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let text = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(find(&text).is_err());
        assert!(find("[1,").is_err());
    }
}
