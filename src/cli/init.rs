//! `minillm init`: a randomly initialised model from a `config.json` and a tokenizer, saved in
//! Hugging Face layout (e.g. a student to train from scratch, or a real-size model to measure).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Args;
use minillm::model::{save_model, Model, Precision};
use minillm::tokenizer::Tokenizer;

/// `minillm init`.
#[derive(Args, Debug)]
pub struct Init {
    /// The architecture: a `config.json` (GPT-2, OPT, Llama, Qwen2 or Mistral).
    #[arg(long)]
    config: PathBuf,
    /// The tokenizer: a `tokenizer.json`, or a directory with one (or GPT-2's vocab.json +
    /// merges.txt, or encoder.json + vocab.bpe).
    #[arg(long)]
    tokenizer: PathBuf,
    /// Output directory (must not hold other files unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the initialisation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Precision of the saved weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Replace the model files of an existing --out (other files in it are kept).
    #[arg(long)]
    overwrite: bool,
}

impl Init {
    /// Writes the model.
    pub fn run(self) -> Result<()> {
        super::refuse_foreign_dir(&self.out, self.overwrite)?;
        let text =
            std::fs::read_to_string(&self.config).with_context(|| format!("reading {}", self.config.display()))?;
        let config: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", self.config.display()))?;
        let tokenizer = if self.tokenizer.is_dir() {
            match Tokenizer::from_dir(&self.tokenizer)? {
                Some(t) => t,
                None => bail!(
                    "{} holds no tokenizer.json, vocab.json + merges.txt, or encoder.json + vocab.bpe",
                    self.tokenizer.display()
                ),
            }
        } else {
            Tokenizer::from_file(&self.tokenizer)?
        };
        let arch = minillm::model::config::ArchConfig::parse(&config, &self.config.display().to_string())?;
        // Random initialisation builds every tensor in f32 first: refuse what cannot fit.
        let needed = arch.approx_parameters() * 4.0;
        if let Some(available) = minillm::recipe::memory::available_memory() {
            if needed > available as f64 {
                bail!(
                    "{} describes about {:.1e} parameters ({:.1} GB in f32), more than the {:.1} GB of memory available",
                    self.config.display(),
                    needed / 4.0,
                    needed / 1e9,
                    available as f64 / 1e9
                );
            }
        }
        let mut model = Model::random(config, self.seed, &Device::Cpu, self.dtype.dtype())
            .with_context(|| format!("building a model from {}", self.config.display()))?;
        if tokenizer.vocab_size() > model.lm.info().vocab_size {
            bail!(
                "the tokenizer has {} tokens but {} gives the embedding only {} rows",
                tokenizer.vocab_size(),
                self.config.display(),
                model.lm.info().vocab_size
            );
        }
        model.tokenizer = Some(tokenizer);
        save_model(&model, &self.out, self.dtype.dtype())?;
        eprintln!("initialised {} parameters in {}", model.lm.params().num_elements(), self.out.display());
        Ok(())
    }
}
