//! Logits processors and token choice, with `transformers`' semantics: n-gram blocking,
//! temperature, top-k, top-p, arg-max, and inverse-CDF draws.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::decode::SamplingConfig;
use crate::ops::math;

/// `out = log_softmax(x)`, computed stably.
pub fn log_softmax_into(x: &[f32], out: &mut Vec<f32>) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + x.iter().map(|v| (v - max).exp()).sum::<f32>().ln();
    out.clear();
    out.extend(x.iter().map(|v| v - lse));
}

/// Applies the logits processors in `transformers`' order (n-gram ban, temperature, top-k,
/// top-p) and picks a token: arg-max at temperature 0, otherwise a draw from `rng`.
pub(crate) fn choose_token(logits: &mut [f32], history: &[u32], cfg: &SamplingConfig, rng: &mut ChaCha8Rng) -> u32 {
    process_logits(logits, history, cfg);
    if cfg.temperature == 0.0 {
        return argmax(logits) as u32;
    }
    sample_from_logits(logits, rng.random())
}

/// The logits processors of `cfg` in `transformers`' order, in place: tokens completing an
/// n-gram of `history` get −∞, then (unless greedy) temperature, top-k and top-p.
pub fn process_logits(logits: &mut [f32], history: &[u32], cfg: &SamplingConfig) {
    for t in banned_ngram_tokens(history, cfg.no_repeat_ngram_size) {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
    if cfg.temperature == 0.0 {
        return;
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
