//! `sage facts` through the binary with the real lite backbone (SmolLM2) on a small real ELPV
//! AD-PL set: one line per distinct test image, prompts free of ground truth, everything cached
//! on a second run, a SIGKILLed run resumed without redoing what it cached, a torn cache line
//! ignored, and the user errors (unknown backbone, a backbone that cannot generate, bad data).

mod common;
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SENTENCES: usize = 2;

/// A small real ELPV AD-PL set (3 images per cell type and label); returns its test.json.
fn elpv_set(dir: &Path) -> PathBuf {
    let out = dir.join("elpv");
    let o = sage()
        .args(["data", "build", "--source", "elpv", "--limit", "3", "--json", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out.join("test.json")
}

/// The distinct test images of an AD-PL file in order, with their category.
fn distinct_images(data: &Path) -> Vec<(String, String)> {
    let items: Vec<Value> = serde_json::from_slice(&std::fs::read(data).unwrap()).unwrap();
    let mut seen = BTreeSet::new();
    items
        .iter()
        .filter(|i| seen.insert(i["test_image"].as_str().unwrap().to_string()))
        .map(|i| (i["test_image"].as_str().unwrap().to_string(), i["category"].as_str().unwrap().to_string()))
        .collect()
}

fn facts_args(data: &Path, out: &Path) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> =
        ["facts", "--json", "--sentences", "2", "--max-tokens", "24", "--data"].iter().map(Into::into).collect();
    a.push(data.into());
    a.push("--out".into());
    a.push(out.into());
    a
}

/// Runs `sage facts --json` to completion; returns the summary.
fn facts(data: &Path, out: &Path) -> Value {
    let o = sage().args(facts_args(data, out)).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout_json(&o)
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn sha256(p: &Path) -> String {
    Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect()
}

fn cache_of(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.cache", out.display()))
}

fn n(v: &Value, k: &str) -> usize {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}")) as usize
}

#[test]
fn one_line_per_test_image_then_everything_cached_and_a_torn_cache_line_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let data = elpv_set(dir.path());
    let images = distinct_images(&data);
    let categories: BTreeSet<&str> = images.iter().map(|(_, c)| c.as_str()).collect();
    assert!(images.len() >= 2 && categories.len() == 2, "{images:?}");
    let out = dir.path().join("facts.jsonl");

    let t0 = Instant::now();
    let s = facts(&data, &out);
    eprintln!("first run: {:.1} s, {s}", t0.elapsed().as_secs_f64());
    assert_eq!(n(&s, "images"), images.len());
    // Images of one category share their prompts, so each prompt is generated once.
    assert_eq!(n(&s, "generated"), categories.len() * SENTENCES);
    assert_eq!(n(&s, "cached"), images.len() * SENTENCES - n(&s, "generated"));
    assert_eq!(s["out"], out.to_str().unwrap());

    let got = lines(&out);
    assert_eq!(got.len(), images.len());
    let mut prompts_of: BTreeMap<String, Value> = BTreeMap::new();
    for (line, (image, category)) in got.iter().zip(&images) {
        assert_eq!(line["image"], image.as_str(), "dataset order");
        assert_eq!(line["image_sha256"], sha256(Path::new(image)));
        assert_eq!(line["category"], category.as_str());
        assert_eq!(line["backbone"], "lite");
        assert_eq!(line["generation"]["max_tokens"], 24);
        let facts = line["facts"].as_array().unwrap();
        assert_eq!(facts.len(), SENTENCES, "{line}");
        for f in facts {
            let f = f.as_str().unwrap();
            assert!(
                f.chars().filter(|c| c.is_alphabetic()).count() >= 2 && f == f.trim() && !f.contains('\n'),
                "{f:?}"
            );
        }
        let prompts = line["prompts"].as_array().unwrap();
        assert_eq!(prompts.len(), SENTENCES);
        for p in prompts {
            let p = p.as_str().unwrap().to_lowercase();
            // Prompts come from the category only: nothing of the label leaks into them.
            assert!(!p.contains("defective") && !p.contains("anomalous"), "{p}");
            let kind = if category.contains("mono") { "monocrystalline" } else { "polycrystalline" };
            assert!(p.contains(kind), "{p}");
        }
        // Every image of a category gets the same prompts (so the label cannot matter).
        let first = prompts_of.entry(category.clone()).or_insert_with(|| line["prompts"].clone());
        assert_eq!(*first, line["prompts"]);
    }
    let reference = std::fs::read(&out).unwrap();

    // A second run generates nothing and rewrites the same file.
    let s = facts(&data, &out);
    assert_eq!((n(&s, "generated"), n(&s, "cached")), (0, images.len() * SENTENCES), "{s}");
    assert_eq!(std::fs::read(&out).unwrap(), reference);

    // A torn last line (a write cut short) is ignored and cut off; the result is the same.
    let cache = cache_of(&out);
    let text = std::fs::read_to_string(&cache).unwrap();
    let complete: Vec<&str> = text.lines().collect();
    assert_eq!(complete.len(), images.len() * SENTENCES);
    let last = complete[complete.len() - 1];
    let torn = format!("{}\n{}", complete[..complete.len() - 1].join("\n"), &last[..last.len() / 2]);
    std::fs::write(&cache, &torn).unwrap();
    std::fs::remove_file(&out).unwrap();
    let s = facts(&data, &out);
    assert_eq!(s["cache_loaded"]["torn_tail"], true, "{s}");
    assert_eq!(n(&s, "generated") + n(&s, "cached"), images.len() * SENTENCES);
    assert_eq!(std::fs::read(&out).unwrap(), reference);
    let text = std::fs::read_to_string(&cache).unwrap();
    assert!(text.ends_with('\n'));
    for l in text.lines() {
        serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("cache line after the torn one: {e}: {l}"));
    }
}

#[test]
fn a_killed_run_resumes_without_redoing_what_it_cached() {
    let dir = tempfile::tempdir().unwrap();
    let data = elpv_set(dir.path());
    let images = distinct_images(&data).len();

    let whole = dir.path().join("whole.jsonl");
    let full = facts(&data, &whole);

    let out = dir.path().join("killed.jsonl");
    let cache = cache_of(&out);
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("sage"))
        .env_remove("SAGE_THREADS")
        .args(facts_args(&data, &out))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !std::fs::read(&cache).map(|b| b.contains(&b'\n')).unwrap_or(false) {
        assert!(child.try_wait().unwrap().is_none(), "sage facts ended before writing a cache line");
        assert!(t0.elapsed() < Duration::from_secs(120), "no cache line after 120 s");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "the run finished before it was killed: the test proves nothing");

    // The generations the killed run finished (complete lines; a torn one does not count).
    let text = std::fs::read_to_string(&cache).unwrap();
    let done: BTreeSet<String> = text
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(|l| {
            let r: Value = serde_json::from_str(l).unwrap();
            format!("{}|{}|{}", r["prompt"], r["backbone"], r["options"])
        })
        .collect();
    assert!(!done.is_empty());
    eprintln!("killed after {} cached generation(s)", done.len());

    let resumed = facts(&data, &out);
    assert_eq!(n(&resumed, "generated"), n(&full, "generated") - done.len(), "{resumed} vs {full}");
    assert_eq!(n(&resumed, "cached"), images * SENTENCES - n(&resumed, "generated"));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&whole).unwrap(), "resumed output differs");
}

/// Runs sage and returns (exit code, stderr).
fn fails(args: &[std::ffi::OsString], plugin_dir: Option<&Path>) -> (Option<i32>, String) {
    let mut c = sage();
    if let Some(d) = plugin_dir {
        c.arg("--plugin-dir").arg(d);
    }
    let o = c.args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (o.status.code(), stderr)
}

#[test]
fn unknown_backbone_and_unreadable_data_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let data = elpv_set(dir.path());
    let out = dir.path().join("f.jsonl");

    let mut a = facts_args(&data, &out);
    a.extend(["--backbone".into(), "gpt5".into()]);
    let (code, err) = fails(&a, None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no backbone plugin named `gpt5`") && err.contains("found: lite"), "{err}");

    let (code, err) = fails(&facts_args(&dir.path().join("missing.json"), &out), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read") && err.contains("missing.json"), "{err}");

    let garbage = dir.path().join("garbage.json");
    std::fs::write(&garbage, "[{\"test_image\": ").unwrap();
    let (code, err) = fails(&facts_args(&garbage, &out), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not valid JSON"), "{err}");

    // A test image that is not there (inside the image root: one outside is refused sooner).
    let mut items: Vec<Value> = serde_json::from_slice(&std::fs::read(&data).unwrap()).unwrap();
    let missing = dir.path().join("nonexistent/cell.png");
    items[0]["test_image"] = missing.to_str().unwrap().into();
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, serde_json::to_vec(&items).unwrap()).unwrap();
    let (code, err) = fails(&facts_args(&broken, &out), None);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&format!("cannot read test image {}", missing.display())), "{err}");
    assert!(!out.exists());
}

#[test]
fn a_backbone_that_cannot_generate_is_a_user_error() {
    let dir = tempfile::tempdir().unwrap();
    let data = elpv_set(dir.path());
    // The C example backbone describes itself with "generates": false.
    let target = env!("SAGE_BUILD_TARGET");
    let compiler =
        cc::Build::new().cargo_metadata(false).opt_level(2).debug(false).target(target).host(target).get_compiler();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = dir.path().join("libsage_plugin_example_c.so");
    let status = compiler
        .to_command()
        .args(["-shared", "-fPIC"])
        .arg("-I")
        .arg(root.join("plugins/include"))
        .arg(root.join("plugins/example-c/example_backbone.c"))
        .arg("-o")
        .arg(&lib)
        .arg("-lm")
        .status()
        .unwrap();
    assert!(status.success());
    let mut a = facts_args(&data, &dir.path().join("f.jsonl"));
    a.extend(["--backbone".into(), "example-c".into()]);
    let (code, err) = fails(&a, Some(dir.path()));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("backbone `example-c`") && err.contains("cannot generate text") && err.contains("lite"),
        "{err}"
    );
}
