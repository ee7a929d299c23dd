//! GGUF chat models, through `ChatModel::load` (reader, LLaMA config, tokenizer, chat template,
//! weights) and a two-token greedy chat, as `sage generate` does.
//!
//! The seed is a tiny model cut from the real SmolLM2 asset with `common::gguf_edit`: all of its
//! metadata (the vocabulary cut to its first ids and the merges among them, the sizes made
//! small), the same tensor names and ggml types per tensor, two blocks. The mutator edits
//! metadata values (integers to 0/1/odd/huge/negative or another type, floats to NaN/inf/0/
//! negative, strings, array lengths and element types), tensor infos (dims, types, offsets,
//! entries removed or duplicated), the alignment, and truncates.

use super::mutate::{self, FuzzRng};
use super::runner::{no_setup, Target};
use crate::common::gguf_edit::{GgufFile, Kv, TensorEntry};
use rand::Rng;
use std::path::Path;

const VOCAB: usize = 400;
const HIDDEN: u64 = 128;
const FFN: u64 = 256;
const HEADS: u64 = 2;
const KV_HEADS: u64 = 1;
const BLOCKS: usize = 2;

fn f16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_le_bytes()
}

/// Valid bytes for `n` elements of ggml type `ty` (small values; 1.0 for norms).
fn tensor_bytes(ty: u32, n: usize, norm: bool) -> Vec<u8> {
    match ty {
        0 => (0..n).flat_map(|i| if norm { 1.0f32 } else { ((i % 13) as f32 - 6.0) / 100.0 }.to_le_bytes()).collect(),
        8 => (0..n / 32)
            .flat_map(|b| {
                let mut blk = f16(0.002).to_vec();
                blk.extend((0..32).map(|i| ((i * 7 + b) % 255) as u8));
                blk
            })
            .collect(),
        3 => (0..n / 32)
            .flat_map(|b| {
                let mut blk = [f16(0.01), f16(-0.08)].concat();
                blk.extend((0..16).map(|i| ((i * 11 + b) % 256) as u8));
                blk
            })
            .collect(),
        other => panic!("the tiny model does not use ggml type {other}"),
    }
}

fn tiny() -> GgufFile {
    let real = GgufFile::read(&crate::common::smollm2_gguf());
    let mut g = GgufFile { version: real.version, kv: real.kv.clone(), tensors: vec![], data: vec![] };
    let tokens: Vec<String> = match g.get("tokenizer.ggml.tokens") {
        Some(Kv::Array(_, t)) => t
            .iter()
            .take(VOCAB)
            .map(|k| match k {
                Kv::Str(s) => s.clone(),
                _ => unreachable!(),
            })
            .collect(),
        _ => panic!("the real model has tokens"),
    };
    let kept: std::collections::HashSet<&str> = tokens.iter().map(String::as_str).collect();
    let merges: Vec<Kv> = match g.get("tokenizer.ggml.merges") {
        Some(Kv::Array(_, m)) => m
            .iter()
            .filter(|m| match m {
                Kv::Str(s) => s.split_once(' ').is_some_and(|(a, b)| {
                    kept.contains(a) && kept.contains(b) && kept.contains(format!("{a}{b}").as_str())
                }),
                _ => false,
            })
            .cloned()
            .collect(),
        _ => vec![],
    };
    let types: Vec<Kv> = match g.get("tokenizer.ggml.token_type") {
        Some(Kv::Array(_, t)) => t.iter().take(VOCAB).cloned().collect(),
        _ => vec![],
    };
    g.set("tokenizer.ggml.tokens", Kv::Array(8, tokens.into_iter().map(Kv::Str).collect()));
    g.set("tokenizer.ggml.merges", Kv::Array(8, merges));
    g.set("tokenizer.ggml.token_type", Kv::Array(5, types));
    g.set("llama.vocab_size", Kv::U32(VOCAB as u32));
    g.set("llama.block_count", Kv::U32(BLOCKS as u32));
    g.set("llama.embedding_length", Kv::U32(HIDDEN as u32));
    g.set("llama.feed_forward_length", Kv::U32(FFN as u32));
    g.set("llama.attention.head_count", Kv::U32(HEADS as u32));
    g.set("llama.attention.head_count_kv", Kv::U32(KV_HEADS as u32));
    g.set("llama.rope.dimension_count", Kv::U32((HIDDEN / HEADS) as u32));
    // Same names and types as the real tensors of block 0 and the globals; GGUF dims fastest first.
    let head_dim = HIDDEN / HEADS;
    let dims_of = |name: &str| -> Vec<u64> {
        let base = name.rsplit_once(".weight").map_or(name, |(b, _)| b);
        let kind = base.rsplit('.').next().unwrap();
        match kind {
            "token_embd" => vec![HIDDEN, VOCAB as u64],
            "attn_norm" | "ffn_norm" | "output_norm" => vec![HIDDEN],
            "attn_q" | "attn_output" => vec![HIDDEN, HIDDEN],
            "attn_k" | "attn_v" => vec![HIDDEN, KV_HEADS * head_dim],
            "ffn_gate" | "ffn_up" => vec![HIDDEN, FFN],
            "ffn_down" => vec![FFN, HIDDEN],
            other => panic!("unexpected tensor kind {other}"),
        }
    };
    let mut names = vec![];
    for t in &real.tensors {
        if t.name.starts_with("blk.0.") {
            for b in 0..BLOCKS {
                names.push((t.name.replacen("blk.0.", &format!("blk.{b}."), 1), t.ggml_type));
            }
        } else if !t.name.starts_with("blk.") {
            names.push((t.name.clone(), t.ggml_type));
        }
    }
    let align = g.alignment() as usize;
    for (name, ty) in names {
        let dims = dims_of(&name);
        let n = dims.iter().product::<u64>() as usize;
        let bytes = tensor_bytes(ty, n, name.contains("norm"));
        let offset = g.data.len() as u64;
        g.data.extend(bytes);
        g.data.resize(g.data.len().div_ceil(align) * align, 0);
        g.tensors.push(TensorEntry { name, dims, ggml_type: ty, offset });
    }
    g
}

fn seeds() -> Vec<Vec<u8>> {
    let g = tiny();
    // Also a version-2 file and one with untied output weights (`output.weight`).
    let mut v2 = g.clone();
    v2.version = 2;
    let mut untied = g.clone();
    let embd = untied.tensor("token_embd.weight").clone();
    let bytes = tensor_bytes(embd.ggml_type, (HIDDEN as usize) * VOCAB, false);
    untied.tensors.push(TensorEntry { name: "output.weight".into(), offset: untied.data.len() as u64, ..embd });
    untied.data.extend(bytes);
    vec![g.to_bytes(), v2.to_bytes(), untied.to_bytes()]
}

fn int_kv(like: &Kv, v: i128, rng: &mut FuzzRng) -> Kv {
    // Mostly the key's own type; sometimes another integer type, a float or a string.
    let pick =
        if rng.random_bool(0.8) { like.type_id() } else { *mutate::pick(rng, &[0u32, 1, 4, 5, 6, 8, 10, 11, 12]) };
    match pick {
        0 => Kv::U8(v as u8),
        1 => Kv::I8(v as i8),
        2 => Kv::U16(v as u16),
        3 => Kv::I16(v as i16),
        5 => Kv::I32(v as i32),
        6 => Kv::F32(v as f32),
        8 => Kv::Str(v.to_string()),
        10 => Kv::U64(v as u64),
        11 => Kv::I64(v as i64),
        12 => Kv::F64(v as f64),
        _ => Kv::U32(v as u32),
    }
}

fn mutate_kv(rng: &mut FuzzRng, v: &Kv) -> Kv {
    match v {
        Kv::F32(x) => Kv::F32(mutate::float_near(rng, *x as f64) as f32),
        Kv::F64(x) => Kv::F64(mutate::float_near(rng, *x)),
        Kv::Str(_) => match rng.random_range(0..3) {
            0 => Kv::Str(
                mutate::pick(rng, &["", "llama", "gpt2", "bert", "smollm", "{% for %}", "{{ raise_exception('x') }}"])
                    .to_string(),
            ),
            1 => Kv::U32(7),
            _ => Kv::Str("\u{1F600}".repeat(rng.random_range(1..100))),
        },
        Kv::Bool(b) => Kv::Bool(!b),
        Kv::Array(ety, items) => match rng.random_range(0..4) {
            0 => Kv::Array(*ety, vec![]),
            1 => Kv::Array(*ety, items[..rng.random_range(0..=items.len())].to_vec()),
            2 if !items.is_empty() => {
                // one element changed
                let mut items = items.clone();
                let i = rng.random_range(0..items.len());
                items[i] = mutate_kv(rng, &items[i]);
                let same = items[i].type_id() == *ety;
                if same {
                    Kv::Array(*ety, items)
                } else {
                    Kv::Array(4, items.iter().map(|_| Kv::U32(1)).collect())
                }
            }
            _ => Kv::Array(4, items.iter().enumerate().map(|(i, _)| Kv::U32(i as u32)).collect()),
        },
        other => {
            let old = other.as_u64().map(|x| x as i128).unwrap_or(-1);
            let n = mutate::int_near(rng, old);
            int_kv(other, n, rng)
        }
    }
}

fn mutate_tensor(rng: &mut FuzzRng, g: &mut GgufFile) {
    let i = rng.random_range(0..g.tensors.len());
    match rng.random_range(0..7) {
        0 | 1 => {
            let t = &mut g.tensors[i];
            let d = rng.random_range(0..t.dims.len());
            t.dims[d] = mutate::int_near(rng, t.dims[d] as i128) as u64;
        }
        2 => {
            let t = &mut g.tensors[i];
            if rng.random_bool(0.5) {
                t.dims.push(*mutate::pick(rng, &[1u64, 2, 0]));
            } else {
                t.dims.reverse();
            }
        }
        3 => g.tensors[i].ggml_type = *mutate::pick(rng, &[0u32, 1, 2, 3, 8, 12, 14, 30, 6, 99]),
        4 => {
            let o = g.tensors[i].offset as i128;
            g.tensors[i].offset = match rng.random_range(0..3) {
                0 => o + *mutate::pick(rng, &[1i128, 2, 16, -1, 32]),
                1 => g.tensors[rng.random_range(0..g.tensors.len())].offset as i128,
                _ => *mutate::pick(rng, mutate::INTERESTING_INTS),
            } as u64;
        }
        5 => {
            g.tensors.remove(i);
        }
        _ => {
            let dup = g.tensors[i].clone();
            g.tensors.push(dup);
        }
    }
}

fn mutate_gguf(data: &[u8], rng: &mut FuzzRng) -> Vec<u8> {
    // The editor reads well-formed files only; damage from a byte-level step stays byte-level.
    let Some(mut g) = super::runner::quietly(|| GgufFile::parse(data)) else {
        return mutate::bytes(rng, data, b"GGUF");
    };
    match rng.random_range(0..10) {
        0..=4 => {
            // model hyperparameters most of the time, any key otherwise
            let keys: Vec<usize> = (0..g.kv.len())
                .filter(|&i| {
                    rng.random_bool(0.3)
                        || g.kv[i].0.starts_with("llama.")
                        || g.kv[i].0.starts_with("tokenizer.ggml.") && !g.kv[i].0.ends_with('s')
                })
                .collect();
            if let Some(&k) = keys.get(rng.random_range(0..keys.len().max(1))) {
                g.kv[k].1 = mutate_kv(rng, &g.kv[k].1);
            }
        }
        5 => {
            let k = rng.random_range(0..g.kv.len());
            if rng.random_bool(0.7) {
                g.kv.remove(k);
            } else {
                // the same key twice, the second with another value
                let (key, v) = g.kv[k].clone();
                let v2 = mutate_kv(rng, &v);
                g.kv.push((key, v2));
            }
        }
        6 | 7 => mutate_tensor(rng, &mut g),
        8 => g.set("general.alignment", Kv::U32(*mutate::pick(rng, &[0u32, 1, 7, 16, 64, 4096]))),
        _ => {
            let bytes = g.to_bytes();
            return mutate::truncate(rng, &bytes);
        }
    }
    g.to_bytes()
}

fn run(p: &Path) -> anyhow::Result<()> {
    use sage::formats::chat_template::Message;
    use sage::models::llama::ChatModel;
    use sage::models::sampling::Sampling;
    let m = ChatModel::load(sage::backend::cpu::HostOps, p, 256, sage::models::llama::BaseWeights::Quantized)?;
    m.chat(&[Message::new("user", "Hi!")], 2, Sampling { temperature: 0.0, top_p: 1.0, seed: 0 }, |_| {})?;
    Ok(())
}

pub fn targets() -> Vec<Target> {
    vec![Target { name: "gguf", file_name: "model.gguf", seeds, mutate: mutate_gguf, setup: no_setup, run }]
}
