//! MiniLLM's rollout buffer: teacher-mixed samples with what the updates need from sampling
//! time (log q_old, log p, importance weights w_t, rewards, the teacher's final hidden states),
//! the plan of minibatches over the buffer's inner epochs, and the buffer's statistics.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::config::DistillConfig;
use crate::data::batch::LmBatch;
use crate::generate::{mix_log_prob, Sample};
use crate::loss::policy::{k3_estimate, rewards};
use crate::model::Model;
use crate::ops::math;
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
    /// The longest response of the generation batch it was decoded (or scored) with: the
    /// width the released implementation stores it at (`distill.released_padding`).
    #[serde(default)]
    pub generation_width: usize,
    /// Teacher final hidden states `[len, hidden]` (single-step term only).
    #[serde(skip)]
    pub teacher_hidden: Option<Tensor>,
}

impl Rollout {
    /// A rollout from a teacher-mixed sample drawn with mixing coefficient `alpha`, decoded
    /// in a generation batch whose longest response has `generation_width` tokens.
    pub fn from_sample(s: Sample, generation_width: usize, cfg: &DistillConfig) -> Self {
        let importance = s.logq.iter().zip(&s.logp).map(|(&q, &p)| (q - mix_log_prob(q, p, cfg.alpha)).exp()).collect();
        Self {
            rewards: rewards(&s.logp, &s.logq, &cfg.policy),
            prompt: s.prompt,
            response: s.response,
            logq_old: s.logq,
            logp: s.logp,
            importance,
            generation_width,
            teacher_hidden: s.teacher_hidden,
        }
    }
}

/// Rollouts from given (prompt, response) pairs, scored now by full forward passes of the
/// student and the teacher: what collection records at sampling time (log q over the shared
/// vocabulary, log p, importance weights for `cfg.alpha`, rewards, and the teacher's hidden
/// states when the single-step term is on), for replaying stored responses. Pairs are scored
/// `cfg.rollout_batch` at a time, their logits `rows × vocab` a slice at a time.
pub fn rescore_rollouts(
    student: &Model,
    teacher: &Model,
    pairs: &[(Vec<u32>, Vec<u32>)],
    cfg: &DistillConfig,
) -> Result<Vec<Rollout>> {
    let vocab = student.lm.info().vocab_size.min(teacher.lm.info().vocab_size);
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(cfg.rollout_batch.max(1)) {
        let width = chunk.iter().map(|(_, r)| r.len()).max().unwrap_or(0);
        let refs: Vec<(&[u32], &[u32])> = chunk.iter().map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
        let batch = LmBatch::from_rollouts(&refs, student.pad_id(), &student.device())?;
        let hidden = |m: &Model| -> Result<Tensor> {
            batch.gather(&m.lm.forward_hidden(&batch.input_ids, &batch.mask, None)?.detach())
        };
        let (hq, hp) = (hidden(student)?, hidden(teacher)?);
        let logq = target_log_probs(student, &hq, &batch.targets, vocab)?;
        let logp = target_log_probs(teacher, &hp, &batch.targets, vocab)?;
        let mut at = 0;
        for (prompt, response) in chunk {
            let n = response.len();
            let sample = Sample {
                prompt: prompt.clone(),
                response: response.clone(),
                ended_with_eos: false,
                logq: logq[at..at + n].to_vec(),
                logp: logp[at..at + n].to_vec(),
                teacher_hidden: if cfg.single_step { Some(hp.narrow(0, at, n)?) } else { None },
                forward_kl: Vec::new(),
            };
            out.push(Rollout::from_sample(sample, width, cfg));
            at += n;
        }
    }
    Ok(out)
}

/// `log softmax(h·Wᵀ)[..vocab]` at each row's target, 256 rows at a time.
fn target_log_probs(model: &Model, hidden: &Tensor, targets: &[u32], vocab: usize) -> Result<Vec<f32>> {
    let head = model.lm.lm_head_weight().narrow(0, 0, vocab)?;
    let mut out = Vec::with_capacity(targets.len());
    for start in (0..targets.len()).step_by(256) {
        let n = 256.min(targets.len() - start);
        // The fused layer: also reads a bf16-stored teacher head without widening it all.
        let logits = crate::ops::linear_no_bias(&hidden.narrow(0, start, n)?, &head, crate::ops::WeightLayout::OutIn)?;
        let rows = &targets[start..start + n];
        if logits.device().is_cpu() {
            // One pass per row (its log-normaliser) instead of a log-softmax tensor and a
            // gather: the composition was half of OPD's rescoring (`perf`).
            let logits = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let lse: Vec<f32> = logits.par_chunks(vocab).map(math::logsumexp).collect();
            for (r, (&y, l)) in rows.iter().zip(lse).enumerate() {
                let y = y as usize;
                anyhow::ensure!(y < vocab, "token {y} is outside the {vocab}-token vocabulary both models share");
                out.push(logits[r * vocab + y] - l);
            }
        } else {
            let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let idx = Tensor::from_slice(rows, (n, 1), hidden.device())?;
            out.extend(lp.gather(&idx, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

/// Rollouts from samples decoded `chunk` at a time (their generation batches, in order).
pub fn rollouts_from_samples(samples: Vec<Sample>, chunk: usize, cfg: &DistillConfig) -> Vec<Rollout> {
    let mut out = Vec::with_capacity(samples.len());
    let mut samples = samples.into_iter().peekable();
    while samples.peek().is_some() {
        let batch: Vec<Sample> = samples.by_ref().take(chunk.max(1)).collect();
        let width = batch.iter().map(|s| s.response.len()).max().unwrap_or(0);
        out.extend(batch.into_iter().map(|s| Rollout::from_sample(s, width, cfg)));
    }
    out
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
