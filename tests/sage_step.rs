//! The SAGE model's device training step (`models::sage_step`) on the CPU reference op set,
//! against `sage sfe`'s CPU path on the real SmolLM2-135M and EfficientNet-Lite0: the same loss,
//! the same gradient for every trainable tensor (LoRA adapters, or every LLM tensor, and the whole
//! head), and the same weights after clipped AdamW steps. This holds the GPU step's orchestration
//! (padding, sequence weights, row assembly, the head's backward, clipping) to the CPU model; the
//! CUDA ops are held to their CPU references by tests/kernels_parity.rs on a device.

mod common;
use common::*;
use sage::backend::cpu::HostOps;
use sage::models::efficientnet::PatchTokens;
use sage::models::llama_train::Finetune;
use sage::models::sage::{FactsMode, SageConfig};
use sage::models::sage_model::{Example, SageModel};
use sage::models::sage_step::DeviceSage;
use sage::ops::similarity::Reduce;
use sage::train::{AdamWConfig, ParamSet, SeedRng, Trainer};

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

fn max_err(a: &[f32], b: &[f32]) -> (f32, f32) {
    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
    (a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())), scale)
}

/// Loss and every gradient of one batch, then three clipped AdamW steps, device step vs CPU path.
fn device_step_matches_cpu(finetune: Finetune) {
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
    let plans: Vec<_> = exs.iter().map(|e| m.plan(e).unwrap()).collect();
    assert!(plans.iter().map(|p| p.t).min() < plans.iter().map(|p| p.t).max(), "the batch needs padding");

    let max_norm = 0.05;
    let dev = DeviceSage::new(HostOps, &m, &params, AdamWConfig::default(), Some(max_norm)).unwrap();
    let g = dev.forward_backward(&plans).unwrap();
    let loss = dev.llm.loss(&g).unwrap();

    // The CPU path: one backward per example, averaged, as `sage sfe` does it.
    params.zero_grad();
    let mut cpu_loss = 0.0;
    for e in &exs {
        cpu_loss += m.loss(&mut params, e, true).unwrap().0 / exs.len() as f32;
    }
    params.scale_grads(1.0 / exs.len() as f32);
    assert!((loss - cpu_loss).abs() <= 1e-4 * cpu_loss.abs(), "loss {loss} vs {cpu_loss}");
    let mut checked = 0;
    for (p, grad) in dev.llm.params.iter().zip(&g.grads) {
        let host = &params[params.id(&p.name).unwrap()];
        assert_eq!(grad.is_some(), host.trainable, "{}: a gradient exactly when trainable", p.name);
        let Some(grad) = grad else { continue };
        let (err, scale) = max_err(&dev.llm.download_grad(grad).unwrap(), &host.grad);
        assert!(err <= 2e-3 * scale, "{}: max |Δ| {err} at gradient scale {scale}", p.name);
        checked += 1;
    }
    assert!(checked >= 14, "head and LLM gradients checked: {checked}");
    println!("device step on host ops: loss {loss} (cpu {cpu_loss}), {checked} gradients equal");

    // Three steps on each side from the same start: the device step's clipping and AdamW against
    // the trainer's.
    let tcfg = sage::train::TrainConfig {
        adamw: AdamWConfig::default(),
        schedule: sage::train::CosineSchedule { peak_lr: 1e-3, warmup_steps: 0, total_steps: 3, min_ratio: 0.1 },
        max_grad_norm: Some(max_norm),
        accum_steps: exs.len(),
    };
    let mut dev = DeviceSage::new(HostOps, &m, &params, tcfg.adamw, Some(max_norm)).unwrap();
    let mut trainer = Trainer::new(tcfg);
    params.zero_grad();
    for step in 0..3u64 {
        let lr = tcfg.schedule.lr(step);
        let (dl, dn) = dev.train_step(&plans, lr).unwrap();
        let mut cl = 0.0;
        let mut report = None;
        for e in &exs {
            cl += m.loss(&mut params, e, true).unwrap().0 / exs.len() as f32;
            report = trainer.micro_step(&mut params);
        }
        let report = report.unwrap();
        assert!((dl - cl).abs() <= 1e-4 * cl.abs(), "step {step}: loss {dl} vs {cl}");
        assert!(
            (dn - report.grad_norm).abs() <= 1e-3 * report.grad_norm,
            "step {step}: norm {dn} vs {}",
            report.grad_norm
        );
        assert!(report.grad_norm > max_norm, "the test should clip: norm {}", report.grad_norm);
    }
    // Adam moves an element by up to lr per step whatever its gradient's size, so where the two
    // paths' rounding differs on a near-zero gradient the update can differ by a part of a step:
    // the weights must agree to 5% of the three steps' largest possible movement (3·lr).
    let mut stepped = params.clone();
    dev.llm.download_into(&mut stepped).unwrap();
    let mut worst = 0.0f32;
    for p in params.iter().filter(|p| p.trainable) {
        let (err, _) = max_err(&stepped[stepped.id(&p.name).unwrap()].value, &p.value);
        assert!(err <= 0.05 * 3e-3, "{} after three steps: max |Δ| {err}", p.name);
        worst = worst.max(err);
    }
    println!("three clipped steps: losses and norms equal, weights within {worst:.2e}");
    assert_eq!(dev.llm.steps(), 3);
}

#[test]
fn sage_device_step_on_host_ops_matches_the_cpu_path_with_lora() {
    device_step_matches_cpu(Finetune::Lora { rank: 4, alpha: 8.0, targets: vec!["attn_q".into(), "attn_v".into()] });
}

/// Generation on the device op set (`DeviceSage::generate`: the assembled prompts prefilled into a
/// KV cache, then cached decode steps; what `sage eval` and `sage infer` run with `--device cuda`)
/// on the CPU reference ops equals the CPU model's batched greedy answers, token for token, and
/// stops at `max_new`.
#[test]
fn sage_device_generation_on_host_ops_matches_the_cpu_answers() {
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
    let greedy = sage::models::llama::Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
    let cpu = m.answer_batch(&params, &exs, 10, greedy).unwrap();
    let dev = DeviceSage::new(HostOps, &m, &params, AdamWConfig::default(), None).unwrap();
    let plans: Vec<_> = exs.iter().map(|e| m.plan(e).unwrap()).collect();
    let ids = dev.generate(&plans, 10, &m.tokenizer.stop_ids, greedy).unwrap();
    for ((text, _), ids) in cpu.iter().zip(&ids) {
        assert!(ids.len() <= 10);
        let got = m.tokenizer.decode(ids, true).unwrap().trim().to_string();
        assert_eq!(&got, text);
    }
    println!("device generation on host ops: {:?}", cpu.iter().map(|c| &c.0).collect::<Vec<_>>());
}

/// Full fine-tuning: the token table trains through the text rows (and, tied, as the LM head).
#[test]
fn sage_device_step_on_host_ops_matches_the_cpu_path_full_finetune() {
    device_step_matches_cpu(Finetune::Full);
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
    let mut dev = DeviceSage::new(cuda, &m, &params, tcfg.adamw, tcfg.max_grad_norm).unwrap();
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
    let mut host = DeviceSage::new(HostOps, &m, &rounded, tcfg.adamw, tcfg.max_grad_norm).unwrap();
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
