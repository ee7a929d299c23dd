//! sage: comparison-based visual anomaly reasoning.
//!
//! Layers, one direction of dependency (ARCHITECTURE.md §2):
//! `cli` → `models` → `ops` → `backend` → `tensor`, with `formats` and `assets` beside them.

pub mod assets;
pub mod backend;
pub mod cli;
pub mod config;
pub mod data;
pub mod demo;
pub mod edpo;
pub mod error;
pub mod eval;
pub mod facts;
pub mod formats;
pub mod grpo;
pub mod image_io;
pub mod jsonl_log;
pub mod judge;
pub mod lock;
pub mod metrics;
pub mod models;
pub mod ops;
pub mod opset;
pub mod plugin;
pub mod qmatrix;
pub mod quant;
pub mod score;
pub mod sfe;
pub mod stage;
pub mod tensor;
pub mod threads;
pub mod train;
pub mod util;

pub use error::UserError;
pub use tensor::{DType, Device, Tensor};
