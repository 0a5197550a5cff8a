//! MiniLLM's rollout buffer: teacher-mixed samples with what the updates need from sampling
//! time (log q_old, log p, importance weights w_t, rewards, the teacher's final hidden states),
//! the plan of minibatches over the buffer's inner epochs, and the buffer's statistics.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::config::DistillConfig;
use crate::generate::{mix_log_prob, Sample};
use crate::loss::policy::{k3_estimate, rewards};
use crate::train::data_order::DataOrder;
use crate::train::trainer::Stats;

/// One stored rollout.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Rollout {
    /// Prompt tokens.
    pub prompt: Vec<u32>,
    /// Sampled response tokens.
    pub response: Vec<u32>,
    /// `log q_old(y_t)`: the student at sampling time.
    pub logq_old: Vec<f32>,
    /// `log p(y_t)`: the teacher.
    pub logp: Vec<f32>,
    /// w_t = q_old(y_t) / p̃(y_t), p̃ the teacher-mixed sampler.
    pub importance: Vec<f32>,
    /// Per-token rewards `r_t`.
    pub rewards: Vec<f32>,
    /// Teacher final hidden states `[len, hidden]` (single-step term only).
    #[serde(skip)]
    pub teacher_hidden: Option<Tensor>,
}

impl Rollout {
    /// A rollout from a teacher-mixed sample drawn with mixing coefficient `alpha`.
    pub fn from_sample(s: Sample, cfg: &DistillConfig) -> Self {
        let importance = s.logq.iter().zip(&s.logp).map(|(&q, &p)| (q - mix_log_prob(q, p, cfg.alpha)).exp()).collect();
        Self {
            rewards: rewards(&s.logp, &s.logq, &cfg.policy),
            prompt: s.prompt,
            response: s.response,
            logq_old: s.logq,
            logp: s.logp,
            importance,
            teacher_hidden: s.teacher_hidden,
        }
    }
}

/// Minibatches of `batch` rollout indices for each inner epoch (a fresh permutation per epoch,
/// derived from the seed, iteration and epoch; an incomplete last minibatch is dropped).
pub fn plan_minibatches(n: usize, batch: usize, epochs: usize, seed: u64, iteration: u64) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for e in 0..epochs {
        let mut order =
            DataOrder::new(n, seed ^ (iteration.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(e as u64));
        for _ in 0..n / batch {
            out.push(order.next(batch));
        }
    }
    out
}

/// Statistics of a rollout buffer: mixed-sample length, an importance-sampled estimate of the
/// pure-student length (no extra generation), per-token k3 reverse-KL estimate and reward.
pub fn rollout_stats(buffer: &[Rollout], cfg: &DistillConfig) -> Stats {
    let n = buffer.len().max(1) as f64;
    let mixed_len = buffer.iter().map(|r| r.response.len() as f64).sum::<f64>() / n;
    // Self-normalised importance sampling: sequence weight Π_t q/p̃.
    let log_w: Vec<f64> = buffer.iter().map(|r| r.importance.iter().map(|&w| (w as f64).ln()).sum()).collect();
    let m = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let ws: Vec<f64> = log_w.iter().map(|l| (l - m).exp()).collect();
    let stu_len =
        buffer.iter().zip(&ws).map(|(r, w)| w * r.response.len() as f64).sum::<f64>() / ws.iter().sum::<f64>();
    let (lp, lq): (Vec<f32>, Vec<f32>) =
        buffer.iter().flat_map(|r| r.logp.iter().copied().zip(r.logq_old.iter().copied())).unzip();
    let reward = buffer
        .iter()
        .map(|r| {
            let s: f64 = r.rewards.iter().map(|&x| x as f64).sum();
            if cfg.policy.length_norm {
                s / r.rewards.len().max(1) as f64
            } else {
                s
            }
        })
        .sum::<f64>()
        / n;
    Stats::from([
        ("mixed_len".to_string(), mixed_len),
        ("stu_len_is".to_string(), stu_len),
        ("rev_kl_k3".to_string(), k3_estimate(&lp, &lq)),
        ("reward".to_string(), reward),
    ])
}

/// The buffer's teacher hidden states as named tensors (for a checkpoint).
pub fn hidden_tensors(buffer: &[Rollout]) -> std::collections::HashMap<String, Tensor> {
    buffer
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.teacher_hidden.as_ref().map(|h| (format!("teacher_hidden.{i}"), h.clone())))
        .collect()
}

/// Puts the teacher hidden states of a checkpoint back into its buffer.
pub fn restore_hidden(buffer: &mut [Rollout], tensors: &std::collections::HashMap<String, Tensor>) {
    for (i, r) in buffer.iter_mut().enumerate() {
        r.teacher_hidden = tensors.get(&format!("teacher_hidden.{i}")).cloned();
    }
}
