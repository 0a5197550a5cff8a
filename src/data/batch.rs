//! Batches for the LM head: padded sequences and the positions whose next token is a target
//! (right-padded for training data, the decoding layout for sampled rollouts).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::instruct::InstructExample;
use crate::model::AttentionMask;

/// A right-padded batch; position `j` of a row predicts token `j + 1`.
#[derive(Clone, Debug)]
pub struct LmBatch {
    /// Token ids `[b, t]`.
    pub input_ids: Tensor,
    /// Real-token mask.
    pub mask: AttentionMask,
    /// Flattened index `row · t + j` of every position with a target.
    pub positions: Vec<u32>,
    /// The target token of each such position.
    pub targets: Vec<u32>,
}

impl LmBatch {
    /// Sequences with targets at positions `from[i] − 1 ..` (the tokens from `from[i]` on).
    pub fn new(seqs: &[Vec<u32>], from: &[usize], pad: u32, device: &Device) -> Result<Self> {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * t);
        let mut rows = Vec::with_capacity(seqs.len());
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (b, (s, &f)) in seqs.iter().zip(from).enumerate() {
            ids.extend(s.iter().copied().chain(std::iter::repeat_n(pad, t - s.len())));
            rows.push([vec![1u8; s.len()], vec![0u8; t - s.len()]].concat());
            for (j, &tok) in s.iter().enumerate().skip(f.max(1)) {
                positions.push((b * t + j - 1) as u32);
                targets.push(tok);
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (seqs.len(), t), device)?,
            mask: AttentionMask::from_rows(&rows)?,
            positions,
            targets,
        })
    }

    /// Instruction examples: targets are the response tokens.
    pub fn from_examples(examples: &[&InstructExample], pad: u32, device: &Device) -> Result<Self> {
        let seqs: Vec<Vec<u32>> = examples.iter().map(|e| [e.prompt.clone(), e.response.clone()].concat()).collect();
        let from: Vec<usize> = examples.iter().map(|e| e.prompt.len()).collect();
        Self::new(&seqs, &from, pad, device)
    }

    /// Corpus chunks: every token after the first is a target.
    pub fn from_chunks(chunks: &[&Vec<u32>], pad: u32, device: &Device) -> Result<Self> {
        let seqs: Vec<Vec<u32>> = chunks.iter().map(|c| c.to_vec()).collect();
        Self::new(&seqs, &vec![1; seqs.len()], pad, device)
    }

    /// (prompt, response) pairs in the layout decoding ran in: prompts left-padded to the
    /// longest, then responses right-padded to the longest, so re-scoring reproduces the
    /// sampling-time logits; the targets are the response tokens.
    pub fn from_rollouts(pairs: &[(&[u32], &[u32])], pad: u32, device: &Device) -> Result<Self> {
        let p = pairs.iter().map(|(x, _)| x.len()).max().unwrap_or(0);
        let r = pairs.iter().map(|(_, y)| y.len()).max().unwrap_or(0);
        if p == 0 && r > 0 {
            bail!("a rollout needs a non-empty prompt (its first response token has no prefix)");
        }
        let t = p + r;
        let mut ids = Vec::with_capacity(pairs.len() * t);
        let mut rows = Vec::with_capacity(pairs.len());
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (b, (prompt, response)) in pairs.iter().enumerate() {
            let left = p - prompt.len();
            ids.extend(std::iter::repeat_n(pad, left).chain(prompt.iter().copied()).chain(response.iter().copied()));
            ids.extend(std::iter::repeat_n(pad, r - response.len()));
            rows.push(
                [vec![0u8; left], vec![1u8; prompt.len() + response.len()], vec![0u8; r - response.len()]].concat(),
            );
            // Position j − 1 predicts the token at j.
            for (k, &tok) in response.iter().enumerate() {
                positions.push((b * t + p + k - 1) as u32);
                targets.push(tok);
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (pairs.len(), t), device)?,
            mask: AttentionMask::from_rows(&rows)?,
            positions,
            targets,
        })
    }

    /// Number of target tokens.
    pub fn num_targets(&self) -> usize {
        self.targets.len()
    }

    /// Hidden states `[b, t, h]` gathered at the target positions: `[targets, h]`.
    pub fn gather(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = hidden.dim(2)?;
        let flat = hidden.reshape(((), h))?;
        let idx = Tensor::from_slice(&self.positions, self.positions.len(), hidden.device())?;
        Ok(flat.index_select(&idx, 0)?)
    }
}
