//! Batched incremental decoding with a KV cache per model: greedy and sampled generation
//! (temperature, top-k, top-p, no-repeat-n-gram) and MiniLLM's teacher-mixed sampling, where
//! student and teacher decode in lockstep and each token is drawn from
//! `(1 − α)·softmax(student) + α·softmax(teacher)`.
//!
//! Each row has its own random stream, so a row's output does not depend on which other rows
//! share its batch (up to floating-point effects of padding).

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::loss::divergence::kl_value;
use crate::loss::Divergence;
use crate::model::{AttentionMask, CausalLm, KvCache};
use crate::ops::math;

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

/// A teacher-mixed rollout: the generation plus, per generated token, its log-probability
/// under the student (`log q`) and the teacher (`log p`) at sampling time.
#[derive(Clone, Debug)]
pub struct MixedRollout {
    /// Tokens.
    pub generation: Generation,
    /// `log q(y_t | y_<t, x)` of each response token.
    pub logq: Vec<Vec<f32>>,
    /// `log p(y_t | y_<t, x)` of each response token.
    pub logp: Vec<Vec<f32>>,
    /// The teacher's final hidden state at each response position, `[b, steps, hidden]`
    /// (when asked for).
    pub teacher_hidden: Option<Tensor>,
    /// KL(p‖q) at each response position (when asked for; empty otherwise).
    pub forward_kl: Vec<Vec<f32>>,
}

/// A generation laid out as one padded batch: prompts left-padded to a common length, then
/// responses right-padded (the layout decoding ran in, so re-scoring it reproduces the
/// sampling-time logits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Token ids `[b][prompt_len + max_response_len]`.
    pub input_ids: Vec<Vec<u32>>,
    /// 1 for real tokens.
    pub attention_mask: Vec<Vec<u8>>,
    /// 1 for response tokens, the first EOS included.
    pub response_mask: Vec<Vec<u8>>,
    /// Width of the left-padded prompt block.
    pub prompt_len: usize,
}

impl Generation {
    /// The padded batch layout (see [`PaddedBatch`]).
    pub fn padded(&self, pad: u32) -> PaddedBatch {
        PaddedBatch::new(self.prompts.iter().map(Vec::as_slice).zip(self.responses.iter().map(Vec::as_slice)), pad)
    }
}

impl PaddedBatch {
    /// Lays out (prompt, response) pairs: prompts left-padded to the longest, responses
    /// right-padded to the longest.
    pub fn new<'a>(pairs: impl Iterator<Item = (&'a [u32], &'a [u32])> + Clone, pad: u32) -> Self {
        let p = pairs.clone().map(|(x, _)| x.len()).max().unwrap_or(0);
        let r = pairs.clone().map(|(_, y)| y.len()).max().unwrap_or(0);
        let mut out = PaddedBatch { input_ids: vec![], attention_mask: vec![], response_mask: vec![], prompt_len: p };
        for (prompt, resp) in pairs {
            let mut ids = vec![pad; p - prompt.len()];
            ids.extend_from_slice(prompt);
            ids.extend_from_slice(resp);
            ids.resize(p + r, pad);
            let mut mask = vec![0u8; p - prompt.len()];
            mask.resize(p + resp.len(), 1);
            mask.resize(p + r, 0);
            let mut rmask = vec![0u8; p];
            rmask.resize(p + resp.len(), 1);
            rmask.resize(p + r, 0);
            out.input_ids.push(ids);
            out.attention_mask.push(mask);
            out.response_mask.push(rmask);
        }
        out
    }
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
struct Choice {
    token: u32,
    logq: f32,
    logp: f32,
}

/// What the decoding loop produced: tokens and the per-token log-probabilities the chooser
/// reported.
struct Decoded {
    generation: Generation,
    logq: Vec<Vec<f32>>,
    logp: Vec<Vec<f32>>,
    /// Per step, the kept model's final hidden state of every row `[b, hidden]`.
    hidden: Vec<Tensor>,
}

/// The shared decoding loop: prefill, then one token per step for every unfinished row until
/// EOS or the length limit. `choose(row, logits_per_model, history)` picks each token.
#[allow(clippy::too_many_arguments)] // private driver shared by the two public entry points
fn decode(
    models: &[&dyn CausalLm],
    prompts: &[Vec<u32>],
    eos: &[u32],
    pad: u32,
    max_new: usize,
    max_length: Option<usize>,
    keep_hidden: Option<usize>,
    mut choose: impl FnMut(usize, &[&[f32]], &[u32]) -> Result<Choice>,
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
    let mut hidden = Vec::new();
    // One step of every model: last-position logits, keeping one model's hidden state.
    let mut step_all = |input: &Tensor, mask: &AttentionMask, caches: &mut [KvCache]| -> Result<Vec<Vec<Vec<f32>>>> {
        let mut out = Vec::with_capacity(models.len());
        for (k, (m, c)) in models.iter().zip(caches.iter_mut()).enumerate() {
            let h = m.forward_hidden(input, mask, Some(c))?;
            let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?.detach();
            out.push(m.logits(&last)?.to_dtype(candle_core::DType::F32)?.to_vec2()?);
            if keep_hidden == Some(k) {
                hidden.push(last);
            }
        }
        Ok(out)
    };
    let mut logits = step_all(&input, &mask, &mut caches)?;

    let mut history: Vec<Vec<u32>> = prompts.to_vec();
    let mut responses = vec![Vec::new(); b];
    let (mut logq, mut logp) = (vec![Vec::new(); b], vec![Vec::new(); b]);
    let mut done = vec![false; b];
    let mut ended = vec![false; b];
    for step in 0..steps {
        let mut next = vec![pad; b];
        let active: Vec<bool> = done.iter().map(|d| !d).collect();
        for row in 0..b {
            if done[row] {
                continue;
            }
            let per_model: Vec<&[f32]> = logits.iter().map(|l| l[row].as_slice()).collect();
            let c = choose(row, &per_model, &history[row])?;
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
        mask = mask.extended(&active);
        let input = Tensor::from_vec(next, (b, 1), &device)?;
        logits = step_all(&input, &mask, &mut caches)?;
    }
    let generation = Generation { prompts: prompts.to_vec(), responses, ended_with_eos: ended };
    Ok(Decoded { generation, logq, logp, hidden })
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
    let mut work = Vec::new();
    let Decoded { generation, .. } =
        decode(&[model], prompts, eos, pad, cfg.max_new_tokens, cfg.max_length, None, |row, logits, hist| {
            work.clear();
            work.extend_from_slice(logits[0]);
            let token = choose_token(&mut work, hist, cfg, &mut rngs[row]);
            Ok(Choice { token, logq: 0.0, logp: 0.0 })
        })?;
    Ok(generation)
}

/// Settings of teacher-mixed sampling.
#[derive(Clone, Debug, PartialEq)]
pub struct MixedSampling {
    /// Teacher share α of the mixture.
    pub alpha: f32,
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Cap on prompt + response length.
    pub max_length: Option<usize>,
    /// Also return the teacher's final hidden state at every response position (what the
    /// single-step term needs, so the teacher runs once per rollout).
    pub keep_teacher_hidden: bool,
    /// Also return the exact forward KL(p‖q) over the shared vocabulary at every step
    /// (exposure-bias analysis).
    pub record_forward_kl: bool,
}

/// Teacher-mixed sampling (MiniLLM §2.2): student and teacher decode in lockstep, each with its
/// own cache, and every token is drawn at temperature 1 from `(1 − α)·q + α·p`, mixing
/// *probabilities*. Both vocabularies are restricted to their shared id range. Returns the
/// tokens with `log q` and `log p` of each chosen token.
pub fn generate_mixed(
    student: &dyn CausalLm,
    teacher: &dyn CausalLm,
    prompts: &[Vec<u32>],
    eos: &[u32],
    pad: u32,
    cfg: &MixedSampling,
    rngs: &mut [ChaCha8Rng],
) -> Result<MixedRollout> {
    let alpha = cfg.alpha;
    if !(0.0..=1.0).contains(&alpha) {
        bail!("the teacher-mix coefficient α must be in [0, 1], got {alpha}");
    }
    if rngs.len() != prompts.len() {
        bail!("{} random streams for {} prompts", rngs.len(), prompts.len());
    }
    let vocab = student.info().vocab_size.min(teacher.info().vocab_size);
    let mut mixed = Vec::with_capacity(vocab);
    let models: [&dyn CausalLm; 2] = [student, teacher];
    let keep = cfg.keep_teacher_hidden.then_some(1);
    let mut forward_kl = vec![Vec::new(); if cfg.record_forward_kl { prompts.len() } else { 0 }];
    let Decoded { generation, logq, logp, hidden } =
        decode(&models, prompts, eos, pad, cfg.max_new_tokens, cfg.max_length, keep, |row, logits, _| {
            let (zq, zp) = (&logits[0][..vocab], &logits[1][..vocab]);
            let (lse_q, lse_p) = (math::logsumexp(zq), math::logsumexp(zp));
            if cfg.record_forward_kl {
                forward_kl[row].push(kl_value(Divergence::ForwardKl, zq, zp, lse_q, lse_p) as f32);
            }
            // The mixture's probabilities themselves (they sum to one): no log-space round trip.
            mixed.clear();
            mixed.extend(
                zq.iter().zip(zp).map(|(&a, &b)| (1.0 - alpha) * math::exp(a - lse_q) + alpha * math::exp(b - lse_p)),
            );
            let token = sample_from_weights(&mixed, rngs[row].random()) as usize;
            Ok(Choice { token: token as u32, logq: zq[token] - lse_q, logp: zp[token] - lse_p })
        })?;
    let teacher_hidden = if hidden.is_empty() { None } else { Some(Tensor::stack(&hidden, 1)?) };
    Ok(MixedRollout { generation, logq, logp, teacher_hidden, forward_kl })
}

/// `log((1 − α)·e^{log q} + α·e^{log p})`: the log-probability of the teacher-mixed sampler.
pub fn mix_log_prob(logq: f32, logp: f32, alpha: f32) -> f32 {
    let (a, b) = ((1.0 - alpha as f64).ln() + logq as f64, (alpha as f64).ln() + logp as f64);
    let m = a.max(b);
    if m == f64::NEG_INFINITY {
        return f32::NEG_INFINITY;
    }
    (m + ((a - m).exp() + (b - m).exp()).ln()) as f32
}

/// `out = log_softmax(x)`, computed stably.
pub fn log_softmax_into(x: &[f32], out: &mut Vec<f32>) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    out.clear();
    out.extend(x.iter().map(|v| v - lse));
}

/// Applies the logits processors in `transformers`' order (n-gram ban, temperature, top-k,
/// top-p) and picks a token: arg-max at temperature 0, otherwise a draw from `rng`.
fn choose_token(logits: &mut [f32], history: &[u32], cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> u32 {
    for t in banned_ngram_tokens(history, cfg.no_repeat_ngram_size) {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if cfg.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    if cfg.temperature != 1.0 {
        logits.iter_mut().for_each(|l| *l /= cfg.temperature);
    }
    if cfg.top_k > 0 {
        top_k_filter(logits, cfg.top_k);
    }
    if cfg.top_p < 1.0 {
        top_p_filter(logits, cfg.top_p);
    }
    sample_from_logits(logits, rng.random())
}

/// Index of the largest value; the first one on ties (as `torch.argmax`).
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

/// Tokens that would complete an n-gram already present in `history`.
pub fn banned_ngram_tokens(history: &[u32], n: usize) -> Vec<u32> {
    if n == 0 || history.len() + 1 < n {
        return Vec::new();
    }
    let prefix = &history[history.len() + 1 - n..];
    history.windows(n).filter(|w| &w[..n - 1] == prefix).map(|w| w[n - 1]).collect()
}

/// Keeps the `k` largest logits (and any tied with the k-th), as `TopKLogitsWarper`.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    if k >= logits.len() {
        return;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_unstable_by(|a, b| b.total_cmp(a));
    let kth = sorted[k - 1];
    logits.iter_mut().filter(|l| **l < kth).for_each(|l| *l = f32::NEG_INFINITY);
}

/// Keeps the most likely tokens until their probability reaches `p` (the token that crosses
/// `p` included, at least one kept), as `TopPLogitsWarper`.
pub fn top_p_filter(logits: &mut [f32], p: f32) {
    let mut probs = Vec::new();
    log_softmax_into(logits, &mut probs);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut mass = 0f64;
    for (rank, &i) in order.iter().enumerate() {
        if rank > 0 && mass >= p as f64 {
            logits[i] = f32::NEG_INFINITY;
        }
        mass += (probs[i] as f64).exp();
    }
}

/// Draws an index from `softmax(logits)` with the uniform number `u` in [0, 1).
pub fn sample_from_logits(logits: &[f32], u: f64) -> u32 {
    let max = math::max(logits);
    let weights: Vec<f32> = logits.iter().map(|&l| math::exp(l - max)).collect();
    sample_from_weights(&weights, u)
}

/// Draws an index with probability proportional to the non-negative `weights`, with the
/// uniform number `u` in [0, 1) (inverse CDF, accumulated in f64; never a zero-weight index).
pub fn sample_from_weights(weights: &[f32], u: f64) -> u32 {
    let total: f64 = weights.iter().map(|&w| w as f64).sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut last_valid = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            last_valid = i;
        }
        acc += w as f64;
        if target < acc {
            return i as u32;
        }
    }
    last_valid as u32
}
