//! DINOv2 (Oquab et al. 2023), the vision transformer, written once against the op set
//! ([`StepOps`]); frozen, so forward only. Names mirror Hugging Face's `Dinov2Model` state dict
//! (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`); an ONNX export of it is read through
//! [`onnx_names`] (`sage convert`, or directly by [`Dinov2::load`]).
//!
//! The forward: the 14×14 patch embedding is an im2col GEMM (columns built on the host, where
//! the image is, with an all-zero row where the CLS token goes) accumulated into a buffer that
//! already holds the CLS token, the patch bias and the position embedding — resampled to the
//! image's grid with [`pos_embed`] (bicubic, as HF does) — so the embeddings are one GEMM. Then
//! pre-norm blocks: LayerNorm → Q, K, V → non-causal multi-head attention (the op set's fusion
//! attention with every token as both query and key) → output projection → residual; LayerNorm
//! → fc1 → exact GELU → fc2 → residual. Layer-scale is folded into the output projection and fc2
//! at load time ([`checkpoint`]), and the residual add is the op set's channel epilogue with one
//! channel and a zero bias. A final LayerNorm gives the normalised tokens.

mod checkpoint;
pub mod onnx_names;
mod pos_embed;

pub use checkpoint::HEAD_DIM;

use crate::backend::cpu::HostOps;
use crate::formats::{onnx, safetensors::SafetensorsFile};
use crate::image_io::Preprocess;
use crate::models::{StateDict, WeightSource};
use crate::opset::{FusionShape, GemmSpec, StepOps};
use crate::user_err;
use anyhow::{bail, Result};
use checkpoint::Checkpoint;
use std::path::Path;

/// DINOv2's LayerNorm epsilon.
pub const LN_EPS: f32 = 1e-6;

/// ImageNet normalisation in [`Preprocess`]'s `(x·255 − mean) / std` form.
pub const MEAN: [f32; 3] = [123.675, 116.28, 103.53];
pub const STD: [f32; 3] = [58.395, 57.12, 57.375];

/// The whole image resized to `size × size` (square inputs; a non-square one is centre-cropped).
pub fn preprocess(size: u32) -> Preprocess {
    Preprocess { resize_shorter: size, crop: size, mean: MEAN, std: STD }
}

/// Which hidden state to read back, HF's `hidden_states` numbering: `Hidden(0)` is the
/// embeddings, `Hidden(i)` the output of block `i − 1`; `Normed` is the last one after the final
/// LayerNorm (HF's `last_hidden_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tap {
    Hidden(usize),
    Normed,
}

struct Linear<O: StepOps> {
    w: O::Buf,
    b: O::Buf,
    out: usize,
    inp: usize,
}

struct Norm<O: StepOps> {
    w: O::Buf,
    b: O::Buf,
}

struct Layer<O: StepOps> {
    norm1: Norm<O>,
    query: Linear<O>,
    key: Linear<O>,
    value: Linear<O>,
    output: Linear<O>,
    norm2: Norm<O>,
    fc1: Linear<O>,
    fc2: Linear<O>,
}

/// The encoder on an op set; `Dinov2` alone is the CPU one.
pub struct Dinov2<O: StepOps = HostOps> {
    ops: O,
    dim: usize,
    patch: usize,
    /// `[dim, 3·patch·patch]`.
    patch_embed: O::Buf,
    /// `cls_token + position[0]`, `[dim]`.
    cls_row: Vec<f32>,
    patch_bias: Vec<f32>,
    /// `[pos_grid, pos_grid, dim]`.
    patch_pos: Vec<f32>,
    pos_grid: usize,
    layers: Vec<Layer<O>>,
    layernorm: Norm<O>,
    /// A one-channel zero bias: `channel_bias_act` with it is a residual add.
    zero: O::Stat,
}

/// The tokens of one tap for a batch: `[images, 1 + grid_h·grid_w, dim]`, CLS first.
#[derive(Clone, Debug)]
pub struct Hidden {
    pub tap: Tap,
    pub images: usize,
    pub grid_h: usize,
    pub grid_w: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

impl Hidden {
    /// Image `i`'s patch tokens `[grid_h·grid_w, dim]` (the CLS token dropped).
    pub fn patches(&self, i: usize) -> &[f32] {
        let t = 1 + self.grid_h * self.grid_w;
        &self.data[(i * t + 1) * self.dim..(i + 1) * t * self.dim]
    }
}

/// Reads a Hugging Face DINOv2 state dict: a `.safetensors` file, or an `.onnx` export converted
/// on the fly.
pub fn read_weights(path: &Path) -> Result<Box<dyn WeightSource>> {
    if crate::formats::hf::is_hf_dir(path) {
        return Ok(Box::new(open_hf(path)?));
    }
    if path.extension().is_some_and(|e| e == "onnx") {
        let c = convert_onnx(path)?;
        Ok(Box::new(StateDict { path: path.to_path_buf(), tensors: c.tensors }))
    } else {
        Ok(Box::new(SafetensorsFile::open(path)?))
    }
}

/// A Hugging Face `Dinov2Model` folder (`config.json` + safetensors), refused unless its config
/// is one this ViT runs: `model_type` dinov2, heads of 64, LayerNorm ε 1e-6, GELU MLP, no SwiGLU.
pub fn open_hf(dir: &Path) -> Result<crate::formats::hf::HfCheckpoint> {
    let ck = crate::formats::hf::HfCheckpoint::open(dir)?;
    if ck.model_type != "dinov2" {
        return Err(user_err!("{}: model_type `{}` is not a DINOv2 ViT (dinov2)", dir.display(), ck.model_type));
    }
    let (d, heads) = (ck.usize("hidden_size")?, ck.usize("num_attention_heads")?);
    if heads == 0 || d != heads * checkpoint::HEAD_DIM {
        return Err(ck.key_err("num_attention_heads", &format!("hidden_size / {} (heads of 64)", checkpoint::HEAD_DIM)));
    }
    if ck.f64_opt("layer_norm_eps")?.is_some_and(|e| (e - 1e-6).abs() > 1e-12) {
        return Err(ck.key_err("layer_norm_eps", "1e-6 (the ViT's LayerNorm ε)"));
    }
    if ck.config["use_swiglu_ffn"].as_bool() == Some(true) {
        return Err(ck.key_err("use_swiglu_ffn", "false (ViT-g's SwiGLU MLP is not implemented)"));
    }
    if let Some(act) = ck.config["hidden_act"].as_str().filter(|a| *a != "gelu") {
        return Err(ck.key_err("hidden_act", &format!("gelu, not {act}")));
    }
    Ok(ck)
}

/// An ONNX export of `Dinov2Model` → its HF-named tensors (see [`onnx_names`]).
pub fn convert_onnx(path: &Path) -> Result<onnx_names::Converted> {
    let model = onnx::load(path)?;
    onnx_names::convert(&model.graph).map_err(|e| user_err!("{}: {}", path.display(), e.0))
}

impl Dinov2<HostOps> {
    /// Loads from `.safetensors` (made by `sage convert`), a Hugging Face `Dinov2Model` folder,
    /// or directly from the `.onnx` export.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_on(HostOps, path)
    }
}

impl<O: StepOps> Dinov2<O> {
    pub fn load_on(ops: O, path: &Path) -> Result<Self> {
        let w = read_weights(path)?;
        Self::from_weights_on(ops, w.as_ref()).map_err(|e| e.context(format!("reading {}", path.display())))
    }

    /// Validates `w` as a DINOv2 checkpoint and copies it to `ops`.
    pub fn from_weights_on(ops: O, w: &dyn WeightSource) -> Result<Self> {
        let ck = Checkpoint::from_weights(w)?;
        let linear = |l: &checkpoint::Linear, out: usize, inp: usize| -> Result<Linear<O>> {
            // Frozen: packed once for the op set's GEMM (the host's AVX-512 path).
            let w = ops.prepare_linear_weight(ops.upload(&l.weight)?, out, inp)?;
            Ok(Linear { w, b: ops.upload(&l.bias)?, out, inp })
        };
        let norm = |n: &checkpoint::Norm| -> Result<Norm<O>> {
            Ok(Norm { w: ops.upload(&n.weight)?, b: ops.upload(&n.bias)? })
        };
        let (d, m) = (ck.dim, ck.mlp);
        let layers = ck
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    norm1: norm(&l.norm1)?,
                    query: linear(&l.query, d, d)?,
                    key: linear(&l.key, d, d)?,
                    value: linear(&l.value, d, d)?,
                    output: linear(&l.output, d, d)?,
                    norm2: norm(&l.norm2)?,
                    fc1: linear(&l.fc1, m, d)?,
                    fc2: linear(&l.fc2, d, m)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let cls_row = ck.cls_token.iter().zip(&ck.cls_pos).map(|(a, b)| a + b).collect();
        Ok(Dinov2 {
            patch_embed: ops.upload(&ck.patch_weight)?,
            layernorm: norm(&ck.layernorm)?,
            zero: ops.stat_zeros(1)?,
            dim: d,
            patch: ck.patch,
            cls_row,
            patch_bias: ck.patch_bias,
            patch_pos: ck.patch_pos,
            pos_grid: ck.pos_grid,
            layers,
            ops,
        })
    }

    pub fn ops(&self) -> &O {
        &self.ops
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn patch(&self) -> usize {
        self.patch
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    fn heads(&self) -> usize {
        self.dim / HEAD_DIM
    }

    /// The embeddings of a batch of `[3, h, w]` images on the op set, `[images·(1 + P), dim]`.
    fn embed(&self, images: &[&[f32]], h: usize, w: usize) -> Result<(O::Buf, usize, usize)> {
        let (p, d) = (self.patch, self.dim);
        let (gh, gw) = (h / p, w / p);
        if gh == 0 || gw == 0 {
            bail!("DINOv2 needs images of at least {p}×{p} pixels, got {h}×{w}");
        }
        if let Some(bad) = images.iter().find(|x| x.len() != 3 * h * w) {
            bail!("DINOv2 takes [3, {h}, {w}] images ({} values), got {}", 3 * h * w, bad.len());
        }
        let t = 1 + gh * gw;
        let k = 3 * p * p;
        let pos = pos_embed::resize(&self.patch_pos, (self.pos_grid, self.pos_grid), (gh, gw), d);
        let (mut base, mut cols) = (vec![0.0f32; images.len() * t * d], vec![0.0f32; images.len() * t * k]);
        for (i, img) in images.iter().enumerate() {
            base[i * t * d..(i * t + 1) * d].copy_from_slice(&self.cls_row);
            for r in 0..gh * gw {
                let row = &mut base[(i * t + 1 + r) * d..(i * t + 2 + r) * d];
                row.iter_mut().zip(&self.patch_bias).zip(&pos[r * d..(r + 1) * d]).for_each(|((y, b), q)| *y = b + q);
                let (py, px) = (r / gw, r % gw);
                let col = &mut cols[(i * t + 1 + r) * k..(i * t + 2 + r) * k];
                for c in 0..3 {
                    for ky in 0..p {
                        let src = c * h * w + (py * p + ky) * w + px * p;
                        col[(c * p + ky) * p..(c * p + ky + 1) * p].copy_from_slice(&img[src..src + p]);
                    }
                }
            }
        }
        let mut x = self.ops.upload(&base)?;
        let spec = GemmSpec { accumulate: true, ..GemmSpec::linear(images.len() * t, d, k) };
        self.ops.gemm(&spec, &self.ops.upload(&cols)?, &self.patch_embed, &mut x)?;
        Ok((x, gh, gw))
    }

    fn linear(&self, l: &Linear<O>, x: &O::Buf, rows: usize) -> Result<O::Buf> {
        let spec = GemmSpec { b_prepared: true, ..GemmSpec::linear(rows, l.out, l.inp) };
        self.ops.gemm_bias_new(&spec, x, &l.w, &l.b)
    }

    /// One pre-norm block over `batch` sequences of `t` tokens.
    fn block(&self, l: &Layer<O>, x: &O::Buf, batch: usize, t: usize) -> Result<O::Buf> {
        let n = batch * t;
        let (y, _) = self.ops.layernorm(x, &l.norm1.w, &l.norm1.b, n, LN_EPS)?;
        let (q, k, v) = (self.linear(&l.query, &y, n)?, self.linear(&l.key, &y, n)?, self.linear(&l.value, &y, n)?);
        let shape = FusionShape { batch, queries: t, keys: t, heads: self.heads(), head_dim: HEAD_DIM };
        let (a, _) = self.ops.fusion_attention(&q, &k, &v, shape)?;
        let mut h = self.linear(&l.output, &a, n)?;
        self.ops.channel_bias_act(&mut h, &self.zero, 1, Some(x), false)?;
        let (y, _) = self.ops.layernorm(&h, &l.norm2.w, &l.norm2.b, n, LN_EPS)?;
        let f = self.ops.gelu(&self.linear(&l.fc1, &y, n)?)?;
        let mut out = self.linear(&l.fc2, &f, n)?;
        self.ops.channel_bias_act(&mut out, &self.zero, 1, Some(&h), false)?;
        Ok(out)
    }

    /// Runs a batch of preprocessed `[3, h, w]` images (each side floored to a multiple of the
    /// patch, as the patch convolution does) and reads back the `taps`, in their order.
    pub fn forward(&self, images: &[&[f32]], h: usize, w: usize, taps: &[Tap]) -> Result<Vec<Hidden>> {
        if images.is_empty() {
            bail!("DINOv2: no images to encode");
        }
        let last = self.layers.len();
        if let Some(t) = taps.iter().find(|t| matches!(t, Tap::Hidden(i) if *i > last)) {
            bail!("{t:?} is past the encoder's {last} layers");
        }
        let (mut x, gh, gw) = self.embed(images, h, w)?;
        let t = 1 + gh * gw;
        let hidden = |tap: Tap, buf: &O::Buf| -> Result<Hidden> {
            Ok(Hidden {
                tap,
                images: images.len(),
                grid_h: gh,
                grid_w: gw,
                dim: self.dim,
                data: self.ops.download(buf)?,
            })
        };
        let mut got: Vec<Hidden> = Vec::new();
        let deepest = taps.iter().map(|t| if let Tap::Hidden(i) = t { *i } else { last }).max().unwrap_or(last);
        for i in 0..=deepest {
            if taps.contains(&Tap::Hidden(i)) {
                got.push(hidden(Tap::Hidden(i), &x)?);
            }
            if i < deepest {
                x = self.block(&self.layers[i], &x, images.len(), t)?;
            }
        }
        if taps.contains(&Tap::Normed) {
            let (y, _) = self.ops.layernorm(&x, &self.layernorm.w, &self.layernorm.b, images.len() * t, LN_EPS)?;
            got.push(hidden(Tap::Normed, &y)?);
        }
        Ok(taps.iter().map(|tap| got.iter().find(|g| g.tap == *tap).expect("every tap was read").clone()).collect())
    }
}
