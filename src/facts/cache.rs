//! The generation cache: an append-only JSONL file beside the output (`F.jsonl.cache`).
//!
//! Each line is one [`Record`]: the raw generation for one (image sha256, prompt, backbone,
//! generation options). Every line is written with a single `write` of the whole line and its
//! newline, then flushed, so a killed run leaves at most one torn line, at the end. On reload a
//! last line without its newline is such a torn line: it is ignored and cut off before anything
//! is appended (so the next line starts clean); a line in the middle that does not parse (a
//! damaged file) is skipped and counted, never fatal.
//!
//! Generations do not depend on the image (the prompt is built from the category), so the cache
//! also indexes them by (prompt, backbone, options): a second image of the same category reuses
//! them, and gets its own record, marked `reused`.
//!
//! The file handling (one write per line, torn-tail cut, bad-line skip) is
//! [`crate::jsonl_log::AppendLog`]'s.

use super::GenOptions;
use crate::jsonl_log::AppendLog;
pub use crate::jsonl_log::LoadReport;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One cached generation for one image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub image_sha256: String,
    /// The image's path when the record was written (informative; the key is the hash).
    pub image: PathBuf,
    pub prompt: String,
    pub backbone: String,
    pub options: GenOptions,
    /// The backbone's raw output (cleaning happens when the output file is written).
    pub text: String,
    /// True when the text was copied from an earlier generation with the same prompt, backbone
    /// and options rather than generated for this image.
    #[serde(default)]
    pub reused: bool,
}

/// The key of a generation: what the backbone's output depends on.
fn gen_key(prompt: &str, backbone: &str, options: &GenOptions) -> String {
    serde_json::to_string(&(prompt, backbone, options)).expect("serialisable")
}

fn image_key(sha: &str, prompt: &str, backbone: &str, options: &GenOptions) -> String {
    serde_json::to_string(&(sha, prompt, backbone, options)).expect("serialisable")
}

/// The cache file, open for appending, and its indexes.
pub struct Cache {
    log: AppendLog<Record>,
    by_image: HashMap<String, usize>,
    by_generation: HashMap<String, usize>,
    pub loaded: LoadReport,
}

impl Cache {
    /// Opens (creating if needed) and reloads the cache at `path`.
    pub fn open(path: &Path) -> Result<Cache> {
        let log = AppendLog::open(path)?;
        let loaded = log.loaded;
        let mut cache = Cache { log, by_image: HashMap::new(), by_generation: HashMap::new(), loaded };
        for i in 0..cache.log.len() {
            cache.index(i);
        }
        Ok(cache)
    }

    fn index(&mut self, i: usize) {
        let r = &self.log.records()[i];
        self.by_image.entry(image_key(&r.image_sha256, &r.prompt, &r.backbone, &r.options)).or_insert(i);
        self.by_generation.entry(gen_key(&r.prompt, &r.backbone, &r.options)).or_insert(i);
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// The record for exactly this image, prompt, backbone and options.
    pub fn for_image(&self, sha: &str, prompt: &str, backbone: &str, options: &GenOptions) -> Option<&Record> {
        self.by_image.get(&image_key(sha, prompt, backbone, options)).map(|&i| &self.log.records()[i])
    }

    /// Any record with this prompt, backbone and options (any image): its text can be reused.
    pub fn generation(&self, prompt: &str, backbone: &str, options: &GenOptions) -> Option<&Record> {
        self.by_generation.get(&gen_key(prompt, backbone, options)).map(|&i| &self.log.records()[i])
    }

    /// Appends one record as one line: a single write of the line and its newline, then a flush.
    pub fn append(&mut self, r: Record) -> Result<()> {
        let i = self.log.append(r).context("writing the generation cache")?;
        self.index(i);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> GenOptions {
        GenOptions { max_tokens: 8, temperature: 0.7, top_p: 0.9, seed: 1, system: Some("sys".into()) }
    }

    fn rec(sha: &str, prompt: &str, text: &str) -> Record {
        Record {
            image_sha256: sha.into(),
            image: format!("/{sha}.png").into(),
            prompt: prompt.into(),
            backbone: "lite".into(),
            options: opts(),
            text: text.into(),
            reused: false,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_are_found_by_both_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl.cache");
        {
            let mut c = Cache::open(&p).unwrap();
            c.append(rec("aa", "q1", "t1")).unwrap();
            c.append(rec("bb", "q1", "t1")).unwrap();
            c.append(rec("aa", "q2", "t2")).unwrap();
        }
        let c = Cache::open(&p).unwrap();
        assert_eq!(c.loaded, LoadReport { records: 3, torn_tail: false, bad_lines: 0 });
        assert_eq!(c.for_image("aa", "q2", "lite", &opts()).unwrap().text, "t2");
        assert!(c.for_image("cc", "q2", "lite", &opts()).is_none());
        assert_eq!(c.generation("q2", "lite", &opts()).unwrap().text, "t2");
        assert!(c.generation("q2", "other", &opts()).is_none());
        let mut o = opts();
        o.seed = 2;
        assert!(c.generation("q2", "lite", &o).is_none());
    }

    #[test]
    fn a_torn_last_line_is_cut_and_a_bad_middle_line_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.jsonl.cache");
        let line = |r: &Record| format!("{}\n", serde_json::to_string(r).unwrap());
        let good = line(&rec("aa", "q1", "t1"));
        let torn = &line(&rec("aa", "q2", "t2"))[..40];
        std::fs::write(&p, format!("{good}not json\n{good}{torn}")).unwrap();
        let mut c = Cache::open(&p).unwrap();
        assert_eq!(c.loaded, LoadReport { records: 2, torn_tail: true, bad_lines: 1 });
        assert!(c.for_image("aa", "q2", "lite", &opts()).is_none());
        c.append(rec("aa", "q2", "t2")).unwrap();
        drop(c);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with(&line(&rec("aa", "q2", "t2"))) && !text.contains(&format!("{torn}{{")), "{text}");
        let c = Cache::open(&p).unwrap();
        assert_eq!(c.loaded, LoadReport { records: 3, torn_tail: false, bad_lines: 1 });
        assert_eq!(c.for_image("aa", "q2", "lite", &opts()).unwrap().text, "t2");
    }
}
