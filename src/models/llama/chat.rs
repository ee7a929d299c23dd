//! A chat model: the decoder, its tokenizer and its chat template from one GGUF file, generating
//! one conversation's reply token by token with the KV-cached decode of [`super::decode`] and
//! handing each piece of text to the caller as it is produced (the batched generation of
//! [`Llama::generate_rows_with`], with one sequence).

use super::source::LlmSource;
use super::{BaseWeights, Finetune, Llama, LlamaParams};
use crate::formats::chat_template::{ChatTemplate, Message};
use crate::formats::tokenizer::TextTokenizer;
use crate::models::sampling::Sampling;
use crate::opset::StepOps;
use crate::train::{ParamSet, SeedRng};
use crate::user_err;
use anyhow::{Context, Result};
use std::path::Path;

pub struct ChatModel<O: StepOps> {
    pub model: Llama<O>,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    /// Most positions a conversation (prompt and reply) may take.
    pub max_positions: usize,
}

pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl<O: StepOps> ChatModel<O> {
    /// Loads the GGUF file or Hugging Face folder at `path` onto `ops` for inference (no
    /// optimizer state), for conversations of at most `max_positions` positions (capped by the
    /// model's context), with the base weights held as `base` says.
    pub fn load(ops: O, path: &Path, max_positions: usize, base: BaseWeights) -> Result<Self> {
        let LlmSource { config, weights, tokenizer, template } = LlmSource::open(path)?;
        let template =
            template.ok_or_else(|| user_err!("{} has no chat template; use an instruct model", path.display()))?;
        let max_positions = max_positions.min(config.context_length);
        let model = {
            let mut params = ParamSet::new();
            // Full fine-tuning's layout with no optimizer: every tensor, none trained.
            let layout = LlamaParams::load_with(
                weights.as_ref(),
                config,
                &Finetune::Full,
                base,
                &mut params,
                &mut SeedRng::new(0, 0),
            )
            .with_context(|| format!("loading {}", path.display()))?;
            // Generation reads the token table and head from their blocks (`Llama::new` frees
            // their f32 copies).
            Llama::new(ops, &layout, &params, None)?
        };
        Ok(ChatModel { model, tokenizer, template, max_positions })
    }

    /// Formats `messages` with the chat template and decodes up to `max_tokens` new tokens;
    /// `on_token` sees each piece of text as it is produced (a character whose bytes span tokens
    /// comes whole with the last of them; bytes that form no character are dropped, so the
    /// pieces joined are `text`).
    pub fn chat(
        &self,
        messages: &[Message],
        max_tokens: usize,
        sampling: Sampling,
        mut on_token: impl FnMut(&str),
    ) -> Result<Generation> {
        let prompt = self.template.render(messages, true)?;
        let ids = self.tokenizer.encode(&prompt, false)?;
        let m = &self.model;
        if ids.is_empty() || ids.len() > self.max_positions {
            return Err(user_err!(
                "the prompt takes {} positions but the model was set up for {}; shorten the prompt",
                ids.len(),
                self.max_positions
            ));
        }
        // Tokens after the prompt: the first comes from the prefill, each further one from a
        // decode step that takes a position.
        let max_new = max_tokens.min(self.max_positions + 1 - ids.len());
        let t0 = std::time::Instant::now();
        let mut prefill_secs = None;
        let mut out: Vec<u32> = Vec::new();
        // A character split across tokens is printed whole, with the token that completes it.
        let mut stream = self.tokenizer.stream(true)?;
        let stop = &self.tokenizer.stop_ids;
        m.generate_rows_with(m.embed_tokens(&ids)?, ids.len(), &[ids.len()], max_new, stop, sampling, |_, tok| {
            prefill_secs.get_or_insert_with(|| t0.elapsed().as_secs_f64());
            out.push(tok);
            let piece = stream.step(tok);
            if !piece.is_empty() {
                on_token(&piece);
            }
            Ok(())
        })?;
        let total = t0.elapsed().as_secs_f64();
        // Without a token the whole time was the prefill.
        let prefill_secs = prefill_secs.unwrap_or(total);
        let text = self.tokenizer.decode(&out, true)?;
        Ok(Generation { text, prompt_tokens: ids.len(), tokens: out, prefill_secs, decode_secs: total - prefill_secs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::Asset;
    use crate::backend::cpu::HostOps;

    /// The real SmolLM2, asked for Japanese, answers greedily in kana spelled over several byte
    /// tokens each: the streamed pieces join to the reply and hold no U+FFFD, and the tokens that
    /// end mid-character print nothing.
    #[test]
    fn smollm2_streams_characters_split_across_tokens_whole() {
        let path = Asset::SmolLm2Gguf.path().unwrap_or_else(|e| panic!("{e:#}"));
        let m = ChatModel::load(HostOps, &path, 256, BaseWeights::F32).unwrap();
        let mut pieces = Vec::new();
        let greedy = Sampling { temperature: 0.0, top_p: 1.0, seed: 0 };
        let prompt = [Message::new("user", "Write 'thank you' in Japanese, Chinese and Korean.")];
        let g = m.chat(&prompt, 24, greedy, |p| pieces.push(p.to_string())).unwrap();
        let partial = g
            .tokens
            .iter()
            .filter(|&&id| std::str::from_utf8(&m.tokenizer.token_bytes(id, true).unwrap_or_default()).is_err())
            .count();
        assert!(partial >= 10, "only {partial} tokens hold part of a character: {:?}", g.text);
        assert_eq!(pieces.concat(), g.text);
        assert!(!g.text.contains('\u{FFFD}'), "{:?}", g.text);
        assert!(pieces.len() < g.tokens.len(), "{} pieces for {} tokens", pieces.len(), g.tokens.len());
        assert!(pieces.iter().all(|p| !p.is_empty()));
    }
}
