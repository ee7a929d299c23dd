//! The SAGE model's definition on the host: the frozen vision encoder, the tokenizer and chat
//! template, where the head's and the LLM's tensors sit in the [`ParamSet`], and how one (test,
//! reference, facts, question, answer) example becomes an input sequence (a [`SeqPlan`]) before
//! any trained parameter is read. [`super::Sage`] runs the plans on an op set.
//!
//! The user turn of the backbone's chat template is
//!
//! ```text
//! Test image: <test image tokens>
//! Reference image: <reference image tokens>          (one-shot only)
//! Patch comparison: <the map cue's phrase>.          (model.map_cue only)
//! Facts: <fused fact tokens | fact sentences>        (facts = fused | hard)
//! <question>
//! ```
//!
//! text pieces are tokenized and embedded with the LLM's table, image and fact tokens are rows
//! the head computes, and the assistant turn is the answer, trained with cross-entropy.

use super::head::{FactsMode, FusionInput, ImageInput, SageConfig, SageHead};
use crate::formats::chat_template::{ChatTemplate, Message};
use crate::formats::tokenizer::TextTokenizer;
use crate::image_io;
use crate::models::backbone::Backbone;
use crate::models::efficientnet::PatchTokens;
use crate::models::llama::{BaseWeights, Finetune, LlamaParams, LlmSource};
use crate::models::patch_encoder::PatchEncoder;
use crate::train::{ParamSet, SeedRng};
use anyhow::{ensure, Context, Result};
use std::path::Path;

/// The system turn: asks for the answer shape the accuracy metric parses.
pub const SYSTEM_PROMPT: &str = "You are an industrial visual inspection assistant. You compare a test image with a \
normal reference image of the same kind. Start every answer with Yes or No, then explain briefly.";

const IGNORE: u32 = u32::MAX;

/// One question about one image pair.
pub struct Example<'a> {
    pub test: &'a PatchTokens,
    pub reference: Option<&'a PatchTokens>,
    pub facts: &'a [String],
    pub question: &'a str,
    /// The answer to train on; `None` when generating.
    pub answer: Option<&'a str>,
}

pub struct SageModel {
    pub head: SageHead,
    pub llm: LlamaParams,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub vision: PatchEncoder,
    pub backbone: Backbone,
}

/// One example's input sequence before any trained parameter is read: where each text run, image
/// and the fact tokens sit, and the answer targets. [`super::Sage`] realises it on an op set.
#[derive(Clone)]
pub struct SeqPlan {
    /// Positions.
    pub t: usize,
    /// `[t]`: position `i` predicts token `i + 1`; `IGNORE` outside the answer.
    pub targets: Vec<u32>,
    /// (first row, token ids) of each text run, the answer's included, in order.
    pub text: Vec<(usize, Vec<u32>)>,
    /// (first row, adapter input) of each image: the test image, then the reference.
    pub images: Vec<(usize, ImageInput)>,
    /// (first row, token ids of each fact sentence, the fusion input) when facts are fused.
    pub facts: Option<(usize, Vec<Vec<u32>>, FusionInput)>,
}

impl SeqPlan {
    /// Targets that are not ignored.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    /// The same sequence with only its first counted target kept: the whole answer stays in the
    /// context, and a loss on the plan is the loss of the answer's first token (the conclusion
    /// `sage eval --first-token` reads).
    pub fn first_target_only(mut self) -> SeqPlan {
        let mut seen = false;
        for t in self.targets.iter_mut().filter(|t| **t != IGNORE) {
            if seen {
                *t = IGNORE;
            }
            seen = true;
        }
        self
    }
}

enum Piece {
    Text(String),
    Image(ImageInput),
    Facts(Vec<Vec<u32>>, FusionInput),
}

impl SageModel {
    /// Builds the model on the backbone `head_cfg.backbone` names (its frozen encoder and its
    /// GGUF LLM); the head is freshly initialised.
    pub fn new(head_cfg: SageConfig, finetune: &Finetune, params: &mut ParamSet, rng: &mut SeedRng) -> Result<Self> {
        SageModel::on(Backbone::resolve(&head_cfg.backbone)?, head_cfg, finetune, BaseWeights::F32, params, rng)
    }

    /// [`SageModel::new`] on a backbone resolved to files (`head_cfg.backbone` must name it).
    pub fn on(
        backbone: Backbone,
        head_cfg: SageConfig,
        finetune: &Finetune,
        base: BaseWeights,
        params: &mut ParamSet,
        rng: &mut SeedRng,
    ) -> Result<Self> {
        ensure!(
            backbone.name == head_cfg.backbone,
            "the model config names backbone `{}` but `{}` was given",
            head_cfg.backbone,
            backbone.name
        );
        let vision = backbone.encoder()?;
        let llm_path = backbone.llm.as_path();
        let src = LlmSource::open(llm_path)?;
        let family = serde_json::to_value(src.config.family)?;
        if let Some(promised) = backbone.llm_family.as_deref().filter(|f| family != *f) {
            return Err(crate::user_err!(
                "backbone `{}` describes an LLM of family `{promised}`, but {} is a {family} model",
                backbone.name,
                llm_path.display()
            ));
        }
        let template = src
            .template
            .ok_or_else(|| crate::user_err!("{} has no chat template; use an instruct model", llm_path.display()))?;
        // The SAGE prompt's template renders its own turn markers; no BOS/EOS text is inserted.
        let template = ChatTemplate::new(template.source(), "", "")?;
        let tokenizer = src.tokenizer;
        let llm = LlamaParams::load_with(src.weights.as_ref(), src.config, finetune, base, params, rng)
            .with_context(|| format!("loading {}", llm_path.display()))?;
        let head = SageHead::new(head_cfg, vision.dim(), llm.hidden_size(), params, rng)?;
        Ok(SageModel { head, llm, tokenizer, template, vision, backbone })
    }

    /// Patch tokens of an image file (the frozen encoder's output; cache these).
    pub fn patch_tokens(&self, path: &Path) -> Result<PatchTokens> {
        let img = image_io::load(path)?;
        self.vision.tokens_chw(&image_io::to_chw(&img, &self.vision.preprocess()))
    }

    /// The layout of one example's sequence: the chat template around the user turn, the image,
    /// fact and question pieces tokenized or prepared, the answer and its targets.
    pub fn plan(&self, ex: &Example) -> Result<SeqPlan> {
        let answer_ids = match ex.answer {
            Some(a) => {
                let end = self.tokenizer.stop_ids.first().copied().context("the tokenizer has no end-of-turn token")?;
                let mut ids = self.tokenizer.encode(a, false)?;
                ids.push(end);
                ids
            }
            None => vec![],
        };
        self.plan_ids(ex, answer_ids)
    }

    /// The plan of a generated answer, its token ids as sampled (decoding and re-encoding the text
    /// could give other ids, and a policy gradient must score the tokens that were drawn); with
    /// `stopped`, the end-of-turn token the sampler chose ends it. `ex.answer` is ignored.
    pub fn plan_generated(&self, ex: &Example, ids: &[u32], stopped: bool) -> Result<SeqPlan> {
        let mut answer_ids = ids.to_vec();
        if stopped {
            answer_ids
                .push(self.tokenizer.stop_ids.first().copied().context("the tokenizer has no end-of-turn token")?);
        }
        self.plan_ids(ex, answer_ids)
    }

    fn plan_ids(&self, ex: &Example, answer_ids: Vec<u32>) -> Result<SeqPlan> {
        let mode = self.head.config.facts;
        let cfg = &self.head.config;
        // The patch selection, when facts are fused, also gives the anomaly channel and the map
        // cue their map.
        let fusion = match mode {
            FactsMode::Fused => Some(self.head.fusion_inputs(ex.test, ex.reference)?),
            _ => None,
        };
        let map = match (&fusion, cfg.anomaly_channel || cfg.map_cue) {
            (_, false) => None,
            (Some(f), true) => Some(f.selection.anomaly_map.clone()),
            (None, true) => Some(self.head.anomaly_scores(ex.test, ex.reference)?),
        };
        let channel = map.as_deref().filter(|_| cfg.anomaly_channel);
        let mut user_pieces: Vec<Piece> = vec![Piece::Text("Test image: ".into())];
        user_pieces.push(Piece::Image(self.head.pool(ex.test, channel)?));
        if let Some(r) = ex.reference {
            user_pieces.push(Piece::Text("\nReference image: ".into()));
            user_pieces.push(Piece::Image(self.head.pool(r, None)?));
        }
        if let Some(map) = map.as_deref().filter(|_| cfg.map_cue) {
            user_pieces.push(Piece::Text(super::map_cue::line(SageHead::image_score(map), &cfg.map_cue_levels)?));
        }
        match mode {
            FactsMode::None => {}
            FactsMode::Hard => {
                ensure!(!ex.facts.is_empty(), "facts = hard needs fact sentences for every image (run `sage facts`)");
                user_pieces.push(Piece::Text(format!("\nFacts: {}", ex.facts.join(" "))));
            }
            FactsMode::Fused => {
                ensure!(!ex.facts.is_empty(), "facts = fused needs fact sentences for every image (run `sage facts`)");
                let mut ids = Vec::with_capacity(ex.facts.len());
                for f in ex.facts {
                    let t = self.tokenizer.encode(f, false)?;
                    ensure!(!t.is_empty(), "a fact sentence is empty");
                    ids.push(t);
                }
                let input = fusion.context("the patch selection is made when facts are fused")?;
                user_pieces.push(Piece::Text("\nFacts: ".into()));
                user_pieces.push(Piece::Facts(ids, input));
            }
        }
        user_pieces.push(Piece::Text(format!("\n{}", ex.question)));

        // Render the template around a marker, then splice the pieces in at the marker.
        const MARK: &str = "\u{1}SAGE-USER\u{1}";
        let rendered =
            self.template.render(&[Message::new("system", SYSTEM_PROMPT), Message::new("user", MARK)], true)?;
        let (before, after) = rendered.split_once(MARK).context("the chat template dropped the user message")?;
        let mut pieces = vec![Piece::Text(before.to_string())];
        pieces.extend(user_pieces);
        pieces.push(Piece::Text(after.to_string()));

        let (mut at, mut text, mut images, mut facts) = (0usize, Vec::new(), Vec::new(), None);
        for p in pieces {
            match p {
                Piece::Text(s) => {
                    let ids = self.tokenizer.encode(&s, false)?;
                    let n = ids.len();
                    text.push((at, ids));
                    at += n;
                }
                Piece::Image(input) => {
                    let n = input.rows;
                    images.push((at, input));
                    at += n;
                }
                Piece::Facts(ids, input) => {
                    let n = ids.len();
                    facts = Some((at, ids, input));
                    at += n;
                }
            }
        }
        let prompt_len = at;
        let t = prompt_len + answer_ids.len();
        // Position i predicts token i + 1: the last prompt position predicts the first answer token.
        let mut targets = vec![IGNORE; t];
        for (i, &id) in answer_ids.iter().enumerate() {
            targets[prompt_len + i - 1] = id;
        }
        text.push((prompt_len, answer_ids));
        Ok(SeqPlan { t, targets, text, images, facts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_target_only_keeps_the_answers_first_counted_token() {
        // Prompt rows ignored, a three-token answer at positions 2..5, ignored after it.
        let plan = SeqPlan {
            t: 6,
            targets: vec![IGNORE, IGNORE, 7, 8, 9, IGNORE],
            text: vec![(0, vec![1, 2, 7, 8, 9])],
            images: vec![],
            facts: None,
        };
        let one = plan.clone().first_target_only();
        assert_eq!(one.targets, vec![IGNORE, IGNORE, 7, IGNORE, IGNORE, IGNORE]);
        assert_eq!(one.counted(), 1);
        // The answer stays in the context.
        assert_eq!(one.text, plan.text);
        assert_eq!(plan.counted(), 3);
    }
}
