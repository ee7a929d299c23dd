//! `sage data synth` through the binary: the MVTec fixture into the MVTec layout, read back by
//! `sage data build`; the contact sheet; bad configs and flags as user errors.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn expect_user_error(cmd: &mut assert_cmd::Command, must_name: &[&str]) -> String {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    for name in must_name {
        assert!(stderr.contains(name), "message does not name {name:?}: {stderr}");
    }
    stderr
}

fn synth(out: &Path, extra: &[&str]) -> assert_cmd::Command {
    let mut c = sage();
    c.args(["data", "synth", "--source", "mvtec", "--root"]).arg(fixture("mvtec")).arg("--out").arg(out).args(extra);
    c
}

#[test]
fn cutpaste_on_the_mvtec_fixture_gives_a_tree_data_build_reads() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("synth");
    let sheet = dir.path().join("sheet.png");
    let o = synth(&out, &["--method", "cutpaste", "--limit", "1", "--json", "--contact-sheet"])
        .arg(&sheet)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s = stdout_json(&o);
    assert_eq!(s["method"], "cutpaste");
    // Each fixture category has 3 normals: 1 reference, 1 held-out normal, 1 source.
    for c in s["categories"].as_array().unwrap() {
        assert_eq!((c["normals"].as_u64(), c["train_good"].as_u64()), (Some(3), Some(1)), "{c}");
        assert_eq!((c["test_good"].as_u64(), c["sources"].as_u64()), (Some(1), Some(1)), "{c}");
    }
    assert_eq!(s["samples"].as_u64().unwrap() + s["skipped"].as_u64().unwrap(), 2);
    assert_eq!(s["samples"], 2, "the fixture's 8 × 8 images take a CutPaste patch");

    for cat in ["bottle", "cable"] {
        let d = out.join(cat);
        for f in
            ["train/good/000.png", "test/good/000.png", "test/cutpaste/000.png", "ground_truth/cutpaste/000_mask.png"]
        {
            assert!(d.join(f).is_file(), "{cat}/{f} missing");
        }
        let m = read_json(&d.join("synth-cutpaste.json"));
        assert_eq!(m["category"], cat);
        let sample = &m["samples"][0];
        assert_eq!(sample["image"], "test/cutpaste/000.png");
        assert!(sample["source"].as_str().unwrap().contains(&format!("{cat}/")));
        assert!(!sample["boxes"].as_array().unwrap().is_empty());
        for key in ["cut", "paste", "rotation", "brightness", "contrast"] {
            assert!(sample["params"].get(key).is_some(), "params.{key} missing: {}", sample["params"]);
        }
        let image = image::open(d.join("test/cutpaste/000.png")).unwrap();
        let mask = image::open(d.join("ground_truth/cutpaste/000_mask.png")).unwrap().to_luma8();
        assert_eq!(mask.dimensions(), (image.width(), image.height()), "the mask has the image's size");
        assert_eq!(mask.dimensions(), (8, 8));
        assert!(mask.pixels().any(|p| p.0[0] == 255) && mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        // Outside the mask the anomaly is its source, pixel for pixel.
        let src = image::open(sample["source"].as_str().unwrap()).unwrap().to_luma8();
        let img = image.to_luma8();
        for (x, y, p) in mask.enumerate_pixels() {
            if p.0[0] == 0 {
                assert_eq!(img.get_pixel(x, y), src.get_pixel(x, y), "{cat}: ({x}, {y}) outside the mask changed");
            }
        }
    }
    let sheet = image::open(&sheet).unwrap();
    assert_eq!((sheet.width(), sheet.height()), (2 * (2 * 160 + 4) + 3 * 8, 160 + 2 * 8), "two tiles in a row");

    // `sage data build` reads the tree: the anomalies with their masks and boxes.
    let built = dir.path().join("built");
    let o = sage()
        .args(["data", "build", "--json", "--source", "mvtec", "--root"])
        .arg(&out)
        .arg("--out")
        .arg(&built)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let b = stdout_json(&o);
    assert_eq!((b["samples"].as_u64(), b["anomalous"].as_u64()), (Some(4), Some(2)));
    let items: Vec<Value> = ["train.json", "test.json"]
        .iter()
        .flat_map(|f| read_json(&built.join(f)).as_array().unwrap().clone())
        .collect();
    let anomalous: Vec<&Value> = items.iter().filter(|i| i["label"] == "anomalous").collect();
    assert_eq!(anomalous.len(), 2);
    for i in anomalous {
        assert_eq!(i["defect_type"], "cutpaste");
        assert!(i["mask"].as_str().unwrap().ends_with("ground_truth/cutpaste/000_mask.png"), "{i}");
        assert!(!i["boxes"].as_array().unwrap().is_empty(), "{i}");
    }
}

#[test]
fn bad_configs_and_flags_are_user_errors_naming_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let cfg = dir.path().join("synth.toml");

    std::fs::write(&cfg, "[cutpaste]\narea = [0.02, 0.15]\nangle = [0.0, 10.0]\n").unwrap();
    let err = expect_user_error(synth(&out, &["--method", "cutpaste", "--config"]).arg(&cfg), &["synth.toml", "angle"]);
    assert!(err.contains("line 3"), "{err}");

    std::fs::write(&cfg, "[split]\ntrain = 0.2\n\n[nsa]\nscale = [1.5, 0.5]\n").unwrap();
    let err = expect_user_error(synth(&out, &["--method", "nsa", "--config"]).arg(&cfg), &["synth.toml", "nsa.scale"]);
    assert!(err.contains("line 5") && err.contains("must not exceed"), "{err}");

    std::fs::write(&cfg, "[draem]\ntexture = \"dtd\"\n").unwrap();
    expect_user_error(synth(&out, &["--method", "draem", "--config"]).arg(&cfg), &["synth.toml", "dtd"]);
    assert!(!out.join("bottle").exists(), "nothing is written when the config is refused");

    // The shipped config is accepted as is.
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/synth.toml");
    let o = synth(&out, &["--method", "nsa", "--json", "--config"]).arg(&shipped).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    expect_user_error(
        sage().args(["data", "synth", "--source", "mvtec", "--method", "cutpaste", "--out"]).arg(&out),
        &["--root"],
    );
    expect_user_error(&mut synth(&out, &["--method", "cutpaste", "--per-image", "0"]), &["--per-image"]);
    expect_user_error(
        sage()
            .args(["data", "synth", "--source", "mvtec", "--method", "cutpaste", "--root", "/no/such/dir", "--out"])
            .arg(&out),
        &["/no/such/dir"],
    );
}
