//! Hugging Face checkpoint folders, written by transformers itself (scripts/hf_tiny_reference.py:
//! tiny random-weight LlamaForCausalLM with one safetensors file and the chat template in
//! tokenizer_config.json, Qwen2ForCausalLM in three shards with chat_template.jinja, Dinov2Model),
//! against what transformers computed on them (tests/fixtures/hf/reference.json).

mod common;

use sage::backend::cpu::HostOps;
use sage::formats::chat_template::Message;
use sage::models::dinov2::{Dinov2, Tap};
use sage::models::llama::{BaseWeights, ChatModel};
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf").join(name)
}

fn reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("reference.json")).unwrap()).unwrap()
}

/// f32 forward passes of the same weights in another order of sums: 1e-4 on logits of size ~3.
const LOGIT_TOL: f32 = 1e-4;

fn llm_matches_transformers(name: &str) {
    let r = &reference()[name];
    let m = ChatModel::load(HostOps, &fixture(name), 128, BaseWeights::F32).unwrap();
    let prompt = m.template.render(&[Message::new("user", "Is there a crack in the cell?")], true).unwrap();
    assert_eq!(prompt, r["prompt"].as_str().unwrap(), "{name}: the chat template renders as transformers'");
    let ids = m.tokenizer.encode(&prompt, false).unwrap();
    let want: Vec<u32> = r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, want, "{name}: tokenizer.json tokenizes as transformers'");
    let model = &m.model;
    let fwd = model.forward_rows(model.embed_tokens(&ids).unwrap(), &vec![0; ids.len()], 1, false).unwrap();
    let rows: Vec<u32> = (0..ids.len() as u32).collect();
    let logits = model.logits_of_rows(&fwd.hidden, &rows).unwrap();
    let want: Vec<f32> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().clone())
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(logits.len(), want.len());
    let worst = logits.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("{name}: largest |logit − transformers| over {} logits = {worst:.2e}", want.len());
    assert!(worst <= LOGIT_TOL, "{name}: logits differ from transformers' by up to {worst}");
    assert!(m.tokenizer.stop_ids.contains(&m.tokenizer.token_to_id("<|im_end|>").unwrap()));
}

#[test]
fn hf_llama_folder_matches_transformers() {
    llm_matches_transformers("llama");
}

#[test]
fn hf_qwen2_sharded_folder_matches_transformers() {
    llm_matches_transformers("qwen2");
}

#[test]
fn hf_dinov2_folder_matches_transformers() {
    let r = &reference()["dinov2"];
    let net = Dinov2::load(&fixture("dinov2")).unwrap();
    let pixels: Vec<f32> = r["pixels"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    let h = &net.forward(&[&pixels], 28, 28, &[Tap::Normed]).unwrap()[0];
    let want: Vec<f32> =
        r["last_hidden_state"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(h.data.len(), want.len(), "CLS + 2×2 patches of 64");
    let worst = h.data.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    eprintln!("dinov2: largest |hidden − transformers| = {worst:.2e}");
    assert!(worst <= 1e-4, "{worst}");
}

#[test]
fn unknown_architectures_and_broken_folders_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let copy = |name: &str| -> PathBuf {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for e in std::fs::read_dir(fixture(name)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
        }
        d
    };
    let err_of = |p: &Path| format!("{:#}", ChatModel::load(HostOps, p, 128, BaseWeights::F32).err().expect("refused"));
    let q = copy("qwen2");
    let cfg = std::fs::read_to_string(q.join("config.json")).unwrap();
    std::fs::write(q.join("config.json"), cfg.replace("\"model_type\": \"qwen2\"", "\"model_type\": \"mistral\""))
        .unwrap();
    let e = err_of(&q);
    assert!(e.contains("model_type `mistral`") && e.contains("llama, qwen2"), "{e}");
    std::fs::write(
        q.join("config.json"),
        cfg.replace("\"rope_scaling\": null", "\"rope_scaling\": {\"type\": \"yarn\"}"),
    )
    .unwrap();
    let e = err_of(&q);
    assert!(e.contains("rope_scaling") && e.contains("not supported"), "{e}");
    std::fs::write(q.join("config.json"), &cfg).unwrap();
    std::fs::remove_file(q.join("model-00002-of-00003.safetensors")).unwrap();
    let e = err_of(&q);
    assert!(e.contains("model-00002-of-00003.safetensors"), "{e}");
    let d = copy("dinov2");
    let e = format!("{:#}", ChatModel::load(HostOps, &d, 128, BaseWeights::F32).err().unwrap());
    assert!(e.contains("model_type `dinov2`"), "{e}");
    let e = format!("{:#}", Dinov2::load(&fixture("llama")).err().unwrap());
    assert!(e.contains("model_type `llama` is not a DINOv2"), "{e}");
}
