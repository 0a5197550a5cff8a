//! Where a supervised step's responses come from — the data, samples of the current student
//! or of the teacher, or a replay buffer of earlier student samples — and sampling them with
//! the shared decoding helper (per-row random streams, so a resumed run samples the same).

use anyhow::Result;

use crate::data::batch::LmBatch;
use crate::generate::{consecutive_rows, Sampler, SamplingConfig};
use crate::model::Model;

/// Where a step's responses come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseSource {
    /// The data set's responses.
    Data,
    /// Fresh samples of the current student (on-policy).
    Student,
    /// Samples of the teacher (GKD's `seq_kd`).
    Teacher,
    /// Earlier student samples from a replay buffer (DistiLLM).
    Replay,
}

/// `(prompt, response)` pairs: each prompt with a response `model` samples, prompt `i` with
/// the random stream `(seed, rows_from + i)`, decoded `batch` prompts at a time.
pub fn sample_pairs(
    model: &Model,
    sampling: &SamplingConfig,
    seed: u64,
    prompts: &[Vec<u32>],
    rows_from: u64,
    batch: usize,
) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
    let rows = consecutive_rows(rows_from, prompts.len());
    let snapshot = model.decoding_snapshot()?;
    let decoder = snapshot.as_ref().unwrap_or(model);
    let samples = Sampler::plain(decoder, sampling).decode_in_chunks(prompts, seed, &rows, batch, |_, _| Ok(()))?;
    Ok(samples.into_iter().map(|s| (s.prompt, s.response)).collect())
}

/// A training batch of `pairs` laid out for `student` (targets: the responses).
pub fn pairs_batch(student: &Model, pairs: &[(Vec<u32>, Vec<u32>)]) -> Result<LmBatch> {
    let refs: Vec<(&[u32], &[u32])> = pairs.iter().map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
    LmBatch::from_rollouts(&refs, student.pad_id(), &student.device())
}
