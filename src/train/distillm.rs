//! DistiLLM (Ko et al., ICML 2024, arXiv 2402.03898): a skew divergence (`sfkl:λ`, the skew
//! forward KL(p ‖ λp + (1 − λ)q), or `srkl:λ`) with the adaptive off-policy approach of its
//! released `finetune.py`: each step draws r ~ U(0, 1) against the adaptive probability θ
//! (start `init_threshold`, 0 released) and its sampling share θ_s (`replay_ratio`:
//! decreasing θ·(1 − step/total) released, constant θ/2, increasing θ·step/total):
//! - r < θ_s, or r < θ while the replay buffer is not full: fresh samples of the current
//!   student for the batch's prompts, added to the buffer (capacity 1,000, oldest dropped), are
//!   trained on;
//! - otherwise r < θ: a batch drawn uniformly without replacement from the buffer;
//! - otherwise: the data's responses.
//!
//! At every validation, when the validation loss is at least `loss_eps` (0.1) above the one
//! recorded, θ rises by 0.1 (at most 1) and the new loss is recorded; the first validation
//! (before training) records the starting loss. The task is
//! [`SupervisedTask`](super::supervised::SupervisedTask) with a teacher term of weight
//! `kd_ratio` (1 released) and this schedule.

use std::collections::VecDeque;

use anyhow::{bail, Result};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::responses::ResponseSource;
use crate::generate::SamplingConfig;
use crate::loss::Divergence;

/// How the sampling share θ_s follows θ over training.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplayRatio {
    /// θ·(1 − step/total): fresh samples early, replay late (released default).
    #[default]
    Decreasing,
    /// θ/2.
    Constant,
    /// θ·step/total.
    Increasing,
}

/// `[distillm]`: the released `finetune.py` arguments and the GPT-2 script's values.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillmConfig {
    /// The divergence (`sfkl:0.1` = the released `adaptive-sfkl`; `srkl:λ` for the reverse).
    pub divergence: Divergence,
    /// Weight of the divergence; 1 − kd_ratio goes to cross-entropy (`--kd-ratio`, 1.0).
    pub kd_ratio: f64,
    /// Starting probability θ of student-generated data (`--init-threshold`, 0.0).
    pub init_threshold: f64,
    /// Raise θ when the validation loss rises by at least this (`--loss-eps`, 0.1).
    pub loss_eps: f64,
    /// How much θ rises each time (0.1 in the released code).
    pub threshold_step: f64,
    /// Replay buffer size in responses (`--capacity`, 1000).
    pub capacity: usize,
    /// The sampling share's schedule (`--replay-ratio`, decreasing).
    pub replay_ratio: ReplayRatio,
    /// Sampling temperature of the student's responses (1.0, no top-k/top-p).
    pub temperature: f64,
    /// Most tokens sampled per response (also bounded by `data.max_len`).
    pub max_new_tokens: usize,
}

impl Default for DistillmConfig {
    fn default() -> Self {
        Self {
            divergence: Divergence::SkewForwardKl { lambda: 0.1 },
            kd_ratio: 1.0,
            init_threshold: 0.0,
            loss_eps: 0.1,
            threshold_step: 0.1,
            capacity: 1000,
            replay_ratio: ReplayRatio::Decreasing,
            temperature: 1.0,
            max_new_tokens: 256,
        }
    }
}

impl DistillmConfig {
    /// Checks every setting, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        self.divergence.validate()?;
        for (key, v) in [
            ("distillm.kd_ratio", self.kd_ratio),
            ("distillm.init_threshold", self.init_threshold),
            ("distillm.threshold_step", self.threshold_step),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} must be in [0, 1], got {v}");
            }
        }
        if !(self.loss_eps.is_finite() && self.loss_eps >= 0.0) {
            bail!("distillm.loss_eps must be a finite number ≥ 0, got {}", self.loss_eps);
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            bail!("distillm.temperature must be a positive finite number, got {}", self.temperature);
        }
        for (key, v) in [("distillm.capacity", self.capacity), ("distillm.max_new_tokens", self.max_new_tokens)] {
            if v == 0 {
                bail!("{key} must be at least 1, got 0");
            }
        }
        Ok(())
    }

    /// The student's sampling within `max_len` tokens (prompt + response).
    pub fn sampling(&self, max_len: usize) -> SamplingConfig {
        SamplingConfig {
            max_length: Some(max_len),
            temperature: self.temperature as f32,
            ..SamplingConfig::sampling(self.max_new_tokens)
        }
    }
}

/// The adaptive schedule's state: θ, the recorded validation loss and the replay buffer of
/// student-generated (prompt, response) pairs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveOffPolicy {
    cfg: DistillmConfig,
    seed: u64,
    total_steps: usize,
    threshold: f64,
    recorded_loss: Option<f64>,
    buffer: VecDeque<(Vec<u32>, Vec<u32>)>,
}

impl AdaptiveOffPolicy {
    /// A fresh schedule over `total_steps` steps, its draws derived from `seed` and the step.
    pub fn new(cfg: DistillmConfig, seed: u64, total_steps: usize) -> Self {
        let threshold = cfg.init_threshold;
        Self { cfg, seed, total_steps: total_steps.max(1), threshold, recorded_loss: None, buffer: VecDeque::new() }
    }

    /// The probability θ of student-generated data.
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// Responses in the replay buffer.
    pub fn buffered(&self) -> usize {
        self.buffer.len()
    }

    /// The sampling share θ_s at `step`.
    pub fn sampling_share(&self, step: usize) -> f64 {
        let progress = step as f64 / self.total_steps as f64;
        match self.cfg.replay_ratio {
            ReplayRatio::Decreasing => self.threshold * (1.0 - progress),
            ReplayRatio::Constant => self.threshold * 0.5,
            ReplayRatio::Increasing => self.threshold * progress,
        }
    }

    fn rng(&self, step: usize, stream: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        rng.set_stream(stream);
        rng
    }

    /// Where step `step`'s responses come from: fresh student samples, the replay buffer, or
    /// the data.
    pub fn source(&self, step: usize) -> ResponseSource {
        let r: f64 = self.rng(step, 0).random();
        if r < self.sampling_share(step) || (r < self.threshold && self.buffer.len() < self.cfg.capacity) {
            ResponseSource::Student
        } else if r < self.threshold {
            ResponseSource::Replay
        } else {
            ResponseSource::Data
        }
    }

    /// Adds freshly sampled pairs, dropping the oldest beyond the capacity.
    pub fn remember(&mut self, pairs: impl IntoIterator<Item = (Vec<u32>, Vec<u32>)>) {
        for p in pairs {
            if self.buffer.len() == self.cfg.capacity {
                self.buffer.pop_front();
            }
            self.buffer.push_back(p);
        }
    }

    /// `n` pairs drawn uniformly without replacement from the buffer for micro-batch `k` of
    /// step `step` (all of them when it holds fewer).
    pub fn replay(&self, n: usize, step: usize, k: usize) -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut rng = self.rng(step, 1 + k as u64);
        let n = n.min(self.buffer.len());
        sample(&mut rng, self.buffer.len(), n).into_iter().map(|i| self.buffer[i].clone()).collect()
    }

    /// A validation loss: the first is recorded; a later one at least `loss_eps` above the
    /// recorded raises θ by `threshold_step` (at most 1) and is recorded.
    pub fn observe_validation(&mut self, loss: f64) {
        match self.recorded_loss {
            None => self.recorded_loss = Some(loss),
            Some(prev) if loss >= prev + self.cfg.loss_eps => {
                self.threshold = (self.threshold + self.cfg.threshold_step).min(1.0);
                self.recorded_loss = Some(loss);
            }
            Some(_) => {}
        }
    }
}
