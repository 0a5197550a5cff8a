//! `minillm generate`: sample continuations of a prompt, or of an instruction wrapped in the
//! prompt template.

use anyhow::Result;
use clap::Args;
use minillm::generate::{consecutive_rows, Sampler, SamplingConfig};
use minillm::tokenizer::format_prompt;

use super::ModelArgs;

/// `minillm generate`.
#[derive(Args, Debug)]
pub struct Generate {
    #[command(flatten)]
    model: ModelArgs,
    /// Raw prompt text.
    #[arg(long, conflicts_with = "instruction", required_unless_present = "instruction")]
    prompt: Option<String>,
    /// Instruction, wrapped in the MiniLLM prompt template.
    #[arg(long)]
    instruction: Option<String>,
    /// Optional input for the instruction template.
    #[arg(long, requires = "instruction", default_value = "")]
    input: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Forbid repeated n-grams of this size (0 = off).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
    /// Number of samples.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

impl Generate {
    /// Prints `num_samples` continuations.
    pub fn run(self) -> Result<()> {
        let model = self.model.load()?;
        let tok = model.tokenizer()?;
        let text = match &self.instruction {
            Some(i) => format_prompt(i, &self.input),
            None => self.prompt.clone().unwrap_or_default(),
        };
        let cfg = SamplingConfig {
            max_new_tokens: self.max_new_tokens,
            max_length: None,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            no_repeat_ngram_size: self.no_repeat_ngram_size,
        };
        let prompts = vec![tok.encode(&text)?; self.num_samples.max(1)];
        let rows = consecutive_rows(0, prompts.len());
        let samples =
            Sampler::plain(&model, &cfg).decode_in_chunks(&prompts, self.seed, &rows, prompts.len(), |_, _| Ok(()))?;
        for (i, s) in samples.iter().enumerate() {
            if self.num_samples > 1 {
                println!("--- sample {}", i + 1);
            }
            println!("{}", tok.decode(&s.response, true)?);
        }
        Ok(())
    }
}
