//! `minillm generate`.

use anyhow::Result;

use super::LoadOptions;
use crate::sample::{generate as decode, row_rngs, SamplingConfig};
use crate::tokenizer::format_prompt;

/// Options of `minillm generate`.
pub struct GenerateOptions {
    /// The model.
    pub load: LoadOptions,
    /// A raw prompt.
    pub prompt: Option<String>,
    /// Or an instruction and its input, wrapped in the template.
    pub instruction: Option<(String, String)>,
    /// Decoding settings.
    pub sampling: SamplingConfig,
    /// Samples to draw.
    pub num_samples: usize,
    /// Seed of the random streams.
    pub seed: u64,
}

/// Prints `num_samples` continuations of the prompt.
pub fn generate(o: GenerateOptions) -> Result<()> {
    let model = o.load.load()?;
    let tok = model.tokenizer()?;
    let text = match (&o.prompt, &o.instruction) {
        (Some(p), _) => p.clone(),
        (None, Some((i, input))) => format_prompt(i, input),
        (None, None) => anyhow::bail!("give --prompt or --instruction"),
    };
    let ids = tok.encode(&text)?;
    let eos = model.eos_token_ids.clone();
    let pad = model.pad_id();
    let prompts = vec![ids; o.num_samples.max(1)];
    let mut rngs = row_rngs(o.seed, 0..prompts.len() as u64);
    let out = decode(model.lm.as_ref(), &prompts, &eos, pad, &o.sampling, &mut rngs)?;
    for (i, resp) in out.responses.iter().enumerate() {
        if o.num_samples > 1 {
            println!("--- sample {}", i + 1);
        }
        println!("{}", tok.decode(resp, true)?);
    }
    Ok(())
}
