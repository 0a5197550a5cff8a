//! Recipes: a method and its settings, turned into a training run — the models loaded once,
//! the method's [`Task`](crate::train::trainer::Task), the shared trainer.
//!
//! ```no_run
//! use minillm::recipe::{Method, Recipe};
//!
//! # fn main() -> anyhow::Result<()> {
//! let mut recipe = Recipe::from_toml(Method::Sft, Some("configs/gpt2-sft.toml".as_ref()), &[])?;
//! recipe.config.model.student = Some("gpt2".into());
//! recipe.config.train.max_steps = 100;
//! let report = recipe.run()?;
//! println!("selected model in {}", report.best.display());
//! # Ok(())
//! # }
//! ```

pub mod memory;
pub mod run;
pub mod settings;

pub use run::{Method, Recipe, RunReport};
pub use settings::{DataSection, KdSection, ModelSection, Preset, RunConfig, SeqKdMode, SeqKdSection};
