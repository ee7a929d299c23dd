//! `sage map`: the training-free anomaly map for one pair, or its metrics over a dataset
//! (`--eval --data D`: `eval::map_eval`; `--eval-elpv`: `eval::elpv`; `--eval-elpv --shots`:
//! `eval::shots`).

use super::{print_json, Ctx};
use crate::assets::Asset;
use crate::backend::cpu::HostOps;
use crate::backend::cuda::step_ops::CudaOps;
use crate::eval::map_eval::{self, MapEvalOptions};
use crate::eval::shots::{self, Shots, ShotsConfig};
use crate::image_io;
use crate::models::anomaly_map::AnomalyMapper;
use crate::models::foreground::Masking;
use crate::models::memory_bank::ImageScore;
use crate::models::patch_encoder::{DinoLayer, EncoderKind, PatchEncoder};
use crate::models::reference_views::ReferenceViews;
use crate::opset::{Reduce, StepOps};
use anyhow::Result;
use std::path::PathBuf;

pub const LONG_ABOUT: &str =
    "Training-free anomaly map (ARCHITECTURE.md §1): patch tokens of the test and reference images from \
EfficientNet-Lite0 (14×14 grid, stride-8 and stride-16 features; the default) or DINOv2 ViT-S/14 (--encoder dinov2: \
the last layer's normalised tokens, 16×16 at --size 224); each test patch scores 1 − its highest cosine \
similarity to any reference patch; the image score is the map's maximum. Without --reference the test image is \
compared with itself (zero-shot).\n\n\
--eval --data D scores the map over a labelled dataset D, a folder in the MVTec AD layout or a data file (AD-PL as \
`sage data build` writes it, MANTA, MMAD; format guessed): each test image against its sample's reference \
(zero-shot without one, counted); image AUROC from the map's maximum and, where masks exist, the map upsampled to \
the mask's pixels, smoothed (--sigma) and scored as pixel AUROC and PRO (MVTec AD's per-region overlap: the area \
under the PRO curve up to a false-positive rate of 0.3, over 0.3); per category, pooled, and averaged over \
categories (ARCHITECTURE.md §6). --eval-elpv is its ELPV form (image AUROC of defective against normal cells, one \
same-type reference each), kept as it is for `sage demo`.\n\n\
--eval-elpv --shots 1,4,16,full --encoder efficientnet,dinov2 is the few-shot protocol (ARCHITECTURE.md §6): per \
cell type the normal cells split by position into a reference pool (even) and scored normals (odd); a k-shot \
memory bank holds every patch of the first k pool cells, `full` a greedy coreset (--coreset) of the whole pool; \
each scored cell's map is 1 − its patches' highest cosine similarity to the bank, its score the map's maximum or \
AnomalyDINO's mean of the top 1% (--image-score). Every row scores the same cells; each AUROC has a 95% bootstrap \
interval over cells and each encoder after the first its paired difference from the first. --reference-views \
identity,rotations,dihedral adds each k-shot reference's right-angle rotations (and their mirror images) to its bank, \
AnomalyDINO's augmented references: a set of rows per setting, each with its paired difference from the plain bank.\n\n\
--device cuda runs the encoder and the nearest-neighbour search on the GPU (bf16 tokens; the fused min-cosine kernel, \
a memory bank uploaded once); the reports name the device. The coreset is chosen on the CPU.";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The test image.
    #[arg(long, required_unless_present_any = ["eval_elpv", "eval"])]
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
    #[arg(long, conflicts_with_all = ["test", "reference", "out", "eval"])]
    eval_elpv: bool,
    /// With --eval-elpv: the few-shot protocol with these memory banks, comma-separated: k normal
    /// reference cells of the cell's type, or `full` (a coreset of the whole reference pool).
    /// With --eval: one number k, every sample of a category scored against a memory bank of the
    /// category's first k distinct reference images (in data order) instead of its own reference.
    #[arg(long, value_delimiter = ',', value_name = "K|full,...")]
    shots: Vec<Shots>,
    /// The patch encoder (EfficientNet-Lite0's 14×14 tokens, or DINOv2 ViT-S/14's last layer);
    /// with --shots a comma-separated list, the first being the one the others are compared with.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "efficientnet")]
    encoder: Vec<EncoderKind>,
    /// DINOv2's input side in pixels, a multiple of 14 (224 → 16×16 patches, 448 → 32×32).
    #[arg(long, default_value_t = 224)]
    size: u32,
    /// DINOv2's hidden state: a block's output (1–12), or `last` (after the final LayerNorm, as
    /// AnomalyDINO reads it). Block 6 by default: this checkpoint's late blocks were tuned for
    /// saliency and localise far worse (docs/results/synth-elpv).
    #[arg(long, default_value = "6")]
    layer: DinoLayer,
    /// With --eval-elpv --shots: how a cell's patch map reduces to its score (--eval --shots
    /// takes the map's maximum).
    #[arg(long, value_enum, default_value = "max", requires = "shots")]
    image_score: ImageScore,
    /// With --shots: the views of each reference a k-shot bank holds (AnomalyDINO's augmented
    /// references): `identity` (as it is), `rotations` (0°, 90°, 180°, 270°), `dihedral` (the
    /// rotations and their mirror images). With --eval-elpv a comma-separated list, each a set of
    /// rows with its paired difference from `identity` (include it); the full-shot bank is never
    /// augmented. With --eval one set.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "identity", requires = "shots")]
    reference_views: Vec<ReferenceViews>,
    /// With --shots: background masking, `none` or `pca` (AnomalyDINO's zero-shot mask: each
    /// image's first principal component of its patch tokens — DINOv2's last layer whatever
    /// --layer is, EfficientNet's own tokens — split by Otsu's threshold, the side holding the
    /// centre kept, dilated and closed; background patches neither enter the bank nor score;
    /// DINOv2's forward then runs to its last layer). With --eval-elpv a comma-separated list, a
    /// set of rows per entry, each masked row with its paired difference from the unmasked one
    /// (always run); with --eval one value.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "none", requires = "shots")]
    masking: Vec<Masking>,
    /// With --eval-elpv --shots full: the bank's coreset, as a share of the pool's patches (1 = all).
    #[arg(long, default_value_t = 0.1, requires = "shots")]
    coreset: f64,
    /// Evaluate on the labelled dataset --data: image AUROC, and pixel AUROC and PRO where masks
    /// exist, per category, pooled and averaged over categories.
    #[arg(long, requires = "data", conflicts_with_all = ["test", "reference", "out"])]
    eval: bool,
    /// With --eval: a folder in the MVTec AD layout (<category>/train/good, <category>/test/<defect>,
    /// <category>/ground_truth/<defect>) or a data file (AD-PL, MANTA, MMAD; format guessed).
    #[arg(long, requires = "eval")]
    data: Option<PathBuf>,
    /// With a --data file: the folder its image paths are relative to [default: the file's folder].
    #[arg(long, requires = "data")]
    image_root: Option<PathBuf>,
    /// With --data an MVTec AD folder: the seed that picks each test image's train/good reference;
    /// with --shots: the seed of the coreset's random projection and of the bootstrap.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// With --eval: the σ, in mask pixels, of the Gaussian that smooths each upsampled map before
    /// the pixel metrics (PatchCore's 4; 0 = no smoothing).
    #[arg(long, default_value_t = 4.0)]
    sigma: f32,
    /// With --eval: score pixels at this size on the shorter side when a mask is larger (masks
    /// resized by nearest neighbour; 0 = each mask's own size, as MVTec AD's evaluation does). The
    /// pixel metrics hold 12 bytes per pixel: full-resolution MVTec AD needs ~20 GB, 256 ~1.4 GB.
    #[arg(long, default_value_t = 0)]
    mask_side: usize,
    /// With --eval: write each test image's heat map to DIR/<sample id>.png.
    #[arg(long, value_name = "DIR", requires = "eval")]
    out_maps: Option<PathBuf>,
    /// With --eval-elpv: at most this many cells of each label and type; with --eval: at most this
    /// many samples of each category and label, in data order (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Read reduce, k, limit and sigma from a TOML file (e.g. configs/map-elpv.toml); keys present
    /// in the file replace the corresponding flags.
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
    sigma: Option<f32>,
}

impl crate::config::CheckRanges for MapConfig {
    fn check_ranges(&self, c: &mut crate::config::RangeCheck) {
        let patches = crate::sfe::config::PATCH_GRID * crate::sfe::config::PATCH_GRID;
        if let Some(k) = self.k {
            c.int("k", k as u64, 1, patches);
        }
        if let Some(sigma) = self.sigma {
            c.float("sigma", sigma as f64, 0.0, 64.0);
        }
    }
}

/// On `--device cuda` the encoder and the nearest-neighbour search (the fused min-cosine kernel)
/// run on the GPU; otherwise on the CPU.
pub fn run(ctx: &Ctx, a: Args) -> Result<()> {
    if ctx.backend.backend == "cuda" {
        run_on(ctx, a, CudaOps::new(crate::backend::cuda::Gpu::global()?))
    } else {
        run_on(ctx, a, HostOps)
    }
}

fn run_on<O: StepOps + Clone>(ctx: &Ctx, mut a: Args, ops: O) -> Result<()> {
    if let Some(path) = &a.config {
        let c: MapConfig = crate::config::load(path)?;
        a.reduce = c.reduce.unwrap_or(a.reduce);
        a.k = c.k.unwrap_or(a.k);
        a.limit = c.limit.unwrap_or(a.limit);
        a.sigma = c.sigma.unwrap_or(a.sigma);
    }
    if !a.shots.is_empty() && a.eval_elpv {
        return eval_shots(ctx, &a, ops);
    }
    let bank_shots = match a.shots[..] {
        [] => None,
        [Shots::K(k)] if a.eval => Some(k),
        _ if a.eval => crate::user_bail!("--shots with --eval takes one number of references (e.g. --shots 4)"),
        _ => crate::user_bail!("--shots needs --eval-elpv or --eval --data D"),
    };
    let reference_views = match a.reference_views[..] {
        [v] => v,
        _ => crate::user_bail!("--reference-views with --eval takes one set (e.g. --reference-views dihedral)"),
    };
    let masking = match a.masking[..] {
        [m] => m,
        _ => crate::user_bail!("--masking with --eval takes one value (none or pca)"),
    };
    // The dataset is read before the encoder loads, so a wrong --data or --sigma fails at once.
    let eval = match &a.data {
        Some(data) if a.eval => {
            let o = MapEvalOptions {
                sigma: a.sigma,
                limit: a.limit,
                mask_side: a.mask_side,
                out_maps: a.out_maps.clone(),
                encoder: String::new(),
                shots: bank_shots,
                reference_views,
                masking,
            };
            o.check()?;
            Some((map_eval::load_dataset(data, a.seed, a.image_root.as_deref())?, o))
        }
        _ => None,
    };
    let kind = match a.encoder[..] {
        [kind] => kind,
        _ => crate::user_bail!("--encoder takes one encoder here; a list is for --eval-elpv --shots"),
    };
    if a.eval_elpv && kind != EncoderKind::Efficientnet {
        crate::user_bail!(
            "--eval-elpv without --shots is the EfficientNet map `sage demo` reports; add --shots 1 for DINOv2"
        );
    }
    let encoder = PatchEncoder::load_on(ops, kind, Some(a.size), a.layer)?;
    let mapper = AnomalyMapper { encoder, reduce: a.reduce, k: a.k };
    if a.eval_elpv {
        return eval_elpv(ctx, &mapper, a.limit);
    }
    if let Some((data, mut o)) = eval {
        o.encoder = mapper.encoder.describe();
        let r = map_eval::evaluate(&mapper, &data, &o, ctx.quiet())?;
        if ctx.json {
            return print_json(&r);
        }
        print!("{}", r.render_text());
        return Ok(());
    }
    let test_path = a.test.expect("clap requires --test");
    let test_img = image_io::load(&test_path)?;
    let test = mapper.tokens(&test_img)?;
    let reference = match &a.reference {
        Some(p) => Some(mapper.tokens(&image_io::load(p)?)?),
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
            "device": mapper.encoder.ops().describe(),
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

fn eval_shots<O: StepOps + Clone>(ctx: &Ctx, a: &Args, ops: O) -> Result<()> {
    if !(a.coreset > 0.0 && a.coreset <= 1.0) {
        crate::user_bail!("--coreset {}: give the share of the pool's patches to keep, in (0, 1]", a.coreset);
    }
    let mut kinds = a.encoder.clone();
    kinds.dedup();
    let encoders = kinds
        .iter()
        .map(|&k| PatchEncoder::load_on(ops.clone(), k, Some(a.size), a.layer))
        .collect::<Result<Vec<_>>>()?;
    let cfg = ShotsConfig {
        shots: a.shots.clone(),
        image_score: a.image_score,
        coreset: a.coreset,
        limit: a.limit,
        seed: a.seed,
        views: a.reference_views.clone(),
        masking: a.masking.clone(),
    };
    let r = shots::evaluate(&encoders, &Asset::ElpvDir.path()?, &cfg, ctx.quiet())?;
    if ctx.json {
        return print_json(&r);
    }
    print!("{}", shots::markdown(&r));
    Ok(())
}

fn eval_elpv<O: StepOps>(ctx: &Ctx, mapper: &AnomalyMapper<O>, limit: usize) -> Result<()> {
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
