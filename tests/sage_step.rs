//! The SAGE model (`models::sage`) on the real SmolLM2-135M and EfficientNet-Lite0, against
//! independent references: its training step's gradients (LoRA adapters, or every LLM tensor,
//! and the whole head) against finite differences of its loss on the CPU op set, and its
//! generation against a teacher-forced forward and against each question answered alone. The
//! GPU step is held to the CPU op set here (ten SFE steps) and op by op in
//! tests/kernels_parity.rs.

mod common;
use common::*;
use sage::backend::cpu::HostOps;
use sage::models::efficientnet::PatchTokens;
use sage::models::llama::Finetune;
use sage::models::sage::{Example, FactsMode, Sage, SageConfig, SageModel, SeqPlan};
use sage::models::sampling::Sampling;
use sage::ops::similarity::Reduce;
use sage::opset::Buffers;
use sage::train::{AdamWConfig, ParamSet, SeedRng};

struct Pair {
    test: PatchTokens,
    reference: PatchTokens,
}

fn model(finetune: &Finetune, params: &mut ParamSet) -> SageModel {
    let cfg = SageConfig {
        facts: FactsMode::Fused,
        k: 5,
        reduce: Reduce::Nearest,
        fusion_dim: 32,
        fusion_heads: 2,
        image_pool: 5,
    };
    SageModel::new(&efficientnet_pth(), &smollm2_gguf(), cfg, finetune, params, &mut SeedRng::new(3, 0)).unwrap()
}

const FACTS: [&str; 2] = ["The cell shows a dark crack across its lower half.", "The busbars are intact."];
const QA: [(&str, &str); 3] = [
    ("Is there any defect in the test image?", "Yes. A crack runs across the lower half of the cell."),
    ("Is the test cell normal?", "No."),
    ("Does the reference image show a defect?", "No, the reference cell is a normal monocrystalline cell."),
];

fn examples<'a>(pairs: &'a [Pair], facts: &'a [String]) -> Vec<Example<'a>> {
    QA.iter()
        .enumerate()
        .map(|(i, (q, a))| {
            let p = &pairs[i % pairs.len()];
            Example { test: &p.test, reference: Some(&p.reference), facts, question: q, answer: Some(a) }
        })
        .collect()
}

/// Two real ELPV test/reference pairs, encoded.
fn elpv_pairs(m: &SageModel) -> Vec<Pair> {
    [("cell0001.png", "cell0002.png"), ("cell0003.png", "cell0004.png")]
        .iter()
        .map(|(t, r)| Pair {
            test: m.patch_tokens(&elpv_image(t)).unwrap(),
            reference: m.patch_tokens(&elpv_image(r)).unwrap(),
        })
        .collect()
}

/// `Σ g·r` against the central difference of the loss along `r`, Richardson-extrapolated
/// (`(4·D(h/2) − D(h))/3` cancels the h² term), for parameter `i` of `dev`: the relative error.
fn directional_check(dev: &mut Sage<HostOps>, plans: &[SeqPlan], i: usize, analytic: &[f32], seed: u64) -> f64 {
    let w0 = dev.llm.ops.download(dev.llm.w(i)).unwrap();
    let r = SeedRng::new(seed, 0).uniform(w0.len(), -1.0, 1.0);
    let along: f64 = analytic.iter().zip(&r).map(|(&g, &r)| g as f64 * r as f64).sum();
    let loss0 = dev.llm.loss(&dev.forward_backward(plans).unwrap()).unwrap() as f64;
    // h moves the loss by about 1e-3 of itself, far above the f32 rounding of the forward.
    let h = (1e-3 * loss0.max(0.1) / along.abs().max(1e-12)).min(1e-1);
    let mut at = |t: f64| {
        let w: Vec<f32> = w0.iter().zip(&r).map(|(&w, &r)| w + (t * r as f64) as f32).collect();
        dev.llm.write_param(i, &w).unwrap();
        dev.llm.loss(&dev.forward_backward(plans).unwrap()).unwrap() as f64
    };
    let mut central = |h: f64| (at(h) - at(-h)) / (2.0 * h);
    let (d1, d2) = (central(h), central(h / 2.0));
    dev.llm.write_param(i, &w0).unwrap();
    let fd = (4.0 * d2 - d1) / 3.0;
    let rel = (fd - along).abs() / along.abs().max(1e-12);
    println!(
        "{}: analytic {along:.6e}, finite differences {fd:.6e} (h {h:.1e}): relative error {rel:.1e}",
        dev.llm.params[i].name
    );
    rel
}

/// The step's gradients (padding, sequence weights, row assembly, the LLM's and the head's
/// backward) against directional finite differences of the same loss on the real SmolLM2 and
/// EfficientNet-Lite0, for every head tensor and the `picks` of the LLM.
fn gradients_match_finite_differences(finetune: Finetune, picks: &[&str]) {
    let mut params = ParamSet::new();
    let m = model(&finetune, &mut params);
    // Non-zero LoRA B (it starts at zero) so that the adapters' input gradients are exercised.
    let names: Vec<String> = params.iter().filter(|p| p.name.ends_with("lora_b")).map(|p| p.name.clone()).collect();
    for (i, n) in names.iter().enumerate() {
        let id = params.id(n).unwrap();
        let len = params[id].value.len();
        params[id].value = SeedRng::new(100 + i as u64, 0).uniform(len, -0.02, 0.02);
    }
    let pairs = elpv_pairs(&m);
    let facts: Vec<String> = FACTS.iter().map(|s| s.to_string()).collect();
    let exs = examples(&pairs, &facts);
    let plans: Vec<SeqPlan> = exs.iter().map(|e| m.plan(e).unwrap()).collect();
    assert!(plans.iter().map(|p| p.t).min() < plans.iter().map(|p| p.t).max(), "the batch needs padding");
    let mut dev = Sage::new(HostOps, &m, &params, Some(AdamWConfig::default()), None).unwrap();
    let g = dev.forward_backward(&plans).unwrap();
    let mut worst = 0.0f64;
    let mut checked = 0;
    for i in 0..dev.llm.params.len() {
        let p = &dev.llm.params[i];
        assert_eq!(g.grads[i].is_some(), p.trainable(), "{}: a gradient exactly when trainable", p.name);
        let Some(grad) = &g.grads[i] else { continue };
        if !(p.name.starts_with("sage.") || picks.contains(&p.name.as_str())) {
            continue;
        }
        let analytic = dev.llm.download_grad(grad).unwrap();
        if p.name == "sage.fusion.k.bias" {
            // A bias shared by every key shifts all of a query's scores equally: the softmax
            // ignores it, so its true gradient is zero.
            assert!(analytic.iter().all(|g| g.abs() < 1e-5), "{:?}", &analytic[..4]);
            continue;
        }
        worst = worst.max(directional_check(&mut dev, &plans, i, &analytic, i as u64));
        checked += 1;
    }
    assert!(checked >= 13 + picks.len(), "head and LLM gradients checked: {checked}");
    // Observed ≤ 1e-3 (rounding noise); a wrong term is off by far more.
    assert!(worst < 1e-2, "a gradient disagrees with finite differences (worst relative error {worst:.1e})");
}

#[test]
fn sage_step_gradients_match_finite_differences_with_lora() {
    let lora = Finetune::Lora { rank: 4, alpha: 8.0, targets: vec!["attn_q".into(), "attn_v".into()] };
    gradients_match_finite_differences(lora, &["blk.0.attn_q.lora_a", "blk.29.attn_v.lora_b"]);
}

/// Full fine-tuning: the token table trains through the text rows and, tied, as the LM head.
#[test]
fn sage_step_gradients_match_finite_differences_full_finetune() {
    gradients_match_finite_differences(Finetune::Full, &["token_embd.weight", "blk.3.ffn_down.weight"]);
}

/// Generation (`Sage::generate`: the assembled prompts prefilled into a KV cache, then cached
/// decode steps; what `sage eval`, `sage infer` and validation run) answers a batch of questions
/// as it answers each alone, its first token is the argmax of a teacher-forced forward at the
/// prompt's last position, and it stops at `max_new`.
#[test]
fn sage_generation_batches_like_single_questions_and_starts_at_the_forward_argmax() {
    let mut params = ParamSet::new();
    let m = model(&Finetune::Lora { rank: 2, alpha: 4.0, targets: vec!["attn_q".into()] }, &mut params);
    let pair = Pair {
        test: m.patch_tokens(&elpv_image("cell0001.png")).unwrap(),
        reference: m.patch_tokens(&elpv_image("cell0002.png")).unwrap(),
    };
    let facts: Vec<String> = FACTS.iter().map(|s| s.to_string()).collect();
    let exs: Vec<Example> = QA
        .iter()
        .map(|(q, _)| Example {
            test: &pair.test,
            reference: Some(&pair.reference),
            facts: &facts,
            question: q,
            answer: None,
        })
        .collect();
    let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
    let dev = Sage::new(HostOps, &m, &params, None, None).unwrap();
    let plans: Vec<SeqPlan> = exs.iter().map(|e| m.plan(e).unwrap()).collect();
    let batch = dev.generate(&plans, 10, &m.tokenizer.stop_ids, greedy).unwrap();
    for (p, ids) in plans.iter().zip(&batch) {
        assert!(!ids.is_empty() && ids.len() <= 10);
        let alone = dev.generate(std::slice::from_ref(p), 10, &m.tokenizer.stop_ids, greedy).unwrap();
        assert_eq!(&alone[0], ids, "a question answered alone and in a batch");
        let fwd = dev.forward(std::slice::from_ref(p), false).unwrap();
        let logits = dev.llm.logits_of_rows(&fwd.llm.hidden, &[p.t as u32 - 1]).unwrap();
        assert_eq!(sage::models::sampling::argmax(&logits), ids[0], "the first token is the forward's argmax");
    }
    let answers = dev.answer_batch(&m, &exs, 10, greedy).unwrap();
    println!("generation on the CPU ops: {:?}", answers.iter().map(|a| &a.0).collect::<Vec<_>>());
}

/// The GPU check: ten SFE steps of the quick config (`configs/sfe-lite-quick.toml`: its
/// model — facts fused, K 8, fusion 128 × 4 heads, pool 4, LoRA r8 on attn_q/attn_v — and its
/// optimiser: AdamW, clipping, the warm-up and cosine schedule to lr 2e-3) on one batch of four
/// real ELPV examples, on the GPU (`CudaOps`, bf16) against the CPU reference ops (f32, from the
/// same bf16-rounded weights): every step's loss within 5%, and the loss falls. On the emulated
/// device (tests/emu: the same bf16 rounding, no GPU) the first three steps measured 0.4%,
/// 0.6% and 1.8% apart (losses 3.368/3.380, 3.021/3.040, 2.882/2.830; the clipped norm swings
/// from 23 to 11 to 52, so the two trajectories drift apart step by step). Skips with the
/// reason where no CUDA device works; on the GPU machine it needs the assets in `$SAGE_HOME`
/// (`scripts/device_pack_assets.sh` carries them there). `SAGE_SFE_STEPS` shortens it (the
/// emulated device takes minutes per step).
#[test]
fn sage_sfe_ten_steps_on_the_gpu_match_the_cpu_ops() {
    let gpu = match sage::backend::cuda::Gpu::global() {
        Ok(g) => g,
        Err(e) => {
            println!("sage sfe ten steps: skipped, no usable CUDA device: {e:#}");
            return;
        }
    };
    let mut params = ParamSet::new();
    let cfg = SageConfig {
        facts: FactsMode::Fused,
        k: 8,
        reduce: Reduce::Nearest,
        fusion_dim: 128,
        fusion_heads: 4,
        image_pool: 4,
    };
    let lora = Finetune::Lora { rank: 8, alpha: 16.0, targets: vec!["attn_q".into(), "attn_v".into()] };
    let m =
        SageModel::new(&efficientnet_pth(), &smollm2_gguf(), cfg, &lora, &mut params, &mut SeedRng::new(0, 0)).unwrap();
    let pairs = elpv_pairs(&m);
    let facts: Vec<String> = FACTS.iter().map(|s| s.to_string()).collect();
    let mut exs = examples(&pairs, &facts);
    exs.push(Example { test: &pairs[1].test, reference: Some(&pairs[1].reference), ..exs[0] });
    let plans: Vec<_> = exs.iter().map(|e| m.plan(e).unwrap()).collect();
    let cuda = sage::backend::cuda::step_ops::CudaOps::new(gpu);
    let quick: sage::sfe::config::SfeConfig =
        toml::from_str(&std::fs::read_to_string(common::emu::root().join("configs/sfe-lite-quick.toml")).unwrap())
            .unwrap();
    let tcfg = quick.train.trainer_config();
    let mut dev = Sage::new(cuda, &m, &params, Some(tcfg.adamw), tcfg.max_grad_norm).unwrap();
    // The reference starts from the weights the GPU computes with: its forward uses bf16 copies
    // of the fp32 master weights, and at this initialisation the adapter's gradient is
    // ill-conditioned in them: rounding only the adapter's two weight matrices to bf16 halves the
    // adapter's gradient on the CPU ops (fc2.bias gradient norm 17.3 → 8.7, one example), so an
    // f32-weight reference differs from any bf16 run by more than the bf16 arithmetic does.
    let mut rounded = params.clone();
    let names: Vec<String> = rounded.iter().map(|p| p.name.clone()).collect();
    for n in &names {
        let id = rounded.id(n).unwrap();
        rounded[id].value.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
    }
    let mut host = Sage::new(HostOps, &m, &rounded, Some(tcfg.adamw), tcfg.max_grad_norm).unwrap();
    let mut losses = Vec::new();
    let steps: usize = std::env::var("SAGE_SFE_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    for step in 0..steps {
        let lr = tcfg.schedule.lr(step as u64);
        let (a, na) = host.train_step(&plans, lr).unwrap();
        let (b, nb) = dev.train_step(&plans, lr).unwrap();
        losses.push((a, b, na, nb));
        eprintln!("step {step}: (cpu loss, gpu loss, cpu norm, gpu norm) {:?}", losses[step]);
        assert!((a - b).abs() <= 5e-2 * a.abs(), "step {step}: GPU loss {b} vs CPU {a}");
    }
    println!("sage sfe steps so far, (cpu loss, gpu loss, cpu norm, gpu norm): {losses:?}");
    assert!(losses[steps - 1].1 < losses[0].1, "the GPU loss should fall over the steps: {losses:?}");
    println!("sage sfe ten steps, (cpu loss, gpu loss, cpu norm, gpu norm): {losses:?}");
}
