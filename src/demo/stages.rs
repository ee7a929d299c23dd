//! Runs one demo stage: a `sage` subcommand as a child process, echoed first so a user can rerun
//! it by hand, its stdout kept in `logs/<name>.txt` and its wall time in `logs/stage-times.jsonl`
//! (a resumed demo's table adds up the times of the invocations before it from there).

use crate::user_err;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The file, in a demo's `logs/`, that keeps each stage's wall time: one JSON line per child
/// that exited, `{"stage", "seconds", "ok"}`. A child killed with the demo writes no line.
pub const STAGE_TIMES: &str = "stage-times.jsonl";

/// What the children inherit from the `sage demo` process.
#[derive(Clone, Debug)]
pub struct StageEnv {
    /// The `sage` binary.
    pub exe: PathBuf,
    pub threads: usize,
    pub plugin_dirs: Vec<PathBuf>,
    /// `--json`: the children print JSON too, and the demo echoes nothing.
    pub json: bool,
    /// `--device cuda`: the model stages (sfe, edpo, eval) run on the GPU.
    pub gpu: bool,
}

/// `arg` as a POSIX shell reads it back: unchanged when it holds only safe characters, else in
/// single quotes (a `'` inside written `'\''`).
pub fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,@%+".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        return arg.to_string();
    }
    format!("'{}'", arg.replace('\'', "'\\''"))
}

pub struct Runner {
    pub env: StageEnv,
    pub logs: PathBuf,
}

impl Runner {
    /// Runs `sage <args>`: progress on the terminal, stdout into `logs/<name>.txt`.
    pub fn sage(&self, name: &str, args: &[String]) -> Result<()> {
        // The model stages follow --device cuda; the others (fetch, data, facts, score, map) run
        // on the CPU. The echoed line carries the flag too, so it reruns the stage as it ran.
        let on_gpu = self.env.gpu && matches!(args.first().map(String::as_str), Some("sfe" | "edpo" | "eval"));
        let mut shown = vec!["sage".to_string()];
        if on_gpu {
            shown.extend(["--device".to_string(), "cuda".to_string()]);
        }
        shown.extend(args.iter().cloned());
        if !self.env.json {
            eprintln!("▶ {}", shown.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" "));
        }
        let mut cmd = Command::new(&self.env.exe);
        cmd.args(["--threads", &self.env.threads.to_string()]);
        for d in &self.env.plugin_dirs {
            cmd.arg("--plugin-dir").arg(d);
        }
        if self.env.json {
            cmd.arg("--json");
        }
        cmd.args(&shown[1..]);
        let log = self.log(name);
        let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let started = Instant::now();
        let status = cmd.stdout(out).status().with_context(|| format!("starting {}", self.env.exe.display()))?;
        // The stage's own failure is the error to report; a failure to record its time only when
        // the stage succeeded.
        let recorded = self.record_time(name, started.elapsed().as_secs_f64(), status.success());
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(user_err!(
                "stage `{name}` failed ({status}); its output is in {}{}\nrerun `sage demo` with the same --out to resume",
                log.display(),
                if tail.trim().is_empty() { String::new() } else { format!(":\n{}", tail.trim_end()) }
            ));
        }
        recorded
    }

    /// Where stage `name`'s stdout goes.
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.txt"))
    }

    /// Appends stage `name`'s wall time to [`STAGE_TIMES`] (the demo's writer lock makes this
    /// process the folder's only writer).
    fn record_time(&self, name: &str, seconds: f64, ok: bool) -> Result<()> {
        let path = self.logs.join(STAGE_TIMES);
        let line = serde_json::json!({"stage": name, "seconds": seconds, "ok": ok}).to_string() + "\n";
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .with_context(|| format!("recording the stage's time in {}", path.display()))
    }
}

/// The stage times [`STAGE_TIMES`] in `logs` holds, summed (0 when there is none yet). A line
/// that does not parse — the tail of a write cut off by a crash — counts nothing.
pub fn recorded_seconds(logs: &Path) -> f64 {
    std::fs::read_to_string(logs.join(STAGE_TIMES))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["seconds"].as_f64())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_times_are_appended_and_summed() {
        let dir = tempfile::tempdir().unwrap();
        let env = StageEnv { exe: "sage".into(), threads: 1, plugin_dirs: vec![], json: true, gpu: false };
        let r = Runner { env, logs: dir.path().to_path_buf() };
        assert_eq!(recorded_seconds(dir.path()), 0.0);
        r.record_time("sfe-none", 1.5, true).unwrap();
        r.record_time("sfe-hard", 2.25, false).unwrap();
        assert_eq!(recorded_seconds(dir.path()), 3.75);
        // A line cut off by a crash counts nothing; the lines before it still count.
        let path = dir.path().join(STAGE_TIMES);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"stage\":\"eval\",\"seco");
        std::fs::write(&path, text).unwrap();
        assert_eq!(recorded_seconds(dir.path()), 3.75);
    }

    #[test]
    fn echoed_arguments_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("runs/demo-quick/data/train.json"), "runs/demo-quick/data/train.json");
        assert_eq!(shell_quote(r#"{"graded":true}"#), r#"'{"graded":true}'"#);
        assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
