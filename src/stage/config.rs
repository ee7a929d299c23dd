//! The SFE run description (`configs/sfe-*.toml`); unknown keys are refused and numeric keys
//! range-checked ([`CheckRanges`]).

use crate::config::{CheckRanges, RangeCheck};
use crate::models::llama::{BaseWeights, Finetune};
use crate::models::sage::SageConfig;
use crate::train::{AdamWConfig, CosineSchedule, TrainConfig};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SfeConfig {
    pub data: DataConfig,
    #[serde(default)]
    pub model: SageConfig,
    pub llm: LlmConfig,
    pub train: TrainSection,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// AD-PL training file (from `sage data build`).
    pub train: PathBuf,
    /// AD-PL validation file.
    pub val: PathBuf,
    /// Facts JSONL from `sage facts` (needed for facts = hard | fused).
    #[serde(default)]
    pub facts: Option<PathBuf>,
    /// Use at most this many training items (0 = all).
    #[serde(default)]
    pub max_train_items: usize,
    /// Zero-shot: ignore the reference images.
    #[serde(default)]
    pub zero_shot: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    /// `lora` or `full`.
    pub finetune: String,
    #[serde(default = "default_rank")]
    pub lora_rank: usize,
    #[serde(default = "default_alpha")]
    pub lora_alpha: f32,
    #[serde(default = "default_targets")]
    pub lora_targets: Vec<String>,
    /// `f32` (default): the base weights dequantized at load. `quantized`: QLoRA, the frozen
    /// linear layers stay in the GGUF's blocks (forward and input gradient from them; only the
    /// adapters, the SAGE head and their optimizer state in f32). Needs `finetune = "lora"`.
    #[serde(default)]
    pub base: BaseWeights,
}

fn default_rank() -> usize {
    8
}
fn default_alpha() -> f32 {
    16.0
}
fn default_targets() -> Vec<String> {
    vec!["attn_q".into(), "attn_v".into()]
}

impl LlmConfig {
    pub fn finetune(&self) -> anyhow::Result<Finetune> {
        match self.finetune.as_str() {
            "full" => Ok(Finetune::Full),
            "lora" => {
                Ok(Finetune::Lora { rank: self.lora_rank, alpha: self.lora_alpha, targets: self.lora_targets.clone() })
            }
            other => Err(crate::user_err!("llm.finetune must be `lora` or `full`, got `{other}`")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub steps: u64,
    /// Examples (questions) per optimizer step, padded into one batch.
    pub batch: usize,
    pub lr: f32,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_min_ratio")]
    pub min_lr_ratio: f32,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub max_grad_norm: f32,
    #[serde(default)]
    pub seed: u64,
    /// Validate every this many steps (0 = only at the end).
    #[serde(default)]
    pub val_every: u64,
    /// Validation questions (0 = all).
    #[serde(default)]
    pub val_questions: usize,
    /// Save a checkpoint every this many steps (the last step always saves).
    #[serde(default = "default_ckpt")]
    pub checkpoint_every: u64,
}

fn default_min_ratio() -> f32 {
    0.1
}
fn default_wd() -> f64 {
    0.0
}
fn default_clip() -> f32 {
    1.0
}
fn default_ckpt() -> u64 {
    10
}

impl TrainSection {
    pub fn trainer_config(&self) -> TrainConfig {
        TrainConfig {
            adamw: AdamWConfig { weight_decay: self.weight_decay, ..AdamWConfig::default() },
            schedule: CosineSchedule {
                peak_lr: self.lr,
                warmup_steps: self.warmup_steps,
                total_steps: self.steps,
                min_ratio: self.min_lr_ratio,
            },
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
        }
    }
}

/// Side of the patch grid the vision encoder makes (stride 16 over the 224-pixel crop): `k`
/// selects among its `PATCH_GRID²` patches and `image_pool` pools it.
pub const PATCH_GRID: u64 = crate::models::efficientnet::PREPROCESS_FULL.crop as u64 / 16;

impl CheckRanges for SfeConfig {
    fn check_ranges(&self, c: &mut RangeCheck) {
        self.model.check_ranges(c);
        self.llm.check_ranges(c);
        self.train.check_ranges(c);
    }
}

impl CheckRanges for SageConfig {
    fn check_ranges(&self, c: &mut RangeCheck) {
        c.int("model.k", self.k as u64, 1, PATCH_GRID * PATCH_GRID);
        c.int("model.image_pool", self.image_pool as u64, 1, PATCH_GRID);
        c.int("model.fusion_heads", self.fusion_heads as u64, 1, 64);
        c.int("model.fusion_dim", self.fusion_dim as u64, 1, 8192);
        c.require(
            "model.fusion_dim",
            self.fusion_heads == 0 || self.fusion_dim.is_multiple_of(self.fusion_heads),
            format!("= {}, must be a multiple of model.fusion_heads = {}", self.fusion_dim, self.fusion_heads),
        );
    }
}

impl CheckRanges for LlmConfig {
    fn check_ranges(&self, c: &mut RangeCheck) {
        c.require(
            "llm.base",
            self.base == BaseWeights::F32 || self.finetune == "lora",
            "= \"quantized\" keeps the base frozen in its blocks: it needs llm.finetune = \"lora\" (QLoRA)".to_string(),
        );
        if self.finetune == "lora" {
            c.int("llm.lora_rank", self.lora_rank as u64, 1, 1024);
            c.positive_float("llm.lora_alpha", self.lora_alpha as f64, 1e4);
        }
    }
}

/// The most optimizer steps a run may ask for (far beyond any real run, small enough that the
/// step counters and the schedule stay exact).
pub const MAX_STEPS: u64 = 100_000_000;

impl CheckRanges for TrainSection {
    fn check_ranges(&self, c: &mut RangeCheck) {
        c.int("train.steps", self.steps, 1, MAX_STEPS);
        // A step's examples are padded into one batch.
        c.int("train.batch", self.batch as u64, 1, 4096);
        // AdamW multiplies weights by 1 − lr·weight_decay: both ≤ 1 keep that factor in [0, 1].
        c.positive_float("train.lr", self.lr as f64, 1.0);
        c.float("train.weight_decay", self.weight_decay, 0.0, 1.0);
        c.float("train.min_lr_ratio", self.min_lr_ratio as f64, 0.0, 1.0);
        c.int("train.warmup_steps", self.warmup_steps, 0, MAX_STEPS);
        // 0 turns clipping off; NaN would do so silently.
        c.float("train.max_grad_norm", self.max_grad_norm as f64, 0.0, 1e6);
        c.int("train.checkpoint_every", self.checkpoint_every, 1, MAX_STEPS);
    }
}
