//! Batched incremental decoding with a KV cache per model: the shared decoding loop, and plain
//! generation with one model (greedy, temperature, top-k, top-p, no-repeat-n-gram).
//!
//! Each row has its own random stream, so a row's output does not depend on which other rows
//! share its batch (up to floating-point effects of padding).

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::processors::choose_token;
use crate::model::{AttentionMask, CausalLm, KvCache};

/// Settings of plain (single-model) generation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Cap on prompt + response length (the model's own position limit always applies).
    pub max_length: Option<usize>,
    /// Softmax temperature; 0 means greedy (arg-max) decoding.
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p; 1 disables.
    pub top_p: f32,
    /// Forbid repeating any n-gram of this size (prompt included); 0 disables.
    pub no_repeat_ngram_size: usize,
}

impl SamplingConfig {
    /// Greedy decoding of up to `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, ..Self::sampling(max_new_tokens) }
    }

    /// Pure ancestral sampling at temperature 1 (the evaluation protocol's setting).
    pub fn sampling(max_new_tokens: usize) -> Self {
        Self { max_new_tokens, max_length: None, temperature: 1.0, top_k: 0, top_p: 1.0, no_repeat_ngram_size: 0 }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            bail!("temperature must be a finite number ≥ 0, got {}", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top-p must be in (0, 1], got {}", self.top_p);
        }
        Ok(())
    }
}

/// Generated continuations of a batch of prompts.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The prompts, unpadded.
    pub prompts: Vec<Vec<u32>>,
    /// Generated tokens per row, up to and including the first EOS.
    pub responses: Vec<Vec<u32>>,
    /// Whether each row stopped at EOS (rather than at the length limit).
    pub ended_with_eos: Vec<bool>,
}

/// One random stream per row, derived from a seed and the rows' global indices (so a row's
/// stream does not depend on the batch it lands in).
pub fn row_rngs(seed: u64, rows: impl IntoIterator<Item = u64>) -> Vec<ChaCha8Rng> {
    rows.into_iter()
        .map(|i| {
            let mut r = ChaCha8Rng::seed_from_u64(seed);
            r.set_stream(i);
            r
        })
        .collect()
}

/// What a token chooser returns for one row.
pub(crate) struct Choice {
    pub(crate) token: u32,
    pub(crate) logq: f32,
    pub(crate) logp: f32,
}

/// What the decoding loop produced: tokens and the per-token log-probabilities the chooser
/// reported.
pub(crate) struct Decoded {
    pub(crate) generation: Generation,
    pub(crate) logq: Vec<Vec<f32>>,
    pub(crate) logp: Vec<Vec<f32>>,
    /// Per step, the kept model's final hidden state of every row `[b, hidden]`.
    pub(crate) hidden: Vec<Tensor>,
}

/// The shared decoding loop: prefill, then one token per step for every unfinished row until
/// EOS or the length limit. `choose(state, logits_per_model, history)` picks each row's token
/// with that row's `states` entry (its random stream, what it records).
///
/// The rows' choices of a step run in parallel: each reads only its own logits, history and
/// state, so the tokens are those of choosing row by row. A choice passes over the whole
/// vocabulary several times (softmax, the inverse-CDF draw's serial f64 sums), which at GPT-2's
/// 50,257 tokens and 64 rows took 4% of a decoding run on one thread while the other idled.
#[allow(clippy::too_many_arguments)] // crate-private driver shared by the two public entry points
pub(crate) fn decode<S: Send>(
    models: &[&dyn CausalLm],
    prompts: &[Vec<u32>],
    eos: &[u32],
    pad: u32,
    max_new: usize,
    max_length: Option<usize>,
    keep_hidden: Option<usize>,
    states: &mut [S],
    choose: impl Fn(&mut S, &[&[f32]], &[u32]) -> Result<Choice> + Sync,
) -> Result<Decoded> {
    let b = prompts.len();
    if b == 0 {
        return Ok(Decoded {
            generation: Generation { prompts: vec![], responses: vec![], ended_with_eos: vec![] },
            logq: vec![],
            logp: vec![],
            hidden: vec![],
        });
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        bail!("prompt {i} is empty: decoding needs at least one prompt token");
    }
    // The public entry points check their random streams against the prompts.
    assert_eq!(states.len(), b, "decode: one state per row");
    let p = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut limit = max_length.unwrap_or(usize::MAX);
    for m in models {
        if let Some(mp) = m.info().max_positions {
            limit = limit.min(mp);
        }
    }
    if p >= limit {
        bail!("the longest prompt has {p} tokens, which leaves no room under the length limit of {limit}");
    }
    let steps = max_new.min(limit - p);
    let device = models[0].lm_head_weight().device().clone();

    let mut ids = Vec::with_capacity(b * p);
    let mut rows = Vec::with_capacity(b);
    for pr in prompts {
        ids.extend(std::iter::repeat_n(pad, p - pr.len()).chain(pr.iter().copied()));
        rows.push([vec![0u8; p - pr.len()], vec![1u8; pr.len()]].concat());
    }
    let mut mask = AttentionMask::from_rows(&rows)?;
    let input = Tensor::from_vec(ids, (b, p), &device)?;
    let mut caches: Vec<_> = models.iter().map(|m| m.new_cache()).collect();
    // The rows the models run, by prompt index, in batch order. Rows that finish leave the
    // batch once enough of them have ([`worth_dropping`]), so later steps compute only for the
    // others.
    let mut live: Vec<usize> = (0..b).collect();
    let mut hidden = Vec::new();
    // One step of every model for the live rows: last-position logits, keeping one model's
    // hidden state (of all `b` rows, zeros for rows no longer in the batch).
    let mut step_all =
        |input: &Tensor, mask: &AttentionMask, caches: &mut [KvCache], live: &[usize]| -> Result<Vec<Vec<Vec<f32>>>> {
            let mut out = Vec::with_capacity(models.len());
            for (k, (m, c)) in models.iter().zip(caches.iter_mut()).enumerate() {
                let last = m.forward_hidden_last(input, mask, Some(c))?.detach();
                out.push(m.logits(&last)?.to_dtype(candle_core::DType::F32)?.to_vec2()?);
                if keep_hidden == Some(k) {
                    hidden.push(if live.len() == b { last } else { spread_rows(&last, live, b)? });
                }
            }
            Ok(out)
        };
    let mut logits = step_all(&input, &mask, &mut caches, &live)?;

    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut responses = vec![Vec::new(); b];
    let (mut logq, mut logp) = (vec![Vec::new(); b], vec![Vec::new(); b]);
    let mut done = vec![false; b];
    let mut ended = vec![false; b];
    for step in 0..steps {
        // Where each live row's logits sit in this step's batch.
        let mut slot = vec![usize::MAX; b];
        for (i, &row) in live.iter().enumerate() {
            slot[row] = i;
        }
        let mut next = vec![pad; b];
        let mut active: Vec<bool> = live.iter().map(|&row| !done[row]).collect();
        let choices: Vec<Result<Option<Choice>>> = states
            .par_iter_mut()
            .zip(&history)
            .enumerate()
            .map(|(row, (state, history))| {
                if done[row] {
                    return Ok(None);
                }
                let per_model: Vec<&[f32]> = logits.iter().map(|l| l[slot[row]].as_slice()).collect();
                // A fold without early exit vectorises; NaN logits are the rare case.
                if per_model.iter().any(|l| l.iter().fold(false, |nan, x| nan | x.is_nan())) {
                    bail!("the model produced NaN logits at generation step {step} (prompt {row} of the batch)");
                }
                choose(state, &per_model, history).map(Some)
            })
            .collect();
        for (row, choice) in choices.into_iter().enumerate() {
            let Some(c) = choice? else { continue };
            next[row] = c.token;
            responses[row].push(c.token);
            history[row].push(c.token);
            logq[row].push(c.logq);
            logp[row].push(c.logp);
            if eos.contains(&c.token) {
                done[row] = true;
                ended[row] = true;
            }
        }
        if done.iter().all(|&d| d) || step + 1 == steps {
            break;
        }
        let finished = live.iter().filter(|&&row| done[row]).count();
        if worth_dropping(finished, live.len(), steps - step - 1) {
            let keep: Vec<usize> = (0..live.len()).filter(|&i| !done[live[i]]).collect();
            for c in &mut caches {
                c.keep_rows(&keep)?;
            }
            mask = mask.keep_rows(&keep);
            live = keep.iter().map(|&i| live[i]).collect();
            active = vec![true; live.len()];
        }
        mask = mask.extended(&active);
        let input = Tensor::from_vec(live.iter().map(|&row| next[row]).collect(), (live.len(), 1), &device)?;
        logits = step_all(&input, &mask, &mut caches, &live)?;
    }
    let generation = Generation { prompts: prompts.to_vec(), responses, ended_with_eos: ended };
    Ok(Decoded { generation, logq, logp, hidden })
}

/// Whether to drop `finished` rows of a batch of `rows` with `remaining` steps to go. Dropping
/// moves every later row's cached keys and values down (a copy about the size of the cache),
/// and saves the finished rows' share of each remaining step: so once an eighth of the batch
/// has finished, and not for the last few steps.
fn worth_dropping(finished: usize, rows: usize, remaining: usize) -> bool {
    finished > 0 && finished * 8 >= rows && remaining >= 4
}

/// `[live.len(), hidden]` rows placed at rows `live` of a `[b, hidden]` tensor of zeros.
fn spread_rows(x: &Tensor, live: &[usize], b: usize) -> Result<Tensor> {
    let ids = Tensor::new(live.iter().map(|&r| r as u32).collect::<Vec<_>>(), x.device())?;
    Ok(Tensor::zeros((b, x.dim(1)?), x.dtype(), x.device())?.index_add(&ids, x, 0)?)
}

/// Generates continuations of `prompts` with one model. `rngs` holds one stream per row
/// (see [`row_rngs`]); greedy decoding does not use them.
pub fn generate(
    model: &dyn CausalLm,
    prompts: &[Vec<u32>],
    eos: &[u32],
    pad: u32,
    cfg: &SamplingConfig,
    rngs: &mut [ChaCha8Rng],
) -> Result<Generation> {
    cfg.validate()?;
    if rngs.len() != prompts.len() {
        bail!("{} random streams for {} prompts", rngs.len(), prompts.len());
    }
    let Decoded { generation, .. } =
        decode(&[model], prompts, eos, pad, cfg.max_new_tokens, cfg.max_length, None, rngs, |rng, logits, hist| {
            let token = choose_token(&mut logits[0].to_vec(), hist, cfg, rng);
            Ok(Choice { token, logq: 0.0, logp: 0.0 })
        })?;
    Ok(generation)
}
