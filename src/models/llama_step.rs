//! The LLaMA full fine-tuning step on a device op set ([`StepOps`]): the forward, cross-entropy,
//! backward and AdamW of [`TrainableLlama`], over a batch of equal-length sequences at once, with
//! every buffer on the device and no wait for the host inside the step (the loss is read after the
//! optimizer's launches are queued).
//!
//! It mirrors `llama_train.rs` op for op (same names, same order, the residual stream's gradient
//! passed the same way), so that [`HostOps`](crate::backend::step_ops::HostOps) reproduces
//! `TrainableLlama`'s loss and gradients (tested below) and the CUDA op set differs from it only by
//! its bf16 rounding. On the GPU: weights, activations and gradients bf16 (cuBLASLt writes the
//! weight gradients in bf16), norm-weight gradients, master weights and AdamW moments fp32.
//!
//! Not here yet: LoRA adapters (the step trains every tensor) and the SAGE model around the
//! decoder (vision features, fusion attention, adapter); `sage sfe` and `sage edpo` still train on
//! the CPU.

use super::llama::LlamaConfig;
use super::llama_train::{Finetune, TrainableLlama};
use crate::backend::cuda::gemm::GemmSpec;
use crate::backend::step_ops::{CausalShape, GradRef, StepOps};
use crate::ops::loss::IGNORE;
use crate::train::{AdamWConfig, AdamWScalars, ParamSet};
use crate::user_bail;
use anyhow::{bail, Result};

/// One tensor on the device: the working copy the ops read, the fp32 master and the moments.
pub struct DeviceParam<O: StepOps> {
    pub name: String,
    pub numel: usize,
    w: O::Buf,
    master: O::Stat,
    m: O::Stat,
    v: O::Stat,
    decay: bool,
}

/// A gradient as the backward produced it.
pub enum Grad<O: StepOps> {
    Buf(O::Buf),
    Stat(O::Stat),
}

/// `blk.N`: indices into [`DeviceLlama::params`].
struct BlockIds {
    attn_norm: usize,
    attn_q: usize,
    attn_k: usize,
    attn_v: usize,
    attn_output: usize,
    ffn_norm: usize,
    ffn_gate: usize,
    ffn_up: usize,
    ffn_down: usize,
}

/// What one block's backward needs from its forward.
struct BlockActs<O: StepOps> {
    x: O::Buf,
    h1: O::Buf,
    rstd1: O::Stat,
    /// Queries and keys after RoPE.
    q: O::Buf,
    k: O::Buf,
    v: O::Buf,
    /// Attention output (before `attn_output`) and its log-sum-exp.
    ctx: O::Buf,
    lse: O::Stat,
    x1: O::Buf,
    h2: O::Buf,
    rstd2: O::Stat,
    gate: O::Buf,
    up: O::Buf,
    s: O::Buf,
}

/// The loss of a step, still on the device, and the gradients by parameter index.
pub struct StepGrads<O: StepOps> {
    seq_logp: O::Stat,
    counted: usize,
    pub grads: Vec<Option<Grad<O>>>,
}

pub struct DeviceLlama<O: StepOps> {
    pub ops: O,
    pub config: LlamaConfig,
    pub params: Vec<DeviceParam<O>>,
    token_embd: usize,
    blocks: Vec<BlockIds>,
    output_norm: usize,
    output: usize,
    rope: (O::Stat, O::Stat),
    adamw: AdamWConfig,
    step: u64,
}

impl<O: StepOps> DeviceLlama<O> {
    /// Copies `model`'s weights (from `params`) to the device. Full fine-tuning only.
    pub fn new(ops: O, model: &TrainableLlama, params: &ParamSet, adamw: AdamWConfig) -> Result<DeviceLlama<O>> {
        if model.finetune != Finetune::Full {
            user_bail!("the device training step trains every tensor; LoRA adapters on the device are not built yet");
        }
        let mut out = Vec::new();
        let mut index = std::collections::HashMap::new();
        for id in model.param_ids() {
            let p = &params[id];
            if !p.trainable {
                user_bail!("parameter `{}` is frozen; the device training step trains every tensor", p.name);
            }
            index.insert(id, out.len());
            out.push(DeviceParam {
                name: p.name.clone(),
                numel: p.value.len(),
                w: ops.upload(&p.value)?,
                master: ops.upload_stat(&p.value)?,
                m: ops.stat_zeros(p.value.len())?,
                v: ops.stat_zeros(p.value.len())?,
                decay: p.decay,
            });
        }
        let ix = |id| index[&id];
        let blocks = model
            .blocks
            .iter()
            .map(|b| BlockIds {
                attn_norm: ix(b.attn_norm),
                attn_q: ix(b.attn_q.weight),
                attn_k: ix(b.attn_k.weight),
                attn_v: ix(b.attn_v.weight),
                attn_output: ix(b.attn_output.weight),
                ffn_norm: ix(b.ffn_norm),
                ffn_gate: ix(b.ffn_gate.weight),
                ffn_up: ix(b.ffn_up.weight),
                ffn_down: ix(b.ffn_down.weight),
            })
            .collect();
        let (cos, sin) = model.rope_table().tables();
        let rope = ops.rope_tables(cos, sin, model.config.head_dim / 2)?;
        Ok(DeviceLlama {
            config: model.config.clone(),
            token_embd: ix(model.token_embd),
            blocks,
            output_norm: ix(model.output_norm),
            output: ix(model.output),
            params: out,
            rope,
            adamw,
            step: 0,
            ops,
        })
    }

    /// Optimizer steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    fn w(&self, i: usize) -> &O::Buf {
        &self.params[i].w
    }

    fn shape(&self, batch: usize, seq: usize) -> CausalShape {
        let c = &self.config;
        CausalShape { batch, seq, heads: c.num_heads, kv_heads: c.num_kv_heads, head_dim: c.head_dim }
    }

    /// Forward, cross-entropy and backward over `batch` sequences: `inputs` and `targets` are
    /// `[batch·T]` token ids (targets already shifted; `IGNORE` skips a position). Queues the work
    /// and returns the gradients; nothing waits for the device.
    pub fn forward_backward(&self, inputs: &[u32], targets: &[u32], batch: usize) -> Result<StepGrads<O>> {
        let c = &self.config;
        let rows = inputs.len();
        if batch == 0 || rows == 0 || rows % batch != 0 || targets.len() != rows {
            bail!(
                "a step needs batch·T input and target ids (got {rows} inputs, {} targets, batch {batch})",
                targets.len()
            );
        }
        let t = rows / batch;
        let max_pos = self.config.context_length;
        if t > max_pos {
            user_bail!("sequences of {t} positions exceed the model's {max_pos}");
        }
        if let Some(bad) = targets.iter().find(|&&x| x != IGNORE && x as usize >= c.vocab_size) {
            user_bail!("target token {bad} is outside the vocabulary of {}", c.vocab_size);
        }
        let o = &self.ops;
        let (d, f, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let (qd, kvd, half) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim / 2);
        let shape = self.shape(batch, t);
        let linear = |out_f, in_f| GemmSpec::linear(rows, out_f, in_f);
        let residual = |out_f, in_f| GemmSpec { accumulate: true, ..GemmSpec::linear(rows, out_f, in_f) };

        let mut x = o.embed(self.w(self.token_embd), inputs, d)?;
        let mut acts = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (h1, rstd1) = o.rmsnorm(&x, self.w(b.attn_norm), rows, eps)?;
            let mut q = o.gemm_new(&linear(qd, d), &h1, self.w(b.attn_q))?;
            let mut k = o.gemm_new(&linear(kvd, d), &h1, self.w(b.attn_k))?;
            let v = o.gemm_new(&linear(kvd, d), &h1, self.w(b.attn_v))?;
            o.rope(&mut q, &self.rope, half, rows, t, c.num_heads, false)?;
            o.rope(&mut k, &self.rope, half, rows, t, c.num_kv_heads, false)?;
            let (ctx, lse) = o.attention(&q, &k, &v, shape)?;
            let mut x1 = o.copy(&x)?;
            o.gemm(&residual(d, qd), &ctx, self.w(b.attn_output), &mut x1)?;
            let (h2, rstd2) = o.rmsnorm(&x1, self.w(b.ffn_norm), rows, eps)?;
            let gate = o.gemm_new(&linear(f, d), &h2, self.w(b.ffn_gate))?;
            let up = o.gemm_new(&linear(f, d), &h2, self.w(b.ffn_up))?;
            let s = o.swiglu(&gate, &up)?;
            let mut y = o.copy(&x1)?;
            o.gemm(&residual(d, f), &s, self.w(b.ffn_down), &mut y)?;
            acts.push(BlockActs { x, h1, rstd1, q, k, v, ctx, lse, x1, h2, rstd2, gate, up, s });
            x = y;
        }
        let (hidden, rstd_f) = o.rmsnorm(&x, self.w(self.output_norm), rows, eps)?;
        let counted = targets.iter().filter(|&&x| x != IGNORE).count();
        let ce = o.cross_entropy(&hidden, self.w(self.output), targets, batch, counted)?;
        drop(hidden);

        let mut grads: Vec<Option<Grad<O>>> = (0..self.params.len()).map(|_| None).collect();
        let mut dg = o.stat_zeros(d)?;
        let mut dx = o.zeros(rows * d)?;
        o.rmsnorm_backward(&x, self.w(self.output_norm), &ce.d_hidden, &rstd_f, rows, eps, false, &mut dx, &mut dg)?;
        grads[self.output_norm] = Some(Grad::Stat(dg));
        // The LM head; with tied embeddings this is also token_embd's, which the embedding
        // backward adds to below.
        grads[self.output] = Some(Grad::Buf(ce.d_weight));
        for (b, a) in self.blocks.iter().zip(acts).rev() {
            dx = self.block_backward(b, a, &dx, rows, shape, &mut grads)?;
        }
        let mut dtable = match grads[self.token_embd].take() {
            Some(Grad::Buf(g)) => g,
            _ => o.zeros(c.vocab_size * d)?,
        };
        o.embed_backward(inputs, &dx, d, &mut dtable)?;
        grads[self.token_embd] = Some(Grad::Buf(dtable));
        Ok(StepGrads { seq_logp: ce.seq_logp, counted, grads })
    }

    /// Backward of one block given `dy`, the gradient of its output; returns its input's.
    fn block_backward(
        &self,
        b: &BlockIds,
        a: BlockActs<O>,
        dy: &O::Buf,
        rows: usize,
        shape: CausalShape,
        grads: &mut [Option<Grad<O>>],
    ) -> Result<O::Buf> {
        let c = &self.config;
        let o = &self.ops;
        let (d, f, eps) = (c.hidden_size, c.intermediate_size, c.rms_norm_eps);
        let (qd, kvd, half) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.head_dim / 2);
        // dx (+)= dy·W and dW = dyᵀ·x for a linear layer W [out, in].
        let input_grad = |out_f, in_f, acc| GemmSpec { accumulate: acc, ..GemmSpec::nn(rows, in_f, out_f) };
        let weight_grad = |out_f, in_f| GemmSpec { trans_a: true, ..GemmSpec::nn(out_f, in_f, rows) };
        // MLP branch; the residual passes dy straight to x₁.
        let mut dx1 = o.copy(dy)?;
        let ds = o.gemm_new(&input_grad(d, f, false), dy, self.w(b.ffn_down))?;
        grads[b.ffn_down] = Some(Grad::Buf(o.gemm_new(&weight_grad(d, f), dy, &a.s)?));
        drop(a.s);
        let (dgate, dup) = o.swiglu_backward(&ds, &a.gate, &a.up)?;
        drop(ds);
        let mut dh2 = o.gemm_new(&input_grad(f, d, false), &dgate, self.w(b.ffn_gate))?;
        o.gemm(&input_grad(f, d, true), &dup, self.w(b.ffn_up), &mut dh2)?;
        grads[b.ffn_gate] = Some(Grad::Buf(o.gemm_new(&weight_grad(f, d), &dgate, &a.h2)?));
        grads[b.ffn_up] = Some(Grad::Buf(o.gemm_new(&weight_grad(f, d), &dup, &a.h2)?));
        let mut dg2 = o.stat_zeros(d)?;
        o.rmsnorm_backward(&a.x1, self.w(b.ffn_norm), &dh2, &a.rstd2, rows, eps, true, &mut dx1, &mut dg2)?;
        grads[b.ffn_norm] = Some(Grad::Stat(dg2));
        // Attention branch; the residual passes dx₁ to x.
        let mut dx = o.copy(&dx1)?;
        let dctx = o.gemm_new(&input_grad(d, qd, false), &dx1, self.w(b.attn_output))?;
        grads[b.attn_output] = Some(Grad::Buf(o.gemm_new(&weight_grad(d, qd), &dx1, &a.ctx)?));
        let (mut dq, mut dk, dv) = o.attention_backward(&a.q, &a.k, &a.v, &a.ctx, &a.lse, &dctx, shape)?;
        o.rope(&mut dq, &self.rope, half, rows, shape.seq, c.num_heads, true)?;
        o.rope(&mut dk, &self.rope, half, rows, shape.seq, c.num_kv_heads, true)?;
        let mut dh1 = o.gemm_new(&input_grad(qd, d, false), &dq, self.w(b.attn_q))?;
        o.gemm(&input_grad(kvd, d, true), &dk, self.w(b.attn_k), &mut dh1)?;
        o.gemm(&input_grad(kvd, d, true), &dv, self.w(b.attn_v), &mut dh1)?;
        grads[b.attn_q] = Some(Grad::Buf(o.gemm_new(&weight_grad(qd, d), &dq, &a.h1)?));
        grads[b.attn_k] = Some(Grad::Buf(o.gemm_new(&weight_grad(kvd, d), &dk, &a.h1)?));
        grads[b.attn_v] = Some(Grad::Buf(o.gemm_new(&weight_grad(kvd, d), &dv, &a.h1)?));
        let mut dg1 = o.stat_zeros(d)?;
        o.rmsnorm_backward(&a.x, self.w(b.attn_norm), &dh1, &a.rstd1, rows, eps, true, &mut dx, &mut dg1)?;
        grads[b.attn_norm] = Some(Grad::Stat(dg1));
        Ok(dx)
    }

    /// One AdamW step over every parameter with a gradient.
    pub fn apply(&mut self, grads: Vec<Option<Grad<O>>>, lr: f32) -> Result<()> {
        self.step += 1;
        let s = AdamWScalars::new(&self.adamw, self.step, lr);
        let DeviceLlama { ops, params, .. } = self;
        for (p, g) in params.iter_mut().zip(grads) {
            let g = match &g {
                Some(Grad::Buf(b)) => GradRef::Buf(b),
                Some(Grad::Stat(x)) => GradRef::Stat(x),
                None => continue,
            };
            ops.adamw(&mut p.master, g, &mut p.m, &mut p.v, &mut p.w, &s, p.decay)?;
        }
        Ok(())
    }

    /// The mean cross-entropy of a [`DeviceLlama::forward_backward`] (waits for the device).
    pub fn loss(&self, g: &StepGrads<O>) -> Result<f32> {
        let seq = self.ops.download_stat(&g.seq_logp)?;
        Ok((-seq.iter().map(|&x| x as f64).sum::<f64>() / g.counted.max(1) as f64) as f32)
    }

    /// A full step: forward, backward, AdamW at `lr`; returns the loss (read after the optimizer
    /// is queued, the step's only wait).
    pub fn train_step(&mut self, inputs: &[u32], targets: &[u32], batch: usize, lr: f32) -> Result<f32> {
        let mut g = self.forward_backward(inputs, targets, batch)?;
        self.apply(std::mem::take(&mut g.grads), lr)?;
        self.loss(&g)
    }

    /// Copies the fp32 master weights back into `params` (by name), e.g. for a checkpoint.
    pub fn download_into(&self, params: &mut ParamSet) -> Result<()> {
        for p in &self.params {
            let id =
                params.id(&p.name).ok_or_else(|| anyhow::anyhow!("no parameter `{}` to copy back into", p.name))?;
            let v = self.ops.download_stat(&p.master)?;
            if v.len() != params[id].value.len() {
                bail!(
                    "parameter `{}` has {} values on the device and {} on the host",
                    p.name,
                    v.len(),
                    params[id].value.len()
                );
            }
            params[id].value = v;
        }
        Ok(())
    }

    /// A gradient as host floats.
    pub fn download_grad(&self, g: &Grad<O>) -> Result<Vec<f32>> {
        match g {
            Grad::Buf(b) => self.ops.download(b),
            Grad::Stat(s) => self.ops.download_stat(s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::step_ops::HostOps;
    use crate::models::random_init::RandomLlama;
    use crate::models::WeightSource;
    use crate::tensor::Tensor;
    use crate::train::{AdamW, SeedRng};

    fn tiny() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 37,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 10_000.0,
            rms_norm_eps: 1e-6,
            context_length: 64,
        }
    }

    /// Random weights with a separate LM head (`output.weight`), norms away from 1.
    struct Untied(RandomLlama);

    impl WeightSource for Untied {
        fn get(&self, name: &str) -> Result<Tensor> {
            let t = if name == "output.weight" { self.0.get("token_embd.weight")? } else { self.0.get(name)? };
            let v: Vec<f32> = t.f32s()?.to_vec();
            let v = if name == "output.weight" {
                v.iter().rev().map(|x| 0.7 * x).collect()
            } else if name.ends_with("norm.weight") {
                v.iter().enumerate().map(|(i, x)| x * (0.8 + 0.03 * (i % 7) as f32)).collect()
            } else {
                v
            };
            Tensor::from_vec(v, t.shape())
        }

        fn contains(&self, name: &str) -> bool {
            name == "output.weight" || self.0.contains(name)
        }
    }

    fn ids(batch: usize, n: usize, vocab: usize) -> Vec<Vec<u32>> {
        (0..batch).map(|b| (0..n).map(|i| ((b * 13 + i * 7 + 3) % vocab) as u32).collect()).collect()
    }

    /// The device step on the host op set against `TrainableLlama` one sequence at a time (the
    /// CPU path of `sage bench train`): the same loss, gradients and updated weights.
    fn host_step_matches_trainable(weights: &dyn WeightSource, ignore_some: bool) {
        let config = tiny();
        let (batch, t) = (3, 9);
        let mut params = ParamSet::new();
        let model =
            TrainableLlama::load(weights, config.clone(), &Finetune::Full, &mut params, &mut SeedRng::new(0, 0))
                .unwrap();
        let seqs = ids(batch, t + 1, config.vocab_size);
        let mut targets: Vec<Vec<u32>> = seqs.iter().map(|s| s[1..].to_vec()).collect();
        if ignore_some {
            // Prompt positions without a target, as in SFT; every sequence keeps the same count,
            // so the per-sequence mean of the CPU path equals the batch mean.
            targets.iter_mut().for_each(|s| s[..3].fill(IGNORE));
        }
        let dev = DeviceLlama::new(HostOps, &model, &params, AdamWConfig::default()).unwrap();
        let inputs: Vec<u32> = seqs.iter().flat_map(|s| s[..t].iter().copied()).collect();
        let flat_targets: Vec<u32> = targets.concat();
        let g = dev.forward_backward(&inputs, &flat_targets, batch).unwrap();
        let loss = dev.loss(&g).unwrap();

        params.zero_grad();
        let mut cpu_loss = 0.0;
        for (s, tg) in seqs.iter().zip(&targets) {
            let x = model.embed(&params, &s[..t]);
            let (l, dx) = model.loss(&mut params, &x, t, tg, true).unwrap();
            model.embed_backward(&mut params, &s[..t], &dx.unwrap());
            cpu_loss += l / batch as f32;
        }
        params.scale_grads(1.0 / batch as f32);
        assert!((loss - cpu_loss).abs() < 1e-5, "loss {loss} vs {cpu_loss}");
        for (p, grad) in dev.params.iter().zip(&g.grads) {
            let got = dev.download_grad(grad.as_ref().expect("every parameter gets a gradient")).unwrap();
            let want = &params[params.id(&p.name).unwrap()].grad;
            let scale = want.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
            let err = got.iter().zip(want).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-4 * scale, "{}: max |Δ| {err} at gradient scale {scale}", p.name);
        }

        // One AdamW step on each side.
        let mut dev = dev;
        dev.apply(g.grads, 1e-2).unwrap();
        let mut opt = AdamW::new(AdamWConfig::default());
        opt.step(&mut params, 1e-2);
        let mut stepped = params.clone();
        dev.download_into(&mut stepped).unwrap();
        for p in params.iter() {
            let got = &stepped[stepped.id(&p.name).unwrap()].value;
            let err = got.iter().zip(&p.value).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err <= 1e-5, "{} after one step: max |Δ| {err}", p.name);
        }
    }

    #[test]
    fn device_step_on_host_ops_matches_trainable_llama_tied() {
        host_step_matches_trainable(&RandomLlama { config: tiny(), seed: 3 }, false);
    }

    #[test]
    fn device_step_on_host_ops_matches_trainable_llama_untied_with_ignored_targets() {
        host_step_matches_trainable(&Untied(RandomLlama { config: tiny(), seed: 5 }), true);
    }

    /// Ten steps on one batch: the loss falls, and every step's loss equals the CPU path's.
    #[test]
    fn device_step_trains_ten_steps_on_host_ops_like_the_cpu_path() {
        let config = tiny();
        let mut params = ParamSet::new();
        let weights = RandomLlama { config: config.clone(), seed: 1 };
        let model =
            TrainableLlama::load(&weights, config.clone(), &Finetune::Full, &mut params, &mut SeedRng::new(0, 0))
                .unwrap();
        let mut dev = DeviceLlama::new(HostOps, &model, &params, AdamWConfig::default()).unwrap();
        let seqs = ids(2, 12, config.vocab_size);
        let inputs: Vec<u32> = seqs.iter().flat_map(|s| s[..11].iter().copied()).collect();
        let targets: Vec<u32> = seqs.iter().flat_map(|s| s[1..].iter().copied()).collect();
        let mut opt = AdamW::new(AdamWConfig::default());
        for step in 0..10 {
            let loss = dev.train_step(&inputs, &targets, 2, 1e-2).unwrap();
            params.zero_grad();
            let mut cpu = 0.0;
            for s in &seqs {
                let x = model.embed(&params, &s[..11]);
                let (l, dx) = model.loss(&mut params, &x, 11, &s[1..], true).unwrap();
                model.embed_backward(&mut params, &s[..11], &dx.unwrap());
                cpu += l / 2.0;
            }
            params.scale_grads(0.5);
            opt.step(&mut params, 1e-2);
            assert!((loss - cpu).abs() < 1e-4, "step {step}: loss {loss} vs {cpu}");
        }
        assert_eq!(dev.steps(), 10);
        let last = dev.train_step(&inputs, &targets, 2, 1e-2).unwrap();
        assert!(last < 0.8 * 3.6, "ten steps on one batch should lower its loss: {last}");
    }

    #[test]
    fn device_step_refuses_lora_and_bad_batches() {
        let config = tiny();
        let weights = RandomLlama { config: config.clone(), seed: 1 };
        let mut params = ParamSet::new();
        let lora = Finetune::Lora { rank: 2, alpha: 4.0, targets: vec!["attn_q".into()] };
        let model =
            TrainableLlama::load(&weights, config.clone(), &lora, &mut params, &mut SeedRng::new(0, 0)).unwrap();
        let err = DeviceLlama::new(HostOps, &model, &params, AdamWConfig::default()).err().unwrap();
        assert!(format!("{err}").contains("LoRA"), "{err}");
        let mut params = ParamSet::new();
        let model =
            TrainableLlama::load(&weights, config, &Finetune::Full, &mut params, &mut SeedRng::new(0, 0)).unwrap();
        let dev = DeviceLlama::new(HostOps, &model, &params, AdamWConfig::default()).unwrap();
        assert!(dev.forward_backward(&[1, 2, 3], &[2, 3, 4], 2).is_err());
        assert!(dev.forward_backward(&[1, 2], &[2, 99], 1).is_err());
    }
}
