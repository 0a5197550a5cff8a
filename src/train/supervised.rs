//! Supervised training on (prompt, response) pairs: SFT (cross-entropy on response tokens),
//! word-level KD (`(1 − r)·CE + r·D(p ‖ q)` against a teacher), and SeqKD's training phase
//! (the same on teacher-generated responses).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

use super::data_order::DataOrder;
use super::trainer::{Stats, Task, TaskState};
use crate::data::batch::LmBatch;
use crate::data::instruct::InstructExample;
use crate::eval::validate::sampled_rouge_l;
use crate::loss::{head_loss, Divergence, HeadLoss, TargetTerm, TeacherHead};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// The teacher term of word-level KD.
pub struct KdTerm {
    /// The teacher.
    pub teacher: Model,
    /// Weight r of the divergence (1 − r goes to cross-entropy).
    pub ratio: f64,
    /// Which divergence.
    pub divergence: Divergence,
}

/// Settings of sampled Rouge-L validation (for selection by `val_rougeL`).
pub struct RougeValidation {
    /// Decodes the samples.
    pub tokenizer: Tokenizer,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Prompt + response limit.
    pub max_len: usize,
    /// Sampling seed.
    pub seed: u64,
}

/// SFT, or KD when a teacher term is given.
pub struct SupervisedTask {
    train: Vec<InstructExample>,
    valid: Vec<InstructExample>,
    order: DataOrder,
    batch_size: usize,
    grad_accum: usize,
    pad: u32,
    device: Device,
    kd: Option<KdTerm>,
    rouge: Option<RougeValidation>,
    window: Vec<LmBatch>,
}

impl SupervisedTask {
    /// A task over `train`, validated on `valid`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        train: Vec<InstructExample>,
        valid: Vec<InstructExample>,
        batch_size: usize,
        grad_accum: usize,
        seed: u64,
        pad: u32,
        device: Device,
        kd: Option<KdTerm>,
    ) -> Self {
        let order = DataOrder::new(train.len(), seed);
        Self { train, valid, order, batch_size, grad_accum, pad, device, kd, rouge: None, window: Vec::new() }
    }

    /// Also report `val_rougeL` (and `val_len`) from one sampled response per validation
    /// example.
    pub fn with_rouge(mut self, rouge: RougeValidation) -> Self {
        self.rouge = Some(rouge);
        self
    }

    /// `(1 − r)·CE + r·D` (or CE alone), each summed with `weight` per target token.
    fn loss(&self, student: &Model, b: &LmBatch, weight: f32) -> Result<(Tensor, Stats)> {
        let teacher = self.kd.as_ref().map(|kd| (&kd.teacher, kd.divergence, kd.ratio));
        let out = batch_head_loss(student, teacher, b, &vec![weight; b.num_targets()])?;
        let mut stats = Stats::new();
        stats.insert("ce".into(), out.target);
        stats.insert("tokens".into(), b.num_targets() as f64);
        if self.kd.is_some() {
            stats.insert("kd".into(), out.kd);
        }
        Ok((out.loss, stats))
    }
}

/// `(1 − r)·CE + r·D(teacher, student)` at `b`'s target positions (CE alone without a
/// teacher), each weighted by `weights` per target token, through the fused LM-head loss: no
/// `[tokens × vocab]` logits. The teacher is given with its divergence and `r`.
pub(crate) fn batch_head_loss(
    student: &Model,
    teacher: Option<(&Model, Divergence, f64)>,
    b: &LmBatch,
    weights: &[f32],
) -> Result<HeadLoss> {
    let hidden = b.gather(&student.lm.forward_hidden(&b.input_ids, &b.mask, None)?)?;
    let t_hidden = match teacher {
        Some((t, _, _)) => Some(b.gather(&t.lm.forward_hidden(&b.input_ids, &b.mask, None)?.detach())?),
        None => None,
    };
    let head = teacher.zip(t_hidden.as_ref()).map(|((t, kind, coef), hidden)| TeacherHead {
        hidden,
        head: t.lm.lm_head_weight(),
        kind,
        coef,
        weights,
    });
    let ce = TargetTerm::CrossEntropy { weights, coef: 1.0 - teacher.map_or(0.0, |(_, _, r)| r) };
    head_loss(&hidden, student.lm.lm_head_weight(), &b.targets, ce, head, None)
}

impl Task for SupervisedTask {
    fn begin_step(&mut self, _student: &Model, _step: usize) -> Result<f64> {
        self.window.clear();
        let mut tokens = 0;
        for _ in 0..self.grad_accum {
            let idx = self.order.next(self.batch_size);
            let exs: Vec<&InstructExample> = idx.iter().map(|&i| &self.train[i]).collect();
            let b = LmBatch::from_examples(&exs, self.pad, &self.device)?;
            tokens += b.num_targets();
            self.window.push(b);
        }
        Ok(tokens.max(1) as f64)
    }

    fn micro_batches(&self) -> usize {
        self.window.len()
    }

    fn micro_loss(&mut self, student: &Model, i: usize, norm: f64) -> Result<(Tensor, Stats)> {
        let b = self.window[i].clone();
        self.loss(student, &b, (1.0 / norm) as f32)
    }

    fn validate(&mut self, student: &Model) -> Result<Stats> {
        let (mut ce, mut kd, mut tokens) = (0f64, 0f64, 0usize);
        for chunk in self.valid.chunks(self.batch_size) {
            let exs: Vec<&InstructExample> = chunk.iter().collect();
            let b = LmBatch::from_examples(&exs, self.pad, &self.device)?;
            let (_, s) = self.loss(student, &b, 1.0)?;
            ce += s["ce"];
            kd += s.get("kd").copied().unwrap_or(0.0);
            tokens += b.num_targets();
        }
        let mut out = Stats::new();
        out.insert("val_loss".into(), ce / tokens.max(1) as f64);
        if self.kd.is_some() {
            out.insert("val_kd".into(), kd / tokens.max(1) as f64);
        }
        if let Some(r) = &self.rouge {
            let (rouge, len) = sampled_rouge_l(
                student.lm.as_ref(),
                &r.tokenizer,
                &self.valid,
                &r.eos,
                self.pad,
                r.max_len,
                self.batch_size,
                r.seed,
            )?;
            out.insert("val_rougeL".into(), rouge);
            out.insert("val_len".into(), len);
        }
        Ok(out)
    }

    fn state(&self) -> Result<TaskState> {
        Ok(TaskState::json(serde_json::to_value(&self.order)?))
    }

    fn load_state(&mut self, state: TaskState) -> Result<()> {
        let order: DataOrder = serde_json::from_value(state.json).context("restoring the data order")?;
        self.order = order.restored();
        Ok(())
    }
}
