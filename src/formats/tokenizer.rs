//! Text tokenizers, built on the `tokenizers` crate: from a `tokenizer.json`, or rebuilt from
//! GGUF metadata (byte-level BPE vocabulary, merges, special tokens, pre-tokenizer). Byte-level
//! output is decoded here, not by the crate, so that generated text never holds U+FFFD
//! ([`TextTokenizer::decode`], [`TokenStream`]).

use super::gguf::{Gguf, Value};
use super::utf8::Utf8Stream;
use crate::user_err;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, DecoderWrapper, Tokenizer};

/// The pre-tokenizer pattern of Qwen2's `tokenizer.json` (llama.cpp's `qwen2` pre-tokenizer).
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct TextTokenizer {
    inner: Tokenizer,
    /// End-of-sequence / end-of-turn ids that stop generation.
    pub stop_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Loads a `tokenizer.json`, turning padding off (batched padding is the caller's business)
    /// and truncating at `max_len` tokens.
    pub fn from_json_file(path: &Path, max_len: usize) -> Result<Self> {
        let mut inner = Tokenizer::from_file(path).map_err(|e| {
            user_err!("{} is not a valid tokenizer.json: {e}. Re-download it with `sage fetch --force`", path.display())
        })?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(tokenizers::TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(|e| anyhow::anyhow!("setting truncation: {e}"))?;
        Ok(TextTokenizer { inner, stop_ids: vec![] })
    }

    /// The tokenizer of a Hugging Face checkpoint folder: `tokenizer.json`, untruncated, stopping
    /// at `tokenizer_config.json`'s `eos_token`, `config.json`'s `eos_token_id` (one or a list)
    /// and `<|im_end|>` where the vocabulary has it.
    pub fn from_hf(ck: &super::hf::HfCheckpoint) -> Result<Self> {
        let path = ck.dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(user_err!("{}: no tokenizer.json (a language model folder needs one)", ck.dir.display()));
        }
        let mut t = TextTokenizer::from_json_file(&path, usize::MAX)?;
        t.inner.with_truncation(None).map_err(|e| anyhow::anyhow!("clearing truncation: {e}"))?;
        let mut stop: Vec<u32> = Vec::new();
        if let Some(id) = ck.special_token("eos_token")?.and_then(|e| t.token_to_id(&e)) {
            stop.push(id);
        }
        match &ck.config["eos_token_id"] {
            serde_json::Value::Number(n) => stop.extend(n.as_u64().map(|v| v as u32)),
            serde_json::Value::Array(a) => stop.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32)),
            _ => {}
        }
        stop.extend(t.token_to_id("<|im_end|>"));
        stop.sort_unstable();
        stop.dedup();
        t.stop_ids = stop;
        Ok(t)
    }

    /// Rebuilds the tokenizer that a GGUF file describes (`tokenizer.ggml.model = gpt2`).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let model = g.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(user_err!(
                "{}: tokenizer model `{model}` is not supported (byte-level BPE `gpt2` is)",
                g.path.display()
            ));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            let arr =
                g.meta(key)?.as_array().ok_or_else(|| user_err!("{}: `{key}` is not an array", g.path.display()))?;
            arr.iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| user_err!("{}: `{key}` holds a non-string", g.path.display()))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges = strings("tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.metadata.get("tokenizer.ggml.token_type") {
            Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            _ => vec![1; tokens.len()],
        };
        let vocab: HashMap<String, u32> = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .map(|m| {
                let (a, b) =
                    m.split_once(' ').ok_or_else(|| user_err!("{}: malformed BPE merge `{m}`", g.path.display()))?;
                Ok((a.to_owned(), b.to_owned()))
            })
            .collect::<Result<_>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab.into_iter().collect::<tokenizers::models::bpe::Vocab>(), merges)
            .build()
            .map_err(|e| user_err!("{}: cannot build the BPE model: {e}", g.path.display()))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = g.metadata.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
        // llama.cpp's pre-tokenizer table: these split digits one by one before the GPT-2 regex.
        let digits_first = matches!(pre, "smollm" | "starcoder" | "refact" | "codeshell" | "llama3" | "llama-bpe");
        let byte_level = ByteLevel::new(false, true, true);
        if pre == "qwen2" {
            // Qwen2's own split (its tokenizer.json): single digits, letters with one leading
            // non-letter, punctuation runs with their newlines; then bytes to GPT-2 characters.
            let split = Split::new(SplitPattern::Regex(QWEN2_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| user_err!("the qwen2 pre-tokenizer regex does not compile: {e}"))?;
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Split(split),
                PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
            ])));
        } else if digits_first {
            inner.with_pre_tokenizer(Some(Sequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                PreTokenizerWrapper::ByteLevel(byte_level),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(byte_level));
        }
        inner.with_decoder(Some(ByteLevel::default()));
        // Control tokens (type 3) and user-defined ones (type 4) are matched whole, never split.
        let specials: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(s, &t)| AddedToken::from(s.clone(), t == 3))
            .collect();
        inner.add_special_tokens(&specials);
        let mut stop_ids = vec![];
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"] {
            if let Ok(id) = g.meta_u64(key) {
                stop_ids.push(id as u32);
            }
        }
        // Chat models end a turn with <|im_end|> even where eos names another token.
        if let Some(id) = inner.token_to_id("<|im_end|>") {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Ok(TextTokenizer { inner, stop_ids })
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of `ids` (unknown ids are skipped, special tokens too with
    /// `skip_special_tokens`).
    ///
    /// With a byte-level decoder (GPT-2-style BPE: every GGUF tokenizer) the tokens' bytes are
    /// joined and decoded as UTF-8 once, so a character whose bytes are split across tokens comes
    /// out whole. Bytes that form no character are dropped, not replaced by U+FFFD as the
    /// `tokenizers` crate does: a model can emit a token holding the first bytes of a character
    /// (`âĢ`, E2 80, the start of `’` or `—`) and then no continuation, and an answer should
    /// hold only text. Other decoders (WordPiece) decode as the crate does.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if self.is_byte_level() {
            let mut bytes = Vec::new();
            for &id in ids {
                bytes.extend(self.token_bytes(id, skip_special_tokens).unwrap_or_default());
            }
            return Ok(Utf8Stream::decode_dropping_invalid(&bytes));
        }
        self.inner.decode(ids, skip_special_tokens).map_err(|e| anyhow::anyhow!("decoding: {e}"))
    }

    /// Whether the decoder is byte-level (tokens spell bytes, GPT-2's byte-to-character table).
    pub fn is_byte_level(&self) -> bool {
        matches!(self.inner.get_decoder(), Some(DecoderWrapper::ByteLevel(_)))
    }

    /// The bytes token `id` stands for under a byte-level decoder, as the `tokenizers` crate's
    /// `ByteLevel` decoder maps them (a token with a character outside the byte table, e.g. an
    /// added token, stands for its own UTF-8); `None` for an unknown id, or a special token with
    /// `skip_special_tokens`. Not meaningful for other decoders.
    pub fn token_bytes(&self, id: u32, skip_special_tokens: bool) -> Option<Vec<u8>> {
        let token = self.inner.id_to_token(id)?;
        if skip_special_tokens && self.inner.get_added_vocabulary().is_special_token(&token) {
            return None;
        }
        Some(token.chars().map(byte_of_char).collect::<Option<Vec<u8>>>().unwrap_or_else(|| token.into_bytes()))
    }

    /// Decodes generated ids one at a time ([`TokenStream`]); needs a byte-level decoder.
    pub fn stream(&self, skip_special_tokens: bool) -> Result<TokenStream<'_>> {
        anyhow::ensure!(self.is_byte_level(), "streaming decoding needs a byte-level tokenizer");
        Ok(TokenStream { tokenizer: self, skip_special_tokens, utf8: Utf8Stream::new() })
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Generated ids decoded as they come ([`TextTokenizer::stream`]): each step returns the text
/// that its token completes, holding back the first bytes of a character until the token that
/// ends it, so a character split across tokens is printed whole, once. What the steps return,
/// joined, is [`TextTokenizer::decode`] of all the ids (bytes that form no character are dropped
/// the same way).
pub struct TokenStream<'a> {
    tokenizer: &'a TextTokenizer,
    skip_special_tokens: bool,
    utf8: Utf8Stream,
}

impl TokenStream<'_> {
    /// The text token `id` completes (empty while a character waits for its other bytes).
    pub fn step(&mut self, id: u32) -> String {
        match self.tokenizer.token_bytes(id, self.skip_special_tokens) {
            Some(bytes) => self.utf8.push(&bytes),
            None => String::new(),
        }
    }

    /// Ends the stream, dropping a character still incomplete; returns how many bytes were
    /// dropped over the whole stream (0 when the tokens spelled valid UTF-8).
    pub fn finish(&mut self) -> usize {
        self.utf8.finish()
    }
}

/// The byte a character of a byte-level token stands for: the inverse of GPT-2's
/// `bytes_to_unicode` (printable Latin-1 bytes are themselves; the other 68 bytes, in order, are
/// U+0100…U+0143).
fn byte_of_char(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        0x100..=0x120 => Some((c - 0x100) as u8),
        0x121..=0x142 => Some((c - 0x121 + 0x7F) as u8),
        0x143 => Some(0xAD),
        _ => None,
    }
}

/// Reads `max_seq_length` from a sentence-transformers `sentence_bert_config.json`, if present.
pub fn sentence_max_len(model_dir: &Path) -> Result<Option<usize>> {
    let p = model_dir.join("sentence_bert_config.json");
    if !p.exists() {
        return Ok(None);
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p)?).with_context(|| format!("parsing {}", p.display()))?;
    Ok(v.get("max_seq_length").and_then(|x| x.as_u64()).map(|x| x as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assets::Asset;

    /// SmolLM2's tokenizer, rebuilt from the GGUF (a missing asset fails the test with the
    /// command that fetches it, as the integration tests do).
    fn smollm2() -> TextTokenizer {
        let path = Asset::SmolLm2Gguf.path().unwrap_or_else(|e| panic!("{e:#}"));
        TextTokenizer::from_gguf(&Gguf::open(&path).unwrap()).unwrap()
    }

    #[test]
    fn the_byte_table_inverts_gpt2s() {
        // GPT-2's bytes_to_unicode: printable bytes are themselves, the others U+0100 on in order.
        let mut n = 0;
        for b in 0..=255u8 {
            let printable = matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
            let c = if printable { b as char } else { char::from_u32(0x100 + n).unwrap() };
            n += !printable as u32;
            assert_eq!(byte_of_char(c), Some(b), "{c:?}");
        }
        assert_eq!(n, 68);
        assert_eq!(byte_of_char('Ġ'), Some(b' '));
        assert_eq!(byte_of_char('Ģ'), Some(0x80));
        assert_eq!(byte_of_char('\u{144}'), None);
        assert_eq!(byte_of_char('é'), Some(0xE9));
    }

    #[test]
    fn smollm2_streams_characters_split_across_tokens_whole() {
        let tok = smollm2();
        assert!(tok.is_byte_level());
        // SmolLM2 has whole tokens for `—`, `🙂`, `’`, `é`, `“`, `”` and `…` (after a space or
        // not); `🦩`, `龘`, `∮`, `𝔸` and `✓` it spells in 2 or 3 byte tokens.
        let text = "A crack — dark 🙂 cell’s café, “inactive” areas… 🦩 龘∮ 𝔸✓";
        let ids = tok.encode(text, false).unwrap();
        // The test means something only if tokens hold parts of characters.
        let partial = ids.iter().filter(|&&id| std::str::from_utf8(&tok.token_bytes(id, true).unwrap()).is_err());
        assert!(partial.count() >= 10, "too few characters of {text:?} are split across tokens");
        let mut stream = tok.stream(true).unwrap();
        let pieces: Vec<String> = ids.iter().map(|&id| stream.step(id)).collect();
        assert_eq!(stream.finish(), 0);
        assert_eq!(pieces.concat(), text);
        // Each character comes out once, with the token that completes it.
        for ch in ["—", "🙂", "’", "é", "“", "”", "…", "🦩", "龘", "∮", "𝔸", "✓"] {
            assert_eq!(pieces.iter().filter(|p| p.contains(ch)).count(), 1, "{ch}: {pieces:?}");
        }
        assert!(pieces.iter().any(String::is_empty), "a token that ends mid-character prints nothing");
        assert_eq!(tok.decode(&ids, true).unwrap(), text);
        assert_eq!(tok.inner.decode(&ids, true).unwrap(), text, "the crate agrees on valid text");
    }

    #[test]
    fn smollm2_drops_a_character_that_never_completes() {
        let tok = smollm2();
        // `âĢ` (E2 80) is the start of `’`, `—`, `“`, ...: after it, " the" is no continuation.
        let lead = tok.token_to_id("âĢ").expect("SmolLM2 has the token âĢ");
        assert_eq!(tok.token_bytes(lead, true).unwrap(), [0xE2, 0x80]);
        let mut ids = tok.encode("that are", false).unwrap();
        ids.push(lead);
        ids.extend(tok.encode(" the normal", false).unwrap());
        assert_eq!(tok.inner.decode(&ids, true).unwrap(), "that are\u{FFFD} the normal");
        assert_eq!(tok.decode(&ids, true).unwrap(), "that are the normal");
        let mut stream = tok.stream(true).unwrap();
        let streamed: String = ids.iter().map(|&id| stream.step(id)).collect();
        assert_eq!(streamed, "that are the normal");
        assert_eq!(stream.finish(), 2);
        // What the E-DPO row of the quick demo emitted (docs/results/demo-quick/eval/
        // edpo-none-dpo.answers.jsonl, cell0003 question 0: "…areas that are�� the normal…"):
        // after `Ġare`, token 44847 `ŀĭ`, the bytes 9E 8B alone (the tail of 型, E5 9E 8B), two
        // stray continuation bytes that the crate turned into two U+FFFD.
        let ids = [338, 359, 44847, 260, 2955];
        assert_eq!(tok.token_bytes(44847, true).unwrap(), [0x9E, 0x8B]);
        assert_eq!(tok.inner.decode(&ids, true).unwrap(), " that are\u{FFFD}\u{FFFD} the normal");
        assert_eq!(tok.decode(&ids, true).unwrap(), " that are the normal");
        // Special tokens: skipped, or spelled out.
        let end = tok.token_to_id("<|im_end|>").unwrap();
        assert_eq!(tok.decode(&[lead, end], true).unwrap(), "");
        assert_eq!(tok.decode(&[end], false).unwrap(), "<|im_end|>");
    }
}
