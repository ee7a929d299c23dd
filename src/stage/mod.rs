//! What every training stage (`sfe`, `edpo`, and the next ones) shares, written once: the run
//! description ([`config`]), the examples and the cache of the encoder's patch tokens ([`data`]),
//! the run's model and data ([`session`]), atomic checkpoints ([`checkpoint`]) and the training
//! loop behind the [`Stage`] trait ([`train_loop`]). A stage implements [`Stage`] in its own folder
//! and imports this layer and the models, never another stage.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod session;
pub mod train_loop;

pub use session::{sfe_start, Inputs, Session, ValResult};
pub use train_loop::{finished_step, log_totals, train, Outcome, Stage, StepOut, FINAL_FILE};
