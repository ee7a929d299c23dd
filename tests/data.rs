//! `sage data build | check | stats` through the binary: real ELPV, the MVTec and MMAD fixtures,
//! determinism under the seed, and every malformed-field case `check` must name.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Runs sage and returns (exit code, stdout, stderr).
fn run(cmd: &mut assert_cmd::Command) -> (Option<i32>, String, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string(), stderr)
}

fn build(args: &[&str], out: &Path) -> Value {
    let o = sage().args(["data", "build", "--json"]).args(args).arg("--out").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    stdout_json(&o)
}

fn check(format: &str, path: &Path) -> (Option<i32>, String, String) {
    run(sage().args(["data", "check", "--format", format]).arg(path))
}

/// `check` with `--image-root`: a file built from a source folder holds absolute paths into it,
/// and its images must lie inside the image root.
fn check_in(format: &str, path: &Path, root: &Path) -> (Option<i32>, String, String) {
    run(sage().args(["data", "check", "--format", format, "--image-root"]).arg(root).arg(path))
}

/// Every file under `dir`, relative path → bytes.
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                v.push((p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()));
            }
        }
    }
    v.sort();
    v
}

#[test]
fn elpv_build_then_check_then_stats() {
    let _ = elpv_image("cell0001.png"); // fails with "run sage fetch" when ELPV is missing
    let dir = tempfile::tempdir().unwrap();
    let s = build(&["--source", "elpv", "--limit", "3", "--export-trl"], dir.path());
    // 3 of each (type, label): mono/poly × normal/anomalous.
    assert_eq!(s["samples"], 12);
    assert_eq!(s["normal"], 6);
    assert_eq!(s["questions"], 60);
    assert_eq!(s["skipped_ambiguous"], 295);
    let names: Vec<&str> = s["files"].as_array().unwrap().iter().map(|f| f["path"].as_str().unwrap()).collect();
    for want in ["train.json", "test.json", "unseen-poly/train.json", "unseen-poly/test.json", "unseen-mono/test.json"]
    {
        assert!(names.iter().any(|n| n.ends_with(want)), "{want} not in {names:?}");
    }
    for f in s["files"].as_array().unwrap() {
        let path = PathBuf::from(f["path"].as_str().unwrap());
        let (code, stdout, stderr) = check("adpl", &path);
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout.trim(), format!("ok: {} items", f["items"]));
        let trl = std::fs::read_to_string(path.with_extension("trl.jsonl")).unwrap();
        assert_eq!(trl.lines().count() as u64, f["items"].as_u64().unwrap() * 5 * 3);
        assert_eq!(f["trl_pairs"].as_u64().unwrap() as usize, trl.lines().count());
        if let Some(line) = trl.lines().next() {
            let row: Value = serde_json::from_str(line).unwrap();
            assert_eq!(row["images"].as_array().unwrap().len(), 2);
            let chosen = row["chosen"][0]["content"][0]["text"].as_str().unwrap();
            let rejected = row["rejected"][0]["content"][0]["text"].as_str().unwrap();
            assert!(chosen.starts_with("Yes, ") || chosen.starts_with("No, "), "{chosen}");
            assert_ne!(chosen, rejected);
        }
    }
    // The unseen-type split really separates the types.
    let train = read_json(&dir.path().join("unseen-poly/train.json"));
    assert!(train.as_array().unwrap().iter().all(|i| i["category"] == "solar cell (mono)"));
    let item = &train[0];
    assert!(Path::new(item["test_image"].as_str().unwrap()).is_absolute());
    assert_ne!(item["test_image"], item["reference_image"]);
    assert_eq!(item["pair_type"], item["question_answer"][0]["level"]);

    let o = sage().args(["data", "stats", "--json"]).arg(dir.path().join("train.json")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = stdout_json(&o);
    let items = st["items"].as_u64().unwrap();
    assert_eq!(st["format"], "adpl");
    assert_eq!(st["levels"]["standard comparison"].as_u64().unwrap(), 2 * items);
    assert_eq!(st["levels"]["defect identification"].as_u64().unwrap(), 2 * items);
    assert_eq!(st["levels"]["defect diagnosis"].as_u64().unwrap(), items);
    assert_eq!(st["splits"]["train"].as_u64().unwrap(), items);
    assert_eq!(st["labels"]["normal"].as_u64().unwrap() + st["labels"]["anomalous"].as_u64().unwrap(), items);
    let o = sage().args(["data", "stats"]).arg(dir.path().join("train.json")).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("solar cell (poly)") && text.contains("defect diagnosis"), "{text}");
}

#[test]
fn same_seed_same_files_other_seed_other_files() {
    let _ = elpv_image("cell0001.png");
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    for (d, seed) in dirs.iter().zip(["7", "7", "8"]) {
        build(&["--source", "elpv", "--limit", "4", "--export-trl", "--seed", seed], d.path());
    }
    let (a, b, c) = (tree(dirs[0].path()), tree(dirs[1].path()), tree(dirs[2].path()));
    assert_eq!(a.len(), 12, "6 AD-PL files and 6 TRL files");
    assert!(a == b, "the same seed must give byte-identical files");
    let differ = |name: &str| {
        let get = |t: &[(PathBuf, Vec<u8>)]| t.iter().find(|(p, _)| p == Path::new(name)).unwrap().1.clone();
        get(&a) != get(&c)
    };
    assert!(differ("train.json") && differ("unseen-poly/test.json"), "another seed must change the data");
}

#[test]
fn mvtec_fixture_builds_with_masks_boxes_and_held_out_categories() {
    let dir = tempfile::tempdir().unwrap();
    let s = build(&["--source", "mvtec", "--root", fixture("mvtec").to_str().unwrap()], dir.path());
    assert_eq!((s["samples"].as_u64(), s["anomalous"].as_u64()), (Some(5), Some(3)));
    assert!(s["skipped_ambiguous"].is_null());
    for held in ["bottle", "cable"] {
        let test = read_json(&dir.path().join(format!("unseen-{held}/test.json")));
        let train = read_json(&dir.path().join(format!("unseen-{held}/train.json")));
        assert!(test.as_array().unwrap().iter().all(|i| i["category"] == held));
        assert!(train.as_array().unwrap().iter().all(|i| i["category"] != held));
        let (code, _, stderr) =
            check_in("adpl", &dir.path().join(format!("unseen-{held}/test.json")), &fixture("mvtec"));
        assert_eq!(code, Some(0), "{stderr}");
    }
    let all: Vec<Value> = ["train.json", "test.json"]
        .iter()
        .flat_map(|f| read_json(&dir.path().join(f)).as_array().unwrap().clone())
        .collect();
    assert_eq!(all.len(), 5);
    let broken = all.iter().find(|i| i["id"] == "bottle/broken_large/000").expect("bottle/broken_large/000");
    assert_eq!(broken["label"], "anomalous");
    assert_eq!(broken["defect_type"], "broken_large");
    assert_eq!(broken["boxes"], json!([[0.0, 0.0, 3.0, 2.0]]));
    assert!(Path::new(broken["mask"].as_str().unwrap()).is_file());
    assert!(broken["reference_image"].as_str().unwrap().contains("bottle/train/good/"));
    let best: String = broken["question_answer"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["answer_options"][0]["answer_en"].as_str().unwrap().to_string())
        .collect();
    assert!(best.contains("broken large") && best.contains("upper-left part"), "{best}");
    let good = all.iter().find(|i| i["id"] == "cable/good/000").unwrap();
    assert_eq!(good["label"], "normal");
    assert!(good.get("mask").is_none() && good.get("boxes").is_none());

    // One named hold-out; an unknown one and a missing root are the user's to fix.
    let one = tempfile::tempdir().unwrap();
    build(&["--source", "mvtec", "--holdout", "cable", "--root", fixture("mvtec").to_str().unwrap()], one.path());
    assert!(one.path().join("unseen-cable/test.json").is_file() && !one.path().join("unseen-bottle").exists());
    let (code, _, err) = run(sage()
        .args(["data", "build", "--source", "mvtec", "--holdout", "screw", "--root"])
        .arg(fixture("mvtec"))
        .arg("--out")
        .arg(one.path()));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("\"screw\"") && err.contains("bottle, cable"), "{err}");
    let (code, _, err) = run(sage().args(["data", "build", "--source", "mvtec", "--out"]).arg(one.path()));
    assert_eq!(code, Some(2));
    assert!(err.contains("--root"), "{err}");
    let (code, _, err) =
        run(sage().args(["data", "build", "--source", "mvtec", "--root", "/no/such/dir", "--out"]).arg(one.path()));
    assert_eq!(code, Some(2));
    assert!(err.contains("/no/such/dir"), "{err}");
}

#[test]
fn mmad_fixture_checks_and_counts() {
    let json_path = fixture("mmad/mmad.json");
    let (code, stdout, stderr) = check("mmad", &json_path);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout.trim(), "ok: 6 items");
    let o = sage().args(["data", "stats", "--json"]).arg(&json_path).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let st = stdout_json(&o);
    assert_eq!(st["format"], "mmad", "guessed from the content");
    assert_eq!((st["labels"]["normal"].as_u64(), st["labels"]["anomalous"].as_u64()), (Some(3), Some(3)));
    assert_eq!((st["splits"]["MVTec-AD"].as_u64(), st["splits"]["VisA"].as_u64()), (Some(4), Some(2)));
    assert_eq!(st["categories"]["bottle"], 4);
    let subtasks = st["subtasks"].as_object().unwrap();
    for t in ["Anomaly Detection", "Defect Classification", "Defect Localization", "Object Structure"] {
        assert!(subtasks.contains_key(t), "{t} missing from {subtasks:?}");
    }
    assert_eq!(st["subtasks"]["Anomaly Detection"], 6);
}

/// A valid 4-item AD-PL file (copies of one built item) in `dir`.
fn adpl_items(dir: &Path) -> Vec<Value> {
    build(&["--source", "mvtec", "--root", fixture("mvtec").to_str().unwrap()], &dir.join("built"));
    let item = read_json(&dir.join("built/train.json"))[0].clone();
    vec![item; 4]
}

#[test]
fn adpl_check_names_every_malformed_item_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut items = adpl_items(dir.path());
    let missing = fixture("mvtec/no/such/test.png");
    items[0]["test_image"] = json!(missing);
    items[1]["question_answer"].as_array_mut().unwrap().pop();
    items[2]["question_answer"][3]["answer_options"].as_array_mut().unwrap().pop();
    items[3]["pair_type"] = json!("defect comparison");
    items[3]["question_answer"][1]["answer_options"][0]["answer_en"] = json!("Perhaps, hard to say.");
    let p = dir.path().join("bad.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&items).unwrap()).unwrap();

    let (code, _, err) = check_in("adpl", &p, &fixture("mvtec"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("bad.json: 5 problems in 4 items"), "{err}");
    let missing = format!("item 0, field `test_image`: file {} does not exist", missing.display());
    for want in [
        missing.as_str(),
        "item 1, field `question_answer`: expected 5 questions, found 4",
        "item 2, field `question_answer[3].answer_options`: expected 4 answer options, found 3",
        "item 3, field `pair_type`: unknown pair_type \"defect comparison\"",
        "item 3, field `question_answer[1].answer_options[0].answer_en`: the best answer must start with Yes or No",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }

    let o = sage()
        .args(["data", "check", "--json", "--format", "adpl", "--image-root"])
        .arg(fixture("mvtec"))
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let r = stdout_json(&o);
    assert_eq!((r["ok"].as_bool(), r["items"].as_u64()), (Some(false), Some(4)));
    let problems = r["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 5);
    assert!(problems.iter().any(|q| q["index"] == 2 && q["field"] == "question_answer[3].answer_options"));

    // Loading (stats) refuses the same file, naming it, an item and a field.
    let (code, _, err) = run(sage().args(["data", "stats", "--image-root"]).arg(fixture("mvtec")).arg(&p));
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.json") && err.contains("item 1, field `question_answer`"), "{err}");

    // Not JSON, and not the right shape.
    std::fs::write(&p, "[{\"test_image\": ").unwrap();
    let (code, _, err) = check("adpl", &p);
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.json") && err.contains("not valid JSON"), "{err}");
    std::fs::write(&p, "{}").unwrap();
    let (code, _, err) = check("adpl", &p);
    assert_eq!(code, Some(2));
    assert!(err.contains("bad.json") && err.contains("expected a sequence"), "{err}");
}

#[test]
fn mmad_check_names_bad_answer_letters_and_missing_templates() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("mmad/mmad.json")).unwrap();
    let mut v: Value = serde_json::from_str(&text).unwrap();
    let key1 = "MVTec-AD/bottle/test/broken_large/000.png";
    v[key1]["conversation"][1]["Answer"] = json!("F");
    v["VisA/candle/test/bad/000.png"]["random_templates"] = json!(["VisA/candle/train/good/999.png"]);
    v["VisA/candle/test/good/000.png"]["conversation"][0].as_object_mut().unwrap().remove("Options");
    v["VisA/candle/test/good/000.png"]["conversation"][1].as_object_mut().unwrap().remove("type");
    let p = dir.path().join("mmad.json");
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();

    let (code, _, err) =
        run(sage().args(["data", "check", "--format", "mmad", "--image-root"]).arg(fixture("mmad")).arg(&p));
    assert_eq!(code, Some(2), "{err}");
    // serde_json without preserve_order writes keys sorted, so the items are in key order here.
    let index = |k: &str| {
        let mut keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        keys.sort();
        keys.iter().position(|x| *x == k).unwrap()
    };
    for want in [
        format!(
            "item {}, field `conversation[1].Answer`: \"F\" is not one of the option letters A, B, C, D [entry \"{key1}\"]",
            index(key1)
        ),
        format!("item {}, field `random_templates[0]`: file ", index("VisA/candle/test/bad/000.png")),
        format!("item {}, field `conversation[0].Options`: missing", index("VisA/candle/test/good/000.png")),
        format!("item {}, field `conversation[1].type`: missing", index("VisA/candle/test/good/000.png")),
    ] {
        assert!(err.contains(&want), "missing {want:?} in:\n{err}");
    }
    // Without --image-root the images are looked for beside the file, and are missing.
    let (code, _, err) = check("mmad", &p);
    assert_eq!(code, Some(2));
    assert!(err.contains("item 0, field `key`: file "), "{err}");
}

#[test]
fn manta_check_wants_bool_answers_and_existing_images() {
    let dir = tempfile::tempdir().unwrap();
    let img = fixture("mvtec/bottle/test/good/000.png");
    let items = json!([
        {"domain": "bottle", "test_image": img, "pair_type": "defect identification", "conclusion_en": "Fine.",
         "question_answer": [{"question_en": "Is there a crack?", "answer": false, "conclusion_en": "No crack."}]},
        {"domain": "bottle", "test_image": "missing.png", "pair_type": "defect identification",
         "question_answer": [{"question_en": "Is there a crack?", "answer": "no", "conclusion_en": "No crack."},
                             {"answer": true, "conclusion_en": "c"}]}
    ]);
    let p = dir.path().join("manta.json");
    std::fs::write(&p, serde_json::to_vec(&items).unwrap()).unwrap();
    let (code, _, err) = check_in("manta", &p, &fixture("mvtec"));
    assert_eq!(code, Some(2), "{err}");
    for want in [
        "item 1, field `test_image`: file ",
        "item 1, field `question_answer[0].answer`: expected true or false, found a string",
        "item 1, field `question_answer[1].question_en`: missing",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }
    assert!(!err.contains("item 0"), "item 0 is valid: {err}");
    std::fs::write(&p, serde_json::to_vec(&json!([items[0]])).unwrap()).unwrap();
    let (code, stdout, err) = check_in("manta", &p, &fixture("mvtec"));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(stdout.trim(), "ok: 1 items");
    let o = sage().args(["data", "stats", "--json", "--image-root"]).arg(fixture("mvtec")).arg(&p).output().unwrap();
    let st = stdout_json(&o);
    assert_eq!((st["format"].as_str(), st["answers"]["No"].as_u64()), (Some("manta"), Some(1)));
}

#[test]
fn data_subcommands_have_help() {
    for sub in ["build", "check", "stats"] {
        let o = sage().args(["data", sub, "--help"]).output().unwrap();
        assert!(o.status.success(), "{sub} --help failed");
        assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: sage data"), "{sub}");
    }
}

/// A valid AD-PL item whose images are `img/a.png` beside the file.
fn local_item(dir: &Path) -> Value {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    std::fs::copy(fixture("mvtec/bottle/test/good/000.png"), dir.join("img/a.png")).unwrap();
    let mut item = adpl_items(dir).remove(0);
    let o = item.as_object_mut().unwrap();
    o.remove("mask");
    o.remove("id");
    o.insert("test_image".into(), json!("img/a.png"));
    o.insert("reference_image".into(), json!("img/a.png"));
    item
}

#[test]
fn check_and_the_stages_refuse_outside_paths_duplicate_keys_and_ids_and_empty_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let item = local_item(d);
    let write = |name: &str, text: String| -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let items = |v: Vec<Value>| serde_json::to_string_pretty(&v).unwrap();
    let ok = write("ok.json", items(vec![item.clone()]));
    let (code, stdout, err) = check("adpl", &ok);
    assert_eq!((code, stdout.trim()), (Some(0), "ok: 1 items"), "{err}");

    // Image paths outside the root: absolute, climbing out with `..`, through a symlink.
    std::os::unix::fs::symlink("/etc", d.join("img/etc")).unwrap();
    for (path, extra) in [
        ("/etc/passwd", ""),
        ("../../../../../../../etc/passwd", "resolves to /etc/passwd"),
        ("img/etc/passwd", "resolves to /etc/passwd"),
    ] {
        let mut bad = item.clone();
        bad["test_image"] = json!(path);
        let p = write("outside.json", items(vec![item.clone(), bad]));
        let (code, _, err) = check("adpl", &p);
        assert_eq!(code, Some(2), "{path}: {err}");
        assert!(err.contains("item 1, field `test_image`: ") && err.contains("lies outside the image root"), "{err}");
        assert!(err.contains(extra) && err.contains("--allow-outside-root"), "{err}");
        // A stage reading the file refuses it the same way (here `data stats`, and `score`).
        let (code, _, err) = run(sage().args(["data", "stats"]).arg(&p));
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains("item 1, field `test_image`") && err.contains("outside the image root"), "{err}");
        // The flag lets a trusted file through.
        let (code, _, err) = run(sage().args(["--allow-outside-root", "data", "stats"]).arg(&p));
        assert_eq!(code, Some(0), "{err}");
    }
    let (code, _, err) =
        run(sage().args(["data", "check", "--allow-outside-root", "--format", "adpl"]).arg(d.join("outside.json")));
    assert_eq!(code, Some(0), "{err}");

    // A key given twice in an item: reported, not silently the last.
    let text = serde_json::to_string(&item).unwrap().replacen('{', r#"{"test_image": "img/other.png", "#, 1);
    let p = write("dup_key.json", format!("[{text}]"));
    let (code, _, err) = check("adpl", &p);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("item 0, field `test_image`: the key \"test_image\" appears twice"), "{err}");
    let nested =
        serde_json::to_string(&item).unwrap().replacen(r#""answer_en":"#, r#""answer_en": "Yes.", "answer_en":"#, 1);
    let p = write("dup_nested.json", format!("[{nested}]"));
    let (_, _, err) = check("adpl", &p);
    assert!(err.contains("item 0, field `question_answer[0].answer_options[0].answer_en`: the key"), "{err}");

    // Two items with one id, and a file with no item: errors in check and in the stages.
    let mut a = item.clone();
    a["id"] = json!("same");
    let p = write("dup_id.json", items(vec![a.clone(), item.clone(), a]));
    let (code, _, err) = check("adpl", &p);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("item 2, field `id`: duplicate id \"same\": item 0 has it too"), "{err}");
    let cache = d.join("scores.jsonl");
    let (code, _, err) = run(sage().args(["score", "--data"]).arg(&p).arg("--out").arg(&cache));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("item 2, field `id`: duplicate id"), "{err}");
    let p = write("empty.json", "[]".into());
    let (code, _, err) = check("adpl", &p);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("empty.json: 1 problem in 0 items") && err.contains("the dataset has no items"), "{err}");
    let (code, _, err) = run(sage().args(["score", "--data"]).arg(&p).arg("--out").arg(&cache));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the dataset has no items"), "{err}");

    // MANTA and MMAD share the checks.
    let manta = json!([{"domain": "bottle", "test_image": "../../../../../../../etc/passwd", "pair_type": "defect identification",
        "question_answer": [{"question_en": "Is there a crack?", "answer": false, "conclusion_en": "No crack."}]}]);
    let p = write("manta.json", manta.to_string());
    let (code, _, err) = check("manta", &p);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("item 0, field `test_image`") && err.contains("outside the image root"), "{err}");
    let entry = json!({"conversation": [{"Question": "Defect?", "Options": {"A": "Yes.", "B": "No."}, "Answer": "B",
        "type": "Anomaly Detection"}], "mask_path": null, "similar_templates": [], "random_templates": ["/etc/passwd"]});
    let entry = entry.to_string().replacen(r#""mask_path""#, r#""mask_path": "m.png", "mask_path""#, 1);
    let p = write("mmad.json", format!(r#"{{"img/a.png": {entry}}}"#));
    let (code, _, err) = check("mmad", &p);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("item 0, field `random_templates[0]`") && err.contains("outside the image root"), "{err}");
    assert!(err.contains("item 0, field `mask_path`: the key \"mask_path\" appears twice"), "{err}");
    let p = write("mmad_empty.json", "{}".into());
    let (code, _, err) = check("mmad", &p);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("the dataset has no items"), "{err}");
}
