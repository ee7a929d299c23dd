//! An append-only JSONL record file that survives being killed at any point: the storage under
//! the fact generation cache (`facts::cache`) and the judge score cache (`score`).
//!
//! Each record is one line, written with a single `write` of the whole line and its newline, so
//! a killed process leaves at most one torn line, at the end. On open a last line without its
//! newline is such a torn line: it is ignored and cut off before anything is appended (so the
//! next record starts on a line of its own); a complete line that does not parse (a damaged
//! file, or a record of another shape) is skipped and counted, never fatal. Blank lines are
//! ignored.

use crate::lock::WriterLock;
use anyhow::{Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

/// What reloading found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadReport {
    /// Complete, valid lines.
    pub records: usize,
    /// A torn last line was found and cut off.
    pub torn_tail: bool,
    /// Complete lines that did not parse, skipped.
    pub bad_lines: usize,
}

impl LoadReport {
    /// A one-line note for stderr when something was ignored (`None` when the file was clean).
    pub fn note(&self, path: &Path, consequence: &str) -> Option<String> {
        if !self.torn_tail && self.bad_lines == 0 {
            return None;
        }
        let torn = if self.torn_tail { "a torn last line (from an interrupted run)" } else { "" };
        let bad = match self.bad_lines {
            0 => String::new(),
            n => format!(
                "{}{n} unreadable line{}",
                if self.torn_tail { " and " } else { "" },
                if n == 1 { "" } else { "s" }
            ),
        };
        Some(format!("note: {}: {torn}{bad} ignored; {consequence}", path.display()))
    }
}

/// An open record file: every record read on open and every record appended since, in order.
pub struct AppendLog<R> {
    path: PathBuf,
    file: File,
    records: Vec<R>,
    /// What [`AppendLog::open`] found.
    pub loaded: LoadReport,
    /// This process is the file's only writer while the log is open.
    _writer: WriterLock,
    _record: PhantomData<fn() -> R>,
}

impl<R: Serialize + DeserializeOwned> AppendLog<R> {
    /// Opens (creating it and its folders if needed) and reloads the file at `path`.
    /// Refuses at once (a user error naming the holder's PID) when another process has it open.
    pub fn open(path: &Path) -> Result<AppendLog<R>> {
        let writer = WriterLock::for_file(path)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading {}", path.display()))?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        let mut loaded = LoadReport::default();
        if complete < bytes.len() {
            // A torn last line (the process died inside its write): drop it, so that the next
            // record starts on a line of its own.
            loaded.torn_tail = true;
            file.set_len(complete as u64).with_context(|| format!("truncating {}", path.display()))?;
            file.seek(SeekFrom::End(0))?;
        }
        let mut records = Vec::new();
        for line in bytes[..complete].split(|&b| b == b'\n') {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<R>(line) {
                Ok(r) => records.push(r),
                Err(_) => loaded.bad_lines += 1,
            }
        }
        loaded.records = records.len();
        Ok(AppendLog { path: path.to_path_buf(), file, records, loaded, _writer: writer, _record: PhantomData })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The records read on open, then the ones appended since.
    pub fn records(&self) -> &[R] {
        &self.records
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Appends one record as one line (a single write of the line and its newline, then a
    /// flush) and keeps it; returns its index in [`AppendLog::records`].
    pub fn append(&mut self, r: R) -> Result<usize> {
        let mut line = serde_json::to_vec(&r)?;
        line.push(b'\n');
        self.file.write_all(&line).with_context(|| format!("appending to {}", self.path.display()))?;
        self.file.flush().with_context(|| format!("flushing {}", self.path.display()))?;
        self.records.push(r);
        Ok(self.records.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        k: String,
        v: u32,
    }

    fn rec(k: &str, v: u32) -> Rec {
        Rec { k: k.into(), v }
    }

    fn line(r: &Rec) -> String {
        format!("{}\n", serde_json::to_string(r).unwrap())
    }

    #[test]
    fn records_survive_a_reopen_in_order_and_folders_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/log.jsonl");
        {
            let mut log = AppendLog::<Rec>::open(&p).unwrap();
            assert!(log.is_empty() && log.loaded == LoadReport::default());
            assert_eq!(log.append(rec("x", 1)).unwrap(), 0);
            assert_eq!(log.append(rec("y", 2)).unwrap(), 1);
            assert_eq!(log.records(), &[rec("x", 1), rec("y", 2)]);
        }
        assert_eq!(std::fs::read_to_string(&p).unwrap(), line(&rec("x", 1)) + &line(&rec("y", 2)));
        let mut log = AppendLog::<Rec>::open(&p).unwrap();
        assert_eq!(log.loaded, LoadReport { records: 2, torn_tail: false, bad_lines: 0 });
        log.append(rec("z", 3)).unwrap();
        assert_eq!(log.records(), &[rec("x", 1), rec("y", 2), rec("z", 3)]);
        assert_eq!(log.path(), p);
    }

    #[test]
    fn a_torn_last_line_is_cut_before_appending_and_bad_or_blank_middle_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        let good = line(&rec("x", 1));
        let torn = &line(&rec("y", 2))[..9];
        // A line of another shape is as unreadable as one that is not JSON.
        std::fs::write(&p, format!("{good}not json\n\n{{\"k\": 3}}\n{good}{torn}")).unwrap();
        let mut log = AppendLog::<Rec>::open(&p).unwrap();
        assert_eq!(log.loaded, LoadReport { records: 2, torn_tail: true, bad_lines: 2 });
        assert_eq!(
            log.loaded.note(&p, "redone").unwrap(),
            format!(
                "note: {}: a torn last line (from an interrupted run) and 2 unreadable lines ignored; redone",
                p.display()
            )
        );
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            format!("{good}not json\n\n{{\"k\": 3}}\n{good}"),
            "cut on open"
        );
        log.append(rec("y", 2)).unwrap();
        drop(log);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(text.ends_with(&format!("{good}{}", line(&rec("y", 2)))), "{text}");
        let log = AppendLog::<Rec>::open(&p).unwrap();
        assert_eq!(log.loaded, LoadReport { records: 3, torn_tail: false, bad_lines: 2 });
        assert_eq!(log.records().last(), Some(&rec("y", 2)));
    }

    #[test]
    fn a_file_that_is_only_a_torn_line_becomes_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log.jsonl");
        std::fs::write(&p, "{\"k\": \"x\", \"v\"").unwrap();
        let log = AppendLog::<Rec>::open(&p).unwrap();
        assert_eq!(log.loaded, LoadReport { records: 0, torn_tail: true, bad_lines: 0 });
        assert_eq!(std::fs::read(&p).unwrap(), b"");
        assert_eq!(LoadReport::default().note(&p, "x"), None);
    }
}
