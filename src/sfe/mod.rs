//! Stage 1, Self-Guided Fact Enhancement (ARCHITECTURE.md §1): supervised fine-tuning of the SAGE model
//! on the best-ranked answer of every AD-PL question.
//!
//! [`config`] is the TOML a run is described by, [`data`] turns AD-PL files and fact files into
//! examples (with the frozen encoder's patch tokens cached), [`checkpoint`] saves and restores a
//! run exactly, and [`run`] is the loop.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod run;
