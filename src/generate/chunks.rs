//! Decoding a list of prompts in fixed-size chunks, one random stream per example: the one
//! helper behind evaluation, validation, SeqKD's teacher generations, exposure bias and the
//! on-policy rollouts.
//!
//! Example `i` draws from the stream `(seed, rows[i])`, so its output depends on its global
//! row id, never on its position in a chunk. The length cap (`max_length` of the settings, and
//! the models' position limits) is applied per chunk by the decoding loop, which leaves each
//! chunk `max_length − longest prompt` new tokens.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::decode::{generate, row_rngs, SamplingConfig};
use super::mixed::{generate_mixed, MixedSampling};
use crate::model::{CausalLm, Model};

/// Which models decode, and how.
#[derive(Clone, Copy)]
enum Kind<'a> {
    Plain { model: &'a dyn CausalLm, cfg: &'a SamplingConfig },
    Mixed { student: &'a dyn CausalLm, teacher: &'a dyn CausalLm, cfg: &'a MixedSampling },
}

/// A configured decoder: one model with its sampling settings, or a student and a teacher
/// with teacher-mixed sampling; plus the end-of-sequence and padding ids.
#[derive(Clone, Copy)]
pub struct Sampler<'a> {
    kind: Kind<'a>,
    eos: &'a [u32],
    pad: u32,
}

/// One decoded example.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The prompt.
    pub prompt: Vec<u32>,
    /// Generated tokens, up to and including the first EOS.
    pub response: Vec<u32>,
    /// Whether the response stopped at EOS (rather than at the length limit).
    pub ended_with_eos: bool,
    /// `log q(y_t | y_<t, x)` of each response token (teacher-mixed sampling only).
    pub logq: Vec<f32>,
    /// `log p(y_t | y_<t, x)` of each response token (teacher-mixed sampling only).
    pub logp: Vec<f32>,
    /// The teacher's final hidden states at the response positions `[len, hidden]` (when
    /// asked for).
    pub teacher_hidden: Option<Tensor>,
    /// KL(p‖q) at each response position (when asked for).
    pub forward_kl: Vec<f32>,
}

impl<'a> Sampler<'a> {
    /// Plain decoding with `model` (its EOS ids and padding id).
    pub fn plain(model: &'a Model, cfg: &'a SamplingConfig) -> Self {
        Self { kind: Kind::Plain { model: model.lm.as_ref(), cfg }, eos: &model.eos_token_ids, pad: model.pad_id() }
    }

    /// Teacher-mixed sampling (the student's EOS ids and padding id).
    pub fn mixed(student: &'a Model, teacher: &'a Model, cfg: &'a MixedSampling) -> Self {
        let kind = Kind::Mixed { student: student.lm.as_ref(), teacher: teacher.lm.as_ref(), cfg };
        Self { kind, eos: &student.eos_token_ids, pad: student.pad_id() }
    }

    /// Plain decoding with a bare network and explicit special ids.
    pub fn plain_lm(model: &'a dyn CausalLm, cfg: &'a SamplingConfig, eos: &'a [u32], pad: u32) -> Self {
        Self { kind: Kind::Plain { model, cfg }, eos, pad }
    }

    /// Teacher-mixed sampling with bare networks and explicit special ids.
    pub fn mixed_lm(
        student: &'a dyn CausalLm,
        teacher: &'a dyn CausalLm,
        cfg: &'a MixedSampling,
        eos: &'a [u32],
        pad: u32,
    ) -> Self {
        Self { kind: Kind::Mixed { student, teacher, cfg }, eos, pad }
    }

    /// Decodes `prompts` in chunks of `batch`; prompt `i` uses the random stream
    /// `(seed, rows[i])`. `on_chunk(first, samples)` sees each chunk as soon as it is decoded
    /// (`first` is the index of its first prompt), e.g. to append it to a resumable file.
    /// Returns every sample in prompt order.
    pub fn decode_in_chunks(
        &self,
        prompts: &[Vec<u32>],
        seed: u64,
        rows: &[u64],
        batch: usize,
        mut on_chunk: impl FnMut(usize, &[Sample]) -> Result<()>,
    ) -> Result<Vec<Sample>> {
        if rows.len() != prompts.len() {
            bail!("{} row ids for {} prompts", rows.len(), prompts.len());
        }
        let batch = batch.max(1);
        let mut out = Vec::with_capacity(prompts.len());
        for (k, chunk) in prompts.chunks(batch).enumerate() {
            let first = k * batch;
            let samples = self.decode(chunk, seed, &rows[first..first + chunk.len()])?;
            on_chunk(first, &samples)?;
            out.extend(samples);
        }
        Ok(out)
    }

    /// Decodes one batch of prompts together.
    fn decode(&self, prompts: &[Vec<u32>], seed: u64, rows: &[u64]) -> Result<Vec<Sample>> {
        let mut rngs = row_rngs(seed, rows.iter().copied());
        match self.kind {
            Kind::Plain { model, cfg } => {
                let g = generate(model, prompts, self.eos, self.pad, cfg, &mut rngs)?;
                Ok(g.prompts
                    .into_iter()
                    .zip(g.responses)
                    .zip(g.ended_with_eos)
                    .map(|((prompt, response), ended_with_eos)| Sample {
                        prompt,
                        response,
                        ended_with_eos,
                        logq: Vec::new(),
                        logp: Vec::new(),
                        teacher_hidden: None,
                        forward_kl: Vec::new(),
                    })
                    .collect())
            }
            Kind::Mixed { student, teacher, cfg } => {
                let r = generate_mixed(student, teacher, prompts, self.eos, self.pad, cfg, &mut rngs)?;
                let mut forward_kl = r.forward_kl.into_iter();
                let mut out = Vec::with_capacity(prompts.len());
                let g = r.generation;
                let rows = g.prompts.into_iter().zip(g.responses).zip(g.ended_with_eos).zip(r.logq).zip(r.logp);
                for (b, ((((prompt, response), ended_with_eos), logq), logp)) in rows.enumerate() {
                    let teacher_hidden = match &r.teacher_hidden {
                        Some(h) => Some(h.get(b)?.narrow(0, 0, response.len())?),
                        None => None,
                    };
                    let forward_kl = forward_kl.next().unwrap_or_default();
                    out.push(Sample { prompt, response, ended_with_eos, logq, logp, teacher_hidden, forward_kl });
                }
                Ok(out)
            }
        }
    }
}

/// The row ids `first, first + 1, …` of `n` consecutive examples.
pub fn consecutive_rows(first: u64, n: usize) -> Vec<u64> {
    (first..first + n as u64).collect()
}
