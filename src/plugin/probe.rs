//! Probing a plugin library in a child process before loading it here. Loading a library runs
//! its constructors and its entry point; one that aborts, jumps into data or calls `exit` would
//! take `sage plugins` (and every stage that only lists plugins) down with it. The child — this
//! same `sage` binary, re-run as `sage __probe-plugin FILE` — loads the file with every check of
//! [`super::loader::load`] and prints the verdict as one JSON line; the parent reads it, or turns
//! the child's death (signal, exit status, silence, time-out) into a refusal naming it. Only a
//! library the child accepted is then loaded in this process.

use super::loader;
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The hidden subcommand the child runs.
pub const PROBE_ARG: &str = "__probe-plugin";

/// A library's constructors and entry get this long before the probe gives up on it.
const PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// What the child prints: the table's description, or why the library was refused.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Verdict {
    Accepted { kind: String, name: String },
    Refused(String),
}

/// `sage __probe-plugin FILE`: loads `FILE`, prints the verdict, returns the exit status. Called
/// by `main` before any other start-up work, so the child does nothing but the probe.
pub fn child_main(file: &Path) -> i32 {
    let verdict = match loader::load(file) {
        Ok(p) => Verdict::Accepted { kind: p.kind.to_string(), name: p.name },
        Err(reason) => Verdict::Refused(reason),
    };
    // A marker line, so text a library's constructor printed cannot pass for the verdict.
    println!("{PROBE_ARG} {}", serde_json::to_string(&verdict).expect("a verdict serialises"));
    0
}

/// The `sage` binary to run the probe with: this process when it is `sage`, else a `sage` beside
/// it or one folder up (a test binary in `target/<profile>/deps/`). `None` for a program that
/// embeds the library without the binary: it loads in process, unprotected, as before probing.
fn probe_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let name = format!("sage{}", std::env::consts::EXE_SUFFIX);
    if exe.file_name().is_some_and(|n| n == name.as_str()) {
        return Some(exe);
    }
    exe.ancestors().skip(1).take(2).map(|d| d.join(&name)).find(|p| p.is_file())
}

/// `Ok` when the library survives being loaded and validated in a child process; otherwise the
/// refusal reason (the child's own, or how it died). `Ok` too when there is no binary to probe
/// with (see [`probe_exe`]).
pub fn probe(file: &Path) -> Result<(), String> {
    let Some(exe) = probe_exe() else { return Ok(()) };
    let mut child = Command::new(&exe)
        .arg(PROBE_ARG)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the plugin probe {}: {e}", exe.display()))?;
    // Read both pipes on threads, so a chatty library cannot block the child on a full pipe.
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out_pipe.read_to_end(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err_pipe.read_to_end(&mut s);
        s
    });
    let t0 = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if t0.elapsed() < PROBE_TIMEOUT => std::thread::sleep(Duration::from_millis(2)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "loading it did not finish within {} s in the probe process (a constructor or \
                     `sage_plugin_entry` that hangs); not loaded",
                    PROBE_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("waiting for the plugin probe: {e}")),
        }
    };
    let stdout = String::from_utf8_lossy(&out_reader.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_reader.join().unwrap_or_default()).into_owned();
    let verdict = stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(PROBE_ARG).and_then(|j| serde_json::from_str::<Verdict>(j.trim()).ok()));
    match (verdict, status.success()) {
        (Some(Verdict::Accepted { .. }), true) => Ok(()),
        (Some(Verdict::Refused(reason)), true) => Err(reason),
        _ => Err(death(status, &stderr)),
    }
}

/// Why the probe gave no verdict: the signal or exit status, and the child's last stderr line.
fn death(status: std::process::ExitStatus, stderr: &str) -> String {
    #[cfg(unix)]
    let how = {
        use std::os::unix::process::ExitStatusExt;
        match (status.signal(), status.code()) {
            (Some(sig), _) => format!("was killed by signal {sig} ({})", signal_name(sig)),
            (None, Some(code)) => format!("ended the process with exit status {code} before reporting"),
            _ => format!("ended with {status}"),
        }
    };
    #[cfg(not(unix))]
    let how = format!("ended the process with {status} before reporting");
    let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).map(|l| format!("; its last words: {:?}", l.trim()));
    format!(
        "loading it in the probe process {how}: its constructor or `sage_plugin_entry` crashed or exited{}; not loaded",
        last.unwrap_or_default()
    )
}

#[cfg(unix)]
fn signal_name(sig: i32) -> &'static str {
    match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        15 => "SIGTERM",
        31 => "SIGSYS",
        _ => "unknown signal",
    }
}
