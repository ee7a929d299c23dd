//! What training needs below the models: parameters on the host by name ([`param`]), the
//! optimizer's settings and state ([`optim`]: AdamW's hyperparameters and moments, the scalars of
//! one update), the learning-rate schedule ([`schedule`]), seeded randomness ([`rng`]) and the
//! numerics guard of the training loop ([`guard`]). The update itself runs on the op set
//! (`opset::Optimizer`); the loop is `crate::stage`.

pub mod guard;
pub mod optim;
pub mod param;
pub mod rng;
pub mod schedule;

pub use optim::{AdamWConfig, AdamWScalars, AdamWState, Moments, TrainConfig};
pub use param::{Param, ParamId, ParamSet};
pub use rng::{streams, RngState, SeedRng};
pub use schedule::CosineSchedule;
