//! `sage map --eval-elpv --shots ...`: the anomaly map's image AUROC on ELPV for each encoder ×
//! memory bank (k normal references, or a coreset of many), measured in one run on the same
//! cells, each with a 95% bootstrap interval over cells and, for every encoder but the first, the
//! paired difference from the first at the same bank.
//!
//! The protocol, per cell type (mono, poly): the normal cells (defect probability 0) in file
//! order are split by position, even positions into the reference pool and odd positions into
//! the scored normals; the scored anomalies are the cells with probability ≥ 2/3 (the 1/3 cells
//! are left out, as everywhere in sage). A k-shot bank is every patch of the first k pool cells;
//! the full-shot bank is the greedy coreset of every pool cell's patches. So every row scores the
//! same cells, and no reference is ever scored.
//!
//! A k-shot bank may hold several views of each reference (`ReferenceViews`: rotations, mirror
//! images), AnomalyDINO's augmentation; each such row also gets its paired difference from the
//! same encoder's plain bank. The full-shot bank is never augmented (its pool is large already).
//!
//! Background masking (`Masking::Pca`, AnomalyDINO's zero-shot mask, `models::foreground`) keeps
//! each reference's background patches out of the bank and sets each scored cell's background
//! patches to 0 before its image score; each masked row gets its paired difference from the
//! unmasked row with the same bank.

use crate::data::elpv::{self, Cell};
use crate::eval::stats::{bootstrap, bootstrap_difference, Interval, DEFAULT_RESAMPLES};
use crate::image_io;
use crate::metrics::auroc;
use crate::models::efficientnet::PatchTokens;
use crate::models::foreground::Masking;
use crate::models::memory_bank::{ImageScore, MemoryBank};
use crate::models::patch_encoder::PatchEncoder;
use crate::models::reference_views::ReferenceViews;
use crate::opset::StepOps;
use crate::user_err;
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;

/// How many references a bank holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shots {
    K(usize),
    /// The greedy coreset of the whole pool.
    Full,
}

impl std::fmt::Display for Shots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Shots::K(k) => write!(f, "{k}"),
            Shots::Full => f.write_str("full"),
        }
    }
}

impl std::str::FromStr for Shots {
    type Err = String;
    fn from_str(s: &str) -> Result<Shots, String> {
        match s.trim() {
            "full" => Ok(Shots::Full),
            t => match t.parse::<usize>() {
                Ok(k) if k > 0 => Ok(Shots::K(k)),
                _ => Err(format!("`{t}` is not a number of references ≥ 1 or `full`")),
            },
        }
    }
}

#[derive(Clone, Debug)]
pub struct ShotsConfig {
    pub shots: Vec<Shots>,
    pub image_score: ImageScore,
    /// The full-shot coreset's share of the pool's patches.
    pub coreset: f64,
    /// At most this many cells of each type in the pool and in each scored label (0 = all).
    pub limit: usize,
    pub seed: u64,
    /// The views of each reference a k-shot bank holds, one set of rows per entry.
    pub views: Vec<ReferenceViews>,
    /// Background masking, one set of rows per entry (`none` is always run: the others are
    /// compared with it).
    pub masking: Vec<Masking>,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShotsReport {
    pub dataset: &'static str,
    pub protocol: &'static str,
    /// What ran the encoders and the search (`Buffers::describe`).
    pub device: String,
    pub image_score: ImageScore,
    pub coreset: f64,
    pub kinds: Vec<KindCounts>,
    pub rows: Vec<ShotsRow>,
    pub seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KindCounts {
    pub kind: String,
    pub pool: usize,
    pub normal: usize,
    pub defective: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ShotsRow {
    pub encoder: String,
    pub shots: String,
    /// The views of each reference in the bank.
    pub reference_views: ReferenceViews,
    /// Whether background patches were left out of the bank and the scores.
    pub masking: Masking,
    /// With masking: the share of the scored cells' patches on the foreground (that score).
    pub foreground_share: Option<f64>,
    /// Patches in the bank, per type.
    pub bank_patches: BTreeMap<String, usize>,
    /// Image AUROC over both types, with its 95% bootstrap interval over cells.
    pub image_auroc: Interval,
    pub per_kind: BTreeMap<String, Option<f64>>,
    /// This row minus the first encoder's row with the same bank (paired bootstrap), when this
    /// is not the first encoder.
    pub minus_first_encoder: Option<Interval>,
    /// This row minus the same encoder's row with the same shots and the references as they are
    /// (paired bootstrap), for an augmented bank when that row was run.
    pub minus_identity_views: Option<Interval>,
    /// This row minus the same encoder's unmasked row with the same bank (paired bootstrap), for a
    /// masked row.
    pub minus_unmasked: Option<Interval>,
    /// Seconds to build the banks and score the cells (encoding excluded; see `encode_seconds`).
    pub seconds: f64,
    pub encode_seconds: f64,
}

const PROTOCOL: &str = "per type: normal cells (p = 0) in file order, even positions = reference pool, odd positions \
= scored normals; scored anomalies p >= 2/3; k-shot bank = the first k pool cells (with their views when augmented), \
full = greedy coreset of the pool (never augmented)";

struct Split<'a> {
    pool: Vec<&'a Cell>,
    scored: Vec<(&'a Cell, bool)>,
}

fn split(cells: &[Cell], limit: usize) -> BTreeMap<String, Split<'_>> {
    let cap = |n: usize| if limit == 0 { n } else { n.min(limit) };
    let mut by_kind: BTreeMap<String, (Vec<&Cell>, Vec<&Cell>)> = BTreeMap::new();
    for c in cells {
        let e = by_kind.entry(c.kind.clone()).or_default();
        if c.is_normal() {
            e.0.push(c);
        } else if c.is_defective() {
            e.1.push(c);
        }
    }
    by_kind
        .into_iter()
        .map(|(kind, (normals, defects))| {
            let pool: Vec<&Cell> = normals.iter().step_by(2).copied().collect();
            let held: Vec<&Cell> = normals.iter().skip(1).step_by(2).copied().collect();
            let mut scored: Vec<(&Cell, bool)> = held[..cap(held.len())].iter().map(|&c| (c, false)).collect();
            scored.extend(defects[..cap(defects.len())].iter().map(|&c| (c, true)));
            (kind, Split { pool: pool[..cap(pool.len())].to_vec(), scored })
        })
        .collect()
}

/// Patch tokens of `cells` and, when `masks`, their foreground masks; in order, in batches, with a
/// progress bar.
fn encode<O: StepOps>(
    enc: &PatchEncoder<O>,
    cells: &[&Cell],
    masks: bool,
    pb: &indicatif::ProgressBar,
) -> Result<Encoded> {
    encode_views(enc, cells, ReferenceViews::Identity, masks, pb)
}

/// Patch tokens of each view of each of `cells`, cell by cell (a cell's views together), and, when
/// `masks`, each view's foreground mask (empty otherwise).
fn encode_views<O: StepOps>(
    enc: &PatchEncoder<O>,
    cells: &[&Cell],
    views: ReferenceViews,
    masks: bool,
    pb: &indicatif::ProgressBar,
) -> Result<Encoded> {
    let (mut tokens, mut fg) = (Vec::with_capacity(cells.len() * views.count()), Vec::new());
    for chunk in cells.chunks(8usize.div_ceil(views.count())) {
        let mut imgs = Vec::with_capacity(chunk.len() * views.count());
        for c in chunk {
            imgs.extend(views.of(&image_io::load(&c.path)?));
        }
        let imgs: Vec<&image::DynamicImage> = imgs.iter().collect();
        if masks {
            let (t, m) = enc.tokens_and_foreground(&imgs)?;
            tokens.extend(t);
            fg.extend(m);
        } else {
            tokens.extend(enc.tokens(&imgs)?);
        }
        pb.inc(chunk.len() as u64);
    }
    Ok(Encoded { tokens, masks: fg })
}

/// Encoded cells: tokens and (when asked for) foreground masks, in the same order.
struct Encoded {
    tokens: Vec<PatchTokens>,
    masks: Vec<Vec<bool>>,
}

/// Runs the protocol for each encoder (the first is the one the others are compared with).
pub fn evaluate<O: StepOps>(
    encoders: &[PatchEncoder<O>],
    elpv_dir: &Path,
    cfg: &ShotsConfig,
    quiet: bool,
) -> Result<ShotsReport> {
    let t0 = std::time::Instant::now();
    let cells = elpv::load(elpv_dir)?;
    let kinds = split(&cells, cfg.limit);
    let max_k = cfg.shots.iter().filter_map(|s| if let Shots::K(k) = s { Some(*k) } else { None }).max().unwrap_or(0);
    for (kind, s) in &kinds {
        if s.pool.len() < max_k.max(1) {
            return Err(user_err!(
                "ELPV has {} {kind} reference cells, fewer than the {max_k} shots asked for",
                s.pool.len()
            ));
        }
    }
    let has_full = cfg.shots.contains(&Shots::Full);
    // The unmasked rows first: the masked ones are compared with them.
    let mut maskings = cfg.masking.clone();
    maskings.push(Masking::None);
    maskings.sort();
    maskings.dedup();
    // The plain bank first: the augmented rows are compared with it.
    let mut views = if cfg.views.is_empty() { vec![ReferenceViews::Identity] } else { cfg.views.clone() };
    views.sort();
    views.dedup();
    let augmented: Vec<ReferenceViews> = if max_k == 0 {
        Vec::new()
    } else {
        views.iter().copied().filter(|&v| v != ReferenceViews::Identity).collect()
    };
    // Cell order of every score vector: type by type, the scored cells in order.
    let labels: Vec<bool> = kinds.values().flat_map(|s| s.scored.iter().map(|(_, d)| *d)).collect();
    let mut rows: Vec<ShotsRow> = Vec::new();
    let mut first_scores: BTreeMap<String, Vec<f32>> = BTreeMap::new();
    for (e, enc) in encoders.iter().enumerate() {
        let te = std::time::Instant::now();
        let needed: usize = kinds
            .values()
            .map(|s| {
                s.scored.len()
                    + if has_full { s.pool.len() } else { max_k.min(s.pool.len()) }
                    + augmented.len() * max_k.min(s.pool.len())
            })
            .sum();
        let pb = crate::util::progress_bar(needed as u64, &format!("encode {}", enc.describe()), quiet);
        // Tokens, and foreground masks when a masked setting is asked for, by (type, set): the
        // pool, the scored cells, and each augmented view set of the first max_k pool cells.
        let with_masks = maskings.contains(&Masking::Pca);
        let mut encoded: BTreeMap<(&str, &str), Encoded> = BTreeMap::new();
        for (kind, s) in &kinds {
            let pool_cells = if has_full { &s.pool[..] } else { &s.pool[..max_k.min(s.pool.len())] };
            let scored_cells: Vec<&Cell> = s.scored.iter().map(|(c, _)| *c).collect();
            encoded.insert((kind, "pool"), encode(enc, pool_cells, with_masks, &pb)?);
            encoded.insert((kind, "scored"), encode(enc, &scored_cells, with_masks, &pb)?);
            for &v in &augmented {
                let views = encode_views(enc, &s.pool[..max_k.min(s.pool.len())], v, with_masks, &pb)?;
                encoded.insert((kind, v.label()), views);
            }
        }
        pb.finish_and_clear();
        let encode_seconds = te.elapsed().as_secs_f64();
        let mut identity_scores: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let mut unmasked_scores: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        let settings =
            maskings.iter().flat_map(|&m| views.iter().flat_map(move |&v| cfg.shots.iter().map(move |&k| (m, v, k))));
        for (masking, views, shots) in settings {
            if views != ReferenceViews::Identity && shots == Shots::Full {
                continue;
            }
            let ts = std::time::Instant::now();
            let (mut scores, mut bank_patches, mut per_kind) = (Vec::new(), BTreeMap::new(), BTreeMap::new());
            let (mut kept, mut patches) = (0usize, 0usize);
            let pb = crate::util::progress_bar(
                labels.len() as u64,
                &format!("{} {shots}-shot, {views} views, masking {masking}", enc.describe()),
                quiet,
            );
            for (kind, s) in &kinds {
                let scored = &encoded[&(kind.as_str(), "scored")];
                let mut bank = MemoryBank::new(scored.tokens[0].dim);
                let (refs, n) = match (shots, views) {
                    (Shots::Full, _) => (&encoded[&(kind.as_str(), "pool")], usize::MAX),
                    (Shots::K(k), ReferenceViews::Identity) => (&encoded[&(kind.as_str(), "pool")], k),
                    (Shots::K(k), v) => (&encoded[&(kind.as_str(), v.label())], k * v.count()),
                };
                for (i, t) in refs.tokens.iter().take(n).enumerate() {
                    match masking {
                        Masking::None => bank.push(&t.data)?,
                        Masking::Pca => bank.push_masked(&t.data, &refs.masks[i])?,
                    }
                }
                if shots == Shots::Full {
                    bank = bank.coreset(cfg.coreset, cfg.seed);
                }
                bank_patches.insert(kind.clone(), bank.len());
                let bank = bank.on(enc.ops())?;
                let mut ks = Vec::with_capacity(scored.tokens.len());
                // A few cells per search: fewer launches on the GPU, a visible bar on the CPU.
                for (c, chunk) in scored.tokens.chunks(8).enumerate() {
                    let mut maps = bank.anomaly_maps(&chunk.iter().map(|t| t.data.as_slice()).collect::<Vec<_>>())?;
                    if masking == Masking::Pca {
                        // Background patches do not score (AnomalyDINO leaves them out of the search).
                        for (m, keep) in maps.iter_mut().zip(&scored.masks[c * 8..]) {
                            kept += keep.iter().filter(|&&k| k).count();
                            patches += keep.len();
                            m.iter_mut().zip(keep).filter(|(_, &k)| !k).for_each(|(v, _)| *v = 0.0);
                        }
                    }
                    ks.extend(maps.iter().map(|m| cfg.image_score.of(m)));
                    pb.inc(chunk.len() as u64);
                }
                let kl: Vec<bool> = s.scored.iter().map(|(_, d)| *d).collect();
                per_kind.insert(kind.clone(), auroc(&ks, &kl));
                scores.extend(ks);
            }
            pb.finish_and_clear();
            let stat = |sc: &[f32]| {
                let sc = sc.to_vec();
                let labels = labels.clone();
                move |idx: &[usize]| {
                    let s: Vec<f32> = idx.iter().map(|&i| sc[i]).collect();
                    let l: Vec<bool> = idx.iter().map(|&i| labels[i]).collect();
                    auroc(&s, &l)
                }
            };
            let image_auroc = bootstrap(labels.len(), stat(&scores), DEFAULT_RESAMPLES, cfg.seed)
                .ok_or_else(|| user_err!("ELPV evaluation needs both normal and defective cells"))?;
            let key = format!("{masking}/{views}/{shots}");
            // This row against its baseline row (same encoder, same bank but for one setting), or
            // recorded as the baseline when it is one.
            let against = |baselines: &mut BTreeMap<String, Vec<f32>>, key: String, is_baseline: bool| {
                if is_baseline {
                    baselines.insert(key, scores.clone());
                    return None;
                }
                let plain = baselines.get(&key)?;
                bootstrap_difference(labels.len(), stat(&scores), stat(plain), DEFAULT_RESAMPLES, cfg.seed)
            };
            let minus_identity_views =
                against(&mut identity_scores, format!("{masking}/{shots}"), views == ReferenceViews::Identity);
            let minus_unmasked = against(&mut unmasked_scores, format!("{views}/{shots}"), masking == Masking::None);
            let minus_first_encoder = if e == 0 {
                first_scores.insert(key.clone(), scores.clone());
                None
            } else {
                bootstrap_difference(
                    labels.len(),
                    stat(&scores),
                    stat(&first_scores[&key]),
                    DEFAULT_RESAMPLES,
                    cfg.seed,
                )
            };
            rows.push(ShotsRow {
                encoder: enc.describe(),
                shots: shots.to_string(),
                reference_views: views,
                masking,
                foreground_share: (patches > 0).then(|| kept as f64 / patches as f64),
                bank_patches,
                image_auroc,
                per_kind,
                minus_first_encoder,
                minus_identity_views,
                minus_unmasked,
                seconds: ts.elapsed().as_secs_f64(),
                encode_seconds,
            });
        }
    }
    let counts = kinds
        .iter()
        .map(|(kind, s)| KindCounts {
            kind: kind.clone(),
            pool: s.pool.len(),
            normal: s.scored.iter().filter(|(_, d)| !d).count(),
            defective: s.scored.iter().filter(|(_, d)| *d).count(),
        })
        .collect();
    Ok(ShotsReport {
        dataset: "elpv",
        protocol: PROTOCOL,
        device: encoders.first().map_or_else(String::new, |e| e.ops().describe()),
        image_score: cfg.image_score,
        coreset: cfg.coreset,
        kinds: counts,
        rows,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The report as a markdown table.
pub fn markdown(r: &ShotsReport) -> String {
    let kinds: Vec<&str> = r.kinds.iter().map(|k| k.kind.as_str()).collect();
    let mut s = String::new();
    s.push_str(&format!(
        "| encoder | shots | reference views | masking | bank patches | image AUROC [95% CI] | {} | − first encoder [95% CI] | − identity views [95% CI] | − unmasked [95% CI] |\n",
        kinds.iter().map(|k| format!("{k} AUROC")).collect::<Vec<_>>().join(" | ")
    ));
    s.push_str(&format!("|---|---|---|---|---|---|{}---|---|---|\n", "---|".repeat(kinds.len())));
    let diff = |i: &Option<Interval>| {
        i.as_ref().map_or("–".into(), |i| format!("{:+.4} [{:+.4}, {:+.4}]", i.estimate, i.lo, i.hi))
    };
    for row in &r.rows {
        let ci = |i: &Interval| format!("{:.4} [{:.4}, {:.4}]", i.estimate, i.lo, i.hi);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.encoder,
            row.shots,
            row.reference_views,
            row.foreground_share.map_or(row.masking.to_string(), |f| format!(
                "{} ({:.1}% kept)",
                row.masking,
                100.0 * f
            )),
            row.bank_patches.values().map(|n| n.to_string()).collect::<Vec<_>>().join(" / "),
            ci(&row.image_auroc),
            kinds
                .iter()
                .map(|k| row.per_kind.get(*k).copied().flatten().map_or("–".into(), |v| format!("{v:.4}")))
                .collect::<Vec<_>>()
                .join(" | "),
            diff(&row.minus_first_encoder),
            diff(&row.minus_identity_views),
            diff(&row.minus_unmasked),
        ));
    }
    s.push_str(&format!(
        "\ncells per type (pool / scored normal / scored defective): {}; image score: {:?}; coreset {:.0}% of the pool's patches; {:.0} s\n",
        r.kinds.iter().map(|k| format!("{} {}/{}/{}", k.kind, k.pool, k.normal, k.defective)).collect::<Vec<_>>().join(", "),
        r.image_score,
        r.coreset * 100.0,
        r.seconds
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(n: u32, p: f32, kind: &str) -> Cell {
        Cell { path: format!("cell{n:04}.png").into(), defect_probability: p, kind: kind.into() }
    }

    #[test]
    fn the_split_never_scores_a_reference_and_skips_the_uncertain() {
        let cells: Vec<Cell> = (0..10)
            .map(|i| cell(i, if i < 6 { 0.0 } else { [1.0, 0.3333, 0.6666, 1.0][i as usize - 6] }, "mono"))
            .collect();
        let s = &split(&cells, 0)["mono"];
        let pool: Vec<String> = s.pool.iter().map(|c| c.path.display().to_string()).collect();
        assert_eq!(pool, ["cell0000.png", "cell0002.png", "cell0004.png"]);
        let scored: Vec<(String, bool)> = s.scored.iter().map(|(c, d)| (c.path.display().to_string(), *d)).collect();
        assert_eq!(
            scored,
            [
                ("cell0001.png".into(), false),
                ("cell0003.png".into(), false),
                ("cell0005.png".into(), false),
                ("cell0006.png".into(), true),
                ("cell0008.png".into(), true),
                ("cell0009.png".into(), true),
            ]
        );
        let capped = &split(&cells, 2)["mono"];
        assert_eq!((capped.pool.len(), capped.scored.len()), (2, 4));
        assert_eq!("16".parse::<Shots>(), Ok(Shots::K(16)));
        assert_eq!("full".parse::<Shots>(), Ok(Shots::Full));
        assert!("0".parse::<Shots>().is_err());
    }
}
