//! minillm: knowledge distillation of large language models.
//!
//! The library behind the `minillm` command, in the order data flows through a run:
//! [`recipe`] (a method and its settings → a training run), [`model`] (Hugging Face causal
//! LMs in candle) with [`tokenizer`], [`data`] (instruction sets, corpus, batches),
//! [`generate`] (decoding and teacher-mixed sampling), [`loss`] (divergences, the fused
//! LM-head loss, policy-gradient pieces), [`train`] (the shared trainer and the methods'
//! tasks), [`eval`] (the paper's evaluation protocol), [`analysis`] (calibration, exposure
//! bias), [`report`] (tables and plots) and [`demo`] (the paper's experiment in miniature).
//! [`ops`] holds the fused CPU kernels everything above runs on.
//!
//! Running a method from its settings:
//!
//! ```
//! use minillm::recipe::{Method, Recipe};
//!
//! # fn main() -> anyhow::Result<()> {
//! # let tmp = tempfile::tempdir()?;
//! # let data = tmp.path().join("pairs.jsonl");
//! # std::fs::write(&data, "{\"prompt\": \"Say hi:\", \"output\": \" hi\"}\n")?;
//! let mut recipe = Recipe::from_toml(Method::Sft, None, &["train.max_steps=2".into()])?;
//! let cfg = &mut recipe.config;
//! cfg.model.student = Some("tests/fixtures/models/gpt2".into());
//! cfg.data.train = Some(data.clone());
//! cfg.data.valid = Some(data);
//! cfg.data.max_len = 64; // the fixture model's context
//! cfg.out = Some(tmp.path().join("sft"));
//! let report = recipe.run()?;
//! assert_eq!(report.outcome.steps, 2);
//! assert!(report.best.join("model.safetensors").is_file());
//! # Ok(())
//! # }
//! ```

pub mod analysis;
pub mod atomic;
pub mod data;
pub mod demo;
pub mod error_text;
pub mod eval;
pub mod fingerprint;
pub mod generate;
pub mod loss;
pub mod model;
pub mod ops;
pub mod outdir;
pub mod progress;
pub mod recipe;
pub mod report;
pub mod runtime;
pub mod score;
pub mod serde_off;
pub mod tokenizer;
pub mod train;
