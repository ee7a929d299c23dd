//! Judge `rubric` (built in): offline and deterministic scores from the sample's ground truth and MiniLM
//! similarity to the best reference answer (rules in `crate::judge::rubric`). It is the proxy
//! judge for CI and for machines without an LLM endpoint, not a substitute for GPT-4o's opinion.
//!
//! Config (JSON): `minilm_dir` (default: the all-MiniLM-L6-v2 asset in $SAGE_HOME); `graded`
//! (default false): hedged answers lose logic and location points (`crate::judge::rubric`). The
//! config is part of the judge's cache key, so graded and plain scores never mix.

use crate::judge::rubric::RubricJudge;
use crate::judge::JudgeRequest;
use crate::models::bert::SentenceEncoder;
use sage_plugin_sdk::{Plugin, PluginError, PluginResult};
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    minilm_dir: Option<PathBuf>,
    #[serde(default)]
    graded: bool,
}

pub struct Rubric(RubricJudge);

impl Plugin for Rubric {
    fn create(config_json: &str) -> PluginResult<Self> {
        let cfg: Config = serde_json::from_str(config_json)
            .map_err(|e| PluginError::invalid(format!("bad rubric judge config: {e} (keys: minilm_dir, graded)")))?;
        let dir = match cfg.minilm_dir {
            Some(d) => d,
            None => crate::assets::Asset::MiniLmDir.path().map_err(|e| PluginError::io(format!("{e:#}")))?,
        };
        let enc = SentenceEncoder::load(&dir).map_err(|e| PluginError::io(format!("{e:#}")))?;
        Ok(Rubric(RubricJudge::new(enc, cfg.graded)))
    }

    fn judge_score(&mut self, request_json: &str) -> PluginResult<String> {
        let r: JudgeRequest =
            serde_json::from_str(request_json).map_err(|e| PluginError::invalid(format!("bad judge request: {e}")))?;
        let s = self.0.score(&r).map_err(|e| PluginError::other(format!("{e:#}")))?;
        serde_json::to_string(&s).map_err(|e| PluginError::other(e.to_string()))
    }
}
