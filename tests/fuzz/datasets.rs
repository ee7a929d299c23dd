//! AD-PL, MANTA and MMAD dataset files: seeds built from the committed fixtures, loaded and
//! checked the way `sage data check` and the stages that read them do.

use super::runner::{no_setup, Target};
use sage::data::{adpl, manta, mmad, stats};
use std::path::{Path, PathBuf};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// A built AD-PL split of the MVTec fixture (`sage data build`'s own output).
fn adpl_seeds() -> Vec<Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let o = sage::data::build::Options {
        source: sage::data::build::Source::Mvtec,
        root: fixture("mvtec"),
        out: dir.path().to_path_buf(),
        seed: 0,
        export_trl: false,
        limit: 0,
        test_fraction: 0.5,
        holdout: vec![],
    };
    sage::data::build::build(&o, true).expect("building AD-PL from the MVTec fixture");
    let mut seeds = vec![];
    for name in ["train.json", "test.json"] {
        let p = dir.path().join(name);
        if let Ok(b) = std::fs::read(&p) {
            // Absolute image paths into the fixture, the image root `run_adpl` gives.
            seeds.push(b);
        }
    }
    assert!(!seeds.is_empty(), "data build wrote no train.json/test.json");
    seeds
}

/// The seeds name images of the MVTec fixture: that is their image root (a dataset may not reach
/// outside its root).
fn run_adpl(p: &Path) -> anyhow::Result<()> {
    let root = fixture("mvtec");
    adpl::check(p, Some(&root)).into_result()?;
    let s = adpl::load(p, Some(&root))?;
    stats::compute(&s).render();
    Ok(())
}

fn manta_seeds() -> Vec<Vec<u8>> {
    let good = fixture("mvtec/bottle/test/good/000.png");
    let items = serde_json::json!([
        {"domain": "bottle", "test_image": good, "pair_type": "defect identification", "conclusion_en": "Fine.",
         "question_answer": [{"question_en": "Is there a crack?", "answer": false, "conclusion_en": "No crack."},
                             {"question_en": "Is it bent?", "answer": true, "conclusion_en": "Bent."}]},
        {"domain": "bottle", "test_image": good, "pair_type": "defect identification",
         "question_answer": [{"question_en": "Is there a dent?", "answer": false, "conclusion_en": "No dent."}]}
    ]);
    vec![serde_json::to_vec_pretty(&items).unwrap()]
}

fn run_manta(p: &Path) -> anyhow::Result<()> {
    let root = fixture("mvtec");
    manta::check(p, Some(&root)).into_result()?;
    let s = manta::load(p, Some(&root))?;
    stats::compute(&s).render();
    Ok(())
}

fn mmad_seeds() -> Vec<Vec<u8>> {
    vec![std::fs::read(fixture("mmad/mmad.json")).unwrap()]
}

fn run_mmad(p: &Path) -> anyhow::Result<()> {
    let root = fixture("mmad");
    mmad::check(p, Some(&root)).into_result()?;
    let s = mmad::load(p, Some(&root), mmad::RefChoice::Random)?;
    mmad::load(p, Some(&root), mmad::RefChoice::Similar)?;
    stats::compute(&s).render();
    Ok(())
}

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "adpl",
            file_name: "items.json",
            seeds: adpl_seeds,
            mutate: super::json::mutate,
            setup: no_setup,
            run: run_adpl,
        },
        Target {
            name: "manta",
            file_name: "manta.json",
            seeds: manta_seeds,
            mutate: super::json::mutate,
            setup: no_setup,
            run: run_manta,
        },
        Target {
            name: "mmad",
            file_name: "mmad.json",
            seeds: mmad_seeds,
            mutate: super::json::mutate,
            setup: no_setup,
            run: run_mmad,
        },
    ]
}
