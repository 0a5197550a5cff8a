//! MiniLLM phase 2 (REFERENCE.md §1–5): collect a buffer of teacher-mixed rollouts, then run
//! several inner epochs of updates over it with the clipped, importance-weighted policy
//! gradient (long-term part), the exact token-level reverse KL (single-step part) and the
//! pre-training term.
//!
//! The teacher runs once per rollout: its log-probabilities of the sampled tokens and its final
//! hidden states at every response position are kept from the sampling pass; the single-step
//! term recomputes the teacher's logits from those states with one LM-head product.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::data_order::DataOrder;
use super::supervised::batch_head_loss;
use super::trainer::{Stats, Task, TaskState};
use crate::data::batch::LmBatch;
use crate::data::instruct::InstructExample;
use crate::eval::validate::{mean_rouge_l, response_text};
use crate::loss::policy::{advantages, k3_estimate, rewards, PolicyConfig};
use crate::loss::{cross_entropy, head_loss, Divergence, PolicyTokens, TargetTerm, TeacherHead};
use crate::model::{AttentionMask, Model};
use crate::sample::{generate_mixed, mix_log_prob, row_rngs, MixedSampling, PaddedBatch};

/// Salt of the validation sampling seed, so validation samples never share a stream with
/// training rollouts.
const VALID_STREAM_SALT: u64 = 0x5641_4c49_4421;

/// Settings of `minillm distill` (defaults: the released implementation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Teacher share α of the sampling mixture (0 = pure student sampling).
    pub alpha: f32,
    /// Rollouts per collection.
    pub num_rollouts: usize,
    /// Prompts decoded together while collecting.
    pub rollout_batch: usize,
    /// Passes over each buffer.
    pub inner_epochs: usize,
    /// Prompt + response length limit.
    pub max_len: usize,
    /// Response length limit (also bounded by `max_len`).
    pub max_new_tokens: usize,
    /// The long-term term.
    pub policy: PolicyConfig,
    /// Add the exact single-step reverse KL.
    pub single_step: bool,
    /// Weight the single-step term by the importance weight w_t (paper) or not (released).
    pub single_step_weighted: bool,
    /// Add the pre-training term.
    pub pt: bool,
    /// Share of the teacher soft cross-entropy in the pre-training term (0.5 released, 0 paper).
    pub pt_kd_ratio: f64,
    /// Coefficient of the pre-training term.
    pub pt_coef: f64,
    /// Validation prompts sampled (pure student) for the reverse-KL estimate and Rouge-L.
    pub valid_rollouts: usize,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            num_rollouts: 256,
            rollout_batch: 32,
            inner_epochs: 4,
            max_len: 512,
            max_new_tokens: 256,
            policy: PolicyConfig::default(),
            single_step: true,
            single_step_weighted: false,
            pt: true,
            pt_kd_ratio: 0.5,
            pt_coef: 1.0,
            valid_rollouts: 64,
        }
    }
}

impl DistillConfig {
    /// A preset: `lmops` (released implementation) or `paper` (equations as printed).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "lmops" => Ok(Self::default()),
            "paper" => Ok(Self {
                policy: PolicyConfig::paper(),
                single_step_weighted: true,
                pt_kd_ratio: 0.0,
                ..Self::default()
            }),
            other => bail!("unknown preset `{other}` (lmops, paper)"),
        }
    }
}

/// One stored rollout.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Rollout {
    prompt: Vec<u32>,
    response: Vec<u32>,
    logq_old: Vec<f32>,
    logp: Vec<f32>,
    /// w_t = q_old(y_t) / p̃(y_t).
    importance: Vec<f32>,
    rewards: Vec<f32>,
    /// Teacher final hidden states `[len, hidden]` (single-step term only).
    #[serde(skip)]
    teacher_hidden: Option<Tensor>,
}

/// The distillation task.
pub struct DistillTask {
    cfg: DistillConfig,
    teacher: Model,
    prompts: Vec<Vec<u32>>,
    valid: Vec<InstructExample>,
    corpus: Vec<Vec<u32>>,
    eos: Vec<u32>,
    pad: u32,
    device: Device,
    batch_size: usize,
    grad_accum: usize,
    seed: u64,
    prompt_order: DataOrder,
    pt_order: DataOrder,
    iteration: u64,
    buffer: Vec<Rollout>,
    schedule: Vec<Vec<usize>>,
    next_minibatch: usize,
    window: Vec<Vec<usize>>,
    pt_window: Vec<LmBatch>,
    window_tokens: usize,
    window_pt_tokens: usize,
    rollout_stats: Stats,
}

/// What a distillation task is built from.
pub struct DistillData {
    /// Training prompts (token ids; responses are not used).
    pub prompts: Vec<Vec<u32>>,
    /// Validation examples (LM loss on references, reverse KL on sampled prompts).
    pub valid: Vec<InstructExample>,
    /// Pre-training chunks (may be empty when the term is off).
    pub corpus: Vec<Vec<u32>>,
}

impl DistillTask {
    /// A task distilling from `teacher`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: DistillConfig,
        teacher: Model,
        data: DistillData,
        eos: Vec<u32>,
        pad: u32,
        device: Device,
        batch_size: usize,
        grad_accum: usize,
        seed: u64,
    ) -> Result<Self> {
        if data.prompts.is_empty() {
            bail!("no training prompts");
        }
        if cfg.pt && data.corpus.is_empty() {
            bail!("the pre-training term is on but no corpus was given (set [data] corpus or turn pt off)");
        }
        if cfg.num_rollouts < batch_size {
            bail!("num_rollouts ({}) must be at least batch_size ({batch_size})", cfg.num_rollouts);
        }
        let prompt_order = DataOrder::new(data.prompts.len(), seed);
        let pt_order = DataOrder::new(data.corpus.len().max(1), seed.wrapping_add(1));
        Ok(Self {
            cfg,
            teacher,
            prompts: data.prompts,
            valid: data.valid,
            corpus: data.corpus,
            eos,
            pad,
            device,
            batch_size,
            grad_accum,
            seed,
            prompt_order,
            pt_order,
            iteration: 0,
            buffer: Vec::new(),
            schedule: Vec::new(),
            next_minibatch: 0,
            window: Vec::new(),
            pt_window: Vec::new(),
            window_tokens: 0,
            window_pt_tokens: 0,
            rollout_stats: Stats::new(),
        })
    }

    fn sampling(&self, longest_prompt: usize, alpha: f32, keep: bool) -> MixedSampling {
        MixedSampling {
            alpha,
            max_new_tokens: self.cfg.max_new_tokens.min(self.cfg.max_len.saturating_sub(longest_prompt)).max(1),
            max_length: Some(self.cfg.max_len),
            keep_teacher_hidden: keep,
            record_forward_kl: false,
        }
    }

    /// Collects a new buffer of rollouts with the current student and plans its minibatches.
    fn collect(&mut self, student: &Model) -> Result<()> {
        let n = self.cfg.num_rollouts;
        let mut buffer = Vec::with_capacity(n);
        let mut sampled_at = 0u64;
        while buffer.len() < n {
            let take = self.cfg.rollout_batch.min(n - buffer.len()).min(self.prompts.len());
            let prompts: Vec<Vec<u32>> =
                self.prompt_order.next(take).iter().map(|&i| self.prompts[i].clone()).collect();
            let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
            let cfg = self.sampling(longest, self.cfg.alpha, self.cfg.single_step);
            let base = self.iteration * n as u64 + sampled_at;
            let mut rngs = row_rngs(self.seed, base..base + prompts.len() as u64);
            let r = generate_mixed(
                student.lm.as_ref(),
                self.teacher.lm.as_ref(),
                &prompts,
                &self.eos,
                self.pad,
                &cfg,
                &mut rngs,
            )?;
            for b in 0..prompts.len() {
                let (logq, logp) = (r.logq[b].clone(), r.logp[b].clone());
                let len = logq.len();
                let importance =
                    logq.iter().zip(&logp).map(|(&q, &p)| (q - mix_log_prob(q, p, self.cfg.alpha)).exp()).collect();
                let teacher_hidden = match &r.teacher_hidden {
                    Some(h) => Some(h.get(b)?.narrow(0, 0, len)?),
                    None => None,
                };
                buffer.push(Rollout {
                    prompt: r.generation.prompts[b].clone(),
                    response: r.generation.responses[b].clone(),
                    rewards: rewards(&logp, &logq, &self.cfg.policy),
                    logq_old: logq,
                    logp,
                    importance,
                    teacher_hidden,
                });
            }
            sampled_at += prompts.len() as u64;
        }
        self.rollout_stats = rollout_stats(&buffer, &self.cfg);
        self.buffer = buffer;
        self.schedule = plan_minibatches(n, self.batch_size, self.cfg.inner_epochs, self.seed, self.iteration);
        self.next_minibatch = 0;
        self.iteration += 1;
        Ok(())
    }

    /// Student final hidden states `[tokens, width]` at the positions that predict the
    /// response tokens of `rows` (left-padded prompts, right-padded responses: the layout
    /// decoding ran in), with those tokens.
    fn response_hidden(&self, student: &Model, rows: &[&Rollout]) -> Result<(Tensor, Vec<u32>)> {
        let batch = PaddedBatch::new(rows.iter().map(|r| (r.prompt.as_slice(), r.response.as_slice())), self.pad);
        let t = batch.input_ids.first().map_or(0, Vec::len);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (b, (ids, rmask)) in batch.input_ids.iter().zip(&batch.response_mask).enumerate() {
            // Position j − 1 predicts response token j.
            for (j, _) in rmask.iter().enumerate().filter(|(_, &m)| m == 1) {
                positions.push((b * t + j - 1) as u32);
                targets.push(ids[j]);
            }
        }
        let ids = batch.input_ids.concat();
        let mask = batch.attention_mask;
        let input = Tensor::from_vec(ids, (rows.len(), t), &self.device)?;
        let hidden = student.lm.forward_hidden(&input, &AttentionMask::from_rows(&mask)?, None)?;
        let h = hidden.dim(2)?;
        let idx = Tensor::from_slice(&positions, positions.len(), &self.device)?;
        Ok((hidden.reshape(((), h))?.index_select(&idx, 0)?, targets))
    }

    /// The pre-training term of one micro-batch: `(1 − r)·CE + r·H(p, q)`, token-averaged over
    /// the window.
    fn pt_loss(&self, student: &Model, b: &LmBatch) -> Result<(Tensor, Stats)> {
        let w = vec![1.0 / self.window_pt_tokens.max(1) as f32; b.num_targets()];
        let r = self.cfg.pt_kd_ratio;
        let teacher = (r != 0.0).then_some((&self.teacher, Divergence::SoftCrossEntropy, r));
        let out = batch_head_loss(student, teacher, b, &w)?;
        let mut stats = Stats::from([("pt_lm".to_string(), out.target)]);
        if r != 0.0 {
            stats.insert("pt_kd".into(), out.kd);
        }
        Ok((out.loss, stats))
    }
}

/// Minibatches of `batch` rollout indices for each inner epoch (a fresh permutation per epoch,
/// derived from the seed, iteration and epoch; an incomplete last minibatch is dropped).
fn plan_minibatches(n: usize, batch: usize, epochs: usize, seed: u64, iteration: u64) -> Vec<Vec<usize>> {
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
fn rollout_stats(buffer: &[Rollout], cfg: &DistillConfig) -> Stats {
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

impl Task for DistillTask {
    fn begin_step(&mut self, student: &Model, _step: usize) -> Result<f64> {
        if self.schedule.len() < self.next_minibatch + self.grad_accum {
            self.collect(student)?;
            if self.schedule.len() < self.grad_accum {
                bail!(
                    "a buffer of {} rollouts gives {} minibatches of {}, fewer than grad_accum = {}",
                    self.cfg.num_rollouts,
                    self.schedule.len(),
                    self.batch_size,
                    self.grad_accum
                );
            }
        }
        self.window = self.schedule[self.next_minibatch..self.next_minibatch + self.grad_accum].to_vec();
        self.next_minibatch += self.grad_accum;
        self.window_tokens = self.window.iter().flatten().map(|&i| self.buffer[i].response.len()).sum();
        self.pt_window.clear();
        if self.cfg.pt {
            for _ in 0..self.grad_accum {
                let idx = self.pt_order.next(self.batch_size.min(self.corpus.len()));
                let chunks: Vec<&Vec<u32>> = idx.iter().map(|&i| &self.corpus[i]).collect();
                self.pt_window.push(LmBatch::from_chunks(&chunks, self.pad, &self.device)?);
            }
        }
        self.window_pt_tokens = self.pt_window.iter().map(LmBatch::num_targets).sum();
        // Each term normalises itself over the window (its own token count).
        Ok(1.0)
    }

    fn micro_batches(&self) -> usize {
        self.window.len()
    }

    fn micro_loss(&mut self, student: &Model, i: usize, _norm: f64) -> Result<(Tensor, Stats)> {
        let rows: Vec<&Rollout> = self.window[i].iter().map(|&j| &self.buffer[j]).collect();
        let (hidden, targets) = self.response_hidden(student, &rows)?;
        let n = targets.len();
        let adv = advantages(&rows.iter().map(|r| r.rewards.clone()).collect::<Vec<_>>(), &self.cfg.policy);
        let flat = |f: &dyn Fn(&Rollout) -> &Vec<f32>| -> Vec<f32> {
            rows.iter().flat_map(|r| f(r).iter().copied()).collect()
        };
        let old = flat(&|r| &r.logq_old);
        let importance = flat(&|r| &r.importance);
        let adv: Vec<f32> = rows.iter().zip(&adv).flat_map(|(r, a)| a[..r.response.len()].iter().copied()).collect();
        let weight = 1.0 / self.window_tokens.max(1) as f32;
        let weights = vec![weight; n];
        // The PG surrogate and the single-step reverse KL share one pass of the LM heads over
        // the response positions; the teacher's logits come from the hidden states kept at
        // sampling time.
        let policy = PolicyTokens {
            logq_old: &old,
            importance: &importance,
            advantages: &adv,
            weights: &weights,
            clip: self.cfg.policy.clip_ratio,
        };
        let single_weights: Vec<f32> = if self.cfg.single_step_weighted {
            importance.iter().map(|&x| x * weight).collect()
        } else {
            weights.clone()
        };
        let t_hidden = if self.cfg.single_step {
            let hidden: Vec<Tensor> = rows
                .iter()
                .map(|r| r.teacher_hidden.clone().context("rollout without teacher states"))
                .collect::<Result<_>>()?;
            Some(Tensor::cat(&hidden, 0)?)
        } else {
            None
        };
        let single = t_hidden.as_ref().map(|h| TeacherHead {
            hidden: h,
            head: self.teacher.lm.lm_head_weight(),
            kind: Divergence::ReverseKl,
            coef: 1.0,
            weights: &single_weights,
        });
        let out = head_loss(&hidden, student.lm.lm_head_weight(), &targets, TargetTerm::Policy(policy), single, None)?;
        let mut stats = Stats::from([("pg".to_string(), out.target), ("tokens".to_string(), n as f64)]);
        if self.cfg.single_step {
            stats.insert("single".into(), out.kd);
        }
        let mut loss = out.loss;
        if self.cfg.pt {
            let b = self.pt_window[i].clone();
            let (pt, s) = self.pt_loss(student, &b)?;
            stats.insert("pt".into(), pt.to_scalar::<f32>()? as f64);
            *stats.entry("tokens".into()).or_default() += b.num_targets() as f64;
            stats.extend(s);
            loss = (loss + (pt * self.cfg.pt_coef)?)?;
        }
        if i == 0 {
            stats.extend(self.rollout_stats.clone());
        }
        Ok((loss, stats))
    }

    fn validate(&mut self, student: &Model) -> Result<Stats> {
        let (mut ce, mut tokens) = (0f64, 0usize);
        for chunk in self.valid.chunks(self.batch_size) {
            let exs: Vec<&InstructExample> = chunk.iter().collect();
            let b = LmBatch::from_examples(&exs, self.pad, &self.device)?;
            let hidden = student.lm.forward_hidden(&b.input_ids, &b.mask, None)?;
            let logits = student.lm.logits(&b.gather(&hidden)?)?;
            ce += cross_entropy(&logits, &b.targets, &vec![1.0; b.num_targets()])?.to_scalar::<f32>()? as f64;
            tokens += b.num_targets();
        }
        // Pure student samples on validation prompts, scored by the teacher: k3 estimate of
        // the per-token reverse KL and the response length (fixed seed: comparable over time).
        let prompts: Vec<Vec<u32>> =
            self.valid.iter().take(self.cfg.valid_rollouts).map(|e| e.prompt.clone()).collect();
        let (mut lp, mut lq, mut lens, mut texts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (k, chunk) in prompts.chunks(self.cfg.rollout_batch.max(1)).enumerate() {
            let longest = chunk.iter().map(Vec::len).max().unwrap_or(0);
            let cfg = self.sampling(longest, 0.0, false);
            let start = (k * self.cfg.rollout_batch) as u64;
            let mut rngs = row_rngs(self.seed ^ VALID_STREAM_SALT, start..start + chunk.len() as u64);
            let r = generate_mixed(
                student.lm.as_ref(),
                self.teacher.lm.as_ref(),
                chunk,
                &self.eos,
                self.pad,
                &cfg,
                &mut rngs,
            )?;
            lp.extend(r.logp.iter().flatten());
            lq.extend(r.logq.iter().flatten());
            lens.extend(r.generation.responses.iter().map(|y| y.len() as f64));
            if let Some(tok) = &self.teacher.tokenizer {
                for y in &r.generation.responses {
                    texts.push(response_text(tok, y, &self.eos)?);
                }
            }
        }
        let mut out = Stats::from([
            ("val_loss".to_string(), ce / tokens.max(1) as f64),
            ("val_rev_kl_k3".to_string(), k3_estimate(&lp, &lq)),
            ("val_len".to_string(), lens.iter().sum::<f64>() / lens.len().max(1) as f64),
        ]);
        if !texts.is_empty() {
            let refs: Vec<Vec<String>> = self.valid.iter().take(texts.len()).map(|e| e.references.clone()).collect();
            out.insert("val_rougeL".into(), mean_rouge_l(&texts, &refs));
        }
        Ok(out)
    }

    fn state(&self) -> Result<TaskState> {
        let mut tensors = std::collections::HashMap::new();
        for (i, r) in self.buffer.iter().enumerate() {
            if let Some(h) = &r.teacher_hidden {
                tensors.insert(format!("teacher_hidden.{i}"), h.clone());
            }
        }
        let json = json!({
            "prompt_order": self.prompt_order,
            "pt_order": self.pt_order,
            "iteration": self.iteration,
            "next_minibatch": self.next_minibatch,
            "schedule": self.schedule,
            "buffer": self.buffer,
            "rollout_stats": self.rollout_stats,
        });
        Ok(TaskState { json, tensors })
    }

    fn load_state(&mut self, state: TaskState) -> Result<()> {
        let j = state.json;
        let field = |k: &str| j.get(k).cloned().with_context(|| format!("distill state has no `{k}`"));
        self.prompt_order = serde_json::from_value::<DataOrder>(field("prompt_order")?)?.restored();
        self.pt_order = serde_json::from_value::<DataOrder>(field("pt_order")?)?.restored();
        self.iteration = serde_json::from_value(field("iteration")?)?;
        self.next_minibatch = serde_json::from_value(field("next_minibatch")?)?;
        self.schedule = serde_json::from_value(field("schedule")?)?;
        self.buffer = serde_json::from_value(field("buffer")?)?;
        self.rollout_stats = serde_json::from_value(field("rollout_stats")?)?;
        for (i, r) in self.buffer.iter_mut().enumerate() {
            r.teacher_hidden = state.tensors.get(&format!("teacher_hidden.{i}")).cloned();
        }
        Ok(())
    }
}
