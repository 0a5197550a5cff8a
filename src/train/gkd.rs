//! Generalized knowledge distillation (GKD; Agarwal et al., arXiv 2306.13649) with the
//! meanings and defaults of TRL's `GKDConfig`, so settings carry over: each step trains, with
//! probability λ (`lmbda`), on responses the current student samples for the batch's prompts
//! (on-policy), otherwise on the data's responses — or on teacher samples with `seq_kd` —
//! and the loss is TRL's `generalized_jsd_loss`: β·KL(p‖m) + (1 − β)·KL(q‖m) with
//! m = β·p + (1 − β)·q over the whole vocabulary at temperature τ, per response token
//! (β = 0 is the forward KL(p‖q), β = 1 the reverse KL(q‖p), as TRL's code special-cases).
//! The task is [`SupervisedTask`](super::supervised::SupervisedTask) with a divergence-only
//! teacher term and this schedule of where the responses come from.

use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use super::responses::ResponseSource;
use super::responses::{pairs_batch, sample_pairs};
use crate::data::batch::LmBatch;
use crate::data::instruct::InstructExample;
use crate::generate::SamplingConfig;
use crate::loss::Divergence;
use crate::model::Model;

/// `[gkd]`: TRL `GKDConfig`'s fields and defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GkdConfig {
    /// Probability λ that a step trains on the student's own samples.
    pub lmbda: f64,
    /// Interpolation β of the generalised JSD (0: forward KL, 1: reverse KL).
    pub beta: f64,
    /// Temperature τ of sampling and of both models' distributions in the loss.
    pub temperature: f64,
    /// Most tokens sampled per response (also bounded by `data.max_len`).
    pub max_new_tokens: usize,
    /// Train the off-policy steps on teacher samples instead of the data's responses.
    pub seq_kd: bool,
}

impl Default for GkdConfig {
    fn default() -> Self {
        Self { lmbda: 0.5, beta: 0.5, temperature: 0.9, max_new_tokens: 128, seq_kd: false }
    }
}

impl GkdConfig {
    /// Checks every setting, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        for (key, v) in [("gkd.lmbda", self.lmbda), ("gkd.beta", self.beta)] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} must be in [0, 1], got {v}");
            }
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("gkd.temperature must be a positive finite number, got {}", self.temperature);
        }
        if self.max_new_tokens == 0 {
            bail!("gkd.max_new_tokens must be at least 1, got 0");
        }
        Ok(())
    }

    /// The divergence TRL's `generalized_jsd_loss` computes at this β.
    pub fn divergence(&self) -> Divergence {
        if self.beta == 0.0 {
            Divergence::ForwardKl
        } else if self.beta == 1.0 {
            Divergence::ReverseKl
        } else {
            Divergence::Jsd { beta: self.beta }
        }
    }
}

/// GKD's per-step choice of responses, and their sampling.
#[derive(Clone, Debug)]
pub struct ResponseSchedule {
    lmbda: f64,
    seq_kd: bool,
    sampling: SamplingConfig,
    seed: u64,
}

impl ResponseSchedule {
    /// The schedule of `cfg`, sampling within `max_len` tokens (prompt + response), with draws
    /// derived from `seed` and the step (so a resumed run makes the same choices).
    pub fn new(cfg: &GkdConfig, max_len: usize, seed: u64) -> Self {
        let sampling = SamplingConfig {
            max_length: Some(max_len),
            temperature: cfg.temperature as f32,
            ..SamplingConfig::sampling(cfg.max_new_tokens)
        };
        Self { lmbda: cfg.lmbda, seq_kd: cfg.seq_kd, sampling, seed }
    }

    /// The source of step `step`'s responses: the student with probability λ.
    pub fn source(&self, step: usize) -> ResponseSource {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        // TRL draws `random.random() <= lmbda`; `<` keeps λ = 0 strictly off-policy.
        if rng.random::<f64>() < self.lmbda {
            ResponseSource::Student
        } else if self.seq_kd {
            ResponseSource::Teacher
        } else {
            ResponseSource::Data
        }
    }

    /// A batch of `examples` (laid out for `student`) with responses sampled by `model`, prompt
    /// `i` with the random stream `rows_from + i`.
    pub fn sampled_batch(
        &self,
        model: &Model,
        student: &Model,
        examples: &[&InstructExample],
        rows_from: u64,
    ) -> Result<LmBatch> {
        let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt.clone()).collect();
        pairs_batch(student, &sample_pairs(model, &self.sampling, self.seed, &prompts, rows_from, prompts.len())?)
    }
}
