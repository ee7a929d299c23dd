//! File formats: GGUF, safetensors, Hugging Face checkpoint folders, legacy PyTorch pickles, ONNX graphs (over a small
//! [`protobuf`] wire reader), tokenizers (with [`utf8`], the
//! incremental UTF-8 decoding of their byte-level output) and chat templates.
//!
//! Every reader validates sizes and offsets before touching data and reports problems with the
//! file's path and what to do, as a [`crate::UserError`]: a bad file is the user's input.

pub mod chat_template;
pub mod gguf;
pub mod hf;
pub mod onnx;
pub mod protobuf;
pub mod pth;
pub mod safetensors;
pub mod tokenizer;
pub mod utf8;
