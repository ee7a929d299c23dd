//! Reading a DINOv2 checkpoint (Hugging Face `Dinov2Model` names) into host memory, checked so
//! that every shape chains: the forward indexes by these sizes, so a checkpoint that passes here
//! cannot make an op fail. Layer-scale is folded into the linear layer before it at load time
//! (`γ ⊙ (x·Wᵀ + b) = x·(diag γ·W)ᵀ + γ ⊙ b`), so a block is plain GEMMs and residual adds.

use crate::models::WeightSource;
use crate::user_bail;
use anyhow::Result;

/// Every DINOv2 size (ViT-S/B/L/g) has heads of 64.
pub const HEAD_DIM: usize = 64;

/// A linear layer: weight `[out, in]`, bias `[out]`.
pub(super) struct Linear {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

pub(super) struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

pub(super) struct HostLayer {
    pub norm1: Norm,
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    /// `attention.output.dense` with `layer_scale1` folded in.
    pub output: Linear,
    pub norm2: Norm,
    pub fc1: Linear,
    /// `mlp.fc2` with `layer_scale2` folded in.
    pub fc2: Linear,
}

/// The backbone's weights, validated.
pub(super) struct Checkpoint {
    pub dim: usize,
    pub patch: usize,
    pub mlp: usize,
    /// `[dim, 3·patch·patch]`.
    pub patch_weight: Vec<f32>,
    pub patch_bias: Vec<f32>,
    pub cls_token: Vec<f32>,
    /// The CLS position row `[dim]` and the patch grid `[grid, grid, dim]`.
    pub cls_pos: Vec<f32>,
    pub patch_pos: Vec<f32>,
    pub pos_grid: usize,
    pub layers: Vec<HostLayer>,
    pub layernorm: Norm,
}

fn shape(w: &dyn WeightSource, name: &str) -> Result<Vec<usize>> {
    match w.shape(name) {
        Some(s) => Ok(s),
        None => user_bail!("tensor `{name}` is missing: not a Hugging Face DINOv2 checkpoint (make one with `sage convert MODEL.onnx OUT.safetensors`)"),
    }
}

fn values(w: &dyn WeightSource, name: &str, expect: &[usize]) -> Result<Vec<f32>> {
    let s = shape(w, name)?;
    if s != expect {
        user_bail!("tensor `{name}` has shape {s:?}, expected {expect:?}");
    }
    let v = w.get(name)?.into_f32s()?;
    if v.iter().any(|x| !x.is_finite()) {
        user_bail!("tensor `{name}` holds a non-finite value");
    }
    Ok(v)
}

fn linear(w: &dyn WeightSource, name: &str, out: usize, inp: usize, scale: Option<&[f32]>) -> Result<Linear> {
    let mut weight = values(w, &format!("{name}.weight"), &[out, inp])?;
    let mut bias = values(w, &format!("{name}.bias"), &[out])?;
    if let Some(g) = scale {
        for (o, &s) in g.iter().enumerate() {
            weight[o * inp..(o + 1) * inp].iter_mut().for_each(|v| *v *= s);
            bias[o] *= s;
        }
    }
    Ok(Linear { weight, bias })
}

fn norm(w: &dyn WeightSource, name: &str, dim: usize) -> Result<Norm> {
    Ok(Norm {
        weight: values(w, &format!("{name}.weight"), &[dim])?,
        bias: values(w, &format!("{name}.bias"), &[dim])?,
    })
}

impl Checkpoint {
    pub fn from_weights(w: &dyn WeightSource) -> Result<Checkpoint> {
        let pw = shape(w, "embeddings.patch_embeddings.projection.weight")?;
        if pw.len() != 4 || pw[1] != 3 || pw[2] != pw[3] || pw[2] == 0 || pw[0] == 0 {
            user_bail!(
                "tensor `embeddings.patch_embeddings.projection.weight` has shape {pw:?}, expected [dim, 3, patch, patch]"
            );
        }
        let (dim, patch) = (pw[0], pw[2]);
        if !dim.is_multiple_of(HEAD_DIM) {
            user_bail!("the embedding width {dim} is not a multiple of DINOv2's head size {HEAD_DIM}");
        }
        let patch_weight = values(w, "embeddings.patch_embeddings.projection.weight", &pw)?;
        let patch_bias = values(w, "embeddings.patch_embeddings.projection.bias", &[dim])?;
        let cls_token = values(w, "embeddings.cls_token", &[1, 1, dim])?;
        let ps = shape(w, "embeddings.position_embeddings")?;
        let positions = ps.get(1).copied().unwrap_or(0).saturating_sub(1);
        let pos_grid = (positions as f64).sqrt().round() as usize;
        if ps.len() != 3 || ps[0] != 1 || ps[2] != dim || pos_grid == 0 || pos_grid * pos_grid != positions {
            user_bail!("tensor `embeddings.position_embeddings` has shape {ps:?}, expected [1, 1 + g·g, {dim}]");
        }
        let mut pos = values(w, "embeddings.position_embeddings", &ps)?;
        let patch_pos = pos.split_off(dim);
        let mut layers = Vec::new();
        let mlp = shape(w, "encoder.layer.0.mlp.fc1.weight")?.first().copied().unwrap_or(0);
        if mlp == 0 {
            user_bail!("tensor `encoder.layer.0.mlp.fc1.weight` is empty");
        }
        while w.contains(&format!("encoder.layer.{}.norm1.weight", layers.len())) {
            let p = format!("encoder.layer.{}", layers.len());
            let ls1 = values(w, &format!("{p}.layer_scale1.lambda1"), &[dim])?;
            let ls2 = values(w, &format!("{p}.layer_scale2.lambda1"), &[dim])?;
            layers.push(HostLayer {
                norm1: norm(w, &format!("{p}.norm1"), dim)?,
                query: linear(w, &format!("{p}.attention.attention.query"), dim, dim, None)?,
                key: linear(w, &format!("{p}.attention.attention.key"), dim, dim, None)?,
                value: linear(w, &format!("{p}.attention.attention.value"), dim, dim, None)?,
                output: linear(w, &format!("{p}.attention.output.dense"), dim, dim, Some(&ls1))?,
                norm2: norm(w, &format!("{p}.norm2"), dim)?,
                fc1: linear(w, &format!("{p}.mlp.fc1"), mlp, dim, None)?,
                fc2: linear(w, &format!("{p}.mlp.fc2"), dim, mlp, Some(&ls2))?,
            });
        }
        if layers.is_empty() {
            user_bail!("tensor `encoder.layer.0.norm1.weight` is missing: the checkpoint has no transformer layers");
        }
        Ok(Checkpoint {
            dim,
            patch,
            mlp,
            patch_weight,
            patch_bias,
            cls_token,
            cls_pos: pos,
            patch_pos,
            pos_grid,
            layers,
            layernorm: norm(w, "layernorm", dim)?,
        })
    }
}
