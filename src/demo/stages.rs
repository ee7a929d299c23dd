//! Runs one demo stage: a `sage` subcommand as a child process, echoed first so a user can rerun
//! it by hand, its stdout kept in `logs/<name>.txt`.

use crate::user_err;
use anyhow::{Context, Result};
use std::path::PathBuf;
use std::process::Command;

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
        let status = cmd.stdout(out).status().with_context(|| format!("starting {}", self.env.exe.display()))?;
        if !status.success() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(user_err!(
                "stage `{name}` failed ({status}); its output is in {}{}\nrerun `sage demo` with the same --out to resume",
                log.display(),
                if tail.trim().is_empty() { String::new() } else { format!(":\n{}", tail.trim_end()) }
            ));
        }
        Ok(())
    }

    /// Where stage `name`'s stdout goes.
    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.txt"))
    }
}

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn echoed_arguments_are_quoted_for_the_shell() {
        assert_eq!(shell_quote("runs/demo-quick/data/train.json"), "runs/demo-quick/data/train.json");
        assert_eq!(shell_quote(r#"{"graded":true}"#), r#"'{"graded":true}'"#);
        assert_eq!(shell_quote("it's"), r#"'it'\''s'"#);
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
    }
}
