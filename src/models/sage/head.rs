//! The SAGE head (ARCHITECTURE.md §1): everything between the frozen vision encoder and the LLM.
//!
//! - **adapter** (`sage.adapter.fc1/fc2`): the LLaVA-style MLP projector, vision width → LLM
//!   width, applied to the patch tokens of the test (and reference) image after an optional
//!   `pool × pool` average that shortens the image sequence.
//! - **patch selection**: the K test patches least similar to the reference (fused min-cosine
//!   top-K, [`crate::ops::similarity::mincos_topk`]); zero-shot compares the test with itself.
//! - **fusion attention** (`sage.fusion.q/k/v/out`): queries are the fact embeddings `t_g`, keys
//!   the difference vectors `d_i = v_t[i] − v_r[nn(i)]`, values the selected test patches
//!   `v_t[i]`, H heads; its output goes through the **LayerNorm projection** (`sage.proj_norm`)
//!   and becomes the fact tokens `t_s` that join the image and question tokens.
//!
//! Here: the head's configuration, its parameters in the shared [`ParamSet`] (under `sage.*`)
//! and what it computes on the host before any trained parameter is read (the pooled adapter
//! input and the patch selection, both functions of the frozen encoder's output). Its forward
//! and backward run on the op set with the rest of the model ([`super::Sage`]).

use crate::models::efficientnet::PatchTokens;
use crate::ops::pool::resize_area;
use crate::ops::similarity::{mincos_topk, Reduce};
use crate::opset::FusionShape;
use crate::train::param::{ParamId, ParamSet};
use crate::train::rng::SeedRng;
use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

/// How facts reach the model (the paper's Table 3 rows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FactsMode {
    /// No facts: the Baseline row.
    None,
    /// Fact sentences pasted into the prompt: +Fact\[Hard\].
    Hard,
    /// Fact embeddings fused with the selected patches: +Fact\[FE\], SAGE.
    Fused,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SageConfig {
    /// The backbone (`models::backbone`): vision encoder + LLM. Checkpoints made before the key
    /// existed read as `lite`, the only backbone then.
    pub backbone: String,
    pub facts: FactsMode,
    /// Patches selected per image (K).
    pub k: usize,
    pub reduce: Reduce,
    /// Width of the fusion attention (split across `fusion_heads`).
    pub fusion_dim: usize,
    pub fusion_heads: usize,
    /// Average `pool × pool` patch tokens before the adapter (1 keeps the full grid).
    pub image_pool: usize,
    /// Give the adapter each test patch's anomaly score as one more input channel: `1 − s_i`
    /// (the patch selection's map: the distance to the nearest reference patch), max-pooled over
    /// the `pool × pool` window so one defective patch is not averaged away, times the test
    /// image's mean patch-token norm so the channel weighs like the features at the adapter's
    /// initialisation. The reference image's channel is 0. Off in checkpoints made before the key
    /// existed.
    pub anomaly_channel: bool,
    /// Put the training-free map's image score into the prompt as one line of words after the
    /// images ([`super::map_cue`]). Off in checkpoints made before the key existed.
    pub map_cue: bool,
    /// The map cue's three levels (ascending quantiles of the score on normal pairs). Left empty,
    /// the SFE run calibrates them on its training split and saves them here.
    pub map_cue_levels: Vec<f32>,
}

impl SageConfig {
    /// The fusion attention's shape for `l` facts and `s` selected patches (one sample).
    pub fn fusion_shape(&self, l: usize, s: usize) -> FusionShape {
        let h = self.fusion_heads;
        FusionShape { batch: 1, queries: l, keys: s, heads: h, head_dim: self.fusion_dim / h }
    }
}

impl Default for SageConfig {
    fn default() -> Self {
        SageConfig {
            backbone: crate::models::backbone::DEFAULT.to_string(),
            facts: FactsMode::Fused,
            k: 16,
            reduce: Reduce::Nearest,
            fusion_dim: 256,
            fusion_heads: 4,
            image_pool: 2,
            anomaly_channel: false,
            map_cue: false,
            map_cue_levels: Vec::new(),
        }
    }
}

struct Linear {
    w: ParamId,
    b: ParamId,
    in_f: usize,
    out_f: usize,
}

impl Linear {
    /// Uniform(±1/√in) weights (PyTorch's nn.Linear default), zero bias; `gain` scales the init.
    fn new(params: &mut ParamSet, name: &str, in_f: usize, out_f: usize, gain: f32, rng: &mut SeedRng) -> Result<Self> {
        let bound = gain / (in_f as f32).sqrt();
        let w = params.add(format!("{name}.weight"), &[out_f, in_f], rng.uniform(in_f * out_f, -bound, bound), true)?;
        let b = params.add(format!("{name}.bias"), &[out_f], vec![0.0; out_f], true)?;
        Ok(Linear { w, b, in_f, out_f })
    }
}

/// Every head parameter's name starts with this.
pub const PARAM_PREFIX: &str = "sage.";
/// The fusion attention's parameters (frozen in stage 2).
pub const FUSION_PREFIX: &str = "sage.fusion.";

pub struct SageHead {
    pub config: SageConfig,
    pub vision_dim: usize,
    pub llm_dim: usize,
    adapter_fc1: Linear,
    adapter_fc2: Linear,
    fusion_q: Linear,
    fusion_k: Linear,
    fusion_v: Linear,
    fusion_out: Linear,
    proj_norm_w: ParamId,
    proj_norm_b: ParamId,
}

/// One image's adapter input: its patch tokens average-pooled to the image-token grid. Frozen
/// encoder output, so it depends on no trained parameter.
#[derive(Clone, Debug)]
pub struct ImageInput {
    pub rows: usize,
    /// `[rows, vision_dim]`
    pub pooled: Vec<f32>,
}

/// The fusion attention's inputs for one test image: the selected patches and their difference
/// vectors. A function of the frozen encoder's output only.
#[derive(Clone, Debug)]
pub struct FusionInput {
    /// Selected patches (K, or fewer on a small grid).
    pub s: usize,
    /// `d_i = v_t[i] − v_r[nn(i)]` at the selected `i`, `[s, vision_dim]`.
    pub diff: Vec<f32>,
    /// `v_t[i]` at the selected `i`, `[s, vision_dim]`.
    pub v_sel: Vec<f32>,
    pub selection: Selection,
}

/// A head layer's parameters: `(weight [out, in], bias [out], in, out)`.
pub type LinearParams = (ParamId, ParamId, usize, usize);

/// Every parameter of the head, for an op set that runs it elsewhere (`models::sage`).
pub struct HeadParams {
    pub adapter_fc1: LinearParams,
    pub adapter_fc2: LinearParams,
    pub fusion_q: LinearParams,
    pub fusion_k: LinearParams,
    pub fusion_v: LinearParams,
    pub fusion_out: LinearParams,
    pub proj_norm_w: ParamId,
    pub proj_norm_b: ParamId,
}

/// LayerNorm epsilon of the projection norm.
pub const LN_EPS: f32 = 1e-5;

/// The selection made for one test image.
#[derive(Clone, Debug, Serialize)]
pub struct Selection {
    /// Selected test patch indices (on the full grid), most anomalous first.
    pub patches: Vec<u32>,
    /// Per-patch `1 − s_i` on the full grid.
    pub anomaly_map: Vec<f32>,
    pub grid: (usize, usize),
}

impl SageHead {
    /// Registers the head's parameters (all trainable) under `sage.*`.
    pub fn new(
        config: SageConfig,
        vision_dim: usize,
        llm_dim: usize,
        params: &mut ParamSet,
        rng: &mut SeedRng,
    ) -> Result<Self> {
        ensure!(
            config.fusion_heads > 0 && config.fusion_dim.is_multiple_of(config.fusion_heads),
            "fusion_dim must divide into fusion_heads"
        );
        ensure!(config.k > 0 && config.image_pool > 0, "k and image_pool must be positive");
        let f = config.fusion_dim;
        Ok(SageHead {
            adapter_fc1: Linear::new(
                params,
                "sage.adapter.fc1",
                vision_dim + config.anomaly_channel as usize,
                llm_dim,
                1.0,
                rng,
            )?,
            adapter_fc2: Linear::new(params, "sage.adapter.fc2", llm_dim, llm_dim, 1.0, rng)?,
            fusion_q: Linear::new(params, "sage.fusion.q", llm_dim, f, 1.0, rng)?,
            fusion_k: Linear::new(params, "sage.fusion.k", vision_dim, f, 1.0, rng)?,
            fusion_v: Linear::new(params, "sage.fusion.v", vision_dim, f, 1.0, rng)?,
            fusion_out: Linear::new(params, "sage.fusion.out", f, llm_dim, 1.0, rng)?,
            proj_norm_w: params.add("sage.proj_norm.weight", &[llm_dim], vec![1.0; llm_dim], true)?,
            proj_norm_b: params.add("sage.proj_norm.bias", &[llm_dim], vec![0.0; llm_dim], true)?,
            config,
            vision_dim,
            llm_dim,
        })
    }

    /// Number of image tokens the adapter makes for a grid.
    pub fn image_token_count(&self, grid: (usize, usize)) -> usize {
        let p = self.config.image_pool;
        grid.0.div_ceil(p) * grid.1.div_ceil(p)
    }

    /// The adapter's input width: the patch tokens' channels and the anomaly channel when on.
    pub fn adapter_input_dim(&self) -> usize {
        self.vision_dim + self.config.anomaly_channel as usize
    }

    /// Patch tokens → the adapter's input: `pool × pool` average pooling of the patch grid, and
    /// with [`SageConfig::anomaly_channel`] the anomaly channel after each pooled token: from
    /// `anomaly` (one score per patch of the grid; `None`, as for the reference image, gives 0).
    pub fn pool(&self, v: &PatchTokens, anomaly: Option<&[f32]>) -> Result<ImageInput> {
        let pooled = self.pool_features(v);
        if !self.config.anomaly_channel {
            return Ok(pooled);
        }
        let p = self.config.image_pool;
        let ow = v.w.div_ceil(p);
        let mut channel = vec![0.0f32; pooled.rows];
        if let Some(a) = anomaly {
            ensure!(a.len() == v.h * v.w, "anomaly map of {} values for a {}x{} patch grid", a.len(), v.h, v.w);
            let tokens = (v.h * v.w).max(1) as f32;
            let norm =
                v.data.chunks_exact(v.dim).map(|t| t.iter().map(|x| x * x).sum::<f32>().sqrt()).sum::<f32>() / tokens;
            for (i, &score) in a.iter().enumerate() {
                let cell = &mut channel[(i / v.w / p) * ow + (i % v.w) / p];
                *cell = cell.max(score * norm);
            }
        }
        let c = self.vision_dim;
        let mut rows = Vec::with_capacity(pooled.rows * (c + 1));
        for (tok, a) in pooled.pooled.chunks_exact(c).zip(&channel) {
            rows.extend_from_slice(tok);
            rows.push(*a);
        }
        Ok(ImageInput { rows: pooled.rows, pooled: rows })
    }

    /// The patch tokens' `pool × pool` average.
    fn pool_features(&self, v: &PatchTokens) -> ImageInput {
        let p = self.config.image_pool;
        let (oh, ow) = (v.h.div_ceil(p), v.w.div_ceil(p));
        // [P, C] → [C, h, w] for pooling, then back to rows.
        let mut chw = vec![0.0; v.dim * v.h * v.w];
        for (i, tok) in v.data.chunks_exact(v.dim).enumerate() {
            for (c, &x) in tok.iter().enumerate() {
                chw[c * v.h * v.w + i] = x;
            }
        }
        let pooled_chw = if p == 1 { chw } else { resize_area(&chw, v.dim, v.h, v.w, oh, ow) };
        let rows = oh * ow;
        let mut pooled = vec![0.0; rows * v.dim];
        for c in 0..v.dim {
            for i in 0..rows {
                pooled[i * v.dim + c] = pooled_chw[c * rows + i];
            }
        }
        ImageInput { rows, pooled }
    }

    /// Each test patch's anomaly score against the reference (`1 − s_i`, zero-shot against the
    /// test's other patches), on the full grid: what [`SageConfig::anomaly_channel`] feeds.
    pub fn anomaly_scores(&self, test: &PatchTokens, reference: Option<&PatchTokens>) -> Result<Vec<f32>> {
        ensure!(test.dim == self.vision_dim, "patch width {} differs from the head's {}", test.dim, self.vision_dim);
        Ok(mincos_topk(&test.data, reference.map(|r| r.data.as_slice()), test.dim, 1, self.config.reduce).anomaly_map())
    }

    /// The map's image score: the largest of [`SageHead::anomaly_scores`] (what the map cue states).
    pub fn image_score(map: &[f32]) -> f32 {
        map.iter().copied().fold(f32::NEG_INFINITY, f32::max)
    }

    /// The patch selection (fused min-cosine top-K) and the fusion attention's keys' and values'
    /// inputs.
    pub fn fusion_inputs(&self, test: &PatchTokens, reference: Option<&PatchTokens>) -> Result<FusionInput> {
        let c = self.vision_dim;
        ensure!(test.dim == c, "patch width {} differs from the head's {c}", test.dim);
        let scores =
            mincos_topk(&test.data, reference.map(|r| r.data.as_slice()), c, self.config.k, self.config.reduce);
        let s = scores.topk.len();
        let ref_data = reference.map_or(&test.data, |r| &r.data);
        let mut diff = Vec::with_capacity(s * c);
        let mut v_sel = Vec::with_capacity(s * c);
        for &i in &scores.topk {
            let (i, j) = (i as usize, scores.ref_index[i as usize] as usize);
            let (t, r) = (&test.data[i * c..(i + 1) * c], &ref_data[j * c..(j + 1) * c]);
            diff.extend(t.iter().zip(r).map(|(a, b)| a - b));
            v_sel.extend_from_slice(t);
        }
        let selection =
            Selection { patches: scores.topk.clone(), anomaly_map: scores.anomaly_map(), grid: (test.h, test.w) };
        Ok(FusionInput { s, diff, v_sel, selection })
    }

    /// The head's parameters and layer sizes.
    pub fn params(&self) -> HeadParams {
        let lin = |l: &Linear| (l.w, l.b, l.in_f, l.out_f);
        HeadParams {
            adapter_fc1: lin(&self.adapter_fc1),
            adapter_fc2: lin(&self.adapter_fc2),
            fusion_q: lin(&self.fusion_q),
            fusion_k: lin(&self.fusion_k),
            fusion_v: lin(&self.fusion_v),
            fusion_out: lin(&self.fusion_out),
            proj_norm_w: self.proj_norm_w,
            proj_norm_b: self.proj_norm_b,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(h: usize, w: usize, dim: usize, seed: u64) -> PatchTokens {
        PatchTokens { h, w, dim, data: SeedRng::new(seed, 0).uniform(h * w * dim, -1.0, 1.0) }
    }

    fn head(params: &mut ParamSet) -> SageHead {
        let cfg = SageConfig {
            backbone: "lite".into(),
            facts: FactsMode::Fused,
            k: 3,
            reduce: Reduce::Nearest,
            fusion_dim: 8,
            fusion_heads: 2,
            image_pool: 2,
            anomaly_channel: false,
            map_cue: false,
            map_cue_levels: vec![],
        };
        SageHead::new(cfg, 6, 10, params, &mut SeedRng::new(7, 1)).unwrap()
    }

    #[test]
    fn selection_prefers_the_patch_that_differs_and_zero_shot_works() {
        let mut params = ParamSet::new();
        let h = head(&mut params);
        let reference = tokens(4, 4, 6, 9);
        let mut test = reference.clone();
        // Patch 6 becomes something the reference does not contain.
        test.data[6 * 6..7 * 6].copy_from_slice(&[5.0, -5.0, 5.0, -5.0, 5.0, -5.0]);
        let input = h.fusion_inputs(&test, Some(&reference)).unwrap();
        assert_eq!(input.selection.patches[0], 6);
        let map = &input.selection.anomaly_map;
        assert!(map.iter().all(|&m| m <= map[6]) && map[0].abs() < 1e-5, "{map:?}");
        // The difference vector of the selected patch is the test patch minus its nearest
        // reference patch; its value is the test patch.
        assert_eq!(&input.v_sel[..6], &test.data[6 * 6..7 * 6]);
        let zero_shot = h.fusion_inputs(&test, None).unwrap();
        assert_eq!((zero_shot.s, zero_shot.selection.patches.len()), (3, 3));
    }

    #[test]
    fn the_anomaly_channel_is_the_window_maximum_times_the_mean_token_norm() {
        let mut params = ParamSet::new();
        let cfg = SageConfig { anomaly_channel: true, ..head(&mut ParamSet::new()).config };
        let h = SageHead::new(cfg, 6, 10, &mut params, &mut SeedRng::new(7, 1)).unwrap();
        assert_eq!(h.adapter_input_dim(), 7);
        assert_eq!(params[params.id("sage.adapter.fc1.weight").unwrap()].shape, vec![10, 7]);
        // A 3×3 grid pooled by 2 gives windows {0,1,3,4}, {2,5}, {6,7}, {8}.
        let v = tokens(3, 3, 6, 4);
        let norm = v.data.chunks(6).map(|t| t.iter().map(|x| x * x).sum::<f32>().sqrt()).sum::<f32>() / 9.0;
        let map = [0.1, 0.4, 0.2, 0.3, 0.0, 0.5, 0.05, 0.0, 0.7];
        let test = h.pool(&v, Some(&map)).unwrap();
        let channel: Vec<f32> = test.pooled.chunks(7).map(|r| r[6]).collect();
        let want = [0.4 * norm, 0.5 * norm, 0.05 * norm, 0.7 * norm];
        assert!(channel.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5), "{channel:?} vs {want:?}");
        // The features are the plain average; the reference's channel is 0.
        let plain = h.pool_features(&v);
        assert!(test.pooled.chunks(7).zip(plain.pooled.chunks(6)).all(|(a, b)| &a[..6] == b));
        assert!(h.pool(&v, None).unwrap().pooled.chunks(7).all(|r| r[6] == 0.0));
        assert!(h.pool(&v, Some(&map[..4])).is_err(), "a map of the wrong size is refused");
        // The scores are the selection's map: the patch that differs scores highest.
        let mut t = v.clone();
        t.data[4 * 6..5 * 6].copy_from_slice(&[5.0, -5.0, 5.0, -5.0, 5.0, -5.0]);
        let scores = h.anomaly_scores(&t, Some(&v)).unwrap();
        assert_eq!(scores.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0, 4);
        assert_eq!(scores, h.fusion_inputs(&t, Some(&v)).unwrap().selection.anomaly_map);
    }

    #[test]
    fn pooling_averages_each_window_of_the_patch_grid() {
        let mut params = ParamSet::new();
        let h = head(&mut params);
        let v = tokens(4, 4, 6, 1);
        let input = h.pool(&v, None).unwrap();
        assert_eq!((input.rows, h.image_token_count((4, 4)), h.image_token_count((5, 4))), (4, 4, 6));
        // The first pooled token is the mean of patches (0,0), (0,1), (1,0), (1,1).
        for c in 0..6 {
            let mean = [0, 1, 4, 5].iter().map(|&p| v.data[p * 6 + c]).sum::<f32>() / 4.0;
            assert!((input.pooled[c] - mean).abs() < 1e-5, "channel {c}: {} vs {mean}", input.pooled[c]);
        }
    }
}
