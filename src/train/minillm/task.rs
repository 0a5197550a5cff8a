//! MiniLLM phase 2 as a [`Task`] (REFERENCE.md §1–5): collect a buffer of teacher-mixed
//! rollouts, then run several inner epochs of updates over it with the clipped,
//! importance-weighted policy gradient (long-term part), the exact token-level reverse KL
//! (single-step part) and the pre-training term.
//!
//! The teacher runs once per rollout: its log-probabilities of the sampled tokens and its final
//! hidden states at every response position are kept from the sampling pass; the single-step
//! term recomputes the teacher's logits from those states with one LM-head product.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde_json::json;

use super::config::DistillConfig;
use super::rollout::{
    hidden_tensors, plan_minibatches, rescore_rollouts, restore_hidden, rollout_stats, rollouts_from_samples, Rollout,
};
use crate::data::batch::LmBatch;
use crate::data::instruct::InstructExample;
use crate::generate::{consecutive_rows, MixedSampling, Sampler, SamplingConfig};
use crate::loss::policy::{advantages_padded, k3_estimate};
use crate::loss::{head_loss, Divergence, PolicyTokens, TargetTerm, TeacherHead};
use crate::model::Model;
use crate::train::data_order::DataOrder;
use crate::train::objective::{batch_head_loss, TeacherTerm};
use crate::train::responses::sample_pairs;
use crate::train::trainer::{add_seconds, Stats, Task, TaskState, Window};
use crate::train::validation::{reference_loss, samples_rouge_l};
use std::time::Instant;

/// Salt of the validation sampling seed, so validation samples never share a stream with
/// training rollouts.
const VALID_STREAM_SALT: u64 = 0x5641_4c49_4421;

/// What a distillation task is built from.
pub struct DistillData {
    /// Training prompts (token ids; responses are not used).
    pub prompts: Vec<Vec<u32>>,
    /// Validation examples (LM loss on references, reverse KL on sampled prompts).
    pub valid: Vec<InstructExample>,
    /// Pre-training chunks (may be empty when the term is off).
    pub corpus: Vec<Vec<u32>>,
}

/// The distillation task.
pub struct DistillTask {
    cfg: DistillConfig,
    teacher: Model,
    data: DistillData,
    seed: u64,
    prompt_order: DataOrder,
    pt_order: DataOrder,
    iteration: u64,
    buffer: Vec<Rollout>,
    schedule: Vec<Vec<usize>>,
    next_minibatch: usize,
    window: Vec<Vec<usize>>,
    /// Advantages of each micro-batch's response tokens, computed over the whole window.
    window_advantages: Vec<Vec<f32>>,
    pt_window: Vec<LmBatch>,
    window_tokens: usize,
    window_pt_tokens: usize,
    rollout_stats: Stats,
    data_stats: Stats,
    /// Seconds spent collecting rollouts and in the pre-training term since last reported.
    phase_seconds: Stats,
}

impl DistillTask {
    /// A task distilling `teacher` into the student it is trained with; data order and
    /// sampling streams derive from `seed`.
    pub fn new(cfg: DistillConfig, teacher: Model, data: DistillData, seed: u64) -> Result<Self> {
        cfg.validate()?;
        if data.prompts.is_empty() {
            bail!("no training prompts");
        }
        if cfg.pt && data.corpus.is_empty() {
            bail!("the pre-training term is on but no corpus was given (set [data] corpus or turn pt off)");
        }
        let prompt_order = DataOrder::new(data.prompts.len(), seed);
        let pt_order = DataOrder::new(data.corpus.len().max(1), seed.wrapping_add(1));
        Ok(Self {
            cfg,
            teacher,
            data,
            seed,
            prompt_order,
            pt_order,
            iteration: 0,
            buffer: Vec::new(),
            schedule: Vec::new(),
            next_minibatch: 0,
            window: Vec::new(),
            window_advantages: Vec::new(),
            pt_window: Vec::new(),
            window_tokens: 0,
            window_pt_tokens: 0,
            rollout_stats: Stats::new(),
            data_stats: Stats::new(),
            phase_seconds: Stats::new(),
        })
    }

    /// Records the counts describing the data (see [`Task::data_stats`]).
    pub fn with_data_stats(mut self, stats: Stats) -> Self {
        self.data_stats = stats;
        self
    }

    fn sampling(&self, alpha: f32, keep_teacher_hidden: bool) -> MixedSampling {
        MixedSampling {
            alpha,
            max_new_tokens: self.cfg.max_new_tokens,
            max_length: Some(self.cfg.max_len),
            keep_teacher_hidden,
            record_forward_kl: false,
        }
    }

    /// Replaces the rollout buffer with `buffer` (e.g. stored responses re-scored with
    /// [`rescore_rollouts`]) and plans its minibatches of
    /// `batch_size`, as a collection would; the next steps train on it.
    pub fn replace_buffer(&mut self, buffer: Vec<Rollout>, batch_size: usize) {
        self.rollout_stats = rollout_stats(&buffer, &self.cfg);
        self.schedule = plan_minibatches(buffer.len(), batch_size, self.cfg.inner_epochs, self.seed, self.iteration);
        self.buffer = buffer;
        self.next_minibatch = 0;
        self.iteration += 1;
    }

    /// Collects a new buffer of rollouts with the current student and plans its minibatches.
    fn collect(&mut self, student: &Model, batch_size: usize) -> Result<()> {
        let t0 = Instant::now();
        let n = self.cfg.num_rollouts;
        let chunk = self.cfg.rollout_batch.min(self.data.prompts.len());
        let mut prompts = Vec::with_capacity(n);
        while prompts.len() < n {
            let take = chunk.min(n - prompts.len());
            prompts.extend(self.prompt_order.next(take).into_iter().map(|i| self.data.prompts[i].clone()));
        }
        let first_row = self.iteration * n as u64;
        let buffer = if self.cfg.student_only_sampling() {
            // No teacher in the loop while sampling: the student decodes alone, then both models
            // score the finished samples in one forward pass each (OPD's collection).
            let sampling = SamplingConfig {
                max_length: Some(self.cfg.max_len),
                ..SamplingConfig::sampling(self.cfg.max_new_tokens)
            };
            let pairs = sample_pairs(student, &sampling, self.seed, &prompts, first_row, chunk)?;
            let t_score = Instant::now();
            let scored = rescore_rollouts(student, &self.teacher, &pairs, &self.cfg)?;
            add_seconds(&mut self.phase_seconds, "collect_scoring", t_score);
            scored
        } else {
            let cfg = self.sampling(self.cfg.alpha, self.cfg.single_step);
            let rows = consecutive_rows(first_row, n);
            let snapshot = student.decoding_snapshot()?;
            let decoder = snapshot.as_ref().unwrap_or(student);
            let samples = Sampler::mixed(decoder, &self.teacher, &cfg).decode_in_chunks(
                &prompts,
                self.seed,
                &rows,
                chunk,
                |_, _| Ok(()),
            )?;
            rollouts_from_samples(samples, chunk, &self.cfg)
        };
        self.replace_buffer(buffer, batch_size);
        add_seconds(&mut self.phase_seconds, "collect", t0);
        Ok(())
    }

    /// The pre-training term of one micro-batch: `(1 − r)·CE + r·H(p, q)`, token-averaged over
    /// the window.
    fn pt_loss(&self, student: &Model, b: &LmBatch) -> Result<(Tensor, Stats)> {
        let w = vec![1.0 / self.window_pt_tokens.max(1) as f32; b.num_targets()];
        let r = self.cfg.pt_kd_ratio;
        let teacher = (r != 0.0).then_some(TeacherTerm {
            teacher: &self.teacher,
            divergence: Divergence::SoftCrossEntropy,
            ratio: r,
            temperature: 1.0,
        });
        let out = batch_head_loss(student, teacher, b, &w)?;
        let mut stats = Stats::from([("pt_lm".to_string(), out.target)]);
        if r != 0.0 {
            stats.insert("pt_kd".into(), out.kd);
        }
        Ok((out.loss, stats))
    }
}

impl Task for DistillTask {
    fn data_stats(&self) -> Stats {
        let mut s = self.data_stats.clone();
        s.insert("corpus_chunks".into(), self.data.corpus.len() as f64);
        s
    }

    fn take_phase_seconds(&mut self) -> Stats {
        std::mem::take(&mut self.phase_seconds)
    }

    fn begin_step(&mut self, student: &Model, _step: usize, window: Window) -> Result<()> {
        let Window { batch_size, grad_accum } = window;
        if self.cfg.num_rollouts < batch_size {
            bail!("distill.num_rollouts ({}) must be at least train.batch_size ({batch_size})", self.cfg.num_rollouts);
        }
        if self.schedule.len() < self.next_minibatch + grad_accum {
            self.collect(student, batch_size)?;
            if self.schedule.len() < grad_accum {
                bail!(
                    "a buffer of {} rollouts gives {} minibatches of {batch_size}, fewer than train.grad_accum = {grad_accum}",
                    self.cfg.num_rollouts,
                    self.schedule.len(),
                );
            }
        }
        self.window = self.schedule[self.next_minibatch..self.next_minibatch + grad_accum].to_vec();
        self.next_minibatch += grad_accum;
        self.window_tokens = self.window.iter().flatten().map(|&i| self.buffer[i].response.len()).sum();
        // Returns and whitening see the whole window (the optimizer step's minibatch), so that
        // train.grad_accum changes memory, not the update. The released trainer whitens each
        // device's micro-batch; with grad_accum = 1 the two agree. Whitening covers the padded
        // [rows × width] table: width = the longest response, or (released padding) the widest
        // generation batch among the rows.
        let rows = || self.window.iter().flatten().map(|&i| &self.buffer[i]);
        let rewards: Vec<Vec<f32>> = rows().map(|r| r.rewards.clone()).collect();
        let width = rows()
            .map(
                |r| if self.cfg.released_padding { r.generation_width.max(r.response.len()) } else { r.response.len() },
            )
            .max()
            .unwrap_or(0);
        let mut adv = advantages_padded(&rewards, width, &self.cfg.policy).into_iter();
        self.window_advantages = self
            .window
            .iter()
            .map(|rows| {
                rows.iter().zip(adv.by_ref()).flat_map(|(&i, a)| a[..self.buffer[i].response.len()].to_vec()).collect()
            })
            .collect();
        self.pt_window.clear();
        if self.cfg.pt {
            for _ in 0..grad_accum {
                let idx = self.pt_order.next(batch_size.min(self.data.corpus.len()));
                let chunks: Vec<&Vec<u32>> = idx.iter().map(|&i| &self.data.corpus[i]).collect();
                self.pt_window.push(LmBatch::from_chunks(&chunks, student.pad_id(), &student.device())?);
            }
        }
        self.window_pt_tokens = self.pt_window.iter().map(LmBatch::num_targets).sum();
        Ok(())
    }

    fn micro_batches(&self) -> usize {
        self.window.len()
    }

    fn micro_loss(&mut self, student: &Model, i: usize) -> Result<(Tensor, Stats)> {
        let rows: Vec<&Rollout> = self.window[i].iter().map(|&j| &self.buffer[j]).collect();
        let pairs: Vec<(&[u32], &[u32])> = rows.iter().map(|r| (r.prompt.as_slice(), r.response.as_slice())).collect();
        let batch = LmBatch::from_rollouts(&pairs, student.pad_id(), &student.device())?;
        let hidden = batch.gather(&student.lm.forward_hidden(&batch.input_ids, &batch.mask, None)?)?;
        let n = batch.num_targets();
        let flat = |f: &dyn Fn(&Rollout) -> &Vec<f32>| -> Vec<f32> {
            rows.iter().flat_map(|r| f(r).iter().copied()).collect()
        };
        let old = flat(&|r| &r.logq_old);
        let importance = flat(&|r| &r.importance);
        let adv = &self.window_advantages[i];
        // Each term normalises itself over the window (its own token count).
        let weight = 1.0 / self.window_tokens.max(1) as f32;
        let weights = vec![weight; n];
        // The PG surrogate and the single-step reverse KL share one pass of the LM heads over
        // the response positions; the teacher's logits come from the hidden states kept at
        // sampling time.
        let policy = PolicyTokens {
            logq_old: &old,
            importance: &importance,
            advantages: adv,
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
            packed_head: self.teacher.lm.lm_head_packed(),
            kind: Divergence::ReverseKl,
            coef: 1.0,
            weights: &single_weights,
        });
        let out =
            head_loss(&hidden, student.lm.lm_head_weight(), &batch.targets, TargetTerm::Policy(policy), single, None)?;
        let mut stats = Stats::from([("pg".to_string(), out.target), ("tokens".to_string(), n as f64)]);
        if self.cfg.single_step {
            stats.insert("single".into(), out.kd);
        }
        let mut loss = out.loss;
        if self.cfg.pt {
            let t = Instant::now();
            let (pt, s) = self.pt_loss(student, &self.pt_window[i])?;
            add_seconds(&mut self.phase_seconds, "pt_forward", t);
            stats.insert("pt".into(), pt.to_scalar::<f32>()? as f64);
            *stats.entry("tokens".into()).or_default() += self.pt_window[i].num_targets() as f64;
            stats.extend(s);
            loss = (loss + (pt * self.cfg.pt_coef)?)?;
        }
        if i == 0 {
            stats.extend(self.rollout_stats.clone());
        }
        Ok((loss, stats))
    }

    fn validate(&mut self, student: &Model, batch_size: usize) -> Result<Stats> {
        let loss = reference_loss(student, None, &self.data.valid, batch_size)?;
        // Pure student samples on validation prompts, scored by the teacher: k3 estimate of
        // the per-token reverse KL, the response length and Rouge-L (fixed seed: comparable
        // over time).
        let examples = &self.data.valid[..self.cfg.valid_rollouts.min(self.data.valid.len())];
        let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt.clone()).collect();
        let cfg = self.sampling(0.0, false);
        let snapshot = student.decoding_snapshot()?;
        let samples = Sampler::mixed(snapshot.as_ref().unwrap_or(student), &self.teacher, &cfg).decode_in_chunks(
            &prompts,
            self.seed ^ VALID_STREAM_SALT,
            &consecutive_rows(0, prompts.len()),
            self.cfg.rollout_batch,
            |_, _| Ok(()),
        )?;
        let lp: Vec<f32> = samples.iter().flat_map(|s| s.logp.iter().copied()).collect();
        let lq: Vec<f32> = samples.iter().flat_map(|s| s.logq.iter().copied()).collect();
        let len = samples.iter().map(|s| s.response.len() as f64).sum::<f64>() / samples.len().max(1) as f64;
        let mut out = Stats::from([
            ("val_loss".to_string(), loss.ce),
            ("val_rev_kl_k3".to_string(), k3_estimate(&lp, &lq)),
            ("val_len".to_string(), len),
        ]);
        if let Some(tok) = &student.tokenizer {
            let (rouge, _) = samples_rouge_l(tok, &student.eos_token_ids, &samples, examples)?;
            out.insert("val_rougeL".into(), rouge);
        }
        Ok(out)
    }

    fn state(&self) -> Result<TaskState> {
        let json = json!({
            "prompt_order": self.prompt_order,
            "pt_order": self.pt_order,
            "iteration": self.iteration,
            "next_minibatch": self.next_minibatch,
            "schedule": self.schedule,
            "buffer": self.buffer,
            "rollout_stats": self.rollout_stats,
        });
        Ok(TaskState { json, tensors: hidden_tensors(&self.buffer) })
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
        restore_hidden(&mut self.buffer, &state.tensors);
        Ok(())
    }
}
