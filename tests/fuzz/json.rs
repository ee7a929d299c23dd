//! Structure-aware JSON mutation: a node of the `serde_json::Value` tree replaced by a wrong
//! type, an empty container, a huge or negative number or a hostile path; keys removed or added;
//! then, in the raw text, duplicated keys and numbers serde cannot hold.

use super::mutate::{self, FuzzRng};
use rand::Rng;
use serde_json::{json, Value};

const HOSTILE_STRINGS: &[&str] = &[
    "",
    "../../etc/passwd",
    "/etc/passwd",
    "/dev/zero",
    "/proc/self/mem",
    ".",
    "..",
    "a\0b",
    "\u{202e}gnp.exe",
    "Yes",
    "No",
    "A",
    "Z",
    "lora",
    "gelu",
    "full",
    "%s%n",
];

/// Every node's path from the root (object keys and array indices).
fn paths(v: &Value, here: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(Step::Key(k.clone()));
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(Step::Index(i));
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

#[derive(Clone)]
enum Step {
    Key(String),
    Index(usize),
}

fn node_mut<'a>(v: &'a mut Value, path: &[Step]) -> &'a mut Value {
    path.iter().fold(v, |v, s| match s {
        Step::Key(k) => &mut v[k.as_str()],
        Step::Index(i) => &mut v[*i],
    })
}

/// A value of a different kind than `old`, or a nasty one of the same kind.
fn replacement(rng: &mut FuzzRng, old: &Value) -> Value {
    match rng.random_range(0..9) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!([]),
        3 => json!({}),
        4 => json!(*mutate::pick(rng, HOSTILE_STRINGS)),
        5 => json!("x".repeat(rng.random_range(1..5000))),
        6 => match old.as_f64() {
            Some(x) => json!(mutate::float_near(rng, x)),
            None => json!(*mutate::pick(rng, &[1e308, -1.0, 0.0, 0.5, 1e19, -1e19])),
        },
        7 => {
            let n = mutate::int_near(rng, old.as_i64().unwrap_or(1) as i128);
            if let Ok(x) = i64::try_from(n) {
                json!(x)
            } else if let Ok(x) = u64::try_from(n) {
                json!(x)
            } else {
                json!(n as f64)
            }
        }
        _ => match old {
            // wrap in a container of the wrong kind
            Value::Array(a) => json!({ "0": a.first().cloned().unwrap_or(Value::Null) }),
            other => json!([other.clone()]),
        },
    }
}

/// One tree edit of `v` (in place).
pub fn mutate_value(rng: &mut FuzzRng, v: &mut Value) {
    let mut all = vec![];
    paths(v, &mut vec![], &mut all);
    let path = mutate::pick(rng, &all).clone();
    let (parent_path, last) = match path.split_last() {
        Some((l, p)) => (p.to_vec(), Some(l.clone())),
        None => (vec![], None),
    };
    match (rng.random_range(0..10), last) {
        // remove this node from its parent
        (0 | 1, Some(step)) => match (node_mut(v, &parent_path), step) {
            (Value::Object(m), Step::Key(k)) => {
                m.remove(&k);
            }
            (Value::Array(a), Step::Index(i)) => {
                a.remove(i);
            }
            _ => {}
        },
        // duplicate an array element many times, or empty the array
        (2, _) => {
            if let Value::Array(a) = node_mut(v, &path) {
                if let Some(x) = a.first().cloned() {
                    let n = *mutate::pick(rng, &[0usize, 1, 2, 50]);
                    if n == 0 {
                        a.clear();
                    } else {
                        a.extend(std::iter::repeat_n(x, n));
                    }
                }
            }
        }
        // an unknown key beside known ones
        (3, _) => {
            if let Value::Object(m) = node_mut(v, &path) {
                m.insert("unexpected_key".into(), json!(1));
            }
        }
        _ => {
            let n = node_mut(v, &path);
            *n = replacement(rng, n);
        }
    }
}

/// `"key":` positions in compact JSON text, as (start of the quoted key, end after the colon).
fn key_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut spans = vec![];
    let mut i = 0;
    let mut start = None;
    let mut in_str = false;
    while i < b.len() {
        match (in_str, b[i]) {
            (true, b'\\') => i += 1,
            (true, b'"') => {
                in_str = false;
                if b.get(i + 1) == Some(&b':') {
                    spans.push((start.unwrap(), i + 2));
                }
            }
            (false, b'"') => {
                in_str = true;
                start = Some(i);
            }
            _ => {}
        }
        i += 1;
    }
    spans
}

/// Text-level edits serde_json's tree cannot express: a duplicated key (the first of two
/// copies has another value), a number too large for any type.
fn mutate_text(rng: &mut FuzzRng, text: &str) -> String {
    let spans = key_spans(text);
    if spans.is_empty() {
        return text.to_string();
    }
    let (s, e) = *mutate::pick(rng, &spans);
    if rng.random_bool(0.6) {
        let key = &text[s..e];
        let val = replacement(rng, &Value::Null).to_string();
        format!("{}{key}{val},{}", &text[..s], &text[s..])
    } else {
        // Replace the value right after this key with a raw literal.
        let lit = *mutate::pick(rng, &["1e999", "-1e999", "123456789012345678901234567890", "-0", "NaN", "0x10"]);
        let rest = &text[e..];
        let vend = rest.find([',', '}', ']']).unwrap_or(rest.len());
        format!("{}{lit}{}", &text[..e], &rest[vend..])
    }
}

/// Structure-aware mutation of a JSON document (falls back to bytes when it does not parse).
pub fn mutate(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<Value>(data) else {
        return mutate::bytes(rng, data, b"{}");
    };
    for _ in 0..rng.random_range(1..=3) {
        mutate_value(rng, &mut v);
    }
    let text = v.to_string();
    let text = if rng.random_bool(0.25) { mutate_text(rng, &text) } else { text };
    text.into_bytes()
}
