//! `sage map --eval --data D`: the anomaly map's image AUROC, pixel AUROC and PRO over a dataset,
//! on the MVTec-layout fixture (as a folder and as an MMAD file) with the real EfficientNet-Lite0.
//! The fixture's images are 8×8 and its scores mean nothing: these tests check the report's
//! structure and counts, and that every metric is in [0, 1] or null where a class is missing.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// Runs `sage map --eval --json` with `args`, expecting success.
fn map_eval(args: &[&str]) -> Value {
    let _ = efficientnet_pth();
    let out = sage().args(["map", "--eval", "--json"]).args(args).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stdout_json(&out)
}

/// A metric: a number in [0, 1], or null when `present` is false.
fn check_metric(v: &Value, present: bool, what: &str) {
    if present {
        let x = v.as_f64().unwrap_or_else(|| panic!("{what} is {v}, expected a number"));
        assert!((0.0..=1.0).contains(&x), "{what} = {x}");
    } else {
        assert!(v.is_null(), "{what} = {v}, expected null");
    }
}

/// The counts of one row: images, anomalous, masked, regions, pixels, defect pixels, zero-shot.
fn counts(s: &Value) -> [u64; 7] {
    ["images", "anomalous", "masked", "regions", "pixels", "defect_pixels", "zero_shot"]
        .map(|k| s[k].as_u64().unwrap_or_else(|| panic!("{k} missing in {s}")))
}

fn category<'a>(v: &'a Value, name: &str) -> &'a Value {
    v["per_category"].as_array().unwrap().iter().find(|c| c["category"] == name).unwrap_or_else(|| panic!("{name}"))
}

#[test]
fn mvtec_folder_reports_every_metric_per_category_and_overall() {
    let v = map_eval(&["--data", fixture("mvtec").to_str().unwrap()]);
    assert_eq!(v["format"], "mvtec");
    assert_eq!(v["seed"], 0);
    assert_eq!(v["sigma"], 4.0);
    assert_eq!(v["pro_fpr_limit"], 0.3);
    assert_eq!(v["reduce"], "nearest");
    assert_eq!(v["unlabelled"], 0);
    let names: Vec<&str> =
        v["per_category"].as_array().unwrap().iter().map(|c| c["category"].as_str().unwrap()).collect();
    assert_eq!(names, ["bottle", "cable"]);
    // bottle: 2 broken_large (masks: a 3×2 blob, a 3×3 blob) + 1 good, 8×8 each.
    assert_eq!(counts(category(&v, "bottle")), [3, 2, 3, 2, 192, 15, 0]);
    // cable: 1 cut_inner_insulation (a 2×2 blob) + 1 good.
    assert_eq!(counts(category(&v, "cable")), [2, 1, 2, 1, 128, 4, 0]);
    assert_eq!(counts(&v["overall"]), [5, 3, 5, 3, 320, 19, 0]);
    for row in [category(&v, "bottle"), category(&v, "cable"), &v["overall"], &v["category_mean"]] {
        for m in ["image_auroc", "pixel_auroc", "pro"] {
            check_metric(&row[m], true, m);
        }
    }
    assert!(v["seconds"].as_f64().unwrap() >= 0.0);

    // The text report is a table with the same rows.
    let out = sage().args(["map", "--eval", "--data"]).arg(fixture("mvtec")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for want in
        ["bottle", "cable", "all images (pooled)", "mean over categories", "pixel AUROC", "PRO", "5 images scored"]
    {
        assert!(text.contains(want), "{want:?} missing from:\n{text}");
    }
}

#[test]
fn limit_sigma_and_mask_side_change_what_is_scored() {
    let dir = tempfile::tempdir().unwrap();
    let maps = dir.path().join("maps");
    let v = map_eval(&[
        "--data",
        fixture("mvtec").to_str().unwrap(),
        "--limit",
        "1",
        "--sigma",
        "0",
        "--mask-side",
        "4",
        "--seed",
        "3",
        "--out-maps",
        maps.to_str().unwrap(),
    ]);
    assert_eq!((v["seed"].as_u64(), v["sigma"].as_f64(), v["mask_side"].as_u64()), (Some(3), Some(0.0), Some(4)));
    // One image of each label per category, masks shrunk from 8×8 to 4×4 (nearest: source pixels
    // 1, 3, 5, 7 of each axis): bottle's 000 blob and cable's blob each keep one pixel.
    assert_eq!(counts(category(&v, "bottle")), [2, 1, 2, 1, 32, 1, 0]);
    assert_eq!(counts(category(&v, "cable")), [2, 1, 2, 1, 32, 1, 0]);
    let written = snapshot(&maps);
    assert_eq!(written.len(), 4, "{:?}", written.keys());
    assert!(written.contains_key("bottle_broken_large_000.png"), "{:?}", written.keys());
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

#[test]
fn an_mmad_file_with_zero_shot_samples_and_a_missing_class() {
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&fixture("mvtec"), &dir.path().join("MVTec-AD"));
    let entry = |mask: Option<&str>, templates: &[&str]| {
        json!({"conversation": [{"Question": "Is there any defect?", "Options": {"A": "Yes.", "B": "No."},
               "Answer": "A", "type": "Anomaly Detection"}],
               "mask_path": mask, "similar_templates": [], "random_templates": templates})
    };
    let mmad = json!({
        "MVTec-AD/bottle/test/broken_large/000.png":
            entry(Some("MVTec-AD/bottle/ground_truth/broken_large/000_mask.png"), &["MVTec-AD/bottle/train/good/000.png"]),
        "MVTec-AD/bottle/test/good/000.png": entry(None, &[]),
        "MVTec-AD/cable/test/cut_inner_insulation/000.png":
            entry(Some("MVTec-AD/cable/ground_truth/cut_inner_insulation/000_mask.png"), &[]),
    });
    let file = dir.path().join("mmad.json");
    std::fs::write(&file, serde_json::to_string(&mmad).unwrap()).unwrap();
    let v = map_eval(&["--data", file.to_str().unwrap()]);
    assert_eq!(v["format"], "mmad");
    assert!(v["seed"].is_null());
    // Without random templates a sample is compared with itself (zero-shot).
    assert_eq!(counts(category(&v, "bottle")), [2, 1, 2, 1, 128, 6, 1]);
    assert_eq!(counts(category(&v, "cable")), [1, 1, 1, 1, 64, 4, 1]);
    assert_eq!(counts(&v["overall"]), [3, 2, 3, 2, 192, 10, 2]);
    for m in ["image_auroc", "pixel_auroc", "pro"] {
        check_metric(&category(&v, "bottle")[m], true, m);
        check_metric(&v["overall"][m], true, m);
    }
    // cable has no normal image: no image AUROC; its mask still has normal pixels.
    check_metric(&category(&v, "cable")["image_auroc"], false, "cable image_auroc");
    check_metric(&category(&v, "cable")["pixel_auroc"], true, "cable pixel_auroc");
    check_metric(&category(&v, "cable")["pro"], true, "cable pro");
}

#[test]
fn data_that_is_neither_a_folder_nor_a_data_file_is_the_users_to_fix() {
    // Refused before the encoder loads: no asset is needed.
    for (path, expect) in [("/nonexistent", "no such file or folder"), ("Cargo.toml", "not valid JSON")] {
        let out = sage().args(["map", "--eval", "--data", path]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "expected exit 2; stderr: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(path) && stderr.contains(expect), "{stderr}");
        assert!(stderr.contains("MVTec AD layout") && stderr.contains("data file"), "{stderr}");
    }
    let out = sage().args(["map", "--eval", "--data", "/nonexistent", "--sigma=-1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sigma"));
}

/// `--shots K` with `--eval`: every sample of a category against one memory bank of the
/// category's first K distinct references; the same images are scored, the report says K, and
/// asking for more references than a category has, or for a list, is the user's to fix.
#[test]
fn a_memory_bank_per_category_scores_the_same_images() {
    let data = fixture("mvtec");
    let v = map_eval(&["--data", data.to_str().unwrap(), "--shots", "1"]);
    assert_eq!(v["shots"], 1);
    assert_eq!(counts(&v["overall"]), [5, 3, 5, 3, 320, 19, 0]);
    for m in ["image_auroc", "pixel_auroc", "pro"] {
        check_metric(&v["overall"][m], true, m);
    }
    assert!(map_eval(&["--data", data.to_str().unwrap()])["shots"].is_null());
    let e = expect_user_error(sage().args(["map", "--eval", "--shots", "3", "--data"]).arg(&data), "--shots 3");
    assert!(e.contains("distinct reference images"), "{e}");
    expect_user_error(sage().args(["map", "--eval", "--shots", "1,2", "--data"]).arg(&data), "--shots");
    expect_user_error(sage().args(["map", "--eval", "--shots", "full", "--data"]).arg(&data), "--shots");
}

/// AnomalyDINO's augmented references: a bank of a reference's rotations holds the exact tokens
/// of its quarter-turned copy, so that copy scores ~0 against it, and clearly more against the
/// bank of the reference as it is (the encoder is not rotation-invariant).
#[test]
fn a_turned_reference_is_normal_only_to_a_bank_of_its_rotations() {
    use sage::models::memory_bank::{ImageScore, MemoryBank};
    use sage::models::patch_encoder::{EncoderKind, PatchEncoder};
    use sage::models::reference_views::ReferenceViews;
    let _ = efficientnet_pth();
    let enc = PatchEncoder::load(EncoderKind::Efficientnet, Some(224), "6".parse().unwrap()).unwrap();
    // Horizontal stripes that thin out downwards: a quarter turn makes vertical ones.
    let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(224, 224, |_, y| {
        let v = if (y * y / 400) % 2 == 0 { 220 } else { 30 };
        image::Rgb([v, v, v])
    }));
    let turned = enc.tokens(&[&img.rotate90()]).unwrap().remove(0);
    let score = |views: ReferenceViews| {
        let imgs = views.of(&img);
        let mut bank = MemoryBank::new(turned.dim);
        for t in enc.tokens(&imgs.iter().collect::<Vec<_>>()).unwrap() {
            bank.push(&t.data).unwrap();
        }
        assert_eq!(bank.len(), views.count() * turned.data.len() / turned.dim);
        ImageScore::Max.of(&bank.anomaly_map(&turned.data).unwrap())
    };
    let (plain, rotations, dihedral) =
        (score(ReferenceViews::Identity), score(ReferenceViews::Rotations), score(ReferenceViews::Dihedral));
    eprintln!(
        "a turned copy against the bank of: itself {plain}, its rotations {rotations}, dihedral views {dihedral}"
    );
    assert!(rotations.abs() < 1e-4 && dihedral.abs() < 1e-4, "{rotations} {dihedral}");
    assert!(plain > 0.1, "the plain bank: {plain}");
}

/// `--reference-views` with `--eval --shots`: the report names the views; a list is refused.
#[test]
fn an_augmented_bank_is_reported_and_takes_one_set() {
    let data = fixture("mvtec");
    let v = map_eval(&["--data", data.to_str().unwrap(), "--shots", "1", "--reference-views", "dihedral"]);
    assert_eq!(v["reference_views"], "dihedral");
    assert_eq!(counts(&v["overall"]), [5, 3, 5, 3, 320, 19, 0]);
    assert!(map_eval(&["--data", data.to_str().unwrap()])["reference_views"].is_null());
    let args = ["map", "--eval", "--shots", "1", "--reference-views", "identity,dihedral", "--data"];
    expect_user_error(sage().args(args).arg(&data), "--reference-views");
}

/// `--masking pca` with `--eval --shots`: AnomalyDINO's background masking on a memory bank. The
/// report names it and the share of scored patches on the foreground; the masked-out patches
/// score 0, so the maps (and here the pixel metrics) differ from the unmasked run's on the same
/// images. One value only, and only with a bank.
#[test]
fn background_masking_reaches_the_bank_evaluation() {
    let data = fixture("mvtec");
    let plain = map_eval(&["--data", data.to_str().unwrap(), "--shots", "1"]);
    assert_eq!(plain["masking"], "none");
    assert!(plain["foreground_share"].is_null());
    let masked = map_eval(&["--data", data.to_str().unwrap(), "--shots", "1", "--masking", "pca"]);
    assert_eq!(masked["masking"], "pca");
    let share = masked["foreground_share"].as_f64().unwrap();
    // The fixture's 8×8 images, upsampled, still have a background the mask finds.
    assert!(share > 0.0 && share < 1.0, "foreground share {share}");
    assert_eq!(counts(&masked["overall"]), counts(&plain["overall"]));
    for m in ["image_auroc", "pixel_auroc", "pro"] {
        check_metric(&masked["overall"][m], true, m);
    }
    assert_ne!(masked["overall"]["pixel_auroc"], plain["overall"]["pixel_auroc"]);
    let args = ["map", "--eval", "--shots", "1", "--masking", "pca,none", "--data"];
    expect_user_error(sage().args(args).arg(&data), "--masking");
    let out = sage().args(["map", "--eval", "--masking", "pca", "--data"]).arg(&data).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--shots"));
}
