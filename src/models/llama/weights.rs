//! Where the decoder's tensors live in a [`ParamSet`]: every weight under its GGUF name
//! (`token_embd.weight`, `blk.{i}.attn_q.weight`, ...), which of them train, and the LoRA adapters
//! beside the frozen ones. [`LlamaParams::load`] reads a checkpoint into the set;
//! [`super::Llama::new`] copies the set to an op set. Saving (merged or adapters only) and
//! loading adapters back work on the set, so a checkpoint never depends on the backend.
//!
//! `Finetune::Full` trains every tensor. `Finetune::Lora` freezes them (no optimizer state) and
//! trains low-rank adapters on the chosen linear layers, `y = x·Wᵀ + (alpha/rank)·(x·Aᵀ)·Bᵀ`,
//! with `B` starting at zero so that step 0 is exactly the base model.

use super::config::LlamaConfig;
use crate::models::WeightSource;
use crate::ops::gemm::{sgemm, MatRef};
use crate::ops::rope::RopeTable;
use crate::quant::QMatrix;
use crate::tensor::{DType, Tensor};
use crate::train::{ParamId, ParamSet, SeedRng};
use crate::user_bail;
use anyhow::Result;
use std::collections::BTreeMap;

/// The linear layers of a block in checkpoint order: the names LoRA `targets` may use.
pub const LINEAR_NAMES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// The projections that carry a bias in a family with `qkv_bias` (Qwen2).
const QKV: [&str; 3] = ["attn_q", "attn_k", "attn_v"];

/// What the optimizer may change.
#[derive(Clone, Debug, PartialEq)]
pub enum Finetune {
    /// Every tensor is trainable.
    Full,
    /// Base weights frozen; adapters `blk.N.<target>.lora_a` `[rank, in]` and `.lora_b`
    /// `[out, rank]` on each target in [`LINEAR_NAMES`], scaled by `alpha / rank`.
    Lora { rank: usize, alpha: f32, targets: Vec<String> },
}

/// How the frozen base weights are held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BaseWeights {
    /// Every tensor dequantized to f32 at load.
    #[default]
    F32,
    /// The linear layers keep the checkpoint's quantized blocks (GGUF Q4_0 … Q6_K) and multiply
    /// from them; so do the token table and the LM head (embedding, decoding and the losses read
    /// their blocks). Tensors stored unquantized, and every tensor of a source without blocks,
    /// stay f32. Frozen: it trains only through LoRA adapters (QLoRA).
    Quantized,
}

/// A linear layer's weight: a parameter, or frozen quantized blocks.
#[derive(Clone, Debug)]
pub enum LinearWeight {
    Param(ParamId),
    Quant(QMatrix),
}

/// A low-rank adapter beside a frozen weight: adds `scale · B·A` to it.
#[derive(Clone, Copy, Debug)]
pub struct LoraAdapter {
    pub lora_a: ParamId,
    pub lora_b: ParamId,
    pub rank: usize,
    pub scale: f32,
}

/// `blk.N.<name>.weight` `[out, in]`, with `blk.N.<name>.bias` `[out]` where the family has one
/// (Qwen2's q/k/v), optionally with an adapter.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: LinearWeight,
    pub bias: Option<ParamId>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    /// The effective weight `W + scale·B·A` `[out, in]`.
    fn merged(&self, ps: &ParamSet) -> Vec<f32> {
        let mut w = match &self.weight {
            LinearWeight::Param(id) => ps[*id].value.clone(),
            LinearWeight::Quant(q) => q.dequantize(),
        };
        if let Some(l) = &self.lora {
            let b: Vec<f32> = ps[l.lora_b].value.iter().map(|v| v * l.scale).collect();
            let a = MatRef::rows(&ps[l.lora_a].value, self.in_features);
            sgemm(self.out_features, self.in_features, l.rank, MatRef::rows(&b, l.rank), a, &mut w, true);
        }
        w
    }
}

/// `blk.N`
#[derive(Clone, Debug)]
pub struct Block {
    pub attn_norm: ParamId,
    pub attn_q: Linear,
    pub attn_k: Linear,
    pub attn_v: Linear,
    pub attn_output: Linear,
    pub ffn_norm: ParamId,
    pub ffn_gate: Linear,
    pub ffn_up: Linear,
    pub ffn_down: Linear,
}

impl Block {
    /// The linear layers, in [`LINEAR_NAMES`] order.
    pub fn linears(&self) -> [&Linear; 7] {
        [&self.attn_q, &self.attn_k, &self.attn_v, &self.attn_output, &self.ffn_gate, &self.ffn_up, &self.ffn_down]
    }
}

pub struct LlamaParams {
    pub config: LlamaConfig,
    pub finetune: Finetune,
    /// The token table's f32 parameter; `None` when it is held only as blocks (`embd_q`).
    pub token_embd: Option<ParamId>,
    pub blocks: Vec<Block>,
    pub output_norm: ParamId,
    /// The LM head's f32 parameter: `output.weight` when the checkpoint has one, else
    /// `token_embd` (tied, as in SmolLM2); `None` when it is held only as blocks (`head_q`).
    pub output: Option<ParamId>,
    /// Whether the LM head is the token table (the checkpoint has no `output.weight`).
    pub tied: bool,
    /// With [`BaseWeights::Quantized`], the LM head's blocks and the token table's, when the
    /// checkpoint stores them quantized: embedding, decoding and the losses read only the blocks
    /// (a quantized base never trains them), and the loader registers no f32 copy of such a table.
    pub head_q: Option<QMatrix>,
    pub embd_q: Option<QMatrix>,
    rope: RopeTable,
}

impl LlamaParams {
    /// Registers every weight into `params` under its GGUF name (`token_embd.weight`,
    /// `blk.{i}.attn_q.weight`, ..., `output_norm.weight`). Full: all trainable. LoRA: base weights
    /// frozen; adapters `blk.{i}.{target}.lora_a` `[rank, in]` drawn uniform in `±1/√in` from `rng`
    /// (PyTorch's Kaiming-uniform with `a = √5`, as PEFT initialises A) and `.lora_b` `[out, rank]`
    /// zero, both trainable.
    pub fn load(
        weights: &dyn WeightSource,
        config: LlamaConfig,
        finetune: &Finetune,
        params: &mut ParamSet,
        rng: &mut SeedRng,
    ) -> Result<Self> {
        Self::load_with(weights, config, finetune, BaseWeights::F32, params, rng)
    }

    /// [`LlamaParams::load`] with the base weights held as `base` says.
    pub fn load_with(
        weights: &dyn WeightSource,
        config: LlamaConfig,
        finetune: &Finetune,
        base: BaseWeights,
        params: &mut ParamSet,
        rng: &mut SeedRng,
    ) -> Result<Self> {
        let quantized = base == BaseWeights::Quantized;
        // A quantized tensor of the expected shape, or None (then it is read in f32).
        let quant_of = |name: &str, shape: [usize; 2]| -> Option<QMatrix> {
            let q = weights.quantized(name).filter(|_| quantized)?;
            (q.rows == shape[0] && q.cols == shape[1]).then_some(q)
        };
        if let Finetune::Lora { rank, alpha, targets } = finetune {
            if *rank == 0 || !alpha.is_finite() {
                user_bail!("LoRA needs rank ≥ 1 and a finite alpha, got rank {rank}, alpha {alpha}");
            }
            if targets.is_empty() {
                user_bail!("LoRA without targets trains nothing; choose from {}", LINEAR_NAMES.join(", "));
            }
            if let Some(bad) = targets.iter().find(|t| !LINEAR_NAMES.contains(&t.as_str())) {
                user_bail!("unknown LoRA target `{bad}`; choose from {}", LINEAR_NAMES.join(", "));
            }
        }
        let c = &config;
        let full = matches!(finetune, Finetune::Full);
        let tensor = |params: &mut ParamSet, name: &str, shape: &[usize]| -> Result<ParamId> {
            let t = weights.get(name)?;
            if t.shape() != shape {
                user_bail!("tensor `{name}` has shape {:?}, the config says {shape:?}", t.shape());
            }
            params.register(name, &t, full)
        };
        let (d, qd, kvd) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let tied = !weights.contains("output.weight");
        let head_name = if tied { "token_embd.weight" } else { "output.weight" };
        let head_q = quant_of(head_name, [c.vocab_size, d]);
        let embd_q = quant_of("token_embd.weight", [c.vocab_size, d]);
        // A table stored quantized is frozen with the rest of a quantized base, and every reader
        // of it reads the blocks, so no f32 copy is made (Qwen2.5-0.5B: 2 × 544 MB).
        let token_embd = match embd_q {
            Some(_) => None,
            None => Some(tensor(params, "token_embd.weight", &[c.vocab_size, d])?),
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let mut linear = |params: &mut ParamSet, name: &str, out_f: usize, in_f: usize| -> Result<Linear> {
                let prefix = format!("blk.{i}.{name}");
                let wname = format!("{prefix}.weight");
                let weight = match quant_of(&wname, [out_f, in_f]) {
                    Some(q) => LinearWeight::Quant(q),
                    None => LinearWeight::Param(tensor(params, &wname, &[out_f, in_f])?),
                };
                let bias = if c.family.qkv_bias() && QKV.contains(&name) {
                    Some(tensor(params, &format!("{prefix}.bias"), &[out_f])?)
                } else {
                    None
                };
                let lora = match finetune {
                    Finetune::Lora { rank, alpha, targets } if targets.iter().any(|t| t == name) => {
                        let bound = 1.0 / (in_f as f32).sqrt();
                        let a = rng.uniform(rank * in_f, -bound, bound);
                        let lora_a = params.add(format!("{prefix}.lora_a"), &[*rank, in_f], a, true)?;
                        let b = vec![0.0; out_f * rank];
                        let lora_b = params.add(format!("{prefix}.lora_b"), &[out_f, *rank], b, true)?;
                        Some(LoraAdapter { lora_a, lora_b, rank: *rank, scale: alpha / *rank as f32 })
                    }
                    _ => None,
                };
                Ok(Linear { weight, bias, in_features: in_f, out_features: out_f, lora })
            };
            let attn_norm = tensor(params, &format!("blk.{i}.attn_norm.weight"), &[d])?;
            let mut attn_q = linear(params, "attn_q", qd, d)?;
            let mut attn_k = linear(params, "attn_k", kvd, d)?;
            let attn_v = linear(params, "attn_v", kvd, d)?;
            let attn_output = linear(params, "attn_output", d, qd)?;
            let ffn_norm = tensor(params, &format!("blk.{i}.ffn_norm.weight"), &[d])?;
            let ffn_gate = linear(params, "ffn_gate", c.intermediate_size, d)?;
            let ffn_up = linear(params, "ffn_up", c.intermediate_size, d)?;
            let ffn_down = linear(params, "ffn_down", d, c.intermediate_size)?;
            if c.family.rope_halves() {
                for (l, heads) in [(&mut attn_q, c.num_heads), (&mut attn_k, c.num_kv_heads)] {
                    let ids = match &mut l.weight {
                        LinearWeight::Param(id) => Some(*id),
                        LinearWeight::Quant(q) => {
                            // Whole rows of blocks move: the same permutation of output rows.
                            *q = q.permute_rows(&halves_to_pairs_order(q.rows, c.head_dim, false));
                            None
                        }
                    };
                    for id in ids.into_iter().chain(l.bias) {
                        let row = params[id].value.len() / (heads * c.head_dim);
                        params[id].value = halves_to_pairs(&params[id].value, c.head_dim, row, false);
                    }
                }
            }
            blocks.push(Block { attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down });
        }
        let output_norm = tensor(params, "output_norm.weight", &[d])?;
        let output = match (&head_q, tied) {
            (Some(_), _) => None,
            (None, true) => token_embd,
            (None, false) => Some(tensor(params, "output.weight", &[c.vocab_size, d])?),
        };
        // Every position the model can take: sin/cos are computed per position, so the values do
        // not depend on the table's length (the inference model's shorter table agrees).
        let rope = RopeTable::new(c.head_dim, c.rope_theta, c.context_length);
        Ok(LlamaParams {
            config,
            finetune: finetune.clone(),
            token_embd,
            blocks,
            output_norm,
            output,
            tied,
            head_q,
            embd_q,
            rope,
        })
    }

    /// The RoPE table (every position the model can take).
    pub fn rope_table(&self) -> &RopeTable {
        &self.rope
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }

    /// Most positions a sequence (prompt plus generated tokens) may have.
    pub fn max_positions(&self) -> usize {
        self.rope.max_pos()
    }

    /// Every parameter this model registered (base weights and adapters), in registration order.
    pub fn param_ids(&self) -> Vec<ParamId> {
        let mut ids: Vec<ParamId> = self.token_embd.into_iter().collect();
        for b in &self.blocks {
            ids.push(b.attn_norm);
            ids.push(b.ffn_norm);
            for l in b.linears() {
                if let LinearWeight::Param(id) = l.weight {
                    ids.push(id);
                }
                ids.extend(l.bias);
                if let Some(a) = &l.lora {
                    ids.extend([a.lora_a, a.lora_b]);
                }
            }
        }
        ids.push(self.output_norm);
        if !self.tied {
            ids.extend(self.output);
        }
        ids
    }

    /// The token table and the LM head (when not tied) as f32 values: the parameters, or the
    /// blocks dequantized when they are held only as blocks.
    fn tables(&self, params: &ParamSet) -> Result<Vec<(String, Vec<f32>)>> {
        let table = |id: Option<ParamId>, q: &Option<QMatrix>, name: &str| match (id, q) {
            (Some(id), _) => Ok((params[id].name.clone(), params[id].value.clone())),
            (None, Some(q)) => Ok((name.to_string(), q.dequantize())),
            (None, None) => Err(anyhow::anyhow!("`{name}` has neither an f32 parameter nor quantized blocks")),
        };
        let mut out = vec![table(self.token_embd, &self.embd_q, "token_embd.weight")?];
        if !self.tied {
            out.push(table(self.output, &self.head_q, "output.weight")?);
        }
        Ok(out)
    }

    /// The weights for saving under their GGUF names, with every adapter folded into its base
    /// weight (`W + alpha/rank · B·A`): a plain LLaMA checkpoint that
    /// [`super::llama::Llama::from_weights`] or `LlamaParams::load(.., Finetune::Full, ..)` reads.
    pub fn merged_weights(&self, params: &ParamSet) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        let mut put = |name: &str, value: Vec<f32>, shape: &[usize]| -> Result<()> {
            out.insert(name.to_string(), Tensor::from_vec(value, shape)?);
            Ok(())
        };
        let p = |id: ParamId| (&params[id].name, params[id].value.clone(), &params[id].shape);
        let table_shape = [self.config.vocab_size, self.config.hidden_size];
        let mut tables = self.tables(params)?.into_iter();
        if let Some((n, v)) = tables.next() {
            put(&n, v, &table_shape)?;
        }
        for (i, b) in self.blocks.iter().enumerate() {
            for id in [b.attn_norm, b.ffn_norm] {
                let (n, v, sh) = p(id);
                put(n, v, sh)?;
            }
            let c = &self.config;
            for (j, l) in b.linears().into_iter().enumerate() {
                // Back to the checkpoint's order: q and k of a rotate-half family were permuted on
                // load (see `halves_to_pairs`).
                let heads = match j {
                    0 if c.family.rope_halves() => Some(c.num_heads),
                    1 if c.family.rope_halves() => Some(c.num_kv_heads),
                    _ => None,
                };
                let restore = |v: Vec<f32>| match heads {
                    Some(h) => halves_to_pairs(&v, c.head_dim, v.len() / (h * c.head_dim), true),
                    None => v,
                };
                // A quantized base is saved dequantized, with its adapter folded in.
                let name = format!("blk.{i}.{}.weight", LINEAR_NAMES[j]);
                put(&name, restore(l.merged(params)), &[l.out_features, l.in_features])?;
                if let Some(bias) = l.bias {
                    let (n, v, sh) = p(bias);
                    put(n, restore(v), sh)?;
                }
            }
        }
        let (n, v, sh) = p(self.output_norm);
        put(n, v, sh)?;
        if let Some((n, v)) = tables.next() {
            put(&n, v, &table_shape)?;
        }
        Ok(out)
    }

    /// Only the trainable tensors of this model under their parameter names (every weight for
    /// Full, the `lora_a`/`lora_b` adapters for LoRA): a small checkpoint to write beside the base
    /// GGUF and read back with [`LlamaParams::load_trainable_weights`].
    pub fn trainable_weights(&self, params: &ParamSet) -> Result<BTreeMap<String, Tensor>> {
        self.param_ids()
            .into_iter()
            .filter(|&id| params[id].trainable)
            .map(|id| Ok((params[id].name.clone(), params[id].tensor())))
            .collect()
    }

    /// Overwrites this model's trainable parameters with the tensors of the same names in `src`
    /// (what [`LlamaParams::trainable_weights`] saved). Fails on a missing tensor or a shape
    /// that differs.
    pub fn load_trainable_weights(&self, params: &mut ParamSet, src: &dyn WeightSource) -> Result<()> {
        for id in self.param_ids() {
            if !params[id].trainable {
                continue;
            }
            let name = params[id].name.clone();
            let t = src.get(&name)?;
            if t.shape() != params[id].shape {
                user_bail!("tensor `{name}` has shape {:?}, the model expects {:?}", t.shape(), params[id].shape);
            }
            params[id].value = t.to_dtype(DType::F32).into_f32s()?;
        }
        Ok(())
    }
}

/// Reorders the rows of a query or key projection `[heads·head_dim, row]` (`row` = 1 for a bias)
/// from rotate-half RoPE order, where element `i` of a head turns with element `i + head_dim/2`
/// (HF, and GGUF files of Qwen2), to the adjacent-pair order of the decoder's RoPE
/// (`ops::rope`), where pair `i` is elements `2i, 2i + 1`: row `i` goes to `2i` and row
/// `i + head_dim/2` to `2i + 1`, in every head. Queries and keys move alike, so attention scores
/// are unchanged; this is the permutation llama.cpp's converter applies to LLaMA checkpoints.
/// `inverse` undoes it (for saving in the checkpoint's order).
pub fn halves_to_pairs(values: &[f32], head_dim: usize, row: usize, inverse: bool) -> Vec<f32> {
    let order = halves_to_pairs_order(values.len() / row, head_dim, inverse);
    order.iter().flat_map(|&r| &values[r * row..(r + 1) * row]).copied().collect()
}

/// The row order of [`halves_to_pairs`] over `rows` rows (whole heads): destination row `t` is
/// source row `order[t]`. A quantized projection moves its rows of blocks by it.
pub fn halves_to_pairs_order(rows: usize, head_dim: usize, inverse: bool) -> Vec<usize> {
    let half = head_dim / 2;
    let mut order = vec![0; rows];
    for h in (0..rows).step_by(head_dim) {
        for i in 0..head_dim {
            let paired = if i < half { 2 * i } else { 2 * (i - half) + 1 };
            let (from, to) = if inverse { (paired, i) } else { (i, paired) };
            order[h + to] = h + from;
        }
    }
    order
}
