//! Validation for checkpoint selection, shared by every method: the loss on the reference
//! responses (token-averaged cross-entropy, and the teacher divergence where there is one),
//! and the released implementation's sampled criterion — one seed, temperature 1, no n-gram
//! blocking, Rouge-L ×100 of the student's samples against the references.

use anyhow::Result;

use super::objective::{batch_head_loss, TeacherTerm};
use crate::data::batch::LmBatch;
use crate::data::instruct::InstructExample;
use crate::eval::rouge_l_max;
use crate::generate::{consecutive_rows, Sample, Sampler, SamplingConfig};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Token-averaged losses on the references of a validation set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReferenceLoss {
    /// Mean cross-entropy per response token.
    pub ce: f64,
    /// Mean teacher divergence per response token (0 without a teacher).
    pub kd: f64,
}

/// The student's loss on the reference responses of `examples`, in batches of `batch_size`.
pub fn reference_loss(
    student: &Model,
    teacher: Option<TeacherTerm>,
    examples: &[InstructExample],
    batch_size: usize,
) -> Result<ReferenceLoss> {
    let (mut ce, mut kd, mut tokens) = (0f64, 0f64, 0usize);
    for chunk in examples.chunks(batch_size.max(1)) {
        let exs: Vec<&InstructExample> = chunk.iter().collect();
        let b = LmBatch::from_examples(&exs, student.pad_id(), &student.device())?;
        let out = batch_head_loss(student, teacher, &b, &vec![1.0; b.num_targets()])?;
        ce += out.target;
        kd += out.kd;
        tokens += b.num_targets();
    }
    let n = tokens.max(1) as f64;
    Ok(ReferenceLoss { ce: ce / n, kd: kd / n })
}

/// The student's mean cross-entropy per token over corpus chunks (every token after the
/// first of each chunk), in batches of `batch_size`.
pub fn chunks_loss(student: &Model, chunks: &[Vec<u32>], batch_size: usize) -> Result<f64> {
    let (mut ce, mut tokens) = (0f64, 0usize);
    for part in chunks.chunks(batch_size.max(1)) {
        let refs: Vec<&Vec<u32>> = part.iter().collect();
        let b = LmBatch::from_chunks(&refs, student.pad_id(), &student.device())?;
        ce += batch_head_loss(student, None, &b, &vec![1.0; b.num_targets()])?.target;
        tokens += b.num_targets();
    }
    Ok(ce / tokens.max(1) as f64)
}

/// Rouge-L ×100 of texts against their references, averaged (the protocol's reported number).
pub fn mean_rouge_l(predictions: &[String], references: &[Vec<String>]) -> f64 {
    let n = predictions.len().max(1) as f64;
    predictions
        .iter()
        .zip(references)
        .map(|(p, r)| 100.0 * rouge_l_max(p, &r.iter().map(String::as_str).collect::<Vec<_>>()))
        .sum::<f64>()
        / n
}

/// Mean Rouge-L ×100 of `samples` (decoded with `tok`) against the references of the
/// examples they were sampled for, and their mean length in tokens.
pub fn samples_rouge_l(
    tok: &Tokenizer,
    eos: &[u32],
    samples: &[Sample],
    examples: &[InstructExample],
) -> Result<(f64, f64)> {
    let texts: Vec<String> = samples.iter().map(|s| tok.decode_response(&s.response, eos)).collect::<Result<_>>()?;
    let refs: Vec<Vec<String>> = examples.iter().take(texts.len()).map(|e| e.references.clone()).collect();
    let len = samples.iter().map(|s| s.response.len() as f64).sum::<f64>() / samples.len().max(1) as f64;
    Ok((mean_rouge_l(&texts, &refs), len))
}

/// Samples one response per example (pure sampling, seeded, at most `max_len` tokens in all)
/// and returns the mean Rouge-L ×100 and the mean response length in tokens.
pub fn sampled_rouge_l(
    model: &Model,
    examples: &[InstructExample],
    max_len: usize,
    batch: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let prompts: Vec<Vec<u32>> = examples.iter().map(|e| e.prompt.clone()).collect();
    let cfg = SamplingConfig { max_length: Some(max_len), ..SamplingConfig::sampling(usize::MAX) };
    let snapshot = model.decoding_snapshot()?;
    let samples = Sampler::plain(snapshot.as_ref().unwrap_or(model), &cfg).decode_in_chunks(
        &prompts,
        seed,
        &consecutive_rows(0, prompts.len()),
        batch,
        |_, _| Ok(()),
    )?;
    samples_rouge_l(model.tokenizer()?, &model.eos_token_ids, &samples, examples)
}
