//! Supervised training on (prompt, response) pairs: SFT (cross-entropy on response tokens),
//! word-level KD (`(1 − r)·CE + r·D(p ‖ q)` against a teacher), SeqKD's training phase
//! (the same on teacher-generated responses, see [`super::seqkd`]), GKD (the divergence alone,
//! on responses a [`ResponseSchedule`] draws from the student, the teacher or the data) and
//! DistiLLM (a skew divergence on responses its [`AdaptiveOffPolicy`] draws from fresh student
//! samples, a replay buffer or the data).

use anyhow::{Context, Result};
use candle_core::Tensor;

use super::data_order::DataOrder;
use super::distillm::AdaptiveOffPolicy;
use super::gkd::ResponseSchedule;
use super::objective::{batch_head_loss, TeacherTerm};
use super::responses::{pairs_batch, sample_pairs, ResponseSource};
use super::trainer::{Stats, Task, TaskState, Window};
use super::validation::{reference_loss, sampled_rouge_l};
use crate::data::batch::LmBatch;
use crate::data::instruct::InstructExample;
use crate::generate::SamplingConfig;
use crate::loss::Divergence;
use crate::model::Model;

/// The teacher term of word-level KD.
pub struct KdTerm {
    /// The teacher.
    pub teacher: Model,
    /// Weight r of the divergence (1 − r goes to cross-entropy).
    pub ratio: f64,
    /// Which divergence.
    pub divergence: Divergence,
    /// Softmax temperature of both models in the divergence (GKD; 1 for KD).
    pub temperature: f64,
}

impl KdTerm {
    /// Word-level KD's term: `ratio · D` at temperature 1.
    pub fn new(teacher: Model, ratio: f64, divergence: Divergence) -> Self {
        Self { teacher, ratio, divergence, temperature: 1.0 }
    }

    fn term(&self) -> TeacherTerm<'_> {
        TeacherTerm {
            teacher: &self.teacher,
            divergence: self.divergence,
            ratio: self.ratio,
            temperature: self.temperature,
        }
    }
}

/// SFT, or KD when a teacher term is given.
pub struct SupervisedTask {
    train: Vec<InstructExample>,
    valid: Vec<InstructExample>,
    seed: u64,
    order: DataOrder,
    kd: Option<KdTerm>,
    /// Prompt + response limit of sampled validation Rouge-L (off when `None`).
    rouge_max_len: Option<usize>,
    /// Where each step's responses come from (GKD); the data's when `None`.
    responses: Option<ResponseSchedule>,
    /// DistiLLM's adaptive schedule and how it samples the student.
    adaptive: Option<(AdaptiveOffPolicy, SamplingConfig)>,
    window: Vec<LmBatch>,
    window_source: ResponseSource,
    window_tokens: usize,
    data_stats: Stats,
}

impl SupervisedTask {
    /// A task over `train` (shuffled from `seed`), validated on `valid`.
    pub fn new(train: Vec<InstructExample>, valid: Vec<InstructExample>, seed: u64, kd: Option<KdTerm>) -> Self {
        let order = DataOrder::new(train.len(), seed);
        Self {
            train,
            valid,
            seed,
            order,
            kd,
            rouge_max_len: None,
            responses: None,
            adaptive: None,
            window: Vec::new(),
            window_source: ResponseSource::Data,
            window_tokens: 0,
            data_stats: Stats::new(),
        }
    }

    /// Also report `val_rougeL` (and `val_len`) from one response per validation example,
    /// sampled with the task's seed within `max_len` tokens.
    pub fn with_rouge(mut self, max_len: usize) -> Self {
        self.rouge_max_len = Some(max_len);
        self
    }
}

impl SupervisedTask {
    /// Draws each step's responses as `schedule` says (GKD): the student's samples, the
    /// teacher's (the KD term's teacher), or the data's.
    pub fn with_responses(mut self, schedule: ResponseSchedule) -> Self {
        self.responses = Some(schedule);
        self
    }

    /// Draws each step's responses as DistiLLM's adaptive `schedule` says, sampling the
    /// student with `sampling`; validation losses update the schedule.
    pub fn with_adaptive(mut self, schedule: AdaptiveOffPolicy, sampling: SamplingConfig) -> Self {
        self.adaptive = Some((schedule, sampling));
        self
    }

    /// DistiLLM's schedule, if any.
    pub fn adaptive(&self) -> Option<&AdaptiveOffPolicy> {
        self.adaptive.as_ref().map(|(a, _)| a)
    }

    /// Records the counts describing the data (see [`Task::data_stats`]).
    pub fn with_data_stats(mut self, stats: Stats) -> Self {
        self.data_stats = stats;
        self
    }
}

impl Task for SupervisedTask {
    fn data_stats(&self) -> Stats {
        self.data_stats.clone()
    }

    fn begin_step(&mut self, student: &Model, step: usize, window: Window) -> Result<()> {
        self.window.clear();
        self.window_source = match (&self.responses, &self.adaptive) {
            (Some(r), _) => r.source(step),
            (None, Some((a, _))) => a.source(step),
            (None, None) => ResponseSource::Data,
        };
        for k in 0..window.grad_accum {
            let idx = self.order.next(window.batch_size);
            let exs: Vec<&InstructExample> = idx.iter().map(|&i| &self.train[i]).collect();
            // Random streams unique to the step and micro-batch: a resumed run samples the same.
            let rows_from = ((step * window.grad_accum + k) * window.batch_size) as u64;
            let batch = match (self.window_source, self.responses.as_ref()) {
                (ResponseSource::Student, Some(r)) => r.sampled_batch(student, student, &exs, rows_from)?,
                (ResponseSource::Student, None) => {
                    let (a, sampling) = self.adaptive.as_mut().context("student samples need a schedule")?;
                    let prompts: Vec<Vec<u32>> = exs.iter().map(|e| e.prompt.clone()).collect();
                    let pairs = sample_pairs(student, sampling, self.seed, &prompts, rows_from, prompts.len())?;
                    a.remember(pairs.iter().cloned());
                    pairs_batch(student, &pairs)?
                }
                (ResponseSource::Replay, _) => {
                    let (a, _) = self.adaptive.as_ref().context("replay needs a schedule")?;
                    pairs_batch(student, &a.replay(window.batch_size, step, k))?
                }
                (ResponseSource::Teacher, Some(r)) => {
                    let teacher = &self.kd.as_ref().context("teacher samples need a teacher")?.teacher;
                    r.sampled_batch(teacher, student, &exs, rows_from)?
                }
                _ => LmBatch::from_examples(&exs, student.pad_id(), &student.device())?,
            };
            self.window.push(batch);
        }
        self.window_tokens = self.window.iter().map(LmBatch::num_targets).sum::<usize>().max(1);
        Ok(())
    }

    fn micro_batches(&self) -> usize {
        self.window.len()
    }

    fn micro_loss(&mut self, student: &Model, i: usize) -> Result<(Tensor, Stats)> {
        let b = &self.window[i];
        let weight = (1.0 / self.window_tokens as f64) as f32;
        let out = batch_head_loss(student, self.kd.as_ref().map(KdTerm::term), b, &vec![weight; b.num_targets()])?;
        let mut stats = Stats::from([("ce".to_string(), out.target), ("tokens".to_string(), b.num_targets() as f64)]);
        if self.kd.is_some() {
            stats.insert("kd".into(), out.kd);
        }
        if (self.responses.is_some() || self.adaptive.is_some()) && i == 0 {
            stats.insert("on_policy".into(), f64::from(self.window_source == ResponseSource::Student));
        }
        if let (Some((a, _)), 0) = (&self.adaptive, i) {
            stats.insert("replay".into(), f64::from(self.window_source == ResponseSource::Replay));
            stats.insert("threshold".into(), a.threshold());
        }
        Ok((out.loss, stats))
    }

    fn validate(&mut self, student: &Model, batch_size: usize) -> Result<Stats> {
        let term = self.kd.as_ref().map(KdTerm::term);
        let loss = reference_loss(student, term, &self.valid, batch_size)?;
        // At a temperature ≠ 1 the pass above scales the logits; the loss reported (and
        // selected on) is the plain cross-entropy.
        let ce = match term {
            Some(t) if t.temperature != 1.0 => reference_loss(student, None, &self.valid, batch_size)?.ce,
            _ => loss.ce,
        };
        let mut out = Stats::from([("val_loss".to_string(), ce)]);
        if let Some((a, _)) = &mut self.adaptive {
            a.observe_validation(ce);
            out.insert("threshold".into(), a.threshold());
            out.insert("replay_buffer".into(), a.buffered() as f64);
        }
        if self.kd.is_some() {
            out.insert("val_kd".into(), loss.kd);
        }
        if let Some(max_len) = self.rouge_max_len {
            let (rouge, len) = sampled_rouge_l(student, &self.valid, max_len, batch_size, self.seed)?;
            out.insert("val_rougeL".into(), rouge);
            out.insert("val_len".into(), len);
        }
        Ok(out)
    }

    fn state(&self) -> Result<TaskState> {
        // The data order alone (as runs made before DistiLLM wrote it), or with the schedule.
        Ok(TaskState::json(match &self.adaptive {
            None => serde_json::to_value(&self.order)?,
            Some((a, _)) => serde_json::json!({"order": self.order, "adaptive": a}),
        }))
    }

    fn load_state(&mut self, state: TaskState) -> Result<()> {
        let mut json = state.json;
        if let (Some((a, _)), Some(saved)) = (&mut self.adaptive, json.get("adaptive")) {
            *a = serde_json::from_value(saved.clone()).context("restoring the DistiLLM schedule")?;
            json = json.get("order").cloned().context("task state without the data order")?;
        }
        let order: DataOrder = serde_json::from_value(json).context("restoring the data order")?;
        self.order = order.restored();
        Ok(())
    }
}
