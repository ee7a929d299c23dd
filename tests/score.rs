//! `sage score` through the binary on small real ELPV AD-PL sets: the rubric judge (MiniLM) scores
//! every ranked answer once and a second run reuses them all; a SIGKILLed run is resumed without
//! asking again for any score it saved; a judge that times out (the OpenAI-compatible judge
//! against a scripted local server) stops the run with what is saved, and the same command
//! resumes; and the user errors.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A small real ELPV AD-PL set (3 images per cell type and label): (test.json, train.json) with
/// 4 and 8 items.
fn elpv_set(dir: &Path) -> (PathBuf, PathBuf) {
    let _ = minilm_dir(); // the rubric judge needs it
    let out = dir.join("elpv");
    let o = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "3", "--json", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (out.join("test.json"), out.join("train.json"))
}

fn items(data: &Path) -> usize {
    serde_json::from_slice::<Vec<Value>>(&std::fs::read(data).unwrap()).unwrap().len()
}

fn score_args(data: &Path, extra: &[&str]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["score".into(), "--data".into(), data.into()];
    a.extend(extra.iter().map(OsString::from));
    a
}

/// Runs `sage score --json` to completion; returns the summary.
fn score(data: &Path, extra: &[&str]) -> Value {
    let mut args = score_args(data, extra);
    args.push("--json".into());
    let o = sage().args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout_json(&o)
}

fn n(v: &Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}")) as usize
}

fn records(cache: &Path) -> Vec<Value> {
    std::fs::read_to_string(cache).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every (instance, answer) of a record list, checking there is exactly one record for each.
fn one_record_per_answer(recs: &[Value]) -> BTreeSet<(String, u64)> {
    let mut keys = BTreeSet::new();
    for r in recs {
        let k = (r["instance"].as_str().unwrap().to_string(), r["answer"].as_u64().unwrap());
        assert!(keys.insert(k.clone()), "two records for {k:?}");
    }
    keys
}

#[test]
fn rubric_scores_every_ranked_answer_once_and_better_ranks_score_higher() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = elpv_set(dir.path());
    let items = items(&data);
    let cache = dir.path().join("elpv/test.scores.jsonl");

    let t0 = Instant::now();
    let s = score(&data, &[]);
    eprintln!("first run: {:.1} s, {s}", t0.elapsed().as_secs_f64());
    assert_eq!(n(&s, "items"), items);
    assert_eq!(n(&s, "instances"), items * 5);
    assert_eq!(n(&s, "answers"), items * 20);
    assert_eq!((n(&s, "scored"), n(&s, "reused")), (items * 20, 0));
    assert_eq!(s["cache"], cache.to_str().unwrap(), "the default cache is beside the data");
    let judge = s["judge"].as_str().unwrap().to_string();
    assert!(judge.starts_with("rubric@"), "{judge}");

    let ranks = s["by_rank"].as_array().unwrap();
    assert_eq!(ranks.len(), 4);
    let mle: Vec<f64> = ranks.iter().map(|r| r["mle"].as_f64().unwrap()).collect();
    for r in ranks {
        assert_eq!(n(r, "answers"), items * 5);
        for k in ["type", "location", "logic", "mle"] {
            let v = r[k].as_f64().unwrap();
            assert!((1.0..=5.0).contains(&v), "{k} {v}");
        }
        let h = r["entropy"].as_f64().unwrap();
        assert!((0.0..=3f64.ln() + 1e-6).contains(&h), "{h}");
    }
    // The best answer is its own reference: perfect scores, equal, so H = ln 3.
    assert!((mle[0] - 5.0).abs() < 1e-6 && (ranks[0]["entropy"].as_f64().unwrap() - 3f64.ln()).abs() < 1e-5);
    // The wrong answer (rank 4) scores lowest; the two right-but-weaker ones in between.
    assert!(mle[3] < mle[1] && mle[3] < mle[2] && mle[1] < mle[0] && mle[2] < mle[0], "{mle:?}");

    let recs = records(&cache);
    assert_eq!(recs.len(), items * 20);
    assert_eq!(one_record_per_answer(&recs).len(), items * 20);
    for r in &recs {
        assert_eq!(r["judge"], judge.as_str());
        assert_eq!(r["answer_sha256"].as_str().unwrap().len(), 64);
        for k in ["type", "location", "logic"] {
            assert!((1..=5).contains(&r["scores"][k].as_u64().unwrap()), "{r}");
        }
    }

    // Again: nothing is asked, the same numbers come out.
    let again = score(&data, &[]);
    assert_eq!((n(&again, "scored"), n(&again, "reused")), (0, items * 20));
    assert_eq!(again["by_rank"], s["by_rank"]);
    assert_eq!(records(&cache).len(), items * 20);

    // The first item only, in text: the table and the cache path.
    let o = sage().args(score_args(&data, &["--max-items", "1"])).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains(&format!("judge {judge}: 1 items, 5 instances, 20 answers: 0 scored now, 20 reused")),
        "{text}"
    );
    assert!(text.contains("rank answers  type location logic   MLE     H"), "{text}");
    assert!(text.lines().any(|l| l.split_whitespace().take(3).collect::<Vec<_>>() == ["1", "5", "5.00"]), "{text}");
    assert!(text.contains(&format!("cache: {}", cache.display())), "{text}");

    // Another judge config is another judge: scored afresh, in the same file (the same model
    // named explicitly, so the same scores).
    let first = score(&data, &["--max-items", "1"]);
    let cfg = serde_json::json!({"minilm_dir": minilm_dir()}).to_string();
    let other = score(&data, &["--max-items", "1", "--judge-config", &cfg]);
    assert_ne!(other["judge"], judge.as_str());
    assert_eq!((n(&other, "scored"), n(&other, "reused")), (20, 0));
    assert_eq!(other["by_rank"], first["by_rank"]);
    assert_eq!(records(&cache).len(), items * 20 + 20);

    // --out puts the cache elsewhere (folders created).
    let elsewhere = dir.path().join("a/b/scores.jsonl");
    let s = score(&data, &["--max-items", "1", "--out", elsewhere.to_str().unwrap()]);
    assert_eq!((n(&s, "scored"), s["cache"].as_str()), (20, elsewhere.to_str()));
}

#[test]
fn a_killed_score_run_resumes_without_asking_again_for_what_it_saved() {
    let dir = tempfile::tempdir().unwrap();
    let (_, data) = elpv_set(dir.path());
    let total = items(&data) * 20;
    let cache = dir.path().join("scores.jsonl");
    let args = score_args(&data, &["--json", "--out", cache.to_str().unwrap()]);
    // Kill once this many scores are saved: well before the end (the rubric judge scores
    // tens per second, and the file is polled every 5 ms).
    let kill_at = total / 4;

    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("sage"))
        .env_remove("SAGE_THREADS")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let lines = |p: &Path| std::fs::read(p).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0);
    while lines(&cache) < kill_at {
        assert!(child.try_wait().unwrap().is_none(), "sage score ended before saving {kill_at} scores");
        assert!(t0.elapsed() < Duration::from_secs(180), "fewer than {kill_at} scores after 180 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    // The scores the killed run saved: its complete lines (a torn last one does not count).
    let text = std::fs::read_to_string(&cache).unwrap();
    let complete: Vec<&str> = text.split_inclusive('\n').filter(|l| l.ends_with('\n')).collect();
    let torn = text.len() - complete.iter().map(|l| l.len()).sum::<usize>();
    let saved = complete.len();
    eprintln!("killed after {saved} saved scores of {total}{}", if torn > 0 { " and a torn line" } else { "" });
    assert!(saved >= kill_at && saved < total, "the run finished before it was killed: the test proves nothing");
    let before: Vec<Value> = complete.iter().map(|l| serde_json::from_str(l).unwrap()).collect();

    let s = score(&data, &["--out", cache.to_str().unwrap()]);
    assert_eq!(n(&s, "answers"), total);
    assert_eq!(n(&s, "reused"), saved, "{s}");
    assert_eq!(n(&s, "scored"), total - saved, "{s}");
    assert_eq!(s["cache_loaded"]["records"], saved);
    assert_eq!(s["cache_loaded"]["torn_tail"], torn > 0);
    assert_eq!(s["cache_loaded"]["bad_lines"], 0);

    let after = records(&cache);
    assert_eq!(after.len(), total);
    assert_eq!(one_record_per_answer(&after).len(), total);
    assert_eq!(&after[..saved], &before[..], "saved scores are kept as they were");

    // The resumed result is what an uninterrupted run gives.
    let whole = score(&data, &["--out", dir.path().join("whole.jsonl").to_str().unwrap()]);
    assert_eq!(whole["by_rank"], s["by_rank"]);
}

#[test]
fn a_second_score_run_on_the_same_cache_refuses_at_once_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let (_, data) = elpv_set(dir.path());
    let total = items(&data) * 20;
    let cache = dir.path().join("scores.jsonl");
    let args = score_args(&data, &["--json", "--out", cache.to_str().unwrap()]);
    let mut first = std::process::Command::new(assert_cmd::cargo::cargo_bin("sage"))
        .env_remove("SAGE_THREADS")
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the first run is scoring (its first score is saved).
    let t0 = Instant::now();
    let lines = |p: &Path| std::fs::read(p).map(|b| b.iter().filter(|&&c| c == b'\n').count()).unwrap_or(0);
    while lines(&cache) < 1 {
        assert!(first.try_wait().unwrap().is_none(), "sage score ended before saving a score");
        assert!(t0.elapsed() < Duration::from_secs(180), "no score after 180 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t1 = Instant::now();
    let (code, err) = fails(args.clone());
    let refused_in = t1.elapsed();
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first run ended before the second tried: the test proves nothing"
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("PID {}", first.id())) && err.contains("scores.jsonl.lock"), "{err}");
    assert!(refused_in < Duration::from_secs(5), "refused after {refused_in:?}, not at once");
    assert!(first.wait().unwrap().success());
    // Every answer scored once: the second run wrote nothing.
    let recs = records(&cache);
    assert_eq!(one_record_per_answer(&recs).len(), total);
    assert_eq!(recs.len(), total);
}

/// Serves the OpenAI chat API on 127.0.0.1: a good reply for each request except request
/// `stall` (0-based), which gets no answer for longer than the client waits. Stops after
/// `requests` requests.
fn judge_server(requests: usize, stall: usize) -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let h = std::thread::spawn(move || {
        for i in 0..requests {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            if i == stall {
                // Hold the connection unanswered past the client's timeout, without blocking
                // the next requests (the rerun's).
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(1500));
                    drop(stream);
                });
                continue;
            }
            let content = "type: 4\nlocation: 3\nlogic: 5\nrationale: fine";
            let payload =
                serde_json::json!({"choices": [{"message": {"role": "assistant", "content": content}}]}).to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{payload}",
                payload.len()
            );
        }
    });
    (url, h)
}

#[test]
fn a_judge_timeout_stops_with_what_is_saved_and_the_same_command_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = elpv_set(dir.path());
    let cache = dir.path().join("openai.scores.jsonl");
    // One item: 20 answers. The 4th request stalls; the rerun asks the 17 left.
    let (url, server) = judge_server(21, 3);
    let cfg = serde_json::json!({"base_url": url, "model": "judge", "timeout_secs": 0.5, "max_retries": 0}).to_string();
    let args = score_args(
        &data,
        &["--judge", "openai", "--judge-config", &cfg, "--max-items", "1", "--out", cache.to_str().unwrap()],
    );

    let o = sage().args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("failed on item") && err.contains("question 0 answer 3"), "{err}");
    assert!(
        err.contains("3 of this data's 20 answers are scored and saved in") && err.contains("openai.scores.jsonl"),
        "{err}"
    );
    assert!(err.contains("rerun the same command to resume"), "{err}");
    assert!(err.contains("timed out") || err.contains("timeout"), "{err}");
    assert_eq!(records(&cache).len(), 3);

    let mut json_args = args.clone();
    json_args.push("--json".into());
    let o = sage().args(&json_args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = stdout_json(&o);
    assert_eq!((n(&s, "scored"), n(&s, "reused")), (17, 3), "{s}");
    assert!((s["by_rank"][0]["mle"].as_f64().unwrap() - 4.0).abs() < 1e-6, "{s}");
    server.join().unwrap();
    let recs = records(&cache);
    assert_eq!(one_record_per_answer(&recs).len(), 20);
    assert!(recs.iter().all(|r| r["judge"].as_str().unwrap().starts_with("openai@")));
}

/// Runs sage and returns (exit code, stderr).
fn fails(args: Vec<OsString>) -> (Option<i32>, String) {
    let o = sage().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (o.status.code(), stderr)
}

#[test]
fn unknown_judges_bad_configs_and_bad_data_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = elpv_set(dir.path());
    let out = dir.path().join("s.jsonl");
    let o = out.to_str().unwrap();

    let (code, err) = fails(score_args(&data, &["--judge", "gpt5", "--out", o]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no judge plugin named `gpt5`") && err.contains("rubric"), "{err}");

    let (code, err) = fails(score_args(&data, &["--judge-config", "{model:", "--out", o]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--judge-config is not valid JSON"), "{err}");
    let (code, err) = fails(score_args(&data, &["--judge-config", "[1]", "--out", o]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--judge-config must be a JSON object"), "{err}");
    let (code, err) = fails(score_args(&data, &["--judge-config", "{\"minilm_dirr\": 1}", "--out", o]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("judge plugin `rubric`") && err.contains("refused its configuration"), "{err}");

    let (code, err) = fails(score_args(&dir.path().join("missing.json"), &["--out", o]));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("missing.json"), "{err}");

    let mut items: Vec<Value> = serde_json::from_slice(&std::fs::read(&data).unwrap()).unwrap();
    items[1]["id"] = items[0]["id"].clone();
    let dup = dir.path().join("dup.json");
    std::fs::write(&dup, serde_json::to_vec(&items).unwrap()).unwrap();
    let (code, err) = fails(score_args(&dup, &["--out", o]));
    assert_eq!(code, Some(2), "{err}");
    // Refused by the dataset validation every stage shares, as `sage data check` refuses it.
    assert!(
        err.contains("dup.json")
            && err.contains("item 1, field `id`: duplicate id")
            && err.contains("item 0 has it too"),
        "{err}"
    );
    assert!(!out.exists() || records(&out).is_empty());

    let (code, err) = fails(score_args(&data, &["--max-items", "0"]));
    assert_eq!(code, Some(2), "{err}");

    let o = sage().args(["score", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && help.contains("Usage: sage score") && help.contains("resume"), "{help}");
}
