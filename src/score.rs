//! `sage score`: MLE scoring of a preference dataset (ARCHITECTURE.md §1, E-DPO): a judge scores every ranked answer
//! of every question on defect type, location and logic (1–5), and each score goes to an
//! append-only JSONL cache as soon as it exists.
//!
//! - One cache line is one [`ScoreRecord`], keyed by (instance, answer rank, sha256 of the answer
//!   text, judge key). The instance is `<sample id>#q<question index>`; the judge key is the
//!   plugin's name and a hash of its config ([`judge_key`]), so a judge with another config, or
//!   an answer whose text was edited, is asked again instead of being served a stale score.
//! - A run that is killed loses at most the score in flight: the next run with the same data,
//!   judge and cache reuses every saved line ([`crate::jsonl_log`] cuts a torn last line). A
//!   judge error (a timeout, a refusal) stops the run with a message that says how much is saved
//!   and that rerunning the same command resumes.
//! - Training reads the scores back with [`load_scores`], which insists on a complete set.
//!
//! `H(a_i)` ([`answer_entropy`]) is the entropy of the softmax over an answer's three scores.

use crate::data::sample::{conclusion, yes_no, Sample};
use crate::jsonl_log::{AppendLog, LoadReport};
use crate::judge::{JudgeRequest, JudgeScores, Truth};
use crate::plugin::{self, Instance, Kind};
use crate::user_err;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

/// One cached score: one line of the score file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoreRecord {
    /// `<sample id>#q<question index>` ([`instance_id`]).
    pub instance: String,
    /// The answer's rank index, 0 = best.
    pub answer: usize,
    /// sha256 (lower-case hex) of the answer text: an edited answer is scored again.
    pub answer_sha256: String,
    /// The judge's key ([`judge_key`]): plugin name and a hash of its config.
    pub judge: String,
    pub scores: JudgeScores,
}

/// The instance part of a score's key: `<sample id>#q<question index>`.
pub fn instance_id(sample_id: &str, question: usize) -> String {
    format!("{sample_id}#q{question}")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of an answer's text, lower-case hex.
pub fn answer_sha256(text: &str) -> String {
    sha256_hex(text.as_bytes())
}

/// A JSON value with object keys sorted at every depth (so equal configs hash equally).
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), canonical(&m[k]))).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// The key scores from judge plugin `name` created with `config` are cached under:
/// `<name>@<first 12 hex digits of sha256(config with sorted keys)>`.
pub fn judge_key(name: &str, config: &Value) -> String {
    let hash = sha256_hex(canonical(config).to_string().as_bytes());
    format!("{name}@{}", &hash[..12])
}

/// The plugin name part of a judge key.
fn judge_name(key: &str) -> &str {
    key.rsplit_once('@').map_or(key, |(n, _)| n)
}

/// Where `sage score` caches the scores of a data file unless told otherwise:
/// `<folder>/<stem>.scores.jsonl`, beside it.
pub fn default_cache_path(data: &Path) -> PathBuf {
    let stem = data.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "data".into());
    data.with_file_name(format!("{stem}.scores.jsonl"))
}

type Key = (String, usize, String, String);

/// The score file, open for appending, indexed by (instance, answer, answer sha256, judge).
pub struct ScoreCache {
    log: AppendLog<ScoreRecord>,
    index: HashMap<Key, usize>,
}

impl ScoreCache {
    /// Opens (creating it and its folder if needed) and reloads the score file at `path`. A torn
    /// last line is cut off and unreadable lines are skipped (see [`ScoreCache::loaded`]).
    pub fn open(path: &Path) -> Result<ScoreCache> {
        let log = AppendLog::open(path)?;
        let mut c = ScoreCache { log, index: HashMap::new() };
        for i in 0..c.log.len() {
            c.index(i);
        }
        Ok(c)
    }

    fn index(&mut self, i: usize) {
        let r = &self.log.records()[i];
        // The first score of a key wins (a second one only appears when two runs raced).
        self.index.entry((r.instance.clone(), r.answer, r.answer_sha256.clone(), r.judge.clone())).or_insert(i);
    }

    pub fn path(&self) -> &Path {
        self.log.path()
    }

    /// What opening found: valid lines, a torn last line cut off, unreadable lines skipped.
    pub fn loaded(&self) -> LoadReport {
        self.log.loaded
    }

    /// Every record, in file order (those appended by this process last).
    pub fn records(&self) -> &[ScoreRecord] {
        self.log.records()
    }

    /// The cached scores for this key.
    pub fn get(&self, instance: &str, answer: usize, answer_sha256: &str, judge: &str) -> Option<&JudgeScores> {
        let key = (instance.to_string(), answer, answer_sha256.to_string(), judge.to_string());
        self.index.get(&key).map(|&i| &self.log.records()[i].scores)
    }

    /// Appends one record as one line (written and flushed before this returns).
    pub fn append(&mut self, r: ScoreRecord) -> Result<()> {
        let i = self.log.append(r).context("saving a judge score")?;
        self.index(i);
        Ok(())
    }

    /// The judge keys present in the file.
    pub fn judges(&self) -> BTreeSet<&str> {
        self.log.records().iter().map(|r| r.judge.as_str()).collect()
    }
}

/// Something that scores answers (a judge plugin; a fake in tests).
pub trait Judge {
    /// The judge's cache key ([`judge_key`]): scores are reused only under the same key.
    fn name(&self) -> String;
    fn score(&mut self, req: &JudgeRequest) -> Result<JudgeScores>;
}

/// Refuses scores outside 1–5, naming the judge.
pub fn validate_scores(s: &JudgeScores, judge: &str) -> Result<()> {
    for (criterion, v) in [("type", s.type_), ("location", s.location), ("logic", s.logic)] {
        if !(1..=5).contains(&v) {
            return Err(anyhow::anyhow!(
                "judge `{judge}` returned {criterion} score {v}, outside 1–5 (all: type {}, location {}, logic {})",
                s.type_,
                s.location,
                s.logic
            ));
        }
    }
    Ok(())
}

/// A judge plugin instance and its cache key.
pub struct PluginJudge {
    key: String,
    instance: Instance,
}

impl PluginJudge {
    pub fn new(instance: Instance, key: String) -> PluginJudge {
        PluginJudge { key, instance }
    }

    /// Finds judge plugin `name` and creates it with `config`; its key is
    /// [`judge_key`]`(name, config)`. An unknown judge or a refused config is a user error.
    pub fn open(plugin_dirs: &[PathBuf], name: &str, config: &Value) -> Result<PluginJudge> {
        let found = plugin::discover(plugin_dirs);
        let instance = found.get(Kind::Judge, name)?.instantiate(config)?;
        Ok(PluginJudge::new(instance, judge_key(name, config)))
    }
}

impl Judge for PluginJudge {
    fn name(&self) -> String {
        self.key.clone()
    }

    fn score(&mut self, req: &JudgeRequest) -> Result<JudgeScores> {
        let reply = self.instance.judge_score(&serde_json::to_value(req)?)?;
        let s: JudgeScores = serde_json::from_value(reply.clone()).map_err(|e| {
            let mut text = reply.to_string();
            if text.len() > 200 {
                let cut = (0..=200).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                text.truncate(cut);
                text.push('…');
            }
            anyhow::anyhow!(
                "judge `{}` returned something that is not {{type, location, logic}} scores (integers 1–5): {e}; it returned {text}",
                self.key
            )
        })?;
        validate_scores(&s, &self.key)?;
        Ok(s)
    }
}

/// The judge request for answer `answer` (rank index) of question `question` of `sample`. The
/// truth is the question's answer, else the best answer's leading Yes/No, with the sample's
/// defect type and category; the reference answer is the best-ranked one.
///
/// Panics when either index is out of range.
pub fn request_for(sample: &Sample, question: usize, answer: usize) -> JudgeRequest {
    let q = &sample.questions[question];
    let best = q.ranked_answers.first();
    let truth_conclusion = q.answer.clone().or_else(|| best.and_then(|b| conclusion(b)).map(|c| yes_no(c).to_string()));
    JudgeRequest {
        question: q.text.clone(),
        answer: q.ranked_answers[answer].clone(),
        reference_answer: best.cloned(),
        truth: Truth {
            conclusion: truth_conclusion,
            defect_type: sample.defect_type.clone(),
            category: sample.category.clone(),
            location: None,
        },
    }
}

/// `H(a_i)`: the entropy (natural log) of the softmax over an answer's three scores (type,
/// location, logic). ln 3 ≈ 1.0986 when they are equal; lower the more one score stands out.
pub fn answer_entropy(s: &JudgeScores) -> f32 {
    let x = [s.type_ as f32, s.location as f32, s.logic as f32];
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e = x.map(|v| (v - max).exp());
    let z: f32 = e.iter().sum();
    -e.iter().map(|&v| v / z).filter(|&p| p > 0.0).map(|p| p * p.ln()).sum::<f32>()
}

/// Mean scores of the answers at one rank position.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RankMeans {
    /// 1 = best-ranked.
    pub rank: usize,
    pub answers: usize,
    #[serde(rename = "type")]
    pub type_: f32,
    pub location: f32,
    pub logic: f32,
    /// Mean of the per-answer MLE score (mean of the three).
    pub mle: f32,
    /// Mean `H(a_i)` ([`answer_entropy`]).
    pub entropy: f32,
}

/// What a scoring run did.
#[derive(Clone, Debug, Serialize)]
pub struct ScoreSummary {
    /// The judge key the scores are cached under.
    pub judge: String,
    /// Samples (AD-PL items) looked at.
    pub items: usize,
    /// Questions with ranked answers (instances).
    pub instances: usize,
    /// Ranked answers: every one now has a score.
    pub answers: usize,
    /// Answers the judge scored in this run.
    pub scored: usize,
    /// Answers whose score came from the cache.
    pub reused: usize,
    /// Means per rank position, best first: a sanity check that better answers score higher.
    pub by_rank: Vec<RankMeans>,
    pub cache: PathBuf,
    /// What opening the cache found.
    pub cache_loaded: LoadReport,
    pub seconds: f64,
}

/// Checks that sample ids are unique (they key the cache) and that there is something to score;
/// returns the number of ranked answers.
fn plan(samples: &[Sample]) -> Result<usize> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, s) in samples.iter().enumerate() {
        if let Some(first) = seen.insert(s.id.as_str(), i) {
            return Err(user_err!(
                "items {first} and {i} share the id `{}`; scores are cached by item id, so give every item a unique `id` (or none: the item's index is used)",
                s.id
            ));
        }
    }
    let answers: usize = samples.iter().flat_map(|s| &s.questions).map(|q| q.ranked_answers.len()).sum();
    if answers == 0 {
        return Err(user_err!(
            "no ranked answers to score: judge scoring needs an AD-PL file whose questions have `answer_options` (`sage data build` writes one)"
        ));
    }
    Ok(answers)
}

/// Scores every ranked answer of every question of `samples` that `cache` lacks for this judge,
/// appending each score as soon as it arrives. `progress` gets its length set and one tick per
/// answer (cached ones included).
pub fn score_dataset(
    samples: &[Sample],
    judge: &mut dyn Judge,
    cache: &mut ScoreCache,
    progress: &ProgressBar,
) -> Result<ScoreSummary> {
    let t0 = std::time::Instant::now();
    let total = plan(samples)?;
    let key = judge.name();
    progress.set_length(total as u64);
    let (mut scored, mut reused, mut instances) = (0usize, 0usize, 0usize);
    let mut per_rank: Vec<Vec<JudgeScores>> = Vec::new();
    for s in samples {
        for (qi, q) in s.questions.iter().enumerate() {
            if q.ranked_answers.is_empty() {
                continue;
            }
            instances += 1;
            let instance = instance_id(&s.id, qi);
            for (ai, text) in q.ranked_answers.iter().enumerate() {
                let sha = answer_sha256(text);
                let scores = match cache.get(&instance, ai, &sha, &key) {
                    Some(cached) => {
                        reused += 1;
                        cached.clone()
                    }
                    None => {
                        let fresh =
                            judge.score(&request_for(s, qi, ai)).and_then(|r| validate_scores(&r, &key).map(|_| r));
                        let fresh = fresh.with_context(|| {
                            format!(
                                "judge `{key}` failed on item `{}` question {qi} answer {ai}; {} of this data's {total} answers are scored and saved in {} ({scored} by this run): rerun the same command to resume, saved scores are not asked again",
                                s.id,
                                scored + reused,
                                cache.path().display()
                            )
                        })?;
                        cache.append(ScoreRecord {
                            instance: instance.clone(),
                            answer: ai,
                            answer_sha256: sha,
                            judge: key.clone(),
                            scores: fresh.clone(),
                        })?;
                        scored += 1;
                        fresh
                    }
                };
                if per_rank.len() <= ai {
                    per_rank.resize_with(ai + 1, Vec::new);
                }
                per_rank[ai].push(scores);
                progress.inc(1);
            }
        }
    }
    progress.finish_and_clear();
    Ok(ScoreSummary {
        judge: key,
        items: samples.len(),
        instances,
        answers: total,
        scored,
        reused,
        by_rank: per_rank.iter().enumerate().map(|(i, v)| rank_means(i + 1, v)).collect(),
        cache: cache.path().to_path_buf(),
        cache_loaded: cache.loaded(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

fn rank_means(rank: usize, v: &[JudgeScores]) -> RankMeans {
    let n = v.len().max(1) as f32;
    let mean = |f: &dyn Fn(&JudgeScores) -> f32| v.iter().map(f).sum::<f32>() / n;
    RankMeans {
        rank,
        answers: v.len(),
        type_: mean(&|s| s.type_ as f32),
        location: mean(&|s| s.location as f32),
        logic: mean(&|s| s.logic as f32),
        mle: mean(&|s| s.mean()),
        entropy: mean(&answer_entropy),
    }
}

/// The scores of every ranked answer of a dataset from one judge, for training (E-DPO).
#[derive(Clone, Debug)]
pub struct ScoreTable {
    judge: String,
    by_instance: HashMap<String, Vec<JudgeScores>>,
}

impl ScoreTable {
    /// The judge key the scores came from.
    pub fn judge(&self) -> &str {
        &self.judge
    }

    /// The scores of question `question` of sample `sample_id`, one per ranked answer, best
    /// first; `None` for a question without ranked answers or one not in the loaded samples.
    pub fn get(&self, sample_id: &str, question: usize) -> Option<&[JudgeScores]> {
        self.by_instance.get(&instance_id(sample_id, question)).map(Vec::as_slice)
    }

    /// Questions with scores.
    pub fn len(&self) -> usize {
        self.by_instance.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_instance.is_empty()
    }
}

/// Looks up, in `cache`, judge `judge_key`'s score for every ranked answer of `samples`. Any
/// missing score is a user error that counts them, names the first, and gives the
/// `sage score` command that fills them in.
pub fn load_scores(cache: &ScoreCache, samples: &[Sample], judge_key: &str) -> Result<ScoreTable> {
    let mut by_instance = HashMap::new();
    let mut missing: Vec<(String, usize, bool)> = Vec::new();
    let mut total = 0;
    // (instance, answer) pairs this judge scored, whatever the text was then.
    let scored_any_text: HashSet<(&str, usize)> =
        cache.records().iter().filter(|r| r.judge == judge_key).map(|r| (r.instance.as_str(), r.answer)).collect();
    for s in samples {
        for (qi, q) in s.questions.iter().enumerate() {
            if q.ranked_answers.is_empty() {
                continue;
            }
            let instance = instance_id(&s.id, qi);
            let mut scores = Vec::with_capacity(q.ranked_answers.len());
            for (ai, text) in q.ranked_answers.iter().enumerate() {
                total += 1;
                match cache.get(&instance, ai, &answer_sha256(text), judge_key) {
                    Some(sc) => scores.push(sc.clone()),
                    None => {
                        let edited = scored_any_text.contains(&(instance.as_str(), ai));
                        missing.push((instance.clone(), ai, edited));
                    }
                }
            }
            by_instance.insert(instance, scores);
        }
    }
    if let Some((instance, ai, edited)) = missing.first() {
        let name = judge_name(judge_key);
        let config_hint = if judge_key == self::judge_key(name, &serde_json::json!({})) {
            String::new()
        } else {
            " --judge-config <the same config>".to_string()
        };
        let others: Vec<&str> = cache.judges().into_iter().filter(|j| *j != judge_key).collect();
        return Err(user_err!(
            "{} of {total} answers have no score from judge `{judge_key}` in {} (first: {instance} answer {ai}{}){}; run `sage score --data <this AD-PL file> --judge {name}{config_hint} --out {}` first (it asks only for the missing ones)",
            missing.len(),
            cache.path().display(),
            if *edited { ", whose text changed since it was scored" } else { "" },
            if others.is_empty() {
                String::new()
            } else {
                format!("; the file holds scores from {}", others.iter().map(|j| format!("`{j}`")).collect::<Vec<_>>().join(", "))
            },
            cache.path().display()
        ));
    }
    Ok(ScoreTable { judge: judge_key.to_string(), by_instance })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::sample::{Level, Question};

    fn sc(t: u8, l: u8, g: u8) -> JudgeScores {
        JudgeScores { type_: t, location: l, logic: g, rationale: String::new() }
    }

    #[test]
    fn entropy_of_the_softmax_over_the_three_scores() {
        // Equal scores: a uniform softmax, H = ln 3.
        assert!((answer_entropy(&sc(3, 3, 3)) - 3f32.ln()).abs() < 1e-6);
        assert!((answer_entropy(&sc(5, 5, 5)) - 1.098_612_3).abs() < 1e-6);
        // (5, 1, 1): p = (e⁴, 1, 1) / (e⁴ + 2) = (0.964663, 0.017668, 0.017668); H = 0.177324.
        let e4 = 4f64.exp();
        let p = [e4 / (e4 + 2.0), 1.0 / (e4 + 2.0), 1.0 / (e4 + 2.0)];
        let h: f64 = -p.iter().map(|p| p * p.ln()).sum::<f64>();
        assert!((h - 0.177_324).abs() < 1e-6, "{h}");
        assert!((answer_entropy(&sc(5, 1, 1)) - 0.177_324).abs() < 1e-5);
        // Order does not matter.
        assert!((answer_entropy(&sc(1, 5, 1)) - 0.177_324).abs() < 1e-5);
        // (5, 4, 3): softmax of (2, 1, 0) = (0.665241, 0.244728, 0.090031); H = 0.832396.
        assert!((answer_entropy(&sc(5, 4, 3)) - 0.832_396).abs() < 1e-5);
        // (5, 5, 1): H = 0.738562.
        assert!((answer_entropy(&sc(5, 5, 1)) - 0.738_562).abs() < 1e-5);
    }

    #[test]
    fn judge_keys_hash_the_config_not_its_key_order() {
        let a = judge_key("openai", &serde_json::json!({"model": "m", "x": {"b": 1, "a": [2, {"d": 0, "c": 1}]}}));
        let b = judge_key("openai", &serde_json::json!({"x": {"a": [2, {"c": 1, "d": 0}], "b": 1}, "model": "m"}));
        assert_eq!(a, b);
        assert!(a.starts_with("openai@") && a.len() == "openai@".len() + 12, "{a}");
        assert_ne!(a, judge_key("openai", &serde_json::json!({"model": "n"})));
        assert_ne!(judge_key("rubric", &serde_json::json!({})), judge_key("openai", &serde_json::json!({})));
        assert_eq!(judge_name(&a), "openai");
        assert_eq!(default_cache_path(Path::new("/d/test.json")), Path::new("/d/test.scores.jsonl"));
        assert_eq!(default_cache_path(Path::new("x")), Path::new("x.scores.jsonl"));
    }

    #[test]
    fn scores_outside_one_to_five_are_refused_with_the_judge_named() {
        validate_scores(&sc(1, 5, 3), "j").unwrap();
        let err = validate_scores(&sc(1, 0, 3), "rubric@abc").unwrap_err().to_string();
        assert!(err.contains("`rubric@abc`") && err.contains("location score 0"), "{err}");
        let err = validate_scores(&sc(6, 1, 3), "j").unwrap_err().to_string();
        assert!(err.contains("type score 6"), "{err}");
    }

    fn question(text: &str, answers: &[&str], answer: Option<&str>) -> Question {
        Question {
            text: text.into(),
            level: Some(Level::DefectDiagnosis),
            options: vec![],
            answer: answer.map(Into::into),
            ranked_answers: answers.iter().map(|a| a.to_string()).collect(),
            subtask: None,
        }
    }

    fn sample(id: &str, questions: Vec<Question>) -> Sample {
        Sample {
            id: id.into(),
            test_image: "/t.png".into(),
            reference_image: Some("/r.png".into()),
            category: Some("mono".into()),
            label: None,
            defect_type: Some("crack".into()),
            mask: None,
            boxes: vec![],
            split: None,
            questions,
        }
    }

    const ANSWERS: [&str; 4] = ["Yes, a crack at the left edge.", "Yes, something.", "Yes, maybe.", "No."];

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                sample(
                    &format!("s{i}"),
                    vec![
                        question("Defect?", &ANSWERS, None),
                        question("Normal?", &ANSWERS, Some("No")),
                        question("-", &[], None),
                    ],
                )
            })
            .collect()
    }

    #[test]
    fn requests_carry_the_truth_and_the_best_answer() {
        let s = samples(1).remove(0);
        let r = request_for(&s, 0, 2);
        assert_eq!(r.question, "Defect?");
        assert_eq!(r.answer, "Yes, maybe.");
        assert_eq!(r.reference_answer.as_deref(), Some(ANSWERS[0]));
        assert_eq!(r.truth.conclusion.as_deref(), Some("Yes"), "from the best answer");
        assert_eq!((r.truth.defect_type.as_deref(), r.truth.category.as_deref()), (Some("crack"), Some("mono")));
        assert_eq!(request_for(&s, 1, 0).truth.conclusion.as_deref(), Some("No"), "the question's own answer wins");
    }

    /// Scores by rank (5 − rank on every criterion), records every request, fails on call `fail_at`.
    struct Fake {
        key: String,
        calls: Vec<(String, String)>,
        fail_at: Option<usize>,
        bad: bool,
    }

    impl Fake {
        fn new() -> Fake {
            Fake { key: "fake@000000000000".into(), calls: vec![], fail_at: None, bad: false }
        }
    }

    impl Judge for Fake {
        fn name(&self) -> String {
            self.key.clone()
        }
        fn score(&mut self, req: &JudgeRequest) -> Result<JudgeScores> {
            if self.fail_at == Some(self.calls.len()) {
                return Err(anyhow::anyhow!("the endpoint timed out"));
            }
            self.calls.push((req.question.clone(), req.answer.clone()));
            let rank = ANSWERS.iter().position(|a| *a == req.answer).unwrap_or(3) as u8;
            let v = if self.bad { 0 } else { 5 - rank };
            Ok(JudgeScores { type_: v, location: v, logic: v.max(2) - 1, rationale: "r".into() })
        }
    }

    #[test]
    fn scores_everything_once_then_only_what_is_missing_and_reads_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.scores.jsonl");
        let data = samples(3);
        let pb = ProgressBar::hidden();

        let mut judge = Fake::new();
        let mut cache = ScoreCache::open(&path).unwrap();
        let s = score_dataset(&data, &mut judge, &mut cache, &pb).unwrap();
        assert_eq!((s.items, s.instances, s.answers, s.scored, s.reused), (3, 6, 24, 24, 0));
        assert_eq!(judge.calls.len(), 24);
        let mle: Vec<f32> = s.by_rank.iter().map(|r| r.mle).collect();
        for (got, want) in mle.iter().zip([14.0 / 3.0, 11.0 / 3.0, 8.0 / 3.0, 5.0 / 3.0]) {
            assert!((got - want).abs() < 1e-5, "{mle:?}");
        }
        assert_eq!(s.by_rank.len(), 4);
        assert_eq!(s.by_rank[0].answers, 6);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 24);
        drop(cache);

        // Everything again: nothing asked. One more sample and an edited answer: only those.
        let mut more = samples(4);
        more[1].questions[1].ranked_answers[2] = "Yes, maybe a crack.".into();
        let mut judge = Fake::new();
        let mut cache = ScoreCache::open(&path).unwrap();
        assert_eq!(cache.loaded().records, 24);
        let s = score_dataset(&data, &mut judge, &mut cache, &pb).unwrap();
        assert_eq!((s.scored, s.reused), (0, 24));
        let s = score_dataset(&more, &mut judge, &mut cache, &pb).unwrap();
        assert_eq!((s.scored, s.reused), (9, 23));
        assert!(judge.calls.contains(&("Normal?".into(), "Yes, maybe a crack.".into())));

        // Another judge (another config) is asked everything.
        let mut other = Fake::new();
        other.key = "fake@111111111111".into();
        let s = score_dataset(&data, &mut other, &mut cache, &pb).unwrap();
        assert_eq!((s.scored, s.reused), (24, 0));

        let table = load_scores(&cache, &more, "fake@000000000000").unwrap();
        assert_eq!(table.len(), 8);
        let types = |sample: &str, q: usize| table.get(sample, q).unwrap().iter().map(|s| s.type_).collect::<Vec<_>>();
        assert_eq!(types("s0", 1), vec![5, 4, 3, 2]);
        assert_eq!(types("s1", 1), vec![5, 4, 2, 2], "the edited answer's new score (the fake gives unknown text 2)");
        assert!(table.get("s1", 2).is_none(), "no ranked answers");
        assert!(table.get("s9", 0).is_none());
    }

    #[test]
    fn a_judge_error_stops_with_what_is_saved_and_the_rerun_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.scores.jsonl");
        let data = samples(2);
        let pb = ProgressBar::hidden();
        let mut judge = Fake::new();
        judge.fail_at = Some(5);
        let mut cache = ScoreCache::open(&path).unwrap();
        let err = format!("{:#}", score_dataset(&data, &mut judge, &mut cache, &pb).unwrap_err());
        assert!(
            err.contains("judge `fake@000000000000` failed on item `s0` question 1 answer 1")
                && err.contains("5 of this data's 16 answers are scored and saved")
                && err.contains("rerun the same command to resume")
                && err.ends_with("the endpoint timed out"),
            "{err}"
        );
        drop(cache);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 5);

        // A missing score is an error that says what to run.
        let cache = ScoreCache::open(&path).unwrap();
        let err = load_scores(&cache, &data, "fake@000000000000").unwrap_err();
        assert!(crate::error::is_user_error(&err));
        let err = err.to_string();
        assert!(
            err.contains("11 of 16 answers have no score from judge `fake@000000000000`")
                && err.contains("(first: s0#q1 answer 1)")
                && err.contains(
                    "run `sage score --data <this AD-PL file> --judge fake --judge-config <the same config> --out"
                ),
            "{err}"
        );
        let err = load_scores(&cache, &data, &judge_key("rubric", &serde_json::json!({}))).unwrap_err().to_string();
        assert!(
            err.contains("--judge rubric --out") && err.contains("the file holds scores from `fake@000000000000`"),
            "{err}"
        );

        // The open cache holds the file's writer lock (per open file, so also against this
        // process): close it before opening it again.
        drop(cache);
        let mut cache = ScoreCache::open(&path).unwrap();
        let mut judge = Fake::new();
        let s = score_dataset(&data, &mut judge, &mut cache, &pb).unwrap();
        assert_eq!((s.scored, s.reused), (11, 5));
        load_scores(&cache, &data, "fake@000000000000").unwrap();

        // Scores outside 1–5 are never saved.
        let mut bad = Fake::new();
        bad.key = "bad@0".into();
        bad.bad = true;
        let err = format!("{:#}", score_dataset(&data, &mut bad, &mut cache, &pb).unwrap_err());
        assert!(err.contains("judge `bad@0` returned type score 0, outside 1–5"), "{err}");
        assert!(cache.judges().iter().all(|j| *j != "bad@0"));
    }

    #[test]
    fn duplicate_ids_and_data_without_ranked_answers_are_user_errors() {
        let dir = tempfile::tempdir().unwrap();
        let mut cache = ScoreCache::open(&dir.path().join("s.jsonl")).unwrap();
        let pb = ProgressBar::hidden();
        let mut data = samples(3);
        data[2].id = "s0".into();
        let err = score_dataset(&data, &mut Fake::new(), &mut cache, &pb).unwrap_err();
        assert!(crate::error::is_user_error(&err));
        assert!(err.to_string().contains("items 0 and 2 share the id `s0`"), "{err}");
        let none = vec![sample("a", vec![question("q", &[], Some("Yes"))])];
        let err = score_dataset(&none, &mut Fake::new(), &mut cache, &pb).unwrap_err();
        assert!(crate::error::is_user_error(&err) && err.to_string().contains("no ranked answers"), "{err}");
    }
}
