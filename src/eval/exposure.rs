//! Exposure bias: ExAccErr(l) of the paper's Appendix B.5 (after Arora et al. 2022).
//!
//! R(l) = Σ_{t ≤ l} E_{y<t ~ q, y_t ~ p}[log p/q] is the accumulated regret along prefixes the
//! student generates; l·ε(l) the same along prefixes the teacher generates. The inner
//! expectation over y_t ~ p is computed exactly as KL(p_t ‖ q_t) over the vocabulary; prefixes
//! are sampled (several per prompt), with common random numbers for the two runs.
//! ExAccErr(l) = (R(l) − l·ε(l)) / (l·ε(l)) × 100%.

use anyhow::{bail, Result};

use crate::model::CausalLm;
use crate::sample::{generate_mixed, row_rngs, MixedSampling};

/// The curves, indexed by generation length l = 1..=max_new_tokens.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ExposureCurve {
    /// R(l).
    pub regret: Vec<f64>,
    /// l·ε(l).
    pub oracle: Vec<f64>,
    /// ExAccErr(l) in percent (`None` where l·ε(l) is 0).
    pub ex_acc_err: Vec<Option<f64>>,
}

/// Mean over rows of the cumulative per-step KL up to each length (a finished row keeps its
/// total).
fn cumulative(per_row: &[Vec<f32>], len: usize) -> Vec<f64> {
    let mut out = vec![0f64; len];
    for row in per_row {
        let mut acc = 0f64;
        for (l, slot) in out.iter_mut().enumerate() {
            acc += row.get(l).copied().unwrap_or(0.0) as f64;
            *slot += acc;
        }
    }
    let n = per_row.len().max(1) as f64;
    out.iter().map(|v| v / n).collect()
}

/// ExAccErr of `student` against `teacher` on `prompts`, with `samples` sampled prefixes per
/// prompt and lengths up to `max_new_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn ex_acc_err(
    student: &dyn CausalLm,
    teacher: &dyn CausalLm,
    prompts: &[Vec<u32>],
    samples: usize,
    max_new_tokens: usize,
    eos: &[u32],
    pad: u32,
    seed: u64,
    batch: usize,
) -> Result<ExposureCurve> {
    if prompts.is_empty() || samples == 0 || max_new_tokens == 0 {
        bail!("exposure bias needs prompts, samples ≥ 1 and max_new_tokens ≥ 1");
    }
    let rows: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), samples)).collect();
    let run = |alpha: f32| -> Result<Vec<Vec<f32>>> {
        let cfg = MixedSampling {
            alpha,
            max_new_tokens,
            max_length: None,
            keep_teacher_hidden: false,
            record_forward_kl: true,
        };
        let mut out = Vec::with_capacity(rows.len());
        for (k, chunk) in rows.chunks(batch.max(1)).enumerate() {
            let start = (k * batch.max(1)) as u64;
            let mut rngs = row_rngs(seed, start..start + chunk.len() as u64);
            out.extend(generate_mixed(student, teacher, chunk, eos, pad, &cfg, &mut rngs)?.forward_kl);
        }
        Ok(out)
    };
    // α = 0: prefixes from the student; α = 1: prefixes from the teacher.
    let regret = cumulative(&run(0.0)?, max_new_tokens);
    let oracle = cumulative(&run(1.0)?, max_new_tokens);
    let ex_acc_err = regret.iter().zip(&oracle).map(|(r, o)| (*o > 0.0).then(|| 100.0 * (r - o) / o)).collect();
    Ok(ExposureCurve { regret, oracle, ex_acc_err })
}
