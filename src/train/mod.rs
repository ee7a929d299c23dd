//! Training machinery on the CPU backend: parameters and gradient accumulation ([`param`]),
//! AdamW ([`optim`]), the learning-rate schedule ([`schedule`]), gradient clipping ([`clip`]),
//! the seeded randomness ([`rng`]), the step that ties them together ([`trainer`]) and the
//! numerics guard of the training loops ([`guard`]).
//! The gradients themselves come from the backward functions in [`crate::ops`].

pub mod clip;
pub mod guard;
pub mod optim;
pub mod param;
pub mod rng;
pub mod schedule;
pub mod trainer;

pub use clip::{clip_grad_norm, grad_norm};
pub use optim::{AdamW, AdamWConfig, AdamWScalars, AdamWState, Moments};
pub use param::{GradAccum, Param, ParamId, ParamSet};
pub use rng::{streams, RngState, SeedRng};
pub use schedule::CosineSchedule;
pub use trainer::{StepReport, TrainConfig, Trainer, TrainerState};

#[cfg(test)]
mod tests;
