//! The fuzz driver. The parent (a `#[test]`) never runs a loader itself: it starts the test
//! binary again as a CHILD (`fuzz_child`, an ignored test) under an address-space limit
//! (`ulimit -v`, i.e. setrlimit(RLIMIT_AS)), so a huge allocation fails inside the child instead
//! of taking the machine down. The child generates inputs deterministically from (seed, target,
//! iteration), writes each to its work folder, runs the loader and reports on stdout:
//!
//! ```text
//! @fuzz start <i>
//! @fuzz end <i> ok|err|user|panic [<blame>\t<message>]
//! ```
//!
//! A panic is caught in the child (its input is kept as `panic-<i>`). A child that dies with an
//! input in flight crashed (abort, signal or allocation failure): the parent re-runs that input
//! alone to attribute it. A child silent on one input for longer than the hang limit is killed.
//! Every panic, crash, hang and memory blow-up keeps its input under
//! `tests/fixtures/fuzz/<target>/crash-<hash>.<ext>` (first input per distinct cause).

use super::mutate::{self, FuzzRng};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One loader under test.
pub struct Target {
    pub name: &'static str,
    /// The name the input is written under (some loaders read siblings or key on the extension).
    pub file_name: &'static str,
    /// Real (or real-structured) valid inputs; each must load Ok unmutated.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Structure-aware mutation of one seed.
    pub mutate: fn(&[u8], &mut FuzzRng) -> Vec<u8>,
    /// Writes what the loader needs beside the input (once per work folder).
    pub setup: fn(&Path),
    /// The library's real loading + validation path for the input at this path.
    pub run: fn(&Path) -> anyhow::Result<()>,
}

impl Target {
    pub fn ext(&self) -> &'static str {
        self.file_name.rsplit_once('.').map_or("bin", |(_, e)| e)
    }
}

pub fn no_setup(_: &Path) {}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Ok,
    /// A clean error that is the user's to fix (exit status 2 in the CLI).
    UserErr,
    /// A clean error of another kind.
    Err,
    Panic,
    Abort,
    Hang,
    Memory,
}

impl Outcome {
    pub fn is_failure(self) -> bool {
        matches!(self, Outcome::Panic | Outcome::Abort | Outcome::Hang | Outcome::Memory)
    }
    fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "ok" => Outcome::Ok,
            "user" => Outcome::UserErr,
            "err" => Outcome::Err,
            "panic" => Outcome::Panic,
            _ => return None,
        })
    }
}

/// Run limits, from the environment (documented in tests/fuzz.rs).
#[derive(Clone, Debug)]
pub struct Budget {
    pub iterations: u64,
    pub secs: f64,
    pub hang_secs: f64,
    pub mem_mb: u64,
    pub seed: u64,
}

fn env_num<T: std::str::FromStr>(key: &str) -> Option<T> {
    std::env::var(key).ok().and_then(|v| v.parse().ok())
}

impl Budget {
    /// CI: a few seconds per target; `SAGE_FUZZ_SECS` (per target) lifts the iteration cap.
    pub fn from_env() -> Budget {
        let secs: Option<f64> = env_num("SAGE_FUZZ_SECS");
        Budget {
            iterations: env_num("SAGE_FUZZ_ITERS").unwrap_or(if secs.is_some() { u64::MAX } else { 400 }),
            secs: secs.unwrap_or(6.0),
            hang_secs: env_num("SAGE_FUZZ_HANG_SECS").unwrap_or(20.0),
            mem_mb: env_num("SAGE_FUZZ_MEM_MB").unwrap_or(3072),
            seed: env_num("SAGE_FUZZ_SEED").unwrap_or(16),
        }
    }
}

/// A failure found, attributed to the first frame of sage's own code (file:line).
#[derive(Clone, Debug)]
pub struct Finding {
    pub outcome: Outcome,
    pub blame: String,
    pub message: String,
    pub saved: PathBuf,
}

#[derive(Debug, Default)]
pub struct Report {
    pub iterations: u64,
    pub secs: f64,
    pub counts: BTreeMap<Outcome, u64>,
    pub findings: Vec<Finding>,
    /// Seeds that did not load Ok unmutated (the seed corpus itself is wrong).
    pub bad_seeds: Vec<String>,
    /// The slowest input that finished: (seconds, iteration).
    pub slowest: (f64, u64),
}

impl Report {
    pub fn failures(&self) -> u64 {
        self.counts.iter().filter(|(o, _)| o.is_failure()).map(|(_, n)| n).sum()
    }
    pub fn summary(&self, name: &str, b: &Budget) -> String {
        let c = |o| self.counts.get(&o).copied().unwrap_or(0);
        let mut s = format!(
            "fuzz {name}: {} iterations in {:.1} s (seed {}): ok {}, err {} (user {}), PANIC {}, ABORT {}, HANG {}, MEMORY {}",
            self.iterations,
            self.secs,
            b.seed,
            c(Outcome::Ok),
            c(Outcome::UserErr) + c(Outcome::Err),
            c(Outcome::UserErr),
            c(Outcome::Panic),
            c(Outcome::Abort),
            c(Outcome::Hang),
            c(Outcome::Memory),
        );
        s += &format!("; slowest input {:.2} s (iteration {})", self.slowest.0, self.slowest.1);
        for f in &self.findings {
            s += &format!("\n  {:?} at {}: {} -> {}", f.outcome, f.blame, f.message, f.saved.display());
        }
        for b in &self.bad_seeds {
            s += &format!("\n  bad seed: {b}");
        }
        s
    }
}

pub fn fixtures_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz").join(target)
}

fn short_hash(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Keeps `input` as a crash fixture, with a note of what it did beside it.
fn save_crash(t: &Target, input: &[u8], outcome: Outcome, blame: &str, message: &str) -> PathBuf {
    let dir = fixtures_dir(t.name);
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("crash-{}.{}", short_hash(input), t.ext()));
    std::fs::write(&p, input).unwrap();
    let note = format!("{outcome:?} at {blame}\n{message}\n");
    std::fs::write(p.with_extension(format!("{}.txt", t.ext())), note).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// Child side.

pub const CHILD_TEST: &str = "fuzz_child";

/// The input of iteration `i`: the unmutated seeds first (they must load Ok), then 1–3 stacked
/// structure-aware mutations of a random seed, followed one time in three by a byte-level one.
/// Byte-level damage comes last so the structure-aware mutators (and the strict test-side
/// parsers some use) only ever see their own output, never a header a bit flip made huge.
pub fn generate(t: &Target, seeds: &[Vec<u8>], seed: u64, i: u64) -> Vec<u8> {
    if (i as usize) < seeds.len() {
        return seeds[i as usize].clone();
    }
    let name_hash = t.name.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let mut rng = FuzzRng::seed_from_u64(seed ^ name_hash ^ i.wrapping_mul(0x9E3779B97F4A7C15));
    let base = &seeds[rng.random_range(0..seeds.len())];
    let other = &seeds[rng.random_range(0..seeds.len())];
    let mut data = base.clone();
    let structured = if rng.random_bool(0.2) { 0 } else { rng.random_range(1..=3) };
    for _ in 0..structured {
        data = (t.mutate)(&data, &mut rng);
    }
    if structured == 0 || rng.random_bool(0.33) {
        data = mutate::bytes(&mut rng, &data, other);
    }
    data
}

thread_local! {
    /// Set while a mutator probes an input with a strict test-side parser: its panics are
    /// expected and not worth a backtrace.
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs a test-side parser that panics on malformed input; `None` if it panicked.
pub fn quietly<T>(f: impl FnOnce() -> T) -> Option<T> {
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).ok();
    QUIET.with(|q| q.set(false));
    r
}

/// What the panic hook saw last: (blame, message).
static LAST_PANIC: std::sync::Mutex<Option<(String, String)>> = std::sync::Mutex::new(None);

/// The first frame of sage's own code (`src/...:line`) in a Rust or gdb backtrace, else
/// `fallback`.
pub fn blame(bt: &str, fallback: &str) -> String {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/");
    for line in bt.lines() {
        // Rust: "      at ./src/ops/rope.rs:66:13"; gdb: "#3  sage::... () at src/ops/rope.rs:24"
        let line = line.trim();
        // gdb prints dependencies' paths relative too: its frames must be sage's own functions.
        let gdb_frame = || line.contains("sage::").then(|| line.rsplit_once(" at ").map(|(_, a)| a)).flatten();
        let Some(at) = line.strip_prefix("at ").or_else(gdb_frame) else {
            continue;
        };
        let rel = at.strip_prefix(root).unwrap_or(at).trim_start_matches("./");
        if rel.starts_with("src/") {
            let mut parts = rel.split(':');
            let (file, line_no) = (parts.next().unwrap_or(rel), parts.next().unwrap_or("?"));
            return format!("{file}:{line_no}");
        }
    }
    fallback.to_string()
}

/// Where a hung child is: its threads' stacks through gdb, when gdb is installed.
fn stacks_of(pid: u32) -> String {
    let out = Command::new("timeout")
        .args(["20", "gdb", "-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt 80"])
        .stdin(Stdio::null())
        .output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        // Expected panics of a test-side parser, and every panic after an input's first (a
        // parallel loop can panic once per chunk): no backtrace, they would cost seconds.
        if QUIET.with(|q| q.get()) || LAST_PANIC.lock().map_or(true, |p| p.is_some()) {
            return;
        }
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            s.to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "(non-string panic)".into()
        };
        let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let bt = std::backtrace::Backtrace::force_capture().to_string();
        let who = blame(&bt, &loc);
        eprintln!("@fuzz panic at {who} (panic at {loc}): {msg}");
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some((format!("{who} (panic at {loc})"), msg));
    }));
}

/// Runs one input; a panic is caught and returned with its blame.
fn run_one(t: &Target, path: &Path) -> (Outcome, String) {
    *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = None;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (t.run)(path))) {
        Ok(Ok(())) => (Outcome::Ok, String::new()),
        Ok(Err(e)) if sage::error::is_user_error(&e) => (Outcome::UserErr, String::new()),
        Ok(Err(_)) => (Outcome::Err, String::new()),
        Err(_) => {
            let (who, msg) = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
            (Outcome::Panic, format!("{who}\t{}", msg.replace(['\n', '\t'], " ")))
        }
    }
}

/// The child's main loop (`SAGE_FUZZ_CHILD_*` from the parent).
pub fn child_main(targets: &[Target]) {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} is set by the fuzz parent"));
    let name = var("SAGE_FUZZ_CHILD_TARGET");
    let t = targets.iter().find(|t| t.name == name).expect("known target");
    let work = PathBuf::from(var("SAGE_FUZZ_CHILD_WORK"));
    install_panic_hook();
    (t.setup)(&work);
    let input_path = work.join(t.file_name);
    let out = std::io::stdout();
    if let Ok(replay) = std::env::var("SAGE_FUZZ_CHILD_REPLAY") {
        std::fs::copy(&replay, &input_path).unwrap();
        println!("@fuzz start 0");
        let (o, info) = run_one(t, &input_path);
        println!("@fuzz end 0 {} {info}", outcome_word(o));
        return;
    }
    let num = |k: &str| var(k).parse::<u64>().unwrap();
    let (from, to, seed, deadline_ms) = (
        num("SAGE_FUZZ_CHILD_FROM"),
        num("SAGE_FUZZ_CHILD_TO"),
        num("SAGE_FUZZ_CHILD_SEED"),
        num("SAGE_FUZZ_CHILD_DEADLINE_MS"),
    );
    let seeds = (t.seeds)();
    assert!(!seeds.is_empty(), "target {name} has no seeds");
    for i in from..to {
        if now_ms() >= deadline_ms {
            break;
        }
        let input = generate(t, &seeds, seed, i);
        std::fs::write(&input_path, &input).unwrap();
        writeln!(out.lock(), "@fuzz start {i}").unwrap();
        let (o, info) = run_one(t, &input_path);
        if o == Outcome::Panic {
            std::fs::write(work.join(format!("panic-{i}")), &input).unwrap();
        }
        let tag = if i < seeds.len() as u64 { " seed" } else { "" };
        writeln!(out.lock(), "@fuzz end {i} {}{tag} {info}", outcome_word(o)).unwrap();
    }
}

fn outcome_word(o: Outcome) -> &'static str {
    match o {
        Outcome::Ok => "ok",
        Outcome::UserErr => "user",
        Outcome::Err => "err",
        _ => "panic",
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

// ---------------------------------------------------------------------------------------------
// Parent side.

/// The test binary run as a child under the memory limit, with a clean stack-size setting.
fn child_command(t: &Target, work: &Path, b: &Budget, env: &[(&str, String)]) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -v {} && exec \"$0\" \"$@\"", b.mem_mb * 1024))
        .arg(exe)
        .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1", "-q"])
        .env("SAGE_FUZZ_CHILD_TARGET", t.name)
        .env("SAGE_FUZZ_CHILD_WORK", work)
        // Few malloc arenas: their reservations count against RLIMIT_AS.
        .env("MALLOC_ARENA_MAX", "2")
        .env("RUST_BACKTRACE", "0")
        .env("SAGE_THREADS", "1")
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

enum Event {
    Start(u64),
    End(u64, Outcome, bool, String),
}

fn parse_line(line: &str) -> Option<Event> {
    let rest = line.strip_prefix("@fuzz ")?;
    let mut it = rest.splitn(4, ' ');
    match it.next()? {
        "start" => Some(Event::Start(it.next()?.parse().ok()?)),
        "end" => {
            let i = it.next()?.parse().ok()?;
            let o = Outcome::parse(it.next()?)?;
            let tail = it.next().unwrap_or("");
            let (is_seed, info) = match tail.strip_prefix("seed") {
                Some(r) => (true, r.trim_start()),
                None => (false, tail),
            };
            Some(Event::End(i, o, is_seed, info.to_string()))
        }
        _ => None,
    }
}

/// Re-runs one input alone in a fresh child and says what it did: the outcome, blame, message.
pub fn replay(t: &Target, input: &Path, b: &Budget) -> (Outcome, String, String) {
    let work = tempfile::tempdir().unwrap();
    let mut child =
        child_command(t, work.path(), b, &[("SAGE_FUZZ_CHILD_REPLAY", input.display().to_string())]).spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    let out = match rx.recv_timeout(Duration::from_secs_f64(b.hang_secs)) {
        Ok(s) => s,
        Err(_) => {
            let who = blame(&stacks_of(child.id()), "(hang)");
            let _ = child.kill();
            let _ = child.wait();
            return (Outcome::Hang, who, format!("no answer within {} s", b.hang_secs));
        }
    };
    let status = child.wait().unwrap();
    let err = err_thread.join().unwrap();
    for line in out.lines() {
        if let Some(Event::End(_, o, _, info)) = parse_line(line) {
            let (who, msg) = info.split_once('\t').unwrap_or((&info, ""));
            return (o, who.to_string(), msg.to_string());
        }
    }
    classify_death(&status, &err)
}

/// A child that died mid-input: allocation failure (our allocator's note), stack overflow, or
/// another abort / signal.
fn classify_death(status: &std::process::ExitStatus, stderr: &str) -> (Outcome, String, String) {
    use std::os::unix::process::ExitStatusExt;
    let how = match (status.code(), status.signal()) {
        (_, Some(s)) => format!("signal {s}"),
        (Some(c), None) => format!("exit {c}"),
        _ => "unknown".into(),
    };
    let last = |pat: &str| stderr.lines().find(|l| l.contains(pat)).unwrap_or("").trim().to_string();
    if stderr.contains("@fuzz oom") {
        let who = blame(stderr, "(allocation)");
        return (Outcome::Memory, who, format!("{} ({how})", last("@fuzz oom")));
    }
    if stderr.contains("overflowed its stack") {
        // Rust prints no backtrace here; `gdb -ex run --args <child command>` names the frame.
        let who = "(stack overflow)".to_string();
        return (Outcome::Abort, who, format!("{} ({how})", last("overflowed")));
    }
    let tail: String = stderr.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    (Outcome::Abort, blame(stderr, "(no sage frame)"), format!("{how}: {tail}"))
}

/// Runs `t` under `b`; saves each new failure's input as a crash fixture.
pub fn fuzz(t: &Target, b: &Budget) -> Report {
    let work = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let deadline_ms = now_ms() + (b.secs * 1000.0) as u64;
    let mut r = Report::default();
    let mut seen: BTreeSet<(Outcome, String)> = BTreeSet::new();
    let mut next = 0u64;
    let mut note = |r: &mut Report, o: Outcome, who: String, msg: String, input: &[u8]| {
        *r.counts.entry(o).or_default() += 1;
        if o.is_failure() && seen.insert((o, who.clone())) {
            let saved = save_crash(t, input, o, &who, &msg);
            r.findings.push(Finding { outcome: o, blame: who, message: msg, saved });
        }
    };
    while next < b.iterations && now_ms() < deadline_ms {
        let env = [
            ("SAGE_FUZZ_CHILD_FROM", next.to_string()),
            ("SAGE_FUZZ_CHILD_TO", b.iterations.to_string()),
            ("SAGE_FUZZ_CHILD_SEED", b.seed.to_string()),
            ("SAGE_FUZZ_CHILD_DEADLINE_MS", deadline_ms.to_string()),
        ];
        let mut child = child_command(t, work.path(), b, &env).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        // Drain stderr so a chatty child never blocks; keep its tail for a harness failure (the
        // parent replays crashes for detail).
        let tail = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::<String>::new()));
        let tail_w = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(&mut stderr).lines().map_while(Result::ok) {
                let mut t = tail_w.lock().unwrap();
                t.push_back(line);
                if t.len() > 6 {
                    t.pop_front();
                }
            }
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(e) = parse_line(&line) {
                    if tx.send(e).is_err() {
                        break;
                    }
                }
            }
        });
        let mut in_flight: Option<(u64, Instant)> = None;
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Event::Start(i)) => in_flight = Some((i, Instant::now())),
                Ok(Event::End(i, o, is_seed, info)) => {
                    if let Some((_, since)) = in_flight.take() {
                        let secs = since.elapsed().as_secs_f64();
                        if secs > r.slowest.0 {
                            r.slowest = (secs, i);
                        }
                    }
                    next = i + 1;
                    r.iterations += 1;
                    if is_seed && o != Outcome::Ok {
                        r.bad_seeds.push(format!("seed {i}: {o:?} {info}"));
                    }
                    let (who, msg) = info.split_once('\t').unwrap_or((&info, ""));
                    let panic_file = work.path().join(format!("panic-{i}"));
                    let input =
                        if o == Outcome::Panic { std::fs::read(&panic_file).unwrap_or_default() } else { vec![] };
                    let _ = std::fs::remove_file(&panic_file);
                    note(&mut r, o, who.to_string(), msg.to_string(), &input);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some((i, since)) = in_flight {
                        if since.elapsed().as_secs_f64() > b.hang_secs {
                            let who = blame(&stacks_of(child.id()), "(hang)");
                            let _ = child.kill();
                            let _ = child.wait();
                            let input = std::fs::read(work.path().join(t.file_name)).unwrap_or_default();
                            r.iterations += 1;
                            let msg = format!("iteration {i} ran over {} s", b.hang_secs);
                            note(&mut r, Outcome::Hang, who, msg, &input);
                            next = i + 1;
                            break;
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    if let Some((i, _)) = in_flight {
                        let input = std::fs::read(work.path().join(t.file_name)).unwrap_or_default();
                        let held = work.path().join("crashed-input");
                        std::fs::write(&held, &input).unwrap();
                        let (o, who, msg) = replay(t, &held, b);
                        // Not reproducible alone still counts: the child died on this input.
                        let o = if o.is_failure() { o } else { Outcome::Abort };
                        r.iterations += 1;
                        note(&mut r, o, who, format!("iteration {i}: {msg}"), &input);
                        next = i + 1;
                    } else if !status.success() || (now_ms() < deadline_ms && next < b.iterations) {
                        // Died outside any input (seed building, setup): the harness is wrong.
                        std::thread::sleep(Duration::from_millis(100));
                        let tail: Vec<String> = tail.lock().unwrap().iter().cloned().collect();
                        r.bad_seeds.push(format!(
                            "child ended ({status}) after iteration {next} with no input in flight: {}",
                            tail.join(" | ")
                        ));
                        next = b.iterations;
                    }
                    break;
                }
            }
        }
    }
    r.secs = start.elapsed().as_secs_f64();
    r
}

/// Every saved crash input of `t`, replayed alone: those that still fail, with what they did.
pub fn replay_saved(t: &Target, b: &Budget) -> Vec<String> {
    let dir = fixtures_dir(t.name);
    let Ok(entries) = std::fs::read_dir(&dir) else { return vec![] };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("crash-") && !n.ends_with(".txt"))
        })
        .collect();
    files.sort();
    let mut bad = vec![];
    for f in files {
        let (o, who, msg) = replay(t, &f, b);
        if o.is_failure() {
            bad.push(format!("{}: {o:?} at {who}: {msg}", f.display()));
        }
    }
    bad
}

/// Flushes a line to the real stdout even under the test harness's capture.
pub fn say(s: &str) {
    let _ = writeln!(std::io::stderr(), "{s}");
}
