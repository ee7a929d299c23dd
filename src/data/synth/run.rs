//! `sage data synth`: reads a data set's normal images, splits each category's normals, and
//! writes an MVTec-layout tree of synthetic anomalies with masks:
//!
//! ```text
//! OUT/<category>/train/good/NNN.png              normal references
//! OUT/<category>/test/good/NNN.png               held-out normals
//! OUT/<category>/test/<method>/NNN.png           synthetic anomalies
//! OUT/<category>/ground_truth/<method>/NNN_mask.png   255 inside, 0 outside
//! OUT/<category>/synth-<method>.json             every sample: source, parameters, boxes
//! OUT/<category>/synth-split.json                which normal went where
//! ```
//!
//! The split (a seeded shuffle of the category's normals: `[split] train` to train/good,
//! `[split] test` to test/good, the rest are the anomalies' sources) depends on the seed, the
//! source and `[split]` only, never on the method, so running another method into the same folder
//! adds its folders and rewrites train/good and test/good byte for byte. A folder made by a run
//! with another seed or split is refused rather than mixed ([`check_split_record`]). ELPV's
//! categories are its cell types (`mono`, `poly`); an MVTec-layout source's normals are its
//! `train/good` and `test/good` images.

use super::config::{AcceptConfig, SynthConfig, TextureSource};
use super::{generate, sample_rng, sheet, Img, Method, Other};
use crate::data::build::Source;
use crate::data::{elpv, mask, mvtec};
use crate::image_io;
use crate::user_err;
use crate::util::{progress_bar, write_atomic};
use anyhow::{Context, Result};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What to synthesise.
#[derive(Clone, Debug)]
pub struct Options {
    pub source: Source,
    /// The data set's folder (ELPV: the folder of `labels.csv`).
    pub root: PathBuf,
    pub out: PathBuf,
    pub method: Method,
    /// Anomalies drawn from each source image.
    pub per_image: usize,
    pub seed: u64,
    /// `--config` (`None`: the defaults, `configs/synth.toml`).
    pub config: Option<PathBuf>,
    /// At most this many source images per category (0 = all).
    pub limit: usize,
    pub contact_sheet: Option<PathBuf>,
    /// Samples on the contact sheet (the first ones, in category and index order).
    pub sheet_count: usize,
}

/// One category's part of the run.
#[derive(Clone, Debug, Serialize)]
pub struct CategorySummary {
    pub category: String,
    pub normals: usize,
    pub train_good: usize,
    pub test_good: usize,
    /// Source images used (after `--limit`).
    pub sources: usize,
    pub samples: usize,
    pub skipped: usize,
    pub manifest: PathBuf,
}

/// What was written.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub source: Source,
    pub root: PathBuf,
    pub out: PathBuf,
    pub method: Method,
    pub seed: u64,
    pub per_image: usize,
    pub samples: usize,
    pub skipped: usize,
    pub categories: Vec<CategorySummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contact_sheet: Option<PathBuf>,
}

/// A category's normals, shuffled and shared out.
struct Category {
    name: String,
    /// Sorted, as found.
    normals: Vec<PathBuf>,
    train: Vec<PathBuf>,
    test: Vec<PathBuf>,
    /// Every anomaly source (before `--limit`).
    sources: Vec<PathBuf>,
}

/// `synth-split.json`: which normal went where. Byte-identical for every method of one seed.
#[derive(Serialize)]
struct SplitRecord<'a> {
    source: Source,
    root: &'a Path,
    seed: u64,
    split: &'a super::config::SplitConfig,
    train_good: Vec<Copied>,
    test_good: Vec<Copied>,
    anomaly_sources: &'a [PathBuf],
}

#[derive(Serialize)]
struct Copied {
    file: String,
    source: PathBuf,
}

/// One kept sample, as the manifest lists it. Paths of written files are relative to the
/// category's folder.
#[derive(Clone, Debug, Serialize)]
struct SampleRecord {
    index: usize,
    image: String,
    mask: String,
    source: PathBuf,
    /// DRAEM: the image the texture was taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    texture: Option<PathBuf>,
    /// NSA: the image the patch was taken from.
    #[serde(skip_serializing_if = "Option::is_none")]
    donor: Option<PathBuf>,
    /// Draws until the acceptance rule held.
    tries: u32,
    /// The mask's share of the image.
    mask_area: f64,
    /// Share of the mask's pixels that differ from the source.
    changed: f64,
    /// One box per 8-connected mask region, `[x_min, y_min, x_max, y_max]` in pixel edges.
    boxes: Vec<[f32; 4]>,
    params: serde_json::Value,
}

/// A source whose draws all failed the acceptance rule.
#[derive(Clone, Debug, Serialize)]
struct Skipped {
    index: usize,
    source: PathBuf,
}

enum Outcome {
    Kept(SampleRecord),
    Skipped(Skipped),
}

/// `synth-<method>.json`.
#[derive(Serialize)]
struct Manifest<'a> {
    method: Method,
    category: &'a str,
    source: Source,
    root: &'a Path,
    seed: u64,
    per_image: usize,
    limit: usize,
    /// What the mask marks for this method.
    mask: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    texture_source: Option<TextureSource>,
    split: &'static str,
    accept: &'a AcceptConfig,
    config: serde_json::Value,
    samples: Vec<SampleRecord>,
    skipped: Vec<Skipped>,
}

const SPLIT_FILE: &str = "synth-split.json";

/// One job: the `index`-th sample of a category, drawn from `source`.
struct Job<'a> {
    cat: &'a Category,
    index: usize,
    source: &'a Path,
}

/// Runs `sage data synth`; `quiet` hides the progress bar.
pub fn run(o: &Options, quiet: bool) -> Result<Summary> {
    let cfg: SynthConfig = match &o.config {
        Some(p) => crate::config::load(p)?,
        None => SynthConfig::default(),
    };
    if o.per_image == 0 {
        return Err(user_err!("--per-image must be at least 1"));
    }
    if o.contact_sheet.is_some() && o.sheet_count == 0 {
        return Err(user_err!("--sheet-count must be at least 1"));
    }
    let root = std::fs::canonicalize(&o.root).map_err(|e| user_err!("cannot open --root {}: {e}", o.root.display()))?;
    if o.out.exists() && !o.out.is_dir() {
        return Err(user_err!("--out {} is a file; give a folder to write the anomalies into", o.out.display()));
    }
    let existed = o.out.exists();
    std::fs::create_dir_all(&o.out).map_err(|e| user_err!("cannot create --out {}: {e}", o.out.display()))?;
    let out = std::fs::canonicalize(&o.out).map_err(|e| user_err!("cannot open --out {}: {e}", o.out.display()))?;
    if out.starts_with(&root) || root.starts_with(&out) {
        if !existed {
            let _ = std::fs::remove_dir(&out); // only the empty folder just made
        }
        return Err(user_err!(
            "--out {} and --root {} overlap; the output would overwrite or be read as the data set. Write it elsewhere",
            out.display(),
            root.display()
        ));
    }

    let categories: Vec<Category> = normals(o.source, &root)?
        .into_iter()
        .map(|(name, normals)| split_category(name, normals, &cfg, o.seed))
        .collect::<Result<_>>()?;
    let texture_source = match (o.method, cfg.draem.texture) {
        (Method::Draem, TextureSource::OtherCategory) if categories.len() < 2 => Some(TextureSource::SameCategory),
        (Method::Draem, t) => Some(t),
        _ => None,
    };
    let jobs: Vec<Job> = categories
        .iter()
        .flat_map(|cat| {
            let n = if o.limit == 0 { cat.sources.len() } else { o.limit.min(cat.sources.len()) };
            cat.sources[..n].iter().enumerate().flat_map(move |(s, source)| {
                (0..o.per_image).map(move |j| Job { cat, index: s * o.per_image + j, source })
            })
        })
        .collect();

    // Refuse before writing anything: another run's split, or files this run would not write.
    for cat in &categories {
        let dir = out.join(&cat.name);
        check_split_record(&dir.join(SPLIT_FILE), &split_record(cat, o, &root, &cfg)?)?;
        let mine: Vec<&Job> = jobs.iter().filter(|j| std::ptr::eq(j.cat, cat)).collect();
        let m = o.method.name();
        check_no_strays(&dir.join("train/good"), (0..cat.train.len()).map(|i| format!("{i:03}.png")))?;
        check_no_strays(&dir.join("test/good"), (0..cat.test.len()).map(|i| format!("{i:03}.png")))?;
        check_no_strays(&dir.join("test").join(m), mine.iter().map(|j| format!("{:03}.png", j.index)))?;
        check_no_strays(&dir.join("ground_truth").join(m), mine.iter().map(|j| format!("{:03}_mask.png", j.index)))?;
    }

    let copies: Vec<(&Path, PathBuf)> = categories
        .iter()
        .flat_map(|cat| {
            let dir = out.join(&cat.name);
            let train = cat.train.iter().enumerate().map(move |(i, p)| (p.as_path(), format!("train/good/{i:03}.png")));
            let test = cat.test.iter().enumerate().map(move |(i, p)| (p.as_path(), format!("test/good/{i:03}.png")));
            train.chain(test).map(move |(p, f)| (p, dir.join(f))).collect::<Vec<_>>()
        })
        .collect();
    let pb = progress_bar((copies.len() + jobs.len()) as u64, o.method.name(), quiet);
    for cat in &categories {
        let record = split_record(cat, o, &root, &cfg)?;
        write_atomic(&out.join(&cat.name).join(SPLIT_FILE), &record)?;
    }
    copies.par_iter().try_for_each(|(src, dst)| -> Result<()> {
        // Decoded and re-encoded as PNG (grey stays one channel), so train/good holds exactly the
        // pixels the anomalies were drawn from.
        let img = Img::from_dynamic(&image_io::load(src)?);
        image_io::save_dynamic_atomic(&img.to_dynamic(), dst)?;
        pb.inc(1);
        Ok(())
    })?;

    let pools = Pools::new(&categories, texture_source);
    let outcomes: Vec<Outcome> = jobs
        .par_iter()
        .map(|job| {
            let r = make_sample(job, o, &cfg, &pools, &out)
                .with_context(|| format!("synthesising from {}", job.source.display()));
            pb.inc(1);
            r
        })
        .collect::<Result<_>>()?;
    pb.finish_and_clear();

    let mut summaries = Vec::new();
    let mut kept_all: Vec<(&Category, &SampleRecord)> = Vec::new();
    for cat in &categories {
        let dir = out.join(&cat.name);
        let (mut samples, mut skipped) = (Vec::new(), Vec::new());
        for (job, outcome) in jobs.iter().zip(&outcomes) {
            if !std::ptr::eq(job.cat, cat) {
                continue;
            }
            match outcome {
                Outcome::Kept(r) => samples.push(r.clone()),
                Outcome::Skipped(s) => {
                    // A sample an earlier run kept at this index would no longer be in the manifest.
                    for f in [format!("test/{m}/{:03}.png", s.index, m = o.method.name()), mask_file(o.method, s.index)]
                    {
                        remove_if_present(&dir.join(f))?;
                    }
                    skipped.push(s.clone());
                }
            }
        }
        let manifest_path = dir.join(format!("synth-{}.json", o.method.name()));
        let sources = jobs.iter().filter(|j| std::ptr::eq(j.cat, cat)).count() / o.per_image;
        summaries.push(CategorySummary {
            category: cat.name.clone(),
            normals: cat.normals.len(),
            train_good: cat.train.len(),
            test_good: cat.test.len(),
            sources,
            samples: samples.len(),
            skipped: skipped.len(),
            manifest: manifest_path.clone(),
        });
        let manifest = Manifest {
            method: o.method,
            category: &cat.name,
            source: o.source,
            root: &root,
            seed: o.seed,
            per_image: o.per_image,
            limit: o.limit,
            mask: mask_meaning(o.method),
            texture_source,
            split: SPLIT_FILE,
            accept: &cfg.accept,
            config: method_config(o.method, &cfg)?,
            samples,
            skipped,
        };
        let mut bytes = serde_json::to_vec_pretty(&manifest)?;
        bytes.push(b'\n');
        write_atomic(&manifest_path, &bytes)?;
    }
    for (job, outcome) in jobs.iter().zip(&outcomes) {
        if let Outcome::Kept(r) = outcome {
            kept_all.push((job.cat, r));
        }
    }

    let contact_sheet = match &o.contact_sheet {
        Some(path) if !kept_all.is_empty() => {
            let tiles = kept_all
                .iter()
                .take(o.sheet_count)
                .map(|(cat, r)| tile(&out.join(&cat.name), r))
                .collect::<Result<Vec<_>>>()?;
            image_io::save_atomic(&sheet::sheet(&tiles, sheet::THUMB), path)?;
            Some(path.clone())
        }
        Some(path) => {
            if !quiet {
                eprintln!("no sample was kept, so no contact sheet was written to {}", path.display());
            }
            None
        }
        None => None,
    };
    Ok(Summary {
        source: o.source,
        root,
        out,
        method: o.method,
        seed: o.seed,
        per_image: o.per_image,
        samples: summaries.iter().map(|s| s.samples).sum(),
        skipped: summaries.iter().map(|s| s.skipped).sum(),
        categories: summaries,
        contact_sheet,
    })
}

/// Each category's normal images, sorted.
fn normals(source: Source, root: &Path) -> Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut by_category: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    match source {
        Source::Elpv => {
            for cell in elpv::load(root)?.into_iter().filter(|c| c.is_normal()) {
                let plain = !cell.kind.is_empty()
                    && cell.kind != "."
                    && cell.kind != ".."
                    && cell.kind.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
                if !plain {
                    return Err(user_err!(
                        "{}: cell type {:?} of {} cannot name a folder; expected a plain name such as mono or poly",
                        root.join("labels.csv").display(),
                        cell.kind,
                        cell.path.display()
                    ));
                }
                by_category.entry(cell.kind).or_default().push(cell.path);
            }
        }
        Source::Mvtec => {
            if !root.is_dir() {
                return Err(user_err!(
                    "{} is not a folder; expected the MVTec AD layout <category>/train/good",
                    root.display()
                ));
            }
            for cat_dir in mvtec::subdirs(root)?.into_iter().filter(|c| c.join("train/good").is_dir()) {
                let mut v = mvtec::images(&cat_dir.join("train/good"))?;
                let test_good = cat_dir.join("test/good");
                if test_good.is_dir() {
                    v.extend(mvtec::images(&test_good)?);
                }
                let name = cat_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                by_category.insert(name, v);
            }
        }
    }
    for v in by_category.values_mut() {
        v.sort();
    }
    if by_category.values().all(|v| v.is_empty()) {
        return Err(user_err!(
            "{} holds no normal images (ELPV: cells of defect probability 0; MVTec layout: <category>/train/good, \
             <category>/test/good)",
            root.display()
        ));
    }
    Ok(by_category)
}

/// Shuffles a category's normals under (seed, category) and shares them out: at least one
/// reference and at least one source.
fn split_category(name: String, normals: Vec<PathBuf>, cfg: &SynthConfig, seed: u64) -> Result<Category> {
    let n = normals.len();
    if n < 2 {
        return Err(user_err!(
            "category {name} has {n} normal image(s); synthesis needs at least 2 (a reference and a source)"
        ));
    }
    let mut order = normals.clone();
    order.shuffle(&mut sample_rng(seed, "split", &name, 0));
    let n_train = ((n as f64 * cfg.split.train).round() as usize).clamp(1, n - 1);
    let n_test = ((n as f64 * cfg.split.test).round() as usize).min(n - 1 - n_train);
    let sources = order.split_off(n_train + n_test);
    let test = order.split_off(n_train);
    Ok(Category { name, normals, train: order, test, sources })
}

fn split_record(cat: &Category, o: &Options, root: &Path, cfg: &SynthConfig) -> Result<Vec<u8>> {
    let copied = |v: &[PathBuf], dir: &str| {
        v.iter()
            .enumerate()
            .map(|(i, p)| Copied { file: format!("{dir}/{i:03}.png"), source: p.clone() })
            .collect::<Vec<_>>()
    };
    let record = SplitRecord {
        source: o.source,
        root,
        seed: o.seed,
        split: &cfg.split,
        train_good: copied(&cat.train, "train/good"),
        test_good: copied(&cat.test, "test/good"),
        anomaly_sources: &cat.sources,
    };
    let mut bytes = serde_json::to_vec_pretty(&record)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// An existing `synth-split.json` must be this run's, byte for byte.
fn check_split_record(path: &Path, bytes: &[u8]) -> Result<()> {
    match std::fs::read(path) {
        Ok(old) if old != bytes => Err(user_err!(
            "{} was written by a run with another --source, --root, --seed or [split]; its train/good and test/good \
             do not match this run's. Use the same ones, or a fresh --out",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// Refuses a folder holding a file this run would not write (left by a run with other flags), so
/// the manifest always lists the folder's whole content.
fn check_no_strays(dir: &Path, planned: impl Iterator<Item = String>) -> Result<()> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Ok(()) };
    let planned: BTreeSet<String> = planned.collect();
    let mut strays: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !planned.contains(n))
        .collect();
    strays.sort();
    if let Some(first) = strays.first() {
        return Err(user_err!(
            "{} holds {} file(s) this run would not write ({first}{}), left by a run with other flags; use a fresh \
             --out or remove them",
            dir.display(),
            strays.len(),
            if strays.len() > 1 { ", ..." } else { "" }
        ));
    }
    Ok(())
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

fn mask_file(method: Method, index: usize) -> String {
    format!("ground_truth/{}/{index:03}_mask.png", method.name())
}

fn mask_meaning(method: Method) -> &'static str {
    match method {
        Method::Cutpaste => "the pasted footprint (the cut rectangle, rotated when rotation is drawn)",
        Method::Draem => "the thresholded Perlin-noise region the texture was laid over",
        Method::Nsa => {
            "the blended pixels that changed by more than nsa.threshold grey levels, specks under nsa.min_component \
             pixels dropped"
        }
    }
}

fn method_config(method: Method, cfg: &SynthConfig) -> Result<serde_json::Value> {
    Ok(match method {
        Method::Cutpaste => serde_json::to_value(&cfg.cutpaste)?,
        Method::Draem => serde_json::to_value(&cfg.draem)?,
        Method::Nsa => serde_json::to_value(&cfg.nsa)?,
    })
}

/// Where DRAEM's textures and NSA's donors come from.
struct Pools<'a> {
    /// Per category: the other normals of the category to take NSA patches (and same-category
    /// textures) from: its anomaly sources, or all its normals when it has only one source.
    donors: BTreeMap<&'a str, &'a [PathBuf]>,
    /// Per category: DRAEM's texture images.
    textures: BTreeMap<&'a str, Vec<&'a PathBuf>>,
}

impl<'a> Pools<'a> {
    fn new(categories: &'a [Category], texture: Option<TextureSource>) -> Self {
        let donors: BTreeMap<&str, &[PathBuf]> = categories
            .iter()
            .map(|c| (c.name.as_str(), if c.sources.len() >= 2 { &c.sources[..] } else { &c.normals[..] }))
            .collect();
        let textures = categories
            .iter()
            .map(|c| {
                let pool: Vec<&PathBuf> = match texture {
                    Some(TextureSource::OtherCategory) => {
                        categories.iter().filter(|o| o.name != c.name).flat_map(|o| &o.normals).collect()
                    }
                    _ => donors[c.name.as_str()].iter().collect(),
                };
                (c.name.as_str(), pool)
            })
            .collect();
        Pools { donors, textures }
    }
}

/// A random member of `pool` other than `own` (there always is one: a category has ≥ 2 normals).
fn pick_other<'p>(pool: &[&'p PathBuf], own: &Path, rng: &mut impl Rng) -> Result<&'p PathBuf> {
    let me = pool.iter().position(|p| p.as_path() == own);
    let n = pool.len() - usize::from(me.is_some());
    if n == 0 {
        return Err(user_err!("no other normal image to draw from besides {}", own.display()));
    }
    let mut k = rng.random_range(0..n);
    if me.is_some_and(|m| k >= m) {
        k += 1;
    }
    Ok(pool[k])
}

fn make_sample(job: &Job, o: &Options, cfg: &SynthConfig, pools: &Pools, out: &Path) -> Result<Outcome> {
    let cat = &job.cat.name;
    let mut rng = sample_rng(o.seed, o.method.name(), cat, job.index);
    let src = Img::from_dynamic(&image_io::load(job.source)?);
    let other_path = match o.method {
        Method::Cutpaste => None,
        Method::Draem => Some(pick_other(&pools.textures[cat.as_str()], job.source, &mut rng)?),
        Method::Nsa => {
            let pool: Vec<&PathBuf> = pools.donors[cat.as_str()].iter().collect();
            Some(pick_other(&pool, job.source, &mut rng)?)
        }
    };
    let other_img = match other_path {
        Some(p) => Some(Img::from_dynamic(&image_io::load(p)?).with_channels(src.ch)),
        None => None,
    };
    let other = match (o.method, &other_img) {
        (Method::Draem, Some(t)) => Other::Texture(t),
        (Method::Nsa, Some(d)) => Other::Donor(d),
        _ => Other::None,
    };
    let Some((s, tries)) = generate(o.method, &src, &other, cfg, &mut rng)? else {
        return Ok(Outcome::Skipped(Skipped { index: job.index, source: job.source.to_path_buf() }));
    };
    let dir = out.join(cat);
    let image_rel = format!("test/{}/{:03}.png", o.method.name(), job.index);
    let mask_rel = mask_file(o.method, job.index);
    image_io::save_dynamic_atomic(&s.image.to_dynamic(), &dir.join(&image_rel))?;
    let mask_px: Vec<u8> = s.mask.iter().map(|&m| if m { 255 } else { 0 }).collect();
    let mask_img = image::GrayImage::from_raw(src.w as u32, src.h as u32, mask_px).expect("w·h mask pixels");
    image_io::save_dynamic_atomic(&image::DynamicImage::ImageLuma8(mask_img), &dir.join(&mask_rel))?;
    let info = mask::from_pixels(&s.mask, src.w, src.h);
    let on = s.mask.iter().filter(|&&m| m).count();
    Ok(Outcome::Kept(SampleRecord {
        index: job.index,
        image: image_rel,
        mask: mask_rel,
        source: job.source.to_path_buf(),
        texture: other_path.filter(|_| o.method == Method::Draem).cloned(),
        donor: other_path.filter(|_| o.method == Method::Nsa).cloned(),
        tries,
        mask_area: on as f64 / (src.w * src.h) as f64,
        changed: s.changed_share(&src),
        boxes: info.boxes,
        params: s.params,
    }))
}

/// A contact-sheet tile, read back from the written files.
fn tile(cat_dir: &Path, r: &SampleRecord) -> Result<sheet::Tile> {
    let mask_img = image_io::load(&cat_dir.join(&r.mask))?.to_luma8();
    Ok(sheet::Tile {
        source: image_io::load(&r.source)?,
        image: image_io::load(&cat_dir.join(&r.image))?,
        mask: mask_img.pixels().map(|p| p.0[0] > 127).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_images::noise;
    use super::*;

    /// An MVTec-layout folder: `cats` categories of `n` 32 × 32 noise images each (four in
    /// train/good, the rest in test/good), grey in the first category and colour in the others.
    fn dataset(dir: &Path, cats: usize, n: usize) {
        for c in 0..cats {
            for i in 0..n {
                let sub = if i < 4 { "train/good" } else { "test/good" };
                let img = noise(32, 32, if c == 0 { 1 } else { 3 }, (c * 100 + i) as u32);
                let p = dir.join(format!("cat{c}/{sub}/{i:03}.png"));
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                img.to_dynamic().save(&p).unwrap();
            }
        }
    }

    fn opts(root: &Path, out: &Path, method: Method, seed: u64) -> Options {
        Options {
            source: Source::Mvtec,
            root: root.to_path_buf(),
            out: out.to_path_buf(),
            method,
            per_image: 2,
            seed,
            config: None,
            limit: 0,
            contact_sheet: None,
            sheet_count: 16,
        }
    }

    /// Every file under `dir`, relative path → bytes.
    fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut m = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    m.insert(p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap());
                }
            }
        }
        m
    }

    #[test]
    fn every_method_writes_the_layout_and_its_boxes_enclose_its_masks() {
        let data = tempfile::tempdir().unwrap();
        dataset(data.path(), 2, 10);
        let out = tempfile::tempdir().unwrap();
        for method in [Method::Cutpaste, Method::Draem, Method::Nsa] {
            let s = run(&opts(data.path(), out.path(), method, 3), true).unwrap();
            // 10 normals: 2 train/good, 2 test/good, 6 sources × 2 per image.
            assert_eq!(s.categories.len(), 2);
            for c in &s.categories {
                assert_eq!((c.normals, c.train_good, c.test_good, c.sources), (10, 2, 2, 6), "{method:?}");
                assert_eq!(c.samples + c.skipped, 12);
                assert!(c.samples >= 10, "{method:?} {}: only {} kept", c.category, c.samples);
            }
            for cat in ["cat0", "cat1"] {
                let dir = out.path().join(cat);
                let m: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(dir.join(format!("synth-{}.json", method.name()))).unwrap())
                        .unwrap();
                for sample in m["samples"].as_array().unwrap() {
                    let image = image_io::load(&dir.join(sample["image"].as_str().unwrap())).unwrap();
                    let src = image_io::load(Path::new(sample["source"].as_str().unwrap())).unwrap();
                    assert_eq!(image.color(), src.color(), "grey stays grey, colour stays colour");
                    let mask = image_io::load(&dir.join(sample["mask"].as_str().unwrap())).unwrap().to_luma8();
                    assert_eq!(mask.dimensions(), (32, 32));
                    assert!(mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
                    let boxes: Vec<[f64; 4]> = serde_json::from_value(sample["boxes"].clone()).unwrap();
                    assert!(!boxes.is_empty());
                    let mut on = 0;
                    for (x, y, p) in mask.enumerate_pixels() {
                        if p.0[0] == 255 {
                            on += 1;
                            let (x, y) = (x as f64 + 0.5, y as f64 + 0.5);
                            assert!(
                                boxes.iter().any(|b| (b[0]..=b[2]).contains(&x) && (b[1]..=b[3]).contains(&y)),
                                "{method:?}: mask pixel ({x}, {y}) outside every box {boxes:?}"
                            );
                        }
                    }
                    // Each box is tight: some mask pixel lies on each of its edges.
                    for b in &boxes {
                        let inside = |x: u32, y: u32| mask.get_pixel(x, y).0[0] == 255;
                        let (x0, y0, x1, y1) = (b[0] as u32, b[1] as u32, b[2] as u32 - 1, b[3] as u32 - 1);
                        assert!((y0..=y1).any(|y| inside(x0, y)) && (y0..=y1).any(|y| inside(x1, y)));
                        assert!((x0..=x1).any(|x| inside(x, y0)) && (x0..=x1).any(|x| inside(x, y1)));
                    }
                    assert!((sample["mask_area"].as_f64().unwrap() - on as f64 / 1024.0).abs() < 1e-12);
                    if method == Method::Draem {
                        // Textures come from the other category.
                        let t = sample["texture"].as_str().unwrap();
                        assert!(!t.contains(&format!("/{cat}/")), "{t}");
                    }
                }
            }
        }
        // The data build reads the tree: one anomaly folder per method in each category.
        let samples = mvtec::load(out.path(), 0).unwrap();
        let defects: BTreeSet<String> = samples.iter().filter_map(|s| s.defect_type.clone()).collect();
        assert_eq!(defects, ["cutpaste", "draem", "nsa"].map(String::from).into_iter().collect());
        assert!(samples.iter().filter(|s| s.defect_type.is_some()).all(|s| s.mask.is_some()));
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_files_and_methods_share_the_split() {
        let data = tempfile::tempdir().unwrap();
        dataset(data.path(), 1, 8);
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        for (d, seed) in dirs.iter().zip([7, 7, 8]) {
            run(&opts(data.path(), d.path(), Method::Cutpaste, seed), true).unwrap();
        }
        let (a, b, c) = (tree(dirs[0].path()), tree(dirs[1].path()), tree(dirs[2].path()));
        assert!(a == b, "the same seed must give byte-identical files");
        let anomaly = Path::new("cat0/test/cutpaste/000.png");
        assert_ne!(a[anomaly], c[anomaly], "another seed must draw another anomaly");

        // A second method into the same folder: train/good, test/good and the split are unchanged.
        run(&opts(data.path(), dirs[0].path(), Method::Nsa, 7), true).unwrap();
        let after = tree(dirs[0].path());
        for (p, bytes) in &a {
            assert_eq!(&after[p], bytes, "{} changed", p.display());
        }
        assert!(after.keys().any(|p| p.starts_with("cat0/test/nsa")));
        // Another seed into the same folder would mix two splits: refused.
        let err = run(&opts(data.path(), dirs[0].path(), Method::Draem, 9), true).unwrap_err();
        assert!(crate::error::is_user_error(&err));
        assert!(format!("{err:#}").contains("synth-split.json"), "{err:#}");
    }

    #[test]
    fn limit_caps_sources_and_strays_are_refused() {
        let data = tempfile::tempdir().unwrap();
        dataset(data.path(), 1, 8);
        let out = tempfile::tempdir().unwrap();
        let mut o = opts(data.path(), out.path(), Method::Cutpaste, 0);
        o.limit = 1;
        let s = run(&o, true).unwrap();
        assert_eq!((s.categories[0].sources, s.samples + s.skipped), (1, 2));
        std::fs::write(out.path().join("cat0/test/cutpaste/999.png"), b"x").unwrap();
        let err = format!("{:#}", run(&o, true).unwrap_err());
        assert!(err.contains("999.png") && err.contains("test/cutpaste"), "{err}");
        // --out inside --root is refused before anything is written.
        let inside = opts(data.path(), &data.path().join("synth"), Method::Cutpaste, 0);
        assert!(format!("{:#}", run(&inside, true).unwrap_err()).contains("overlap"));
    }
}
