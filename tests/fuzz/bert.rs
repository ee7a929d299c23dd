//! safetensors weights and the BERT `config.json` of a sentence encoder, loaded by
//! `SentenceEncoder::load` and run on one sentence, as `sage embed` does.
//!
//! The model folder is a tiny copy of the real all-MiniLM-L6-v2 asset: its `config.json` with
//! small sizes, its `tokenizer.json` with the vocabulary cut to the first ids, and a
//! `model.safetensors` with the real file's tensor names (one layer) at the small sizes, so an
//! iteration costs milliseconds instead of a 90 MB load.

use super::mutate::{self, FuzzRng};
use super::runner::Target;
use rand::Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const VOCAB: usize = 3000;
const HIDDEN: usize = 32;
const FFN: usize = 64;
const POSITIONS: usize = 64;

fn real_dir() -> PathBuf {
    crate::common::minilm_dir()
}

fn tiny_config() -> Value {
    let text = std::fs::read_to_string(real_dir().join("config.json")).unwrap();
    let mut c: Value = serde_json::from_str(&text).unwrap();
    c["hidden_size"] = json!(HIDDEN);
    c["intermediate_size"] = json!(FFN);
    c["num_attention_heads"] = json!(2);
    c["num_hidden_layers"] = json!(1);
    c["max_position_embeddings"] = json!(POSITIONS);
    c["vocab_size"] = json!(VOCAB);
    c
}

fn tiny_tokenizer() -> Vec<u8> {
    let text = std::fs::read_to_string(real_dir().join("tokenizer.json")).unwrap();
    let mut t: Value = serde_json::from_str(&text).unwrap();
    t["model"]["vocab"].as_object_mut().unwrap().retain(|_, id| id.as_u64().is_some_and(|i| (i as usize) < VOCAB));
    serde_json::to_vec(&t).unwrap()
}

/// The real header's tensor names and shapes, layer 0 only, sizes mapped to the tiny model.
fn tiny_shapes() -> Vec<(String, Dtype, Vec<usize>)> {
    let mut f = std::fs::File::open(real_dir().join("model.safetensors")).unwrap();
    let mut n = [0u8; 8];
    std::io::Read::read_exact(&mut f, &mut n).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(n) as usize];
    std::io::Read::read_exact(&mut f, &mut header).unwrap();
    let h: serde_json::Map<String, Value> = serde_json::from_slice(&header).unwrap();
    let small = |d: u64| match d {
        384 => HIDDEN,
        1536 => FFN,
        512 => POSITIONS,
        30522 => VOCAB,
        other => other as usize,
    };
    h.iter()
        .filter(|(k, _)| *k != "__metadata__" && (!k.contains("layer.") || k.contains("layer.0.")))
        .map(|(k, v)| {
            let dtype = if v["dtype"] == "I64" { Dtype::I64 } else { Dtype::F32 };
            (k.clone(), dtype, v["shape"].as_array().unwrap().iter().map(|d| small(d.as_u64().unwrap())).collect())
        })
        .collect()
}

/// Weights in `float` (F32, F16 or BF16): small deterministic values, ones for LayerNorm gains.
fn tiny_weights(float: Dtype) -> Vec<u8> {
    let shapes = tiny_shapes();
    let bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = shapes
        .into_iter()
        .map(|(name, dt, shape)| {
            let n: usize = shape.iter().product();
            let val = |i: usize| {
                if name.ends_with("LayerNorm.weight") {
                    1.0
                } else {
                    ((i * 37 % 101) as f32 - 50.0) / 500.0
                }
            };
            let (dt, bytes) = match dt {
                Dtype::I64 => (dt, (0..n as i64).flat_map(|i| i.to_le_bytes()).collect()),
                _ => match float {
                    Dtype::F16 => (float, (0..n).flat_map(|i| half::f16::from_f32(val(i)).to_le_bytes()).collect()),
                    Dtype::BF16 => (float, (0..n).flat_map(|i| half::bf16::from_f32(val(i)).to_le_bytes()).collect()),
                    _ => (Dtype::F32, (0..n).flat_map(|i| val(i).to_le_bytes()).collect::<Vec<u8>>()),
                },
            };
            (name, dt, shape, bytes)
        })
        .collect();
    let views: Vec<(String, TensorView)> =
        bufs.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    let meta = Some([("format".to_string(), "pt".to_string())].into_iter().collect());
    safetensors::serialize(views, meta).unwrap()
}

struct Tiny {
    config: Vec<u8>,
    tokenizer: Vec<u8>,
    weights: Vec<u8>,
}

fn tiny() -> &'static Tiny {
    static T: OnceLock<Tiny> = OnceLock::new();
    T.get_or_init(|| Tiny {
        config: serde_json::to_vec_pretty(&tiny_config()).unwrap(),
        tokenizer: tiny_tokenizer(),
        weights: tiny_weights(Dtype::F32),
    })
}

/// The folder around the input: every file of the tiny model (the input then replaces one).
fn setup(dir: &Path) {
    let t = tiny();
    std::fs::write(dir.join("config.json"), &t.config).unwrap();
    std::fs::write(dir.join("tokenizer.json"), &t.tokenizer).unwrap();
    std::fs::write(dir.join("model.safetensors"), &t.weights).unwrap();
}

fn run(p: &Path) -> anyhow::Result<()> {
    let enc = sage::models::bert::SentenceEncoder::load(p.parent().unwrap())?;
    enc.embed("a cat sat on the mat, and the dog did not.")?;
    Ok(())
}

fn weight_seeds() -> Vec<Vec<u8>> {
    vec![tiny().weights.clone(), tiny_weights(Dtype::F16), tiny_weights(Dtype::BF16)]
}

fn config_seeds() -> Vec<Vec<u8>> {
    vec![tiny().config.clone()]
}

const DTYPES: &[&str] = &["F32", "F16", "BF16", "F64", "I64", "I32", "U8", "BOOL", "F8_E4M3", "E8M0", "X"];

/// One edit of the header (dtype, shape, data offsets, an entry, the metadata), the header length
/// or the data length.
fn mutate_weights(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    let parsed = (data.len() >= 8)
        .then(|| u64::from_le_bytes(data[..8].try_into().unwrap()) as usize)
        .filter(|&n| n <= data.len() - 8)
        .and_then(|n| serde_json::from_slice::<serde_json::Map<String, Value>>(&data[8..8 + n]).ok().map(|h| (n, h)));
    let Some((n, mut h)) = parsed else { return mutate::bytes(rng, data, &[]) };
    let mut body = data[8 + n..].to_vec();
    let names: Vec<String> = h.keys().filter(|k| *k != "__metadata__").cloned().collect();
    let mut declared: Option<u64> = None;
    if names.is_empty() {
        return mutate::bytes(rng, data, &[]);
    }
    let name = mutate::pick(rng, &names).clone();
    let other = mutate::pick(rng, &names).clone();
    let other_offsets = h.get(&other).and_then(|e| e.get("data_offsets")).cloned();
    let entry = h.get_mut(&name).and_then(Value::as_object_mut);
    match (rng.random_range(0..10), entry) {
        (0, Some(e)) => {
            e.insert("dtype".into(), json!(*mutate::pick(rng, DTYPES)));
        }
        (1 | 2, Some(e)) => {
            if let Some(shape) = e.get_mut("shape").and_then(Value::as_array_mut) {
                match rng.random_range(0..3) {
                    0 if !shape.is_empty() => {
                        let i = rng.random_range(0..shape.len());
                        let n = mutate::int_near(rng, shape[i].as_u64().unwrap_or(1) as i128);
                        shape[i] = if n >= 0 { json!(n as u64) } else { json!(n as i64) };
                    }
                    1 => shape.push(json!(*mutate::pick(rng, &[0u64, 1, 2, 1 << 40]))),
                    _ => {
                        shape.pop();
                    }
                }
            }
        }
        (3 | 4, Some(e)) => {
            if let Some(offs) = e.get_mut("data_offsets").and_then(Value::as_array_mut).filter(|o| o.len() == 2) {
                let i = rng.random_range(0..2);
                let old = offs[i].as_u64().unwrap_or(0);
                offs[i] = json!(mutate::int_near(rng, old as i128).clamp(0, u64::MAX as i128) as u64);
            }
        }
        (5, Some(e)) => {
            // overlap: this tensor's offsets set to another's
            if let Some(o) = other_offsets {
                e.insert("data_offsets".into(), o);
            }
        }
        (6, _) => {
            h.remove(&name);
        }
        (7, _) => declared = Some(mutate::int_near(rng, n as i128).clamp(0, u64::MAX as i128) as u64),
        (8, _) => {
            if rng.random_bool(0.5) {
                let cut = rng.random_range(0..=body.len());
                body.truncate(cut);
            } else {
                body.extend(std::iter::repeat_n(0u8, rng.random_range(1..100)));
            }
        }
        _ => {
            let mut v = Value::Object(h);
            super::json::mutate_value(rng, &mut v);
            // The edit may replace the whole header with a non-object: write that as it is.
            match v {
                Value::Object(m) => h = m,
                other => {
                    let header = other.to_string().into_bytes();
                    let mut out = (header.len() as u64).to_le_bytes().to_vec();
                    out.extend(header);
                    out.extend(body);
                    return out;
                }
            }
        }
    }
    let header = serde_json::to_vec(&h).unwrap();
    let mut out = declared.unwrap_or(header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(body);
    out
}

pub fn targets() -> Vec<Target> {
    vec![
        Target {
            name: "safetensors",
            file_name: "model.safetensors",
            seeds: weight_seeds,
            mutate: mutate_weights,
            setup,
            run,
        },
        Target {
            name: "bert_config",
            file_name: "config.json",
            seeds: config_seeds,
            mutate: super::json::mutate,
            setup,
            run,
        },
    ]
}
