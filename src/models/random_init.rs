//! Random-initialised LLaMA-family weights at a named model's shapes, for benchmarks that need
//! the real shapes but no checkpoint (`sage bench train`): every matrix `N(0, 0.02²)` (HF's
//! `initializer_range`), every norm weight 1, the LM head tied to the embedding. Each tensor is
//! drawn from its own seeded stream, so the values do not depend on the order of requests.

use super::llama::{Family, LlamaConfig};
use super::WeightSource;
use crate::tensor::Tensor;
use crate::train::rng::SeedRng;
use crate::user_err;
use anyhow::Result;

/// The shapes `sage bench train` measures, in the LLaMA layout of `models::llama` (no attention
/// biases; Qwen2-0.5B's q/k/v biases are left out on both sides of the comparison).
pub fn preset(name: &str) -> Result<LlamaConfig> {
    let cfg =
        |vocab_size, hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads, rope_theta| LlamaConfig {
            family: Family::Llama,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim: hidden_size / num_heads,
            rope_theta,
            rms_norm_eps: 1e-6,
            context_length: 2048,
        };
    match name {
        "smollm2-135m" => Ok(cfg(49_152, 576, 1536, 30, 9, 3, 100_000.0)),
        "qwen2-0.5b" => Ok(cfg(151_936, 896, 4864, 24, 14, 2, 1_000_000.0)),
        other => Err(user_err!("unknown model shape `{other}`; choose smollm2-135m or qwen2-0.5b")),
    }
}

pub struct RandomLlama {
    pub config: LlamaConfig,
    pub seed: u64,
}

impl RandomLlama {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let c = &self.config;
        let (d, qd, kvd, ff) =
            (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size);
        match name {
            "token_embd.weight" => return Some(vec![c.vocab_size, d]),
            "output_norm.weight" => return Some(vec![d]),
            _ => {}
        }
        let rest = name.strip_prefix("blk.")?;
        let (layer, tensor) = rest.split_once('.')?;
        if layer.parse::<usize>().ok()? >= c.num_layers {
            return None;
        }
        Some(match tensor {
            "attn_norm.weight" | "ffn_norm.weight" => vec![d],
            "attn_q.weight" => vec![qd, d],
            "attn_k.weight" | "attn_v.weight" => vec![kvd, d],
            "attn_output.weight" => vec![d, qd],
            "ffn_gate.weight" | "ffn_up.weight" => vec![ff, d],
            "ffn_down.weight" => vec![d, ff],
            _ => return None,
        })
    }
}

impl WeightSource for RandomLlama {
    fn get(&self, name: &str) -> Result<Tensor> {
        let shape = self.shape(name).ok_or_else(|| user_err!("random LLaMA weights have no tensor `{name}`"))?;
        let n: usize = shape.iter().product();
        let data = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else {
            // FNV-1a of the name picks the stream.
            let stream =
                name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
            SeedRng::new(self.seed, stream).normal(n, 0.02)
        };
        Tensor::from_vec(data, &shape)
    }

    fn contains(&self, name: &str) -> bool {
        self.shape(name).is_some()
    }

    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        RandomLlama::shape(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_llama_has_every_tensor_of_the_preset_and_nothing_else() {
        let w = RandomLlama { config: preset("smollm2-135m").unwrap(), seed: 1 };
        assert_eq!(w.get("blk.29.attn_k.weight").unwrap().shape(), &[192, 576]);
        assert!(!w.contains("blk.30.attn_k.weight") && !w.contains("output.weight"));
        let a = w.get("blk.0.ffn_up.weight").unwrap();
        assert_eq!(a.f32s().unwrap(), w.get("blk.0.ffn_up.weight").unwrap().f32s().unwrap(), "deterministic per name");
        assert_ne!(a.f32s().unwrap()[..8], w.get("blk.1.ffn_up.weight").unwrap().f32s().unwrap()[..8]);
        assert!(w.get("output_norm.weight").unwrap().f32s().unwrap().iter().all(|&x| x == 1.0));
        assert!(preset("gpt-5").is_err());
    }
}
