//! The MVTec AD folder layout (ARCHITECTURE.md §5; MPDD and converted VisA use it too):
//! `<root>/<category>/train/good/*.png` (normal training images),
//! `<root>/<category>/test/<defect>/*.png` (`good` = normal), and
//! `<root>/<category>/ground_truth/<defect>/<stem>_mask.png`.
//!
//! One sample per `test/` image, paired with one `train/good` image of the same category picked
//! with a seeded generator (so a rebuild gives the same pairs and a new seed new ones). Training
//! images are only ever references, so a reference is never a test image. Samples carry no
//! questions (the builder adds them) and no split.

use super::sample::{Label, Sample};
use crate::user_err;
use anyhow::Result;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Sorted sub-folders of `dir`.
pub(crate) fn subdirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| user_err!("cannot read folder {}: {e}", dir.display()))?;
    let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    v.sort();
    Ok(v)
}

/// Sorted image files directly in `dir`.
pub(crate) fn images(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| user_err!("cannot read folder {}: {e}", dir.display()))?;
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|x| x.to_str())
                    .is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.to_ascii_lowercase().as_str()))
        })
        .collect();
    v.sort();
    Ok(v)
}

fn name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

fn stem(p: &Path) -> String {
    p.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The ground-truth mask of a test image, when one exists (`<stem>_mask.png`, else `<stem>.png`).
fn mask_for(cat_dir: &Path, defect: &str, image: &Path) -> Option<PathBuf> {
    let gt = cat_dir.join("ground_truth").join(defect);
    let s = stem(image);
    [format!("{s}_mask.png"), format!("{s}.png")].into_iter().map(|n| gt.join(n)).find(|p| p.is_file())
}

/// Reads every category under `root`; any problem is a user error naming the folder.
pub fn load(root: &Path, seed: u64) -> Result<Vec<Sample>> {
    if !root.is_dir() {
        return Err(user_err!(
            "{} is not a folder; expected the MVTec AD layout <category>/train/good",
            root.display()
        ));
    }
    let categories: Vec<PathBuf> = subdirs(root)?.into_iter().filter(|c| c.join("train/good").is_dir()).collect();
    if categories.is_empty() {
        return Err(user_err!(
            "{} holds no category folder with train/good; expected the MVTec AD layout \
             <category>/train/good, <category>/test/<defect>, <category>/ground_truth/<defect>",
            root.display()
        ));
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut samples = Vec::new();
    for cat_dir in &categories {
        let category = name(cat_dir);
        let refs = images(&cat_dir.join("train/good"))?;
        if refs.is_empty() {
            return Err(user_err!("{} holds no images to use as references", cat_dir.join("train/good").display()));
        }
        let test_dir = cat_dir.join("test");
        if !test_dir.is_dir() {
            return Err(user_err!("{} is missing; every category needs test/<defect> folders", test_dir.display()));
        }
        for defect_dir in subdirs(&test_dir)? {
            let defect = name(&defect_dir);
            let normal = defect == "good";
            for image in images(&defect_dir)? {
                let reference = refs[rng.random_range(0..refs.len())].clone();
                samples.push(Sample {
                    id: format!("{category}/{defect}/{}", stem(&image)),
                    mask: if normal { None } else { mask_for(cat_dir, &defect, &image) },
                    test_image: image,
                    reference_image: Some(reference),
                    category: Some(category.clone()),
                    label: Some(if normal { Label::Normal } else { Label::Anomalous }),
                    defect_type: (!normal).then(|| defect.clone()),
                    boxes: Vec::new(),
                    split: None,
                    questions: Vec::new(),
                });
            }
        }
    }
    if samples.is_empty() {
        return Err(user_err!("{} holds no test images (<category>/test/<defect>/*.png)", root.display()));
    }
    Ok(samples)
}
