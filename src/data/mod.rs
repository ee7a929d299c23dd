//! Datasets: one sample model ([`sample`]), a reader per format, the AD-PL builder, and the
//! shared validation that lets `sage data check` list every problem in a file.

pub mod adpl;
pub mod build;
pub mod duplicate_keys;
pub mod elpv;
pub mod format;
pub mod image_paths;
pub mod manta;
pub mod mask;
pub mod mmad;
pub mod mvtec;
pub mod problems;
pub mod sample;
pub mod stats;
pub mod synth;
pub mod templates;

pub use sample::{Label, Level, Question, Sample};
