//! Fast in-process validation for checkpoint selection (the released implementation's
//! criterion): one seed, temperature 1, no n-gram blocking, Rouge-L ×100 of the student's
//! samples against the references, averaged over examples.

use anyhow::Result;

use super::rouge_l_max;
use crate::data::instruct::InstructExample;
use crate::model::CausalLm;
use crate::sample::{generate, row_rngs, SamplingConfig};
use crate::tokenizer::Tokenizer;

/// Rouge-L ×100 of texts against their references, averaged (the protocol's reported number).
pub fn mean_rouge_l(predictions: &[String], references: &[Vec<String>]) -> f64 {
    let n = predictions.len().max(1) as f64;
    predictions
        .iter()
        .zip(references)
        .map(|(p, r)| 100.0 * rouge_l_max(p, &r.iter().map(String::as_str).collect::<Vec<_>>()))
        .sum::<f64>()
        / n
}

/// The text of a response, without its EOS and special tokens.
pub fn response_text(tok: &Tokenizer, response: &[u32], eos: &[u32]) -> Result<String> {
    let ids: Vec<u32> = response.iter().copied().filter(|t| !eos.contains(t)).collect();
    tok.decode(&ids, true)
}

/// Samples one response per example (seeded) and returns the mean Rouge-L ×100 and the mean
/// response length in tokens.
#[allow(clippy::too_many_arguments)]
pub fn sampled_rouge_l(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    examples: &[InstructExample],
    eos: &[u32],
    pad: u32,
    max_len: usize,
    batch: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let (mut preds, mut refs, mut lens) = (Vec::new(), Vec::new(), Vec::new());
    for (k, chunk) in examples.chunks(batch.max(1)).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt.clone()).collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let cfg = SamplingConfig {
            max_length: Some(max_len),
            ..SamplingConfig::sampling(max_len.saturating_sub(longest).max(1))
        };
        let start = (k * batch) as u64;
        let g = generate(model, &prompts, eos, pad, &cfg, &mut row_rngs(seed, start..start + prompts.len() as u64))?;
        for (e, y) in chunk.iter().zip(&g.responses) {
            preds.push(response_text(tok, y, eos)?);
            refs.push(e.references.clone());
            lens.push(y.len() as f64);
        }
    }
    Ok((mean_rouge_l(&preds, &refs), lens.iter().sum::<f64>() / lens.len().max(1) as f64))
}
