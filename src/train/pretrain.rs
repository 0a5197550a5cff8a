//! Pre-training (language modelling) on a plain-text corpus: cross-entropy on every token of
//! fixed-length chunks. The paper's teacher and student are pre-trained on the corpus its PT
//! term uses; `minillm pretrain` gives models made from scratch that starting point.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;

use super::data_order::DataOrder;
use super::objective::batch_head_loss;
use super::trainer::{Stats, Task, TaskState, Window};
use super::validation::chunks_loss;
use crate::data::batch::LmBatch;
use crate::model::Model;

/// Language modelling on corpus chunks.
pub struct PretrainTask {
    train: Vec<Vec<u32>>,
    valid: Vec<Vec<u32>>,
    order: DataOrder,
    window: Vec<LmBatch>,
    window_tokens: usize,
    data_stats: Stats,
}

impl PretrainTask {
    /// A task over the chunks of `train` (shuffled from `seed`), validated on `valid`.
    pub fn new(train: Vec<Vec<u32>>, valid: Vec<Vec<u32>>, seed: u64) -> Result<Self> {
        if train.is_empty() || valid.is_empty() {
            bail!("pre-training needs training and validation chunks");
        }
        let data_stats = Stats::from([
            ("train_chunks".to_string(), train.len() as f64),
            ("valid_chunks".to_string(), valid.len() as f64),
        ]);
        let order = DataOrder::new(train.len(), seed);
        Ok(Self { train, valid, order, window: Vec::new(), window_tokens: 0, data_stats })
    }
}

impl Task for PretrainTask {
    fn begin_step(&mut self, student: &Model, _step: usize, window: Window) -> Result<()> {
        self.window.clear();
        for _ in 0..window.grad_accum {
            let idx = self.order.next(window.batch_size);
            let chunks: Vec<&Vec<u32>> = idx.iter().map(|&i| &self.train[i]).collect();
            self.window.push(LmBatch::from_chunks(&chunks, student.pad_id(), &student.device())?);
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
        let out = batch_head_loss(student, None, b, &vec![weight; b.num_targets()])?;
        let stats = Stats::from([("ce".to_string(), out.target), ("tokens".to_string(), b.num_targets() as f64)]);
        Ok((out.loss, stats))
    }

    fn validate(&mut self, student: &Model, batch_size: usize) -> Result<Stats> {
        Ok(Stats::from([("val_loss".to_string(), chunks_loss(student, &self.valid, batch_size)?)]))
    }

    fn state(&self) -> Result<TaskState> {
        Ok(TaskState::json(serde_json::to_value(&self.order)?))
    }

    fn load_state(&mut self, state: TaskState) -> Result<()> {
        let order: DataOrder = serde_json::from_value(state.json).context("restoring the data order")?;
        self.order = order.restored();
        Ok(())
    }

    fn data_stats(&self) -> Stats {
        self.data_stats.clone()
    }
}
