//! Stage 1, Self-Guided Fact Enhancement (ARCHITECTURE.md §1): supervised fine-tuning of the SAGE
//! model on the best-ranked answer of every AD-PL question.
//!
//! [`run`] is the stage's step behind `crate::stage::Stage`; the run description
//! (`SfeConfig`), the examples, checkpoints and the loop are `crate::stage`'s, which every stage
//! shares.

pub mod run;

/// The SFE run description (`configs/sfe-*.toml`), defined with the layer every stage shares.
pub use crate::stage::config;
