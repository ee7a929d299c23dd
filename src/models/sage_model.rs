//! The whole SAGE model: the frozen vision encoder, the [`SageHead`] and the trainable LLM,
//! and how one (test, reference, facts, question, answer) example becomes an input sequence.
//!
//! The user turn of the backbone's chat template is
//!
//! ```text
//! Test image: <test image tokens>
//! Reference image: <reference image tokens>          (one-shot only)
//! Facts: <fused fact tokens | fact sentences>        (facts = fused | hard)
//! <question>
//! ```
//!
//! text pieces are tokenized and embedded with the LLM's table, image and fact tokens are rows
//! the head computes, and the assistant turn is the answer, trained with cross-entropy.

use super::efficientnet::{EfficientNetLite, PatchTokens, PREPROCESS_FULL};
use super::llama::{LlamaConfig, Sampling};
use super::llama_train::{Activations, Finetune, TrainableLlama};
use super::sage::{FactActs, FactsMode, FusionInput, ImageActs, ImageInput, SageConfig, SageHead, Selection};
use crate::formats::chat_template::{ChatTemplate, Message};
use crate::formats::gguf::Gguf;
use crate::formats::tokenizer::TextTokenizer;
use crate::image_io;
use crate::ops::edpo::{token_logprobs, TokenLogprobs};
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
    pub llm: TrainableLlama,
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub vision: EfficientNetLite,
}

/// One example's input sequence before any trained parameter is read: where each text run, image
/// and the fact tokens sit, and the answer targets. The CPU model realises it with its parameters
/// ([`SageModel::loss`] and friends); the device step (`models::sage_step`) realises the same plan
/// on a device op set.
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
}

/// Where each kind of row sits in an assembled sequence, and what backward needs.
struct Assembled {
    x: Vec<f32>,
    t: usize,
    targets: Vec<u32>,
    /// (first row, activations) of each image's tokens.
    images: Vec<(usize, ImageActs)>,
    facts: Option<(usize, FactActs)>,
    /// (row, token id) of every text token, for the embedding gradient.
    text: Vec<(usize, u32)>,
}

/// One teacher-forced answer sequence: the final hidden states and targets of its answer rows
/// (position `i` predicts token `i + 1`, the end-of-turn token included), and what its backward needs.
pub struct AnswerPass {
    a: Assembled,
    acts: Option<Activations>,
    rows: Vec<usize>,
    /// `[answer tokens, d]`: the rows that predict answer tokens.
    pub answer_hidden: Vec<f32>,
    pub answer_targets: Vec<u32>,
}

enum Piece {
    Text(String),
    Image(ImageInput),
    Facts(Vec<Vec<u32>>, FusionInput),
}

impl SageModel {
    /// Builds the model from the vision weights and a GGUF LLM; the head is freshly initialised.
    pub fn new(
        vision_path: &Path,
        llm_path: &Path,
        head_cfg: SageConfig,
        finetune: &Finetune,
        params: &mut ParamSet,
        rng: &mut SeedRng,
    ) -> Result<Self> {
        let vision = EfficientNetLite::load(vision_path)?;
        let g = Gguf::open(llm_path)?;
        let cfg = LlamaConfig::from_gguf(&g)?;
        let tokenizer = TextTokenizer::from_gguf(&g)?;
        let template_src = g.meta_str("tokenizer.chat_template")?;
        let template = ChatTemplate::new(template_src, "", "")?;
        let llm = TrainableLlama::load(&g, cfg, finetune, params, rng)
            .with_context(|| format!("loading {}", llm_path.display()))?;
        let head = SageHead::new(head_cfg, vision.patch_dim(), llm.hidden_size(), params, rng)?;
        Ok(SageModel { head, llm, tokenizer, template, vision })
    }

    /// Patch tokens of an image file (the frozen encoder's output; cache these).
    pub fn patch_tokens(&self, path: &Path) -> Result<PatchTokens> {
        let img = image_io::load(path)?;
        Ok(self.vision.patch_tokens(&image_io::to_chw(&img, &PREPROCESS_FULL), PREPROCESS_FULL.crop as usize))
    }

    /// Mean-pooled token embeddings of each fact sentence: `t_g [L, d]`.
    fn fact_embeddings(&self, params: &ParamSet, facts: &[Vec<u32>]) -> Vec<f32> {
        let d = self.llm.hidden_size();
        facts.iter().flat_map(|ids| crate::ops::pool::mean_rows(&self.llm.embed(params, ids), d)).collect()
    }

    /// The layout of one example's sequence: the chat template around the user turn, the image,
    /// fact and question pieces tokenized or prepared, the answer and its targets.
    pub fn plan(&self, ex: &Example) -> Result<SeqPlan> {
        let mode = self.head.config.facts;
        let mut user_pieces: Vec<Piece> = vec![Piece::Text("Test image: ".into())];
        user_pieces.push(Piece::Image(self.head.pool(ex.test)));
        if let Some(r) = ex.reference {
            user_pieces.push(Piece::Text("\nReference image: ".into()));
            user_pieces.push(Piece::Image(self.head.pool(r)));
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
                let input = self.head.fusion_inputs(ex.test, ex.reference)?;
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
        let answer_ids = match ex.answer {
            Some(a) => {
                let end = self.tokenizer.stop_ids.first().copied().context("the tokenizer has no end-of-turn token")?;
                let mut ids = self.tokenizer.encode(a, false)?;
                ids.push(end);
                ids
            }
            None => vec![],
        };

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

    /// The plan realised with the CPU model's parameters: the input rows and what backward needs.
    fn assemble(&self, params: &ParamSet, ex: &Example) -> Result<Assembled> {
        let d = self.llm.hidden_size();
        let plan = self.plan(ex)?;
        let mut x = vec![0.0; plan.t * d];
        let mut put = |at: usize, rows: &[f32]| x[at * d..at * d + rows.len()].copy_from_slice(rows);
        let mut text = Vec::new();
        for (at, ids) in &plan.text {
            put(*at, &self.llm.embed(params, ids));
            text.extend(ids.iter().enumerate().map(|(i, &id)| (at + i, id)));
        }
        let mut images = Vec::with_capacity(plan.images.len());
        for (at, input) in plan.images {
            let (rows, acts) = self.head.adapter(params, input);
            put(at, &rows);
            images.push((at, acts));
        }
        let facts = match plan.facts {
            Some((at, ids, input)) => {
                let t_g = self.fact_embeddings(params, &ids);
                let (rows, acts) = self.head.fuse(params, &t_g, input)?;
                put(at, &rows);
                Some((at, acts))
            }
            None => None,
        };
        Ok(Assembled { x, t: plan.t, targets: plan.targets, images, facts, text })
    }

    /// Teacher-forced answer loss; with `backward`, gradients flow into the head, the LLM and
    /// (when trainable) the token embedding.
    pub fn loss(&self, params: &mut ParamSet, ex: &Example, backward: bool) -> Result<(f32, usize)> {
        ensure!(ex.answer.is_some(), "loss needs an answer");
        let a = self.assemble(params, ex)?;
        let (loss, dx) = self.llm.loss(params, &a.x, a.t, &a.targets, backward)?;
        if let Some(dx) = dx {
            self.inputs_backward(params, &a, &dx);
        }
        Ok((loss, a.targets.iter().filter(|&&t| t != IGNORE).count()))
    }

    /// Carries the gradient of the input rows `dx [T, d]` into whatever produced them: the image
    /// and fact tokens (the head) and the text tokens (the embedding, when trainable).
    fn inputs_backward(&self, params: &mut ParamSet, a: &Assembled, dx: &[f32]) {
        let d = self.llm.hidden_size();
        let rows = |start: usize, n: usize| &dx[start * d..(start + n) * d];
        for (start, acts) in &a.images {
            self.head.image_tokens_backward(params, acts, rows(*start, acts.rows()));
        }
        if let Some((start, acts)) = &a.facts {
            self.head.fact_tokens_backward(params, acts, rows(*start, acts.rows()));
        }
        let ids: Vec<u32> = a.text.iter().map(|&(_, id)| id).collect();
        let grads: Vec<f32> = a.text.iter().flat_map(|&(row, _)| rows(row, 1).iter().copied()).collect();
        self.llm.embed_backward(params, &ids, &grads);
    }

    /// A teacher-forced forward whose backward the caller drives: E-DPO needs the
    /// log-probability of every answer of an instance before any gradient exists. Without
    /// `with_grad` no activations are kept (the frozen reference model of E-DPO).
    pub fn answer_forward(&self, params: &ParamSet, ex: &Example, with_grad: bool) -> Result<AnswerPass> {
        ensure!(ex.answer.is_some(), "answer_forward needs an answer");
        let a = self.assemble(params, ex)?;
        let (hidden, acts) = if with_grad {
            let (h, acts) = self.llm.forward(params, &a.x, a.t);
            (h, Some(acts))
        } else {
            (self.llm.forward_cached(params, &a.x, a.t, &mut self.llm.new_cache())?, None)
        };
        let rows: Vec<usize> = (0..a.t).filter(|&i| a.targets[i] != IGNORE).collect();
        let d = self.llm.hidden_size();
        let answer_hidden = rows.iter().flat_map(|&r| hidden[r * d..(r + 1) * d].iter().copied()).collect();
        let answer_targets = rows.iter().map(|&r| a.targets[r]).collect();
        Ok(AnswerPass { a, acts, rows, answer_hidden, answer_targets })
    }

    /// Per-token log-probabilities of a pass's answer under the LM head in `params`.
    pub fn answer_logprobs(&self, params: &ParamSet, pass: &AnswerPass) -> TokenLogprobs {
        let all = vec![true; pass.answer_targets.len()];
        let head = &params[self.llm.output].value;
        token_logprobs(&pass.answer_hidden, head, self.llm.hidden_size(), &pass.answer_targets, &all)
    }

    /// Backward of an [`AnswerPass`] from the gradient of its answer rows' final hidden states
    /// `d_answer_hidden [answer tokens, d]`.
    pub fn answer_backward(&self, params: &mut ParamSet, pass: &AnswerPass, d_answer_hidden: &[f32]) -> Result<()> {
        let acts = pass.acts.as_ref().context("answer_backward on a pass made without gradients")?;
        let d = self.llm.hidden_size();
        ensure!(d_answer_hidden.len() == pass.rows.len() * d, "answer_backward: gradient must be [answer tokens, d]");
        let mut d_hidden = vec![0.0; pass.a.t * d];
        for (&r, g) in pass.rows.iter().zip(d_answer_hidden.chunks_exact(d)) {
            d_hidden[r * d..(r + 1) * d].copy_from_slice(g);
        }
        let dx = self.llm.backward(params, acts, &d_hidden);
        self.inputs_backward(params, &pass.a, &dx);
        Ok(())
    }

    /// Generates an answer; also returns the patch selection when facts are fused.
    pub fn answer(
        &self,
        params: &ParamSet,
        ex: &Example,
        max_new: usize,
        sampling: Sampling,
    ) -> Result<(String, Option<Selection>)> {
        let a = self.assemble(params, &Example { answer: None, ..*ex })?;
        let ids = self.llm.generate(params, &a.x, a.t, max_new, &self.tokenizer.stop_ids, sampling)?;
        Ok((self.tokenizer.decode(&ids, true)?.trim().to_string(), a.facts.map(|(_, f)| f.selection)))
    }

    /// [`SageModel::answer`] for several examples at once (e.g. the questions about one image
    /// pair): the decode steps of all of them share each weight read
    /// ([`TrainableLlama::generate_batch`]); the answers are the ones `answer` gives.
    pub fn answer_batch(
        &self,
        params: &ParamSet,
        exs: &[Example],
        max_new: usize,
        sampling: Sampling,
    ) -> Result<Vec<(String, Option<Selection>)>> {
        let assembled =
            exs.iter().map(|ex| self.assemble(params, &Example { answer: None, ..*ex })).collect::<Result<Vec<_>>>()?;
        let prompts: Vec<(&[f32], usize)> = assembled.iter().map(|a| (a.x.as_slice(), a.t)).collect();
        let ids = self.llm.generate_batch(params, &prompts, max_new, &self.tokenizer.stop_ids, sampling)?;
        ids.iter()
            .zip(assembled)
            .map(|(ids, a)| {
                Ok((self.tokenizer.decode(ids, true)?.trim().to_string(), a.facts.map(|(_, f)| f.selection)))
            })
            .collect()
    }
}
