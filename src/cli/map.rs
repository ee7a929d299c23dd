//! `sage map`: the training-free anomaly map for one pair, or its AUROC over ELPV.

use super::{print_json, Ctx};
use crate::assets::Asset;
use crate::image_io;
use crate::models::anomaly_map::AnomalyMapper;
use crate::models::efficientnet::EfficientNetLite;
use crate::ops::similarity::Reduce;
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str =
    "Training-free anomaly map (ARCHITECTURE.md §1): EfficientNet-Lite0 patch tokens (14×14 grid, \
stride-8 and stride-16 features) of the test and reference images; each test patch scores 1 − its highest cosine \
similarity to any reference patch; the image score is the map's maximum. Without --reference the test image is \
compared with itself (zero-shot). --eval-elpv reports the image AUROC over ELPV instead.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The test image.
    #[arg(long, required_unless_present = "eval_elpv")]
    test: Option<PathBuf>,
    /// A normal reference image of the same kind (omit for zero-shot).
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Write the heat map overlaid on the test image to this PNG.
    #[arg(long)]
    out: Option<PathBuf>,
    /// How a patch's similarities to the reference reduce to one number.
    #[arg(long, value_enum, default_value = "nearest")]
    reduce: Reduce,
    /// How many most-anomalous patches to report.
    #[arg(long, default_value_t = 8)]
    k: usize,
    /// Evaluate on ELPV: cells with defect probability ≥ 2/3 against cells with 0, each scored
    /// against one normal reference cell of the same type (mono/poly); prints the image AUROC.
    #[arg(long, conflicts_with_all = ["test", "reference", "out"])]
    eval_elpv: bool,
    /// With --eval-elpv: use at most this many cells of each label and type (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Read reduce, k and limit from a TOML file (e.g. configs/map-elpv.toml); keys present in
    /// the file replace the corresponding flags.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The keys a map config may set.
#[derive(serde::Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct MapConfig {
    reduce: Option<Reduce>,
    k: Option<usize>,
    limit: Option<usize>,
}

impl crate::config::CheckRanges for MapConfig {
    fn check_ranges(&self, c: &mut crate::config::RangeCheck) {
        let patches = crate::sfe::config::PATCH_GRID * crate::sfe::config::PATCH_GRID;
        if let Some(k) = self.k {
            c.int("k", k as u64, 1, patches);
        }
    }
}

pub fn run(ctx: &Ctx, mut a: Args) -> Result<()> {
    if let Some(path) = &a.config {
        let c: MapConfig = crate::config::load(path)?;
        a.reduce = c.reduce.unwrap_or(a.reduce);
        a.k = c.k.unwrap_or(a.k);
        a.limit = c.limit.unwrap_or(a.limit);
    }
    let net = EfficientNetLite::load(&Asset::EfficientNetPth.path()?)?;
    let mapper = AnomalyMapper { net, reduce: a.reduce, k: a.k };
    if a.eval_elpv {
        return eval_elpv(ctx, &mapper, a.limit);
    }
    let test_path = a.test.expect("clap requires --test");
    let test_img = image_io::load(&test_path)?;
    let test = mapper.tokens(&test_img);
    let reference = match &a.reference {
        Some(p) => Some(mapper.tokens(&image_io::load(p)?)),
        None => None,
    };
    let m = mapper.compare(&test, reference.as_ref())?;
    if let Some(out) = &a.out {
        let lo = m.map.iter().copied().fold(f32::INFINITY, f32::min);
        let png = image_io::overlay_heatmap(&test_img, &m.map, m.grid_h, m.grid_w, lo, m.score, 0.45);
        image_io::save_atomic(&png, out)?;
    }
    if ctx.json {
        return print_json(&serde_json::json!({
            "test": test_path, "reference": a.reference, "reduce": a.reduce, "out": a.out, "result": m,
        }));
    }
    println!("image score (max of map): {:.4}", m.score);
    println!("grid: {}×{} patches; most anomalous (row, col, 1 − s):", m.grid_h, m.grid_w);
    for &i in &m.patches.topk {
        let i = i as usize;
        println!("  ({:>2}, {:>2})  {:.4}", i / m.grid_w, i % m.grid_w, m.map[i]);
    }
    if let Some(out) = &a.out {
        println!("heat map: {}", out.display());
    }
    Ok(())
}

fn eval_elpv(ctx: &Ctx, mapper: &AnomalyMapper, limit: usize) -> Result<()> {
    let r = crate::eval::elpv::elpv_auroc(mapper, &Asset::ElpvDir.path()?, limit, ctx.quiet())?;
    if ctx.json {
        return print_json(&r);
    }
    println!("ELPV image AUROC (defect probability ≥ 2/3 vs 0, one same-type normal reference): {:.4}", r.image_auroc);
    for k in &r.per_kind {
        println!(
            "  {:<5} normal {:>4}  defective {:>4}  AUROC {:.4}  reference {}",
            k.kind,
            k.normal,
            k.defective,
            k.auroc.unwrap_or(f64::NAN),
            k.reference.display()
        );
    }
    println!("{} cells scored in {:.1} s", r.cells, r.seconds);
    Ok(())
}
