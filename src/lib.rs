//! minillm: knowledge distillation of large language models.
//!
//! The library behind the `minillm` command: Hugging Face causal LMs in candle ([`model`]),
//! tokenizers and the prompt template ([`tokenizer`]), batched decoding and teacher-mixed
//! sampling ([`sample`]) and per-token scoring ([`score`]).

pub mod atomic;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod loss;
pub mod model;
pub mod ops;
pub mod report;
pub mod runtime;
pub mod sample;
pub mod score;
pub mod tokenizer;
pub mod toy;
pub mod train;
