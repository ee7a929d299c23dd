//! `sage grpo` (ARCHITECTURE.md §16): GRPO with AD-FM's multi-stage answers and fine-grained
//! rewards, from an SFE run. The policy answers each training image pair `G` times in the
//! `<think>` → `<rethink>` → `<answer>` format; each answer is rewarded for its format, its verdict
//! and defect type, and its boxes against the sample's mask boxes; advantages are relative to the
//! group; the update is a clipped policy ratio with a k3 KL penalty to the frozen SFE model.
//!
//! [`format`] is the prompt and the lenient parser, [`reward`] the pure reward functions,
//! [`config`] the TOML a run is described by and [`run`] the stage's step behind
//! `crate::stage::Stage` (the loop, logs, checkpoints and resume are `crate::stage`'s).

pub mod config;
pub mod format;
pub mod reward;
pub mod run;
