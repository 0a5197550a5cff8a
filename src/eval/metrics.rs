//! Other metrics of the paper: Dist-n, test LM loss, and mean ± standard deviation over seeds.

use std::collections::HashSet;

use anyhow::Result;

use crate::model::CausalLm;
use crate::score::{score, ScoreRequest};

/// Distinct n-grams / all n-grams over a set of token sequences (Dist-4 with `n = 4`); 0 when
/// no sequence has n tokens. `minillm eval` applies it to the words of the generated texts
/// (Rouge tokenizer without stemming), so that it needs no model and is the same for
/// in-process and external predictions.
pub fn distinct_n<T: std::hash::Hash + Eq + Clone>(sequences: &[Vec<T>], n: usize) -> f64 {
    let mut seen = HashSet::new();
    let mut total = 0usize;
    for s in sequences {
        for w in s.windows(n) {
            total += 1;
            seen.insert(w.to_vec());
        }
    }
    if total == 0 {
        0.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// Test LM loss: the mean over examples of the per-token NLL of the reference response given
/// its prompt (`prompt` and `response` token ids; the response ends with EOS).
pub fn lm_loss(model: &dyn CausalLm, examples: &[(Vec<u32>, Vec<u32>)], batch_tokens: usize) -> Result<f64> {
    let reqs: Vec<ScoreRequest> = examples
        .iter()
        .map(|(p, r)| ScoreRequest { ids: [p.clone(), r.clone()].concat(), score_from: p.len() })
        .collect();
    let scores = score(model, &reqs, batch_tokens)?;
    let per_example: Vec<f64> = scores.iter().map(|s| -s.total / s.logprobs.len().max(1) as f64).collect();
    Ok(per_example.iter().sum::<f64>() / per_example.len().max(1) as f64)
}

/// Mean and sample standard deviation (n − 1; 0 for a single value).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}
