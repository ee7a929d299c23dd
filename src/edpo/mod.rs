//! Stage 2, Entropy-aware DPO (ARCHITECTURE.md §1): preference alignment of an SFE model on the
//! ranked answers of AD-PL questions, with the judge's per-answer score entropies shaping the
//! margin. The frozen SFE model is the reference; the fusion attention is frozen, the adapter,
//! the projection and the LLM (LoRA or full, as in the SFE run) train.
//!
//! [`config`] is the TOML a run is described by, [`pairs`] picks the pairs of an instance and
//! [`run`] is the stage's step behind `crate::stage::Stage` (the loop and checkpoints are
//! `crate::stage`'s; a stage-2 checkpoint is marked with its E-DPO section).

pub mod config;
pub mod pairs;
pub mod run;
