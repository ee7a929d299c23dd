//! The decoder on the CPU op set against independent references: central finite differences for
//! every gradient, the base model for LoRA with `B = 0` and for merged adapters, a full forward
//! per prefix for the KV-cached decode, and each sequence alone for a batch. (The CUDA op set is
//! checked against this one op by op in `tests/kernels_parity.rs`.)

use super::*;
use crate::backend::cpu::HostOps;
use crate::models::sampling::{argmax, Sampling};
use crate::models::{StateDict, WeightSource};
use crate::ops::gradcheck::{assert_grad, numeric_grad, rng, uniform, Tol};
use crate::tensor::Tensor;
use crate::train::{streams, SeedRng};
use std::collections::BTreeMap;

const D: usize = 16;
const T: usize = 6;
const V: usize = 37;
const GREEDY: Sampling = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        family: Family::Llama,
        vocab_size: V,
        hidden_size: D,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        context_length: 32,
    }
}

/// Random weights under the GGUF names, for [`tiny_config`]; `untied` adds an `output.weight`.
fn tiny_weights(seed: u64, untied: bool) -> StateDict {
    let c = tiny_config();
    let (qd, kvd, f) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
    let mut g = rng(seed);
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: &[usize], lo: f32, hi: f32| {
        let t = Tensor::from_vec(uniform(&mut g, shape.iter().product(), lo, hi), shape).unwrap();
        tensors.insert(name, t);
    };
    put("token_embd.weight".into(), &[V, D], -1.0, 1.0);
    for i in 0..c.num_layers {
        put(format!("blk.{i}.attn_norm.weight"), &[D], 0.5, 1.5);
        put(format!("blk.{i}.attn_q.weight"), &[qd, D], -0.5, 0.5);
        put(format!("blk.{i}.attn_k.weight"), &[kvd, D], -0.5, 0.5);
        put(format!("blk.{i}.attn_v.weight"), &[kvd, D], -0.5, 0.5);
        put(format!("blk.{i}.attn_output.weight"), &[D, qd], -0.5, 0.5);
        put(format!("blk.{i}.ffn_norm.weight"), &[D], 0.5, 1.5);
        put(format!("blk.{i}.ffn_gate.weight"), &[f, D], -0.5, 0.5);
        put(format!("blk.{i}.ffn_up.weight"), &[f, D], -0.5, 0.5);
        put(format!("blk.{i}.ffn_down.weight"), &[D, f], -0.5, 0.5);
    }
    put("output_norm.weight".into(), &[D], 0.5, 1.5);
    if untied {
        put("output.weight".into(), &[V, D], -1.0, 1.0);
    }
    StateDict { path: "tiny".into(), tensors }
}

fn load(w: &dyn WeightSource, finetune: &Finetune) -> (LlamaParams, ParamSet) {
    let mut ps = ParamSet::new();
    let m = LlamaParams::load(w, tiny_config(), finetune, &mut ps, &mut SeedRng::new(5, streams::INIT)).unwrap();
    (m, ps)
}

fn on_host(m: &LlamaParams, ps: &ParamSet) -> Llama<HostOps> {
    Llama::new(HostOps, m, ps, Some(AdamWConfig::default())).unwrap()
}

fn lora(rank: usize, targets: &[&str]) -> Finetune {
    Finetune::Lora { rank, alpha: 2.0 * rank as f32, targets: targets.iter().map(|s| s.to_string()).collect() }
}

/// Gives every `lora_b` random values, so adapters have an effect and A gets gradient.
fn randomise_lora_b(ps: &mut ParamSet, seed: u64) {
    let mut g = rng(seed);
    for p in ps.iter_mut().filter(|p| p.name.ends_with(".lora_b")) {
        p.value = uniform(&mut g, p.numel(), -0.5, 0.5);
    }
}

const IDS: [u32; 2 * T] = [3, 17, 36, 0, 9, 17, 5, 5, 21, 2, 30, 11];
const TARGETS: [u32; 2 * T] = [IGNORE, 36, 0, IGNORE, 17, 4, 8, IGNORE, 19, 1, 1, 35];
// Mean cross-entropy of a 2-layer f32 model, central differences with ε = 4e-3: the f32 rounding
// of the loss (≈4e-7) over 2ε is ≈5e-5 and the truncation error O(ε²) stays under 1% where the
// adapters (scale 2, random B) curve the loss most, so 3e-4 absolute plus 1 % relative leaves
// room without hiding a wrong term.
const TOL: Tol = Tol { atol: 3e-4, rtol: 1e-2 };
const EPS: f32 = 4e-3;

/// The loss of two sequences (the mean over their counted targets) under the weights in `ps`.
fn loss_of(m: &LlamaParams, ps: &ParamSet) -> f64 {
    let llm = on_host(m, ps);
    llm.loss(&llm.forward_backward(&IDS, &TARGETS, 2).unwrap()).unwrap() as f64
}

/// Analytic gradients of a two-sequence batch (the named parameters, and the input rows) against
/// central differences. The input is embedded by the step, so the tied table sees both uses.
fn gradcheck(m: &LlamaParams, ps: &ParamSet, names: &[&str]) {
    let llm = on_host(m, ps);
    let g = llm.forward_backward(&IDS, &TARGETS, 2).unwrap();
    for name in names {
        let i = llm.params.iter().position(|p| p.name == *name).unwrap_or_else(|| panic!("no parameter {name}"));
        let analytic = llm.download_grad(g.grads[i].as_ref().expect("trainable")).unwrap();
        let id = ps.id(name).unwrap();
        let mut probe = ps.clone();
        let numeric = numeric_grad(&ps[id].value, EPS, |v| {
            probe[id].value.copy_from_slice(v);
            loss_of(m, &probe)
        });
        assert_grad(name, &analytic, &numeric, TOL);
    }
    // The input rows' gradient, through the rows entry point.
    let counted = TARGETS.iter().filter(|&&t| t != IGNORE).count() as f32;
    let x = llm.embed_tokens(&IDS).unwrap();
    let (_, dx) = llm.forward_backward_rows(x.clone(), &TARGETS, &[1.0 / counted; 2]).unwrap();
    let numeric = numeric_grad(&x, EPS, |x| {
        let (g, _) = llm.forward_backward_rows(x.to_vec(), &TARGETS, &[1.0 / counted; 2]).unwrap();
        llm.loss(&g).unwrap() as f64
    });
    assert_grad("x", &dx, &numeric, TOL);
}

#[test]
fn full_gradients_match_finite_differences() {
    let (m, ps) = load(&tiny_weights(1, false), &Finetune::Full);
    let names = [
        "token_embd.weight",
        "blk.0.attn_norm.weight",
        "blk.0.attn_q.weight",
        "blk.0.attn_k.weight",
        "blk.0.ffn_up.weight",
        "blk.1.attn_v.weight",
        "blk.1.attn_output.weight",
        "blk.1.ffn_norm.weight",
        "blk.1.ffn_gate.weight",
        "blk.1.ffn_down.weight",
        "output_norm.weight",
    ];
    gradcheck(&m, &ps, &names);
}

#[test]
fn untied_head_gradients_match_finite_differences() {
    let (m, ps) = load(&tiny_weights(11, true), &Finetune::Full);
    gradcheck(&m, &ps, &["output.weight", "token_embd.weight", "blk.0.attn_q.weight"]);
}

#[test]
fn lora_gradients_match_finite_differences_and_only_adapters_get_one() {
    let (m, mut ps) = load(&tiny_weights(2, false), &lora(3, &LINEAR_NAMES));
    randomise_lora_b(&mut ps, 3);
    let mut names = Vec::new();
    for (i, t) in [(0, "attn_q"), (0, "attn_v"), (0, "ffn_gate"), (1, "attn_k"), (1, "attn_output"), (1, "ffn_down")] {
        names.push(format!("blk.{i}.{t}.lora_a"));
        names.push(format!("blk.{i}.{t}.lora_b"));
    }
    names.push("blk.1.ffn_up.lora_b".into());
    gradcheck(&m, &ps, &names.iter().map(String::as_str).collect::<Vec<_>>());
    let llm = on_host(&m, &ps);
    let g = llm.forward_backward(&IDS, &TARGETS, 2).unwrap();
    for (p, grad) in llm.params.iter().zip(&g.grads) {
        assert_eq!(grad.is_some(), p.name.contains(".lora_"), "{}: a gradient exactly for the adapters", p.name);
    }
}

#[test]
fn lora_with_zero_b_is_exactly_the_base_model() {
    let w = tiny_weights(4, false);
    let (base, base_ps) = load(&w, &Finetune::Full);
    let (adapted, lora_ps) = load(&w, &lora(4, &LINEAR_NAMES));
    assert_eq!(loss_of(&base, &base_ps).to_bits(), loss_of(&adapted, &lora_ps).to_bits());
    // With B = 0 only B gets gradient (dA = Bᵀ·… = 0), as in LoRA.
    let llm = on_host(&adapted, &lora_ps);
    let g = llm.forward_backward(&IDS, &TARGETS, 2).unwrap();
    let grad = |name: &str| {
        let i = llm.params.iter().position(|p| p.name == name).unwrap();
        llm.download_grad(g.grads[i].as_ref().unwrap()).unwrap()
    };
    assert!(grad("blk.0.attn_q.lora_a").iter().all(|&g| g == 0.0));
    assert!(grad("blk.0.attn_q.lora_b").iter().any(|&g| g != 0.0));
}

/// Logits `[T, V]` of one sequence.
fn logits(llm: &Llama<HostOps>, ids: &[u32]) -> Vec<f32> {
    let fwd = llm.forward_rows(llm.embed_tokens(ids).unwrap(), &vec![IGNORE; ids.len()], 1, false).unwrap();
    llm.logits_of_rows(&fwd.hidden, &(0..ids.len() as u32).collect::<Vec<_>>()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn merged_lora_and_saved_adapters_give_the_adapter_logits() {
    let w = tiny_weights(6, false);
    let targets = ["attn_q", "attn_v", "ffn_down", "ffn_up"];
    let (m, mut ps) = load(&w, &lora(2, &targets));
    randomise_lora_b(&mut ps, 7);
    let want = logits(&on_host(&m, &ps), &IDS[..T]);
    let (base, base_ps) = load(&w, &Finetune::Full);
    assert!(max_abs_diff(&want, &logits(&on_host(&base, &base_ps), &IDS[..T])) > 1e-2, "adapters change the output");

    let merged = StateDict { path: "merged".into(), tensors: m.merged_weights(&ps).unwrap() };
    assert!(merged.tensors.keys().all(|k| k.ends_with(".weight")) && merged.tensors.len() == w.tensors.len());
    let (mm, mps) = load(&merged, &Finetune::Full);
    let got = logits(&on_host(&mm, &mps), &IDS[..T]);
    assert!(max_abs_diff(&want, &got) < 1e-5, "merged vs adapter: {}", max_abs_diff(&want, &got));

    // Saving only the adapters and loading them into a fresh LoRA model restores the output.
    let saved = StateDict { path: "adapters".into(), tensors: m.trainable_weights(&ps).unwrap() };
    assert_eq!(saved.tensors.len(), 2 * 4 * 2);
    assert!(saved.tensors.keys().all(|k| k.contains(".lora_")));
    let (fresh, mut fresh_ps) = load(&w, &lora(2, &targets));
    fresh.load_trainable_weights(&mut fresh_ps, &saved).unwrap();
    assert_eq!(want, logits(&on_host(&fresh, &fresh_ps), &IDS[..T]));
}

#[test]
fn lora_training_moves_only_the_adapters_and_fits_a_batch() {
    let (m, ps) = load(&tiny_weights(8, false), &lora(4, &["attn_q", "attn_v"]));
    for p in ps.iter() {
        assert_eq!(p.trainable, p.name.contains(".lora_"), "{}", p.name);
    }
    // Per layer: q has A [4, 16] and B [16, 4]; v has A [4, 16] and B [8, 4].
    assert_eq!(ps.num_trainable(), 2 * (64 + 64 + 64 + 32));
    let mut llm = on_host(&m, &ps);
    let losses: Vec<f32> = (0..30).map(|_| llm.train_step(&IDS, &TARGETS, 2, 2e-2).unwrap()).collect();
    let mut after = ps.clone();
    llm.download_into(&mut after).unwrap();
    for (p, q) in after.iter().zip(ps.iter()) {
        if p.name.contains(".lora_") {
            assert_ne!(p.value, q.value, "{} did not train", p.name);
        } else {
            assert_eq!(p.value, q.value, "{} is frozen but changed", p.name);
        }
    }
    assert!(losses[29] < 0.5 * losses[0], "LoRA does not fit one batch: {losses:?}");
    assert_eq!(llm.optimizer_state().unwrap().moments.len(), 8, "moments for the 8 adapter tensors only");
}

/// The second step's gradients land in the buffers the first step's left behind (the gradient
/// pool): each must be exactly what a fresh model with the same weights computes, for a tied
/// head (the loss op overwrites the table's buffer, the embedding adds to it), an untied one
/// (the table's buffer is zeroed first) and LoRA adapters.
#[test]
fn reused_gradient_buffers_give_a_fresh_models_gradients() {
    for (name, untied, finetune) in [
        ("tied", false, Finetune::Full),
        ("untied", true, Finetune::Full),
        ("lora", false, lora(2, &["attn_q", "attn_v", "ffn_down"])),
    ] {
        let (m, mut ps) = load(&tiny_weights(14, untied), &finetune);
        randomise_lora_b(&mut ps, 15);
        let mut llm = on_host(&m, &ps);
        llm.train_step(&IDS, &TARGETS, 2, 1e-2).unwrap();
        let mut moved = ps.clone();
        llm.download_into(&mut moved).unwrap();
        let fresh = on_host(&m, &moved);
        let (reused, want) =
            (llm.forward_backward(&IDS, &TARGETS, 2).unwrap(), fresh.forward_backward(&IDS, &TARGETS, 2).unwrap());
        let mut checked = 0;
        for (i, (g, w)) in reused.grads.iter().zip(&want.grads).enumerate() {
            let label = format!("{name}: {}", llm.params[i].name);
            match (g, w) {
                (Some(g), Some(w)) => {
                    let (g, w) = (llm.download_grad(g).unwrap(), fresh.download_grad(w).unwrap());
                    assert!(w.iter().any(|&x| x != 0.0), "{label}: a zero gradient checks nothing");
                    assert_eq!(g, w, "{label}: the reused buffer's gradient differs");
                    checked += 1;
                }
                (None, None) => {}
                _ => panic!("{label}: a gradient on one side only"),
            }
        }
        assert!(checked >= 8, "{name}: only {checked} gradients compared");
    }
}

/// AdamW on the op set against the update written out by hand for one weight: PyTorch's AdamW
/// (decoupled decay `w ← w·(1 − lr·wd)`, bias-corrected moments), clipping applied first.
#[test]
fn one_clipped_adamw_step_is_the_textbook_update() {
    let (m, ps) = load(&tiny_weights(12, false), &Finetune::Full);
    let mut llm = on_host(&m, &ps);
    let g = llm.forward_backward(&IDS, &TARGETS, 2).unwrap();
    let grads: Vec<Vec<f32>> = g.grads.iter().map(|g| llm.download_grad(g.as_ref().unwrap()).unwrap()).collect();
    let norm = grads.iter().flatten().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
    llm.max_grad_norm = Some(0.5 * norm);
    let lr = 1e-2;
    let applied = llm.apply(g.grads, lr).unwrap();
    let got_norm = llm.finish(&applied).unwrap();
    assert!((got_norm - norm).abs() <= 1e-5 * norm, "norm {got_norm} vs {norm}");
    let mut after = ps.clone();
    llm.download_into(&mut after).unwrap();
    let c = AdamWConfig::default();
    let clip = 0.5 * norm / (norm + 1e-6);
    for (i, p) in llm.params.iter().enumerate() {
        let (w0, w1) = (&ps[ps.id(&p.name).unwrap()], &after[after.id(&p.name).unwrap()]);
        let lr = lr as f64;
        let decay = if w0.decay { 1.0 - lr * c.weight_decay } else { 1.0 };
        for (j, (&x0, &x1)) in w0.value.iter().zip(&w1.value).enumerate() {
            let gj = grads[i][j] as f64 * clip as f64;
            let (m, v) = ((1.0 - c.beta1) * gj, (1.0 - c.beta2) * gj * gj);
            let (mh, vh) = (m / (1.0 - c.beta1), v / (1.0 - c.beta2));
            let want = x0 as f64 * decay - lr * mh / (vh.sqrt() + c.eps);
            assert!((x1 as f64 - want).abs() <= 1e-6 + 1e-5 * want.abs(), "{}[{j}]: {x1} vs {want}", p.name);
        }
    }
}

#[test]
fn kv_cached_generation_agrees_with_a_full_forward_per_prefix() {
    let (m, ps) = load(&tiny_weights(9, false), &Finetune::Full);
    let llm = on_host(&m, &ps);
    let prompt = vec![4u32, 30, 11];
    let out = llm.generate(std::slice::from_ref(&prompt), 8, &[], GREEDY).unwrap().remove(0);
    assert_eq!(out.len(), 8);
    let mut seq = prompt.clone();
    for &tok in &out {
        let l = logits(&llm, &seq);
        assert_eq!(argmax(&l[(seq.len() - 1) * V..]), tok, "after {seq:?}");
        seq.push(tok);
    }
    // Stops before a stop id, which is not returned; sampling is reproducible.
    let stop = llm.generate(std::slice::from_ref(&prompt), 8, &[out[2]], GREEDY).unwrap().remove(0);
    assert_eq!(stop, out[..out.iter().position(|&t| t == out[2]).unwrap()]);
    let hot = Sampling { temperature: 1.0, top_p: 0.9, seed: 3 };
    let p = std::slice::from_ref(&prompt);
    assert_eq!(llm.generate(p, 8, &[], hot).unwrap(), llm.generate(p, 8, &[], hot).unwrap());
    // Positions run out at the context length (32): the last token needs no position.
    assert_eq!(llm.generate(p, 100, &[], GREEDY).unwrap()[0].len(), 32 - 3 + 1);
}

#[test]
fn a_batch_generates_what_each_sequence_generates_alone() {
    let (m, mut ps) = load(&tiny_weights(9, false), &lora(2, &["attn_q", "ffn_down"]));
    randomise_lora_b(&mut ps, 4);
    let llm = on_host(&m, &ps);
    // Prompts of different lengths; one stops early on a stop id, one runs into the context length
    // (32 positions), one into max_new.
    let prompts: Vec<Vec<u32>> = vec![vec![4, 30, 11], vec![7], (0..27).map(|i| (i * 5 % 37) as u32).collect()];
    // Row b of a batch draws from its own stream (`Sampling::for_row(b)`): alone, with that
    // stream, a sequence generates what it generates in the batch.
    for sampling in [GREEDY, Sampling { temperature: 0.9, top_p: 0.95, seed: 11 }] {
        let alone = |stop: &[u32]| -> Vec<Vec<u32>> {
            prompts
                .iter()
                .enumerate()
                .map(|(b, p)| llm.generate(std::slice::from_ref(p), 9, stop, sampling.for_row(b)).unwrap().remove(0))
                .collect()
        };
        let one = alone(&[]);
        assert_eq!(llm.generate(&prompts, 9, &[], sampling).unwrap(), one, "{sampling:?}");
        assert_eq!(one[2].len(), 32 - 27 + 1, "the long prompt runs out of positions");
        let stop = [one[0][1]];
        assert_eq!(llm.generate(&prompts, 9, &stop, sampling).unwrap(), alone(&stop), "{sampling:?} with a stop id");
    }
    assert!(llm.generate(&prompts, 0, &[], GREEDY).unwrap().iter().all(|o| o.is_empty()));
    // Copies of one prompt in a batch (GRPO's groups) sample different answers; row 0 samples
    // what the prompt alone samples with the seed.
    let sampled = Sampling { temperature: 0.9, top_p: 0.95, seed: 11 };
    let copies = llm.generate(&vec![prompts[0].clone(); 3], 9, &[], sampled).unwrap();
    assert!(copies[0] != copies[1] || copies[1] != copies[2], "three copies drew one answer: {copies:?}");
    assert_eq!(copies[0], llm.generate(&prompts[..1], 9, &[], sampled).unwrap()[0]);
}

#[test]
fn decode_refuses_bad_steps() {
    let (m, ps) = load(&tiny_weights(3, false), &Finetune::Full);
    let llm = on_host(&m, &ps);
    assert!(llm.new_cache(2, 33).is_err(), "more slots than the context");
    let mut cache = llm.new_cache(2, 4).unwrap();
    let x = vec![0.1; 2 * 3 * D];
    assert!(llm.prefill(x.clone(), 3, &[3, 4], &mut cache).is_err(), "a prompt longer than its padding");
    llm.prefill(x, 3, &[3, 2], &mut cache).unwrap();
    assert!(llm.decode(vec![0.1; 2 * D], &[0, 0], &mut cache).is_err(), "the same sequence twice");
    assert!(llm.decode(vec![0.1; D], &[2], &mut cache).is_err(), "a sequence outside the cache");
    llm.decode(vec![0.1; D], &[0], &mut cache).unwrap();
    let full = llm.decode(vec![0.1; D], &[0], &mut cache).unwrap_err();
    assert!(full.to_string().contains("fills all 4 positions"), "{full}");
    assert_eq!((cache.len(0), cache.len(1)), (4, 2));
}

#[test]
fn bad_batches_configs_and_inference_steps_are_refused() {
    let w = tiny_weights(10, false);
    let mut ps = ParamSet::new();
    let bad = LlamaParams::load(&w, tiny_config(), &lora(2, &["attn_x"]), &mut ps, &mut SeedRng::new(0, 0));
    assert!(bad.err().unwrap().to_string().contains("unknown LoRA target `attn_x`"));
    let (m, ps) = load(&w, &Finetune::Full);
    let llm = on_host(&m, &ps);
    assert!(llm.forward_backward(&[1, 2, 3], &[2, 3, 4], 2).is_err(), "3 targets in a batch of 2");
    assert!(llm.forward_backward(&[1, 2], &[2, 37], 1).is_err(), "a target outside the vocabulary");
    assert!(llm.forward_backward(&[1; 33], &[2; 33], 1).is_err(), "longer than the context");
    assert!(llm.generate(&[vec![1; 33]], 1, &[], GREEDY).is_err());
    let mut frozen = Llama::new(HostOps, &m, &ps, None).unwrap();
    assert!(frozen.params.iter().all(|p| !p.trainable()), "an inference model trains nothing");
    let g = frozen.forward_backward(&IDS, &TARGETS, 2).unwrap();
    assert!(g.grads.iter().all(Option::is_none));
    assert!(frozen.apply(g.grads, 1e-3).is_err(), "an inference model cannot step");
}

/// [`tiny_config`] as a Qwen2 model: q/k/v biases, rotate-half RoPE in the checkpoint.
fn tiny_qwen2() -> (LlamaConfig, StateDict) {
    let c = LlamaConfig { family: Family::Qwen2, ..tiny_config() };
    let mut w = tiny_weights(11, true);
    let mut g = rng(12);
    for i in 0..c.num_layers {
        for (name, n) in [("attn_q", c.num_heads), ("attn_k", c.num_kv_heads), ("attn_v", c.num_kv_heads)] {
            let t = Tensor::from_vec(uniform(&mut g, n * c.head_dim, -0.5, 0.5), &[n * c.head_dim]).unwrap();
            w.tensors.insert(format!("blk.{i}.{name}.bias"), t);
        }
    }
    (c, w)
}

#[test]
fn qwen2_bias_gradients_match_finite_differences() {
    let (c, w) = tiny_qwen2();
    c.validate(std::path::Path::new("tiny"), &w).unwrap();
    let mut ps = ParamSet::new();
    let m = LlamaParams::load(&w, c, &Finetune::Full, &mut ps, &mut SeedRng::new(5, streams::INIT)).unwrap();
    gradcheck(
        &m,
        &ps,
        &["blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.1.attn_v.bias", "blk.1.attn_q.weight", "blk.0.attn_k.weight"],
    );
}

#[test]
fn qwen2_q_and_k_are_permuted_on_load_and_saved_back_in_checkpoint_order() {
    let (c, w) = tiny_qwen2();
    let mut ps = ParamSet::new();
    let m = LlamaParams::load(&w, c.clone(), &Finetune::Full, &mut ps, &mut SeedRng::new(5, streams::INIT)).unwrap();
    // Inside: row i of a head moved to 2i, row i + half to 2i + 1.
    let q = w.tensors["blk.0.attn_q.weight"].clone().into_f32s().unwrap();
    let inside = &ps[ps.id("blk.0.attn_q.weight").unwrap()].value;
    let (hd, half) = (c.head_dim, c.head_dim / 2);
    assert_eq!(inside[2 * D..3 * D], q[D..2 * D], "row 1 of head 0 is pair element 2");
    assert_eq!(inside[D..2 * D], q[half * D..(half + 1) * D], "row half of head 0 is pair element 1");
    assert_eq!(inside[(hd + 1) * D..(hd + 2) * D], q[(hd + half) * D..(hd + half + 1) * D], "head 1 alike");
    // Saved: exactly the checkpoint's tensors, biases included.
    let saved = m.merged_weights(&ps).unwrap();
    for (name, t) in &w.tensors {
        let got = saved.get(name).unwrap_or_else(|| panic!("{name} is not saved"));
        assert_eq!(got.clone().into_f32s().unwrap(), t.clone().into_f32s().unwrap(), "{name}");
    }
    // A bias the family does not read is refused by name rather than dropped.
    let llama = LlamaConfig { family: Family::Llama, ..c };
    let err = llama.validate(std::path::Path::new("tiny"), &w).unwrap_err().to_string();
    assert!(err.contains("blk.0.attn_q.bias") && err.contains("qwen2"), "{err}");
}

/// A model whose widths are whole 32-value blocks, for the quantized base.
fn block_config(family: Family) -> LlamaConfig {
    LlamaConfig { family, hidden_size: 32, intermediate_size: 64, head_dim: 8, ..tiny_config() }
}

/// Q8_0 blocks of `x` (ggml's layout: an f16 scale, 32 int8 values).
fn q8_0_blocks(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = half::f16::from_f32(amax / 127.0);
        out.extend(d.to_le_bytes());
        let id = if d.to_f32() > 0.0 { 1.0 / d.to_f32() } else { 0.0 };
        out.extend(b.iter().map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8));
    }
    out
}

/// Random weights for `c` whose 2-D tensors are served as Q8_0 blocks, and as those blocks
/// dequantized to f32: the f32 and quantized paths hold the same weights.
struct Q8Source(StateDict);

impl WeightSource for Q8Source {
    fn get(&self, name: &str) -> anyhow::Result<Tensor> {
        match self.quantized(name) {
            Some(q) => Tensor::from_vec(q.dequantize(), &[q.rows, q.cols]),
            None => self.0.get(name),
        }
    }
    fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }
    fn quantized(&self, name: &str) -> Option<crate::quant::QMatrix> {
        let t = self.0.tensors.get(name)?;
        let [rows, cols] = t.shape()[..] else { return None };
        let bytes = q8_0_blocks(&t.clone().into_f32s().ok()?);
        crate::quant::QMatrix::new(crate::quant::QType::Q8_0, rows, cols, bytes.into()).ok()
    }
}

fn block_weights(c: &LlamaConfig, seed: u64) -> Q8Source {
    let (qd, kvd, f, d) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size, c.hidden_size);
    let mut g = rng(seed);
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: &[usize], lo: f32, hi: f32| {
        let t = Tensor::from_vec(uniform(&mut g, shape.iter().product(), lo, hi), shape).unwrap();
        tensors.insert(name, t);
    };
    put("token_embd.weight".into(), &[V, d], -1.0, 1.0);
    for i in 0..c.num_layers {
        put(format!("blk.{i}.attn_norm.weight"), &[d], 0.5, 1.5);
        for (name, out_f, in_f) in [
            ("attn_q", qd, d),
            ("attn_k", kvd, d),
            ("attn_v", kvd, d),
            ("attn_output", d, qd),
            ("ffn_gate", f, d),
            ("ffn_up", f, d),
            ("ffn_down", d, f),
        ] {
            put(format!("blk.{i}.{name}.weight"), &[out_f, in_f], -0.4, 0.4);
        }
        if c.family.qkv_bias() {
            for (name, n) in [("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)] {
                put(format!("blk.{i}.{name}.bias"), &[n], -0.5, 0.5);
            }
        }
        put(format!("blk.{i}.ffn_norm.weight"), &[d], 0.5, 1.5);
    }
    put("output_norm.weight".into(), &[d], 0.5, 1.5);
    Q8Source(StateDict { path: "blocks".into(), tensors })
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// QLoRA against its f32 twin on identical weights (the quantized blocks, dequantized): the
/// losses, the adapters' gradients, the decode logits agree up to the activations' int8
/// rounding; merging gives the same checkpoint; Qwen2's q/k row permutation moves whole rows of
/// blocks; full fine-tuning of a quantized base is refused.
#[test]
fn quantized_base_trains_lora_and_decodes_like_its_f32_twin() {
    for family in [Family::Llama, Family::Qwen2] {
        let c = block_config(family);
        let src = block_weights(&c, 21);
        let targets = LINEAR_NAMES;
        let ft = lora(4, &targets);
        let build = |base: BaseWeights| {
            let mut ps = ParamSet::new();
            let mut seed = SeedRng::new(5, streams::INIT);
            let m = LlamaParams::load_with(&src, c.clone(), &ft, base, &mut ps, &mut seed).unwrap();
            randomise_lora_b(&mut ps, 9);
            (m, ps)
        };
        let (mf, psf) = build(BaseWeights::F32);
        let (mq, psq) = build(BaseWeights::Quantized);
        let (lf, lq) = (on_host(&mf, &psf), on_host(&mq, &psq));
        let mem = lq.weight_memory();
        assert_eq!(mem.quant_tensors, 7 * c.num_layers + 1, "{family:?}: every linear layer and the tied head");
        assert!(mem.dense_values < lf.weight_memory().dense_values / 2, "{family:?}: {mem:?}");

        let (gf, gq) =
            (lf.forward_backward(&IDS, &TARGETS, 2).unwrap(), lq.forward_backward(&IDS, &TARGETS, 2).unwrap());
        let (loss_f, loss_q) = (lf.loss(&gf).unwrap(), lq.loss(&gq).unwrap());
        // 12 rows: the int8-activation path (below `TILE_GEMM_ROWS`), whose rounding (half a
        // step of 1/127 of each 32-block's largest input) is the whole difference.
        assert!((loss_f - loss_q).abs() < 2e-2 * loss_f.abs(), "{family:?}: loss {loss_q} vs f32 {loss_f}");
        for (i, p) in lq.params.iter().enumerate() {
            let j = lf.params.iter().position(|x| x.name == p.name).unwrap();
            match (&gq.grads[i], &gf.grads[j]) {
                (Some(a), Some(b)) => {
                    let (a, b) = (lq.download_grad(a).unwrap(), lf.download_grad(b).unwrap());
                    let e = rel_l2(&a, &b);
                    assert!(e < 1e-1, "{family:?} {}: gradient off by {e:.3e} (relative L2)", p.name);
                }
                (None, None) => {}
                _ => panic!("{family:?} {}: a gradient on one path only", p.name),
            }
        }
        // 36 rows: dequantized tiles and the f32 GEMM, exact up to summation order.
        let (ids, targets) = (IDS.repeat(3), TARGETS.repeat(3));
        let (gf, gq) =
            (lf.forward_backward(&ids, &targets, 6).unwrap(), lq.forward_backward(&ids, &targets, 6).unwrap());
        let (loss_f, loss_q) = (lf.loss(&gf).unwrap(), lq.loss(&gq).unwrap());
        assert!((loss_f - loss_q).abs() < 1e-4 * loss_f.abs(), "{family:?}, tiles: loss {loss_q} vs f32 {loss_f}");
        for (i, p) in lq.params.iter().enumerate() {
            let j = lf.params.iter().position(|x| x.name == p.name).unwrap();
            if let (Some(a), Some(b)) = (&gq.grads[i], &gf.grads[j]) {
                let e = rel_l2(&lq.download_grad(a).unwrap(), &lf.download_grad(b).unwrap());
                assert!(e < 1e-4, "{family:?} {}, tiles: gradient off by {e:.3e}", p.name);
            }
        }
        // Decode logits from the quantized head and blocks.
        let (mut cf, mut cq) = (lf.new_cache(1, T).unwrap(), lq.new_cache(1, T).unwrap());
        let hf = lf.prefill(lf.embed_tokens(&IDS[..T]).unwrap(), T, &[T], &mut cf).unwrap();
        let hq = lq.prefill(lq.embed_tokens(&IDS[..T]).unwrap(), T, &[T], &mut cq).unwrap();
        let rows: Vec<u32> = (0..T as u32).collect();
        let (zf, zq) = (lf.logits_of_rows(&hf, &rows).unwrap(), lq.logits_of_rows(&hq, &rows).unwrap());
        let e = rel_l2(&zq, &zf);
        assert!(e < 3e-2, "{family:?}: decode logits off by {e:.3e} (relative L2)");

        let (sf, sq) = (mf.merged_weights(&psf).unwrap(), mq.merged_weights(&psq).unwrap());
        assert_eq!(sf.keys().collect::<Vec<_>>(), sq.keys().collect::<Vec<_>>());
        for (name, t) in &sf {
            let (a, b) = (t.clone().into_f32s().unwrap(), sq[name].clone().into_f32s().unwrap());
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5), "{family:?}: merged {name} differs");
        }
        let mut ps = ParamSet::new();
        let full = LlamaParams::load_with(
            &src,
            c.clone(),
            &Finetune::Full,
            BaseWeights::Quantized,
            &mut ps,
            &mut SeedRng::new(0, 0),
        )
        .unwrap();
        let err = Llama::new(HostOps, &full, &ps, Some(AdamWConfig::default())).err().expect("refused").to_string();
        assert!(err.contains("QLoRA"), "{err}");
        assert!(Llama::new(HostOps, &full, &ps, None).is_ok(), "inference from a quantized base");
    }
}

/// A QLoRA model's losses read its frozen LM head from the blocks (its f32 copy is freed): the
/// sequence log-probabilities and their backward equal, bit for bit, the same ops through the
/// f32 copy of those blocks (the same chunks and sums), and the cross-entropy built from them
/// equals the fused one up to summation order. A head gradient buffer and hidden states of the
/// wrong width are refused.
#[test]
fn a_frozen_quantized_head_gives_the_losses_of_its_f32_copy() {
    use crate::opset::Losses;
    let c = block_config(Family::Llama);
    let mut ps = ParamSet::new();
    let mut seed = SeedRng::new(5, streams::INIT);
    let m = LlamaParams::load_with(
        &block_weights(&c, 21),
        c.clone(),
        &lora(4, &LINEAR_NAMES),
        BaseWeights::Quantized,
        &mut ps,
        &mut seed,
    )
    .unwrap();
    let lq = Llama::new(HostOps, &m, &ps, Some(AdamWConfig::default())).unwrap();
    assert!(lq.quantized_loss_head().is_some() && !lq.lm_head_trains());
    let err = lq.lm_head().expect_err("the f32 head was freed").to_string();
    assert!(err.contains("no f32 copy"), "{err}");
    // The loader made no f32 copy of the tables: the head's blocks dequantized stand in.
    assert!(m.output.is_none() && m.token_embd.is_none() && ps.iter().all(|p| !p.name.contains("token_embd")));
    let head = &m.head_q.as_ref().unwrap().dequantize();
    let o = &HostOps;
    let (seqs, t, d) = (3, 5, c.hidden_size);
    let hidden = uniform(&mut rng(3), seqs * t * d, -1.0, 1.0);
    let mut targets: Vec<u32> = (0..seqs * t).map(|i| (i * 7 % V) as u32).collect();
    (targets[2], targets[9]) = (IGNORE, IGNORE);

    let (seq_q, lse_q) = lq.seq_logprobs(&hidden, &targets, seqs).unwrap();
    let (seq_f, lse_f) = o.seq_logprobs(&hidden, head, &targets, seqs).unwrap();
    assert_eq!((&seq_q, &lse_q), (&seq_f, &lse_f));
    assert!(seq_q.iter().all(|s| s.is_finite() && *s < 0.0), "{seq_q:?}");
    let grad = vec![0.5, -1.0, 2.0];
    let dh_q = lq.logprob_backward(&hidden, &targets, &lse_q, &grad, seqs, None).unwrap();
    let dh_f = o.logprob_backward(&hidden, head, &targets, &lse_f, &grad, seqs, None).unwrap();
    assert_eq!(dh_q, dh_f);
    assert!(dh_q[2 * d..3 * d].iter().all(|&g| g == 0.0), "an ignored position gets no gradient");

    let weights = [0.2, 0.3, 0.5];
    let ce_q = lq.cross_entropy(&hidden, &targets, &weights, None).unwrap();
    let ce_f = o.cross_entropy(&hidden, head, &targets, &weights, None).unwrap();
    assert!(rel_l2(&ce_q.seq_logp, &ce_f.seq_logp) < 1e-6, "{:?} vs {:?}", ce_q.seq_logp, ce_f.seq_logp);
    let e = rel_l2(&ce_q.d_hidden, &ce_f.d_hidden);
    assert!(e < 1e-5, "cross-entropy gradient off by {e:.3e}");

    let mut buf = vec![0.0; V * d];
    let err = lq.cross_entropy(&hidden, &targets, &weights, Some(&mut buf)).err().expect("refused").to_string();
    assert!(err.contains("frozen"), "{err}");
    let narrow = hidden[..seqs * t * (d - 1)].to_vec();
    let err = lq.seq_logprobs(&narrow, &targets, seqs).expect_err("refused").to_string();
    assert!(err.contains("quantized LM head"), "{err}");
}
