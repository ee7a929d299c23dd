//! Qwen2.5-Coder-0.5B-Instruct (the pinned GGUF, Q4_K_M: Q4_K, Q5_0, Q6_K, Q8_0 and f32 tensors)
//! against an independent implementation: `scripts/qwen2_reference.py` dequantises with the `gguf`
//! Python package and runs a numpy float64 Qwen2 decoder written after HF transformers'
//! (rotate-half RoPE, q/k/v biases, GQA), its tokenizer rebuilt with the `tokenizers` package.
//! The fixture holds its token ids and top-10 logits at two positions of a ChatML prompt.

mod common;

use sage::backend::cpu::HostOps;
use sage::formats::chat_template::Message;
use sage::models::llama::{BaseWeights, ChatModel, Finetune};
use sage::models::sage::{Example, FactsMode, Sage, SageConfig, SageModel};
use sage::train::{AdamWConfig, ParamSet, SeedRng};
use serde_json::Value;

/// Largest difference allowed between sage's f32 logits and the float64 reference (logits of
/// this prompt lie around 15..25; measured 1e-5 when the fixture was made, printed by the test).
const LOGIT_TOL: f32 = 2e-3;

#[test]
fn qwen2_tokens_template_and_top10_logits_match_the_numpy_reference() {
    let fixture: Value =
        serde_json::from_str(include_str!("fixtures/qwen2/reference.json")).expect("the fixture is JSON");
    assert_eq!(fixture["gguf_sha256"], sage::assets::JOINED[0].sha256, "the fixture was made from the pinned file");
    let m = ChatModel::load(HostOps, &common::qwen25_gguf(), 256, BaseWeights::F32).unwrap();

    // The ChatML template from the GGUF, with its default system message.
    let prompt = m.template.render(&[Message::new("user", "What is the capital of France?")], true).unwrap();
    assert_eq!(prompt, fixture["prompt"].as_str().unwrap());
    let ids = m.tokenizer.encode(&prompt, false).unwrap();
    let want_ids: Vec<u32> = fixture["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want_ids, "token ids differ from the reference tokenizer's");

    let model = &m.model;
    let x = model.embed_tokens(&ids).unwrap();
    let fwd = model.forward_rows(x, &vec![0; ids.len()], 1, false).unwrap();
    let vocab = model.config.vocab_size;
    let mut worst = 0f32;
    for p in fixture["positions"].as_array().unwrap() {
        let pos = p["pos"].as_u64().unwrap() as u32;
        let logits = model.logits_of_rows(&fwd.hidden, &[pos]).unwrap();
        assert_eq!(logits.len(), vocab);
        let top = p["top"].as_array().unwrap();
        for (rank, entry) in top.iter().enumerate() {
            let (id, want) = (entry[0].as_u64().unwrap() as usize, entry[1].as_f64().unwrap() as f32);
            let got = logits[id];
            worst = worst.max((got - want).abs());
            assert!(
                (got - want).abs() <= LOGIT_TOL,
                "position {pos}, reference rank {rank}: token {id} logit {got} vs {want}"
            );
        }
        let argmax = (0..vocab).max_by(|&a, &b| logits[a].total_cmp(&logits[b])).unwrap();
        assert_eq!(argmax as u64, top[0][0].as_u64().unwrap(), "position {pos}: top-1 differs");
    }
    eprintln!("qwen2 parity: largest |logit − reference| over the top-10 at 2 positions = {worst:.5}");
}

/// The check: `sage generate --backbone dino-qwen` answers the capital question.
#[test]
fn generate_on_the_dino_qwen_backbone_answers_paris() {
    let out = common::sage()
        .args(["generate", "--json", "--backbone", "dino-qwen", "--max-tokens", "24"])
        .args(["--prompt", "What is the capital of France?"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
}

/// The `dino-qwen` backbone reaches the SAGE model: DINOv2 block-6 tokens (16×16 × 384) pooled
/// into the adapter, Qwen2.5's LoRA-adapted decoder with its ChatML template, fused facts; two
/// LoRA SFE steps on one example lower its loss.
#[test]
fn a_sage_sfe_step_runs_on_the_dino_qwen_backbone() {
    let cfg = SageConfig {
        backbone: "dino-qwen".into(),
        facts: FactsMode::Fused,
        k: 8,
        fusion_dim: 64,
        fusion_heads: 2,
        image_pool: 4,
        anomaly_channel: false,
        map_cue: false,
        map_cue_levels: vec![],
        ..SageConfig::default()
    };
    let lora = Finetune::Lora { rank: 4, alpha: 8.0, targets: vec!["attn_q".into(), "attn_v".into()] };
    let mut params = ParamSet::new();
    let m = SageModel::new(cfg, &lora, &mut params, &mut SeedRng::new(0, 0)).unwrap();
    let (test, reference) = (
        m.patch_tokens(&common::elpv_image("cell0001.png")).unwrap(),
        m.patch_tokens(&common::elpv_image("cell0002.png")).unwrap(),
    );
    assert_eq!((test.h, test.w, test.dim), (16, 16, 384), "DINOv2 ViT-S/14 at 224 px");
    let facts = vec!["The cell shows a dark crack.".to_string(), "The busbars are intact.".to_string()];
    let ex = Example {
        test: &test,
        reference: Some(&reference),
        facts: &facts,
        question: "Is there any defect in the test image?",
        answer: Some("Yes. A crack runs across the cell."),
    };
    let plans = vec![m.plan(&ex).unwrap()];
    let mut dev = Sage::new(HostOps, &m, &params, Some(AdamWConfig::default()), None).unwrap();
    let (first, _) = dev.train_step(&plans, 1e-3).unwrap();
    let (second, _) = dev.train_step(&plans, 1e-3).unwrap();
    let after = dev.loss(&plans).unwrap();
    eprintln!("dino-qwen SFE: loss {first:.4} → {second:.4} → {after:.4}");
    assert!(first.is_finite() && after < first, "loss {first} → {after}");
}
