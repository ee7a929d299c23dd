//! The answers file of `sage eval --answers` / `--save-answers`: JSONL, one line per answer,
//! `{"id", "question", "answer"}` (the sample's id and the question's index), so answers made
//! elsewhere can be scored without running a model.

use super::Generated;
use crate::data::Sample;
use crate::jsonl_log::AppendLog;
use crate::user_err;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One answer in a file: the sample's id and the question's index.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnswerLine {
    pub id: String,
    pub question: usize,
    pub answer: String,
}

/// The answers of `path` as [`Generated`] records over `samples`; a line that does not parse or
/// names no sample is a user error naming the file and the line.
pub fn read_answers(path: &Path, samples: &[Sample]) -> Result<Vec<Generated>> {
    let text = std::fs::read_to_string(path).map_err(|e| user_err!("cannot read {}: {e}", path.display()))?;
    let by_id: std::collections::HashMap<&str, usize> =
        samples.iter().enumerate().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let a: AnswerLine = serde_json::from_str(line).map_err(|e| {
            user_err!("{} line {}: {e} (expected {{\"id\", \"question\", \"answer\"}})", path.display(), n + 1)
        })?;
        let item = *by_id
            .get(a.id.as_str())
            .ok_or_else(|| user_err!("{} line {}: no sample with id `{}` in the data", path.display(), n + 1, a.id))?;
        out.push(Generated { item, question: a.question, answer: a.answer });
    }
    Ok(out)
}

/// A fresh answers file (an old one at `path` is replaced): each answer is appended the moment
/// it is generated, so an interrupted evaluation leaves every answer it made.
pub struct AnswerWriter<'a> {
    log: AppendLog<AnswerLine>,
    samples: &'a [Sample],
}

impl<'a> AnswerWriter<'a> {
    pub fn create(path: &Path, samples: &'a [Sample]) -> Result<AnswerWriter<'a>> {
        let _ = std::fs::remove_file(path);
        Ok(AnswerWriter { log: AppendLog::open(path)?, samples })
    }

    pub fn append(&mut self, g: &Generated) -> Result<()> {
        let id = self.samples[g.item].id.clone();
        self.log.append(AnswerLine { id, question: g.question, answer: g.answer.clone() })?;
        Ok(())
    }
}
