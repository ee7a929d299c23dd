//! `sage map --eval --data D` (ARCHITECTURE.md §6): the training-free anomaly map scored over a
//! labelled dataset, the general form of `--eval-elpv` ([`super::elpv`]).
//!
//! `D` is a folder in the MVTec AD layout ([`mvtec::load`]: one seeded `train/good` reference per
//! test image) or a data file any reader takes, its format guessed (AD-PL as `sage data build`
//! writes it, MANTA, MMAD). Every labelled sample's test image is compared with its reference
//! image (a sample without one with itself: zero-shot, counted) by an [`AnomalyMapper`]. Per
//! category:
//!
//! - image AUROC: each patch map's maximum against the labels (the score `sage map` prints and
//!   `--eval-elpv` ranks);
//! - where the category has masks (any of its samples has one): the patch map, upsampled
//!   bilinearly to the mask's pixels ([`upsample`]) and smoothed with a Gaussian of σ pixels
//!   ([`gaussian_blur`]; PatchCore's σ = 4, 0 = none), is scored against the mask: pixel AUROC
//!   ([`MapMetrics`]) and AUPRO up to FPR 0.3 ([`Pro`]). Normal images of such a category count
//!   as all background (MVTec AD's convention); an anomalous image without a mask counts for
//!   image AUROC only (`anomalous_unmasked`).
//!
//! Each metric is reported per category, pooled over every image (`overall`), and as the mean
//! over categories (`category_mean`, how MVTec AD results are usually quoted).
//!
//! Memory: the pooled pixel metrics hold 12 bytes per evaluated pixel until the end (4 for pixel
//! AUROC, 8 for PRO), plus the slack of growing vectors. Small sets are cheap (300 images of
//! 300×300: ~320 MB), but MVTec AD's 1,725 test images at full resolution (~1.6 G pixels) need
//! ~20 GB; `mask_side` evaluates at a smaller size (256: ~1.4 GB), as PatchCore and anomalib do.

use super::maps::MapMetrics;
use super::pro::{Pro, FPR_LIMIT};
use crate::data::format::{guess_format, load_samples, DataFormat};
use crate::data::mvtec;
use crate::data::sample::{Label, Sample};
use crate::image_io;
use crate::models::anomaly_map::AnomalyMapper;
use crate::models::efficientnet::PatchTokens;
use crate::models::foreground::Masking;
use crate::models::memory_bank::{DeviceBank, MemoryBank};
use crate::models::reference_views::ReferenceViews;
use crate::ops::similarity::Reduce;
use crate::opset::StepOps;
use crate::user_bail;
use anyhow::{Context, Result};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What `--data` names, read.
#[derive(Clone, Debug)]
pub struct MapDataset {
    pub path: PathBuf,
    /// `mvtec` (a folder), or the data file's format: `adpl`, `manta`, `mmad`.
    pub format: &'static str,
    /// The MVTec loader's reference seed; `None` for a data file (its references are its own).
    pub seed: Option<u64>,
    pub samples: Vec<Sample>,
}

/// What `--data` must be, for the messages.
const EXPECTED: &str = "expected a folder in the MVTec AD layout (<category>/train/good, <category>/test/<defect>, \
<category>/ground_truth/<defect>) or a data file (AD-PL JSON as `sage data build` writes it, MANTA JSON, or MMAD's \
mmad.json)";

/// Reads `path`: an MVTec AD folder (references drawn with `seed`) or a data file (format
/// guessed; image paths relative to `image_root`, default the file's folder). Anything else is a
/// user error naming the path and what was expected.
pub fn load_dataset(path: &Path, seed: u64, image_root: Option<&Path>) -> Result<MapDataset> {
    if path.is_dir() {
        let samples = mvtec::load(path, seed).with_context(|| format!("--data {}: {EXPECTED}", path.display()))?;
        return Ok(MapDataset { path: path.into(), format: "mvtec", seed: Some(seed), samples });
    }
    if !path.is_file() {
        user_bail!("--data {}: no such file or folder; {EXPECTED}", path.display());
    }
    let format = guess_format(path).with_context(|| format!("--data {}: {EXPECTED}", path.display()))?;
    let samples = load_samples(path, Some(format), image_root)?;
    let format = match format {
        DataFormat::Adpl => "adpl",
        DataFormat::Manta => "manta",
        DataFormat::Mmad => "mmad",
    };
    Ok(MapDataset { path: path.into(), format, seed: None, samples })
}

/// How the maps are scored.
#[derive(Clone, Debug)]
pub struct MapEvalOptions {
    /// The Gaussian's σ in evaluated pixels (0: no smoothing).
    pub sigma: f32,
    /// At most this many samples of each category and label, in data order (0: all).
    pub limit: usize,
    /// Evaluate pixels at this size on the shorter side when a mask is larger (0: the mask's own).
    pub mask_side: usize,
    /// Write each test image's heat map here, as `<sample id>.png`.
    pub out_maps: Option<PathBuf>,
    /// The encoder's name, for the report.
    pub encoder: String,
    /// Score every sample of a category against one memory bank of the category's first `k`
    /// distinct reference images (in sample order) instead of its own reference.
    pub shots: Option<usize>,
    /// The views of each reference that bank holds.
    pub reference_views: ReferenceViews,
    /// With a bank: background masking (`Masking::Pca`: the references' background patches stay
    /// out of the bank and a test image's background patches score 0, as AnomalyDINO does).
    pub masking: Masking,
}

impl MapEvalOptions {
    /// Refuses what cannot work, naming the flag.
    pub fn check(&self) -> Result<()> {
        if !(self.sigma.is_finite() && (0.0..=64.0).contains(&self.sigma)) {
            user_bail!("--sigma {}: must be a number in [0, 64] (pixels; 0 = no smoothing)", self.sigma);
        }
        if self.shots == Some(0) {
            user_bail!("--shots 0: a memory bank needs at least one reference image");
        }
        if self.masking != Masking::None && self.shots.is_none() {
            user_bail!("--masking {}: masking needs a memory bank (--shots K)", self.masking);
        }
        Ok(())
    }
}

/// The report; `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct MapEvalReport {
    pub data: PathBuf,
    /// `mvtec`, `adpl`, `manta` or `mmad`.
    pub format: &'static str,
    pub encoder: String,
    /// What ran the encoder and the search (`Buffers::describe`).
    pub device: String,
    pub reduce: Reduce,
    /// The smoothing Gaussian's σ in evaluated pixels (0: none).
    pub sigma: f32,
    /// PRO is the area under the PRO curve up to this false-positive rate, divided by it.
    pub pro_fpr_limit: f64,
    /// Samples per category and label (0: all).
    pub limit: usize,
    /// The shorter side pixels were evaluated at when a mask was larger (0: each mask's own size).
    pub mask_side: usize,
    /// The MVTec loader's reference seed (`null` for a data file).
    pub seed: Option<u64>,
    /// With a memory bank: the references per category it holds (`null`: each sample against its
    /// own reference).
    pub shots: Option<usize>,
    /// The views of each reference in that bank (`null` without one).
    pub reference_views: Option<ReferenceViews>,
    /// Background masking (`none` without a bank).
    pub masking: Masking,
    /// With masking: the share of the scored images' patches on the foreground (the rest score 0).
    pub foreground_share: Option<f64>,
    /// Every scored image pooled.
    pub overall: Scores,
    /// Each metric's mean over the categories that have it.
    pub category_mean: CategoryMean,
    pub per_category: Vec<CategoryScores>,
    /// Samples without a label, not scored.
    pub unlabelled: usize,
    pub seconds: f64,
}

/// The metrics of a set of images and what they were computed from; a metric is `None` when a
/// class it needs is missing (no normal or no anomalous image; no defect region or no normal
/// pixel).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Scores {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    /// AUPRO up to FPR `pro_fpr_limit`, normalised (1 = every region found before any false positive).
    pub pro: Option<f64>,
    /// Scored images (image AUROC's population) and the anomalous ones among them.
    pub images: usize,
    pub anomalous: usize,
    /// Images in the pixel metrics (with a mask, or normal in a category with masks) and their
    /// connected defect regions, pixels and defect pixels.
    pub masked: usize,
    pub regions: usize,
    pub pixels: usize,
    pub defect_pixels: usize,
    /// Anomalous images of a category with masks that have none: image AUROC only.
    pub anomalous_unmasked: usize,
    /// Images compared with themselves: their sample has no reference.
    pub zero_shot: usize,
}

/// Patches kept by the foreground mask, of all scored patches.
#[derive(Default)]
struct Foreground {
    kept: usize,
    patches: usize,
}

/// One category's [`Scores`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoryScores {
    pub category: String,
    #[serde(flatten)]
    pub scores: Scores,
}

/// Each metric averaged over the categories where it exists.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CategoryMean {
    pub image_auroc: Option<f64>,
    pub pixel_auroc: Option<f64>,
    pub pro: Option<f64>,
}

/// The category of a sample without one.
const NO_CATEGORY: &str = "(none)";

/// One set of images being scored.
#[derive(Default)]
struct Tally {
    maps: MapMetrics,
    pro: Pro,
    anomalous_unmasked: usize,
    zero_shot: usize,
}

impl Tally {
    fn scores(&mut self) -> Scores {
        let r = self.maps.report_in_place();
        Scores {
            image_auroc: r.image_auroc,
            pixel_auroc: r.pixel_auroc,
            pro: self.pro.aupro(FPR_LIMIT),
            images: r.images,
            anomalous: r.anomalous_images,
            masked: r.masked_images,
            regions: self.pro.regions(),
            pixels: r.pixels,
            defect_pixels: r.defect_pixels,
            anomalous_unmasked: self.anomalous_unmasked,
            zero_shot: self.zero_shot,
        }
    }

    fn merge(&mut self, other: Tally) {
        self.maps.merge(other.maps);
        self.pro.merge(other.pro);
        self.anomalous_unmasked += other.anomalous_unmasked;
        self.zero_shot += other.zero_shot;
    }
}

/// Scores every labelled sample of `data` (at most `o.limit` of each category and label).
pub fn evaluate<O: StepOps>(
    mapper: &AnomalyMapper<O>,
    data: &MapDataset,
    o: &MapEvalOptions,
    quiet: bool,
) -> Result<MapEvalReport> {
    o.check()?;
    let t0 = std::time::Instant::now();
    let category = |s: &Sample| s.category.clone().unwrap_or_else(|| NO_CATEGORY.to_string());
    let with_masks: BTreeSet<String> = data.samples.iter().filter(|s| s.mask.is_some()).map(category).collect();
    let mut by_category: BTreeMap<String, Vec<(&Sample, bool)>> = BTreeMap::new();
    let mut taken: HashMap<(String, bool), usize> = HashMap::new();
    let mut unlabelled = 0;
    for s in &data.samples {
        let Some(label) = s.label else {
            unlabelled += 1;
            continue;
        };
        let anomalous = label == Label::Anomalous;
        let n = taken.entry((category(s), anomalous)).or_default();
        if o.limit > 0 && *n >= o.limit {
            continue;
        }
        *n += 1;
        by_category.entry(category(s)).or_default().push((s, anomalous));
    }
    let total: usize = by_category.values().map(Vec::len).sum();
    if total == 0 {
        user_bail!(
            "{}: no sample has a label (normal or anomalous), so there is nothing to score",
            data.path.display()
        );
    }
    let pb = crate::util::progress_bar(total as u64, "map eval", quiet);
    let mut all = Tally::default();
    let mut foreground = Foreground::default();
    let mut per_category = Vec::new();
    for (name, samples) in &by_category {
        let masked = with_masks.contains(name);
        let mut tally = Tally::default();
        // References repeat within a category; their tokens are computed once per category.
        let mut references: HashMap<&Path, PatchTokens> = HashMap::new();
        let bank = match o.shots {
            Some(k) => {
                Some(category_bank(mapper, name, samples, k, o.reference_views, o.masking)?.on(mapper.encoder.ops())?)
            }
            None => None,
        };
        for &(s, anomalous) in samples {
            let scored = Scored { anomalous, category_has_masks: masked };
            score_sample(mapper, bank.as_ref(), s, scored, o, &mut references, &mut tally, &mut foreground)?;
            pb.inc(1);
        }
        per_category.push(CategoryScores { category: name.clone(), scores: tally.scores() });
        all.merge(tally);
    }
    pb.finish_and_clear();
    let mean = |f: fn(&Scores) -> Option<f64>| super::mean_of(per_category.iter().map(|c| f(&c.scores)));
    let category_mean = CategoryMean {
        image_auroc: mean(|s| s.image_auroc),
        pixel_auroc: mean(|s| s.pixel_auroc),
        pro: mean(|s| s.pro),
    };
    Ok(MapEvalReport {
        data: data.path.clone(),
        format: data.format,
        encoder: o.encoder.clone(),
        device: mapper.encoder.ops().describe(),
        reduce: mapper.reduce,
        sigma: o.sigma,
        pro_fpr_limit: FPR_LIMIT,
        limit: o.limit,
        mask_side: o.mask_side,
        seed: data.seed,
        shots: o.shots,
        reference_views: o.shots.map(|_| o.reference_views),
        masking: o.masking,
        foreground_share: (o.masking != Masking::None)
            .then(|| foreground.kept as f64 / foreground.patches.max(1) as f64),
        overall: all.scores(),
        category_mean,
        per_category,
        unlabelled,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// What scoring needs of a map, from a pair or a bank.
struct BankMap {
    grid_h: usize,
    grid_w: usize,
    map: Vec<f32>,
    score: f32,
}

impl From<crate::models::anomaly_map::AnomalyMap> for BankMap {
    fn from(m: crate::models::anomaly_map::AnomalyMap) -> BankMap {
        BankMap { grid_h: m.grid_h, grid_w: m.grid_w, map: m.map, score: m.score }
    }
}

/// A memory bank of every patch of each view of the category's first `k` distinct reference
/// images, in sample order (with masking, their foreground patches only).
fn category_bank<O: StepOps>(
    mapper: &AnomalyMapper<O>,
    category: &str,
    samples: &[(&Sample, bool)],
    k: usize,
    views: ReferenceViews,
    masking: Masking,
) -> Result<MemoryBank> {
    let mut seen: Vec<&Path> = Vec::new();
    for (s, _) in samples {
        if let Some(r) = &s.reference_image {
            if !seen.contains(&r.as_path()) && seen.len() < k {
                seen.push(r);
            }
        }
    }
    if seen.len() < k {
        user_bail!(
            "--shots {k}: category `{category}` has {} distinct reference images; give at most that many",
            seen.len()
        );
    }
    let mut bank: Option<MemoryBank> = None;
    for r in seen {
        let imgs = views.of(&image_io::load(r)?);
        let imgs: Vec<_> = imgs.iter().collect();
        let (tokens, masks) = match masking {
            Masking::None => (mapper.encoder.tokens(&imgs)?, Vec::new()),
            Masking::Pca => mapper.encoder.tokens_and_foreground(&imgs)?,
        };
        for (i, t) in tokens.iter().enumerate() {
            let bank = bank.get_or_insert_with(|| MemoryBank::new(t.dim));
            match masks.get(i) {
                Some(keep) => bank.push_masked(&t.data, keep)?,
                None => bank.push(&t.data)?,
            }
        }
    }
    let bank = bank.expect("k ≥ 1 references");
    if bank.is_empty() {
        user_bail!(
            "--masking {masking}: the foreground masks of category `{category}`'s {k} references left no patch for \
             the bank; run without masking"
        );
    }
    Ok(bank)
}

/// A scored sample's label and whether its category has masks.
#[derive(Clone, Copy)]
struct Scored {
    anomalous: bool,
    category_has_masks: bool,
}

/// Maps one sample (against `bank`, else its own reference) and adds it to `tally`.
#[allow(clippy::too_many_arguments)]
fn score_sample<'a, O: StepOps>(
    mapper: &AnomalyMapper<O>,
    bank: Option<&DeviceBank<O>>,
    s: &'a Sample,
    Scored { anomalous, category_has_masks }: Scored,
    o: &MapEvalOptions,
    references: &mut HashMap<&'a Path, PatchTokens>,
    tally: &mut Tally,
    foreground: &mut Foreground,
) -> Result<()> {
    let test_img = image_io::load(&s.test_image)?;
    let (test, keep) = match o.masking {
        Masking::None => (mapper.tokens(&test_img)?, None),
        Masking::Pca => {
            let (mut t, mut m) = mapper.encoder.tokens_and_foreground(&[&test_img])?;
            (t.remove(0), m.pop())
        }
    };
    let m = match (bank, &s.reference_image) {
        (Some(bank), _) => {
            let mut map = bank.anomaly_maps(&[&test.data])?.remove(0);
            if let Some(keep) = &keep {
                // Background patches do not score (AnomalyDINO leaves them out of the search).
                foreground.kept += keep.iter().filter(|&&k| k).count();
                foreground.patches += keep.len();
                map.iter_mut().zip(keep).filter(|(_, &k)| !k).for_each(|(v, _)| *v = 0.0);
            }
            let score = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            BankMap { grid_h: test.h, grid_w: test.w, map, score }
        }
        (None, Some(r)) => {
            if !references.contains_key(r.as_path()) {
                references.insert(r.as_path(), mapper.tokens(&image_io::load(r)?)?);
            }
            BankMap::from(mapper.compare(&test, references.get(r.as_path()))?)
        }
        (None, None) => {
            tally.zero_shot += 1;
            BankMap::from(mapper.compare(&test, None)?)
        }
    };
    tally.maps.add(&m.map, Some(anomalous), None)?;
    if let Some(dir) = &o.out_maps {
        let lo = m.map.iter().copied().fold(f32::INFINITY, f32::min);
        let png = image_io::overlay_heatmap(&test_img, &m.map, m.grid_h, m.grid_w, lo, m.score, 0.45);
        image_io::save_atomic(&png, &dir.join(format!("{}.png", file_name(&s.id))))?;
    }
    if !category_has_masks {
        return Ok(());
    }
    let (tw, th) = (test_img.width() as usize, test_img.height() as usize);
    let (on, w, h) = match &s.mask {
        Some(path) => {
            let mask = image_io::load(path)?.to_luma8();
            let (w, h) = (mask.width() as usize, mask.height() as usize);
            if ((w * th) as f64 / (h * tw) as f64 - 1.0).abs() > 0.02 {
                user_bail!(
                    "mask {} is {w}×{h} but its test image {} is {tw}×{th}: a mask must have its image's aspect \
                     ratio",
                    path.display(),
                    s.test_image.display()
                );
            }
            let on: Vec<bool> = mask.as_raw().iter().map(|&v| v > 127).collect();
            let (nw, nh) = eval_size(w, h, o.mask_side);
            (resize_mask(&on, w, h, nw, nh), nw, nh)
        }
        None if !anomalous => {
            let (nw, nh) = eval_size(tw, th, o.mask_side);
            (vec![false; nw * nh], nw, nh)
        }
        None => {
            tally.anomalous_unmasked += 1;
            return Ok(());
        }
    };
    let pixels = pixel_map(&m.map, m.grid_h, m.grid_w, h, w, o.sigma);
    tally.maps.add(&pixels, None, Some(&on))?;
    tally.pro.add(&pixels, &on, w, h)
}

/// A sample id as a file name: every character but letters, digits, `-`, `_` and `.` becomes `_`
/// (`bottle/broken_large/000` → `bottle_broken_large_000`).
fn file_name(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect()
}

/// The size a `w × h` mask is evaluated at: its own, or with `side` > 0 and a longer shorter
/// side, scaled so that the shorter side is `side`.
pub fn eval_size(w: usize, h: usize, side: usize) -> (usize, usize) {
    let short = w.min(h);
    if side == 0 || short <= side {
        return (w, h);
    }
    let scale = side as f64 / short as f64;
    (((w as f64 * scale).round() as usize).max(1), ((h as f64 * scale).round() as usize).max(1))
}

/// Nearest-neighbour resize of a row-major mask: output pixel (x, y) takes the source pixel under
/// its centre, (⌊(x + ½)·w/nw⌋, ⌊(y + ½)·h/nh⌋).
pub fn resize_mask(on: &[bool], w: usize, h: usize, nw: usize, nh: usize) -> Vec<bool> {
    if (nw, nh) == (w, h) {
        return on.to_vec();
    }
    let src = |o: usize, n: usize, no: usize| (((o as f64 + 0.5) * n as f64 / no as f64) as usize).min(n - 1);
    let columns: Vec<usize> = (0..nw).map(|x| src(x, w, nw)).collect();
    let columns = columns.as_slice();
    (0..nh)
        .flat_map(move |y| {
            let row = src(y, h, nh) * w;
            columns.iter().map(move |&x| on[row + x])
        })
        .collect()
}

/// A patch map on an `h × w` image's pixels, smoothed: [`upsample`], then [`gaussian_blur`] with
/// `sigma` (0: none).
pub fn pixel_map(map: &[f32], gh: usize, gw: usize, h: usize, w: usize, sigma: f32) -> Vec<f32> {
    gaussian_blur(&upsample(map, gh, gw, h, w), w, h, sigma)
}

/// A `gh × gw` patch map on the pixels of an `h × w` image, bilinear with pixel centres aligned
/// (PyTorch's `align_corners=False`, clamped at the edges).
///
/// The encoder sees the image's central square (its preprocessing resizes the shorter side and
/// crops the centre), so the grid covers the central `min(h, w)²` square; pixels beside it, in a
/// non-square image, take the values of the grid's nearest edge. On a square image this is
/// `ops::pool::resize_bilinear`.
pub fn upsample(map: &[f32], gh: usize, gw: usize, h: usize, w: usize) -> Vec<f32> {
    assert_eq!(map.len(), gh * gw, "a {gh}×{gw} map has {} values", map.len());
    let side = h.min(w) as f64;
    // Per output row (column): the two grid rows (columns) it lies between and the weight of the second.
    let axis = |n: usize, grid: usize| -> Vec<(usize, usize, f32)> {
        let offset = (n as f64 - side) / 2.0;
        (0..n)
            .map(|o| {
                let f = ((o as f64 + 0.5 - offset) * grid as f64 / side - 0.5).clamp(0.0, (grid - 1) as f64);
                let i = f as usize;
                (i, (i + 1).min(grid - 1), (f - i as f64) as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(h, gh), axis(w, gw));
    let mut out = Vec::with_capacity(h * w);
    for &(y0, y1, ty) in &ys {
        let (r0, r1) = (&map[y0 * gw..][..gw], &map[y1 * gw..][..gw]);
        for &(x0, x1, tx) in &xs {
            let top = r0[x0] * (1.0 - tx) + r0[x1] * tx;
            let bottom = r1[x0] * (1.0 - tx) + r1[x1] * tx;
            out.push(top * (1.0 - ty) + bottom * ty);
        }
    }
    out
}

/// Index `i` of a length-`n` axis extended by reflection about the edges' outer sides
/// (`d c b a | a b c d | d c b a`, scipy.ndimage's `reflect` mode), for any `i`.
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - 1 - m }) as usize
}

/// A Gaussian blur of a row-major `w × h` image as `scipy.ndimage.gaussian_filter(img, sigma)`
/// computes it (what PatchCore smooths its maps with): separable, the kernel cut at 4σ (radius
/// ⌊4σ + ½⌋) and normalised to sum 1, edges extended by reflection. `sigma` ≤ 0 returns a copy.
pub fn gaussian_blur(img: &[f32], w: usize, h: usize, sigma: f32) -> Vec<f32> {
    assert_eq!(img.len(), w * h, "a {w}×{h} image has {} values", img.len());
    if sigma <= 0.0 || img.is_empty() {
        return img.to_vec();
    }
    let sigma = sigma as f64;
    let r = (4.0 * sigma + 0.5) as usize;
    let weights: Vec<f64> = (0..=2 * r)
        .map(|i| {
            let x = i as f64 - r as f64;
            (-0.5 * x * x / (sigma * sigma)).exp()
        })
        .collect();
    let z: f64 = weights.iter().sum();
    let k: Vec<f32> = weights.iter().map(|v| (v / z) as f32).collect();
    // Along the rows.
    let mut across = vec![0.0f32; w * h];
    across.par_chunks_mut(w).zip(img.par_chunks(w)).for_each(|(dst, src)| {
        let padded: Vec<f32> = (0..w + 2 * r).map(|i| src[reflect(i as isize - r as isize, w)]).collect();
        for (x, d) in dst.iter_mut().enumerate() {
            *d = padded[x..x + k.len()].iter().zip(&k).map(|(a, b)| a * b).sum();
        }
    });
    // Down the columns, a whole row at a time.
    let mut out = vec![0.0f32; w * h];
    out.par_chunks_mut(w).enumerate().for_each(|(y, dst)| {
        for (j, &kj) in k.iter().enumerate() {
            let src = &across[reflect(y as isize + j as isize - r as isize, h) * w..][..w];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += kj * s);
        }
    });
    out
}

impl MapEvalReport {
    /// The report as a table, for people.
    pub fn render_text(&self) -> String {
        let mut t = String::new();
        let mut source = match self.seed {
            Some(seed) => format!("{} layout, references drawn with seed {seed}", self.format),
            None => format!("{} file", self.format),
        };
        if let Some(k) = self.shots {
            source.push_str(&format!("; each category against a memory bank of its first {k} references"));
            if let Some(v) = self.reference_views.filter(|&v| v != ReferenceViews::Identity) {
                source.push_str(&format!(" ({} {v} views of each)", v.count()));
            }
        }
        if let Some(f) = self.foreground_share {
            source.push_str(&format!(
                "; background masked ({}): {:.1}% of the scored patches on the foreground, the rest score 0",
                self.masking,
                100.0 * f
            ));
        }
        let size = match self.mask_side {
            0 => "pixels at each mask's size".to_string(),
            n => format!("pixels at most {n} on the shorter side"),
        };
        let reduce =
            serde_json::to_value(self.reduce).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        let _ = writeln!(
            t,
            "Anomaly maps on {} ({source}): {} on {}, reduce {reduce}, σ {} px, {size}; PRO = AUPRO up to FPR {}",
            self.data.display(),
            self.encoder,
            self.device,
            self.sigma,
            self.pro_fpr_limit
        );
        let width = self.per_category.iter().map(|c| c.category.chars().count()).max().unwrap_or(0).max(20);
        let _ = writeln!(
            t,
            "{:<width$} {:>7} {:>9} {:>7} {:>7} {:>9} {:>11} {:>11} {:>7}",
            "category", "images", "anomalous", "masked", "regions", "zero-shot", "image AUROC", "pixel AUROC", "PRO"
        );
        let row = |t: &mut String, name: &str, s: &Scores| {
            let _ = writeln!(
                t,
                "{name:<width$} {:>7} {:>9} {:>7} {:>7} {:>9} {:>11} {:>11} {:>7}",
                s.images,
                s.anomalous,
                s.masked,
                s.regions,
                s.zero_shot,
                super::num(s.image_auroc, 4),
                super::num(s.pixel_auroc, 4),
                super::num(s.pro, 4)
            );
        };
        for c in &self.per_category {
            row(&mut t, &c.category, &c.scores);
        }
        row(&mut t, "all images (pooled)", &self.overall);
        let m = &self.category_mean;
        let _ = writeln!(
            t,
            "{:<width$} {:>43} {:>11} {:>11} {:>7}",
            "mean over categories",
            "",
            super::num(m.image_auroc, 4),
            super::num(m.pixel_auroc, 4),
            super::num(m.pro, 4)
        );
        let mut notes = Vec::new();
        if self.overall.anomalous_unmasked > 0 {
            notes
                .push(format!("{} anomalous images without a mask: image AUROC only", self.overall.anomalous_unmasked));
        }
        if self.unlabelled > 0 {
            notes.push(format!("{} samples without a label skipped", self.unlabelled));
        }
        let notes = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
        let _ = writeln!(
            t,
            "{} images scored, {} pixels in the pixel metrics, in {:.1} s{notes}",
            self.overall.images, self.overall.pixels, self.seconds
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_two_by_two_to_four_by_four_by_hand() {
        // Output pixel o sits at grid coordinate (o + ½)·2/4 − ½ = −0.25, 0.25, 0.75, 1.25, clamped
        // to [0, 1]: each row is [a, ¾a + ¼b, ¼a + ¾b, b]; the rows mix the same way.
        let up = upsample(&[0.0, 4.0, 8.0, 12.0], 2, 2, 4, 4);
        #[rustfmt::skip]
        assert_eq!(up, [
            0.0, 1.0, 3.0, 4.0,
            2.0, 3.0, 5.0, 6.0,
            6.0, 7.0, 9.0, 10.0,
            8.0, 9.0, 11.0, 12.0,
        ]);
    }

    #[test]
    fn a_non_square_image_gets_the_map_on_its_central_square() {
        // 4 rows × 8 columns: the grid covers columns 2..6; columns 0, 1 and 6, 7 repeat its edges.
        let up = upsample(&[0.0, 4.0, 8.0, 12.0], 2, 2, 4, 8);
        assert_eq!(up.len(), 32);
        assert_eq!(&up[..8], &[0.0, 0.0, 0.0, 1.0, 3.0, 4.0, 4.0, 4.0]);
        assert_eq!(&up[24..], &[8.0, 8.0, 8.0, 9.0, 11.0, 12.0, 12.0, 12.0]);
        // Taller than wide: the same by rows.
        let up = upsample(&[0.0, 4.0, 8.0, 12.0], 2, 2, 8, 4);
        assert_eq!(&up[..4], &[0.0, 1.0, 3.0, 4.0]);
        assert_eq!(&up[4..8], &[0.0, 1.0, 3.0, 4.0]);
        assert_eq!(&up[28..], &[8.0, 9.0, 11.0, 12.0]);
    }

    #[test]
    fn upsampling_a_square_is_the_ops_resize() {
        let map: Vec<f32> = (0..14 * 14).map(|i| ((i * 37) % 101) as f32 / 101.0).collect();
        let ours = upsample(&map, 14, 14, 30, 30);
        let ops = crate::ops::pool::resize_bilinear(&map, 1, 14, 14, 30, 30);
        assert!(ours.iter().zip(&ops).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn constant_maps_stay_constant_at_the_masks_size() {
        for (h, w, sigma) in [(8, 8, 4.0), (37, 50, 4.0), (300, 300, 4.0), (5, 3, 0.0), (1, 1, 2.0)] {
            let px = pixel_map(&[0.3; 196], 14, 14, h, w, sigma);
            assert_eq!(px.len(), h * w);
            assert!(px.iter().all(|v| (v - 0.3).abs() < 1e-6), "{h}×{w} σ {sigma}");
        }
    }

    #[test]
    fn gaussian_blur_matches_the_kernel_by_hand() {
        // σ = 0.5: radius ⌊2.5⌋ = 2, weights ∝ 1, e^−2, e^−8 at distances 0, 1, 2.
        let (e2, e8) = ((-2.0f64).exp(), (-8.0f64).exp());
        let z = 1.0 + 2.0 * e2 + 2.0 * e8;
        let (w0, w1, w2) = (1.0 / z, e2 / z, e8 / z);
        // One row (the column pass then leaves it as it is): a 3 at x = 1 of 5.
        let out = gaussian_blur(&[0.0, 3.0, 0.0, 0.0, 0.0], 5, 1, 0.5);
        // Reflection: x = −1 reads x = 0 (0) and x = −2 reads x = 1 (3), so out[0] = 3·(w1 + w2)
        // (scipy's "reflect"; "nearest" would give 3·w1, "mirror" 6·w1).
        let want = [3.0 * (w1 + w2), 3.0 * w0, 3.0 * w1, 3.0 * w2, 0.0];
        for (o, w) in out.iter().zip(want) {
            assert!((*o as f64 - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
        // The same column-wise, and separable: a single bright pixel spreads as the outer product.
        let mut img = vec![0.0f32; 25];
        img[2 * 5 + 2] = 1.0;
        let out = gaussian_blur(&img, 5, 5, 0.5);
        let k = [w2, w1, w0, w1, w2];
        for y in 0..5 {
            for x in 0..5 {
                assert!((out[y * 5 + x] as f64 - k[y] * k[x]).abs() < 1e-6);
            }
        }
        assert_eq!(gaussian_blur(&[1.0, 2.0], 2, 1, 0.0), [1.0, 2.0]);
        // A radius far beyond the image (σ 4 → 16 on 3 pixels) keeps reflecting.
        assert_eq!((reflect(-1, 3), reflect(3, 3), reflect(-4, 3), reflect(7, 3), reflect(-17, 3)), (0, 2, 2, 1, 1));
    }

    /// A pseudo-random 7×5 image against `scipy.ndimage.gaussian_filter` (run once on the same
    /// numbers), at σ 1.5 and at σ 4, whose radius 16 reflects several times over the image.
    #[test]
    fn gaussian_blur_matches_scipy() {
        let mut x = 777u32;
        let img: Vec<f32> = (0..35)
            .map(|_| {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                ((x >> 8) % 100) as f32 / 100.0
            })
            .collect();
        for (sigma, want) in [
            (4.0, [0.5419030625271629, 0.541481837027017, 0.5382422150157977, 0.5346224028624998]),
            (1.5, [0.5534458210736543, 0.5470727107907416, 0.518147114648531, 0.527413588521305]),
        ] {
            let out = gaussian_blur(&img, 7, 5, sigma);
            for (i, w) in [0, 8, 17, 34].into_iter().zip(want) {
                assert!((out[i] as f64 - w).abs() < 1e-5, "σ {sigma} pixel {i}: {} vs {w}", out[i]);
            }
        }
    }

    #[test]
    fn masks_shrink_to_the_evaluated_size() {
        assert_eq!(eval_size(900, 900, 0), (900, 900));
        assert_eq!(eval_size(900, 900, 256), (256, 256));
        assert_eq!(eval_size(1024, 768, 256), (341, 256));
        assert_eq!(eval_size(200, 100, 256), (200, 100));
        // 4×4 → 2×2 takes source pixels 1 and 3 of each axis.
        #[rustfmt::skip]
        let m = [
            0, 0, 0, 0,
            0, 1, 0, 0,
            0, 0, 0, 0,
            0, 0, 0, 1,
        ].map(|v| v == 1);
        assert_eq!(resize_mask(&m, 4, 4, 2, 2), [true, false, false, true]);
        assert_eq!(resize_mask(&m, 4, 4, 4, 4), m);
    }

    #[test]
    fn data_paths_that_are_neither_are_refused_by_name() {
        let e = load_dataset(Path::new("/no/such/data"), 0, None).unwrap_err();
        assert!(crate::error::is_user_error(&e));
        let msg = format!("{e:#}");
        assert!(msg.contains("/no/such/data") && msg.contains("MVTec AD layout") && msg.contains("data file"), "{msg}");
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "not json").unwrap();
        let e = load_dataset(&text, 0, None).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            crate::error::is_user_error(&e) && msg.contains("notes.txt") && msg.contains("MVTec AD layout"),
            "{msg}"
        );
        let e = load_dataset(dir.path(), 0, None).unwrap_err();
        assert!(crate::error::is_user_error(&e) && format!("{e:#}").contains("train/good"), "{e:#}");
        assert_eq!(file_name("bottle/broken large/000"), "bottle_broken_large_000");
    }

    #[test]
    fn the_fixture_folder_loads_as_mvtec() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mvtec");
        let d = load_dataset(&root, 0, None).unwrap();
        assert_eq!((d.format, d.seed, d.samples.len()), ("mvtec", Some(0), 5));
    }
}
