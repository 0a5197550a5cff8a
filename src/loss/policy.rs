//! The long-term (policy-gradient) part of MiniLLM: per-token rewards, returns, length
//! normalisation, whitening, and the clipped, importance-weighted surrogate loss.
//!
//! Defaults follow the released implementation (REFERENCE.md §2); [`PolicyConfig::paper`]
//! gives Eq. 6–7 of the paper.

use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// How returns are accumulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Returns {
    /// Released implementation: `G_t = Σ_{k ≥ t} γ^{k−t} r_k` (includes `r_t`).
    Discounted,
    /// Paper Eq. 6: the rewards strictly after `t`, undiscounted.
    Future,
}

/// Settings of the long-term term.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// Return accumulation.
    pub returns: Returns,
    /// Discount γ (only for [`Returns::Discounted`]).
    pub gamma: f64,
    /// Rewards are divided by this.
    pub reward_scaling: f64,
    /// Rewards are clipped to ±this (`"off"` in a settings file: no clipping).
    #[serde(with = "crate::serde_off")]
    pub reward_clip: Option<f64>,
    /// Divide each return by the number of tokens it sums over (length normalisation).
    pub length_norm: bool,
    /// Whiten advantages over the padded minibatch (padding counts, unbiased variance).
    pub whiten: bool,
    /// PPO ratio clip ε (`"off"`: the plain importance-sampled surrogate).
    #[serde(with = "crate::serde_off")]
    pub clip_ratio: Option<f64>,
}

impl Default for PolicyConfig {
    /// The released implementation.
    fn default() -> Self {
        Self {
            returns: Returns::Discounted,
            gamma: 0.95,
            reward_scaling: 0.5,
            reward_clip: Some(100.0),
            length_norm: true,
            whiten: true,
            clip_ratio: Some(0.2),
        }
    }
}

impl PolicyConfig {
    /// The paper's Eq. 6–7: future rewards, undiscounted, length-normalised, not whitened,
    /// unscaled rewards, ratio clipping as in Algorithm 1.
    pub fn paper() -> Self {
        Self {
            returns: Returns::Future,
            gamma: 1.0,
            reward_scaling: 1.0,
            reward_clip: None,
            length_norm: true,
            whiten: false,
            clip_ratio: Some(0.2),
        }
    }
}

/// Per-token rewards `r_t = clip((log p − log q_old) / scaling)`.
pub fn rewards(logp: &[f32], logq: &[f32], cfg: &PolicyConfig) -> Vec<f32> {
    logp.iter()
        .zip(logq)
        .map(|(&p, &q)| {
            let r = (p as f64 - q as f64) / cfg.reward_scaling;
            let r = match cfg.reward_clip {
                Some(c) => r.clamp(-c, c),
                None => r,
            };
            r as f32
        })
        .collect()
}

/// Advantages of a minibatch of responses, `[rows][width]` with zeros beyond each response
/// (width = the longest response). Returns, length normalisation and whitening per `cfg`.
pub fn advantages(rewards: &[Vec<f32>], cfg: &PolicyConfig) -> Vec<Vec<f32>> {
    advantages_padded(rewards, rewards.iter().map(Vec::len).max().unwrap_or(0), cfg)
}

/// [`advantages`] over a `[rows][width]` table at least as wide as the longest response: the
/// whitening statistics count the zeros of the padding too.
pub fn advantages_padded(rewards: &[Vec<f32>], width: usize, cfg: &PolicyConfig) -> Vec<Vec<f32>> {
    let width = width.max(rewards.iter().map(Vec::len).max().unwrap_or(0));
    let mut out: Vec<Vec<f64>> = rewards
        .iter()
        .map(|r| {
            let n = r.len();
            let mut g = vec![0f64; width];
            let mut acc = 0f64;
            for t in (0..n).rev() {
                match cfg.returns {
                    Returns::Discounted => {
                        acc = r[t] as f64 + cfg.gamma * acc;
                        g[t] = acc;
                    }
                    Returns::Future => {
                        g[t] = acc;
                        acc += r[t] as f64;
                    }
                }
            }
            if cfg.length_norm {
                for (t, v) in g.iter_mut().enumerate().take(n) {
                    // Tokens the return sums over: t..n (discounted) or t+1..n (future; the
                    // paper prints T − t − 1, which is undefined at the last two positions —
                    // we divide by the number of summed rewards, i.e. take their mean).
                    let count = match cfg.returns {
                        Returns::Discounted => n - t,
                        Returns::Future => n - t - 1,
                    };
                    *v /= count.max(1) as f64;
                }
            }
            g
        })
        .collect();
    if cfg.whiten {
        let all: Vec<f64> = out.iter().flatten().copied().collect();
        let n = all.len() as f64;
        let mean = all.iter().sum::<f64>() / n;
        // torch.var_mean: unbiased variance.
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
        let scale = 1.0 / (var + 1e-8).sqrt();
        for row in &mut out {
            for v in row.iter_mut() {
                *v = (*v - mean) * scale;
            }
        }
    }
    out.into_iter().map(|r| r.into_iter().map(|v| v as f32).collect()).collect()
}

/// The clipped surrogate `Σ_t weight_t · max(−A_t ρ_t, −A_t clip(ρ_t, 1 ± ε))` with
/// `ρ_t = exp(log q_θ − log q_old) · w_t`, over flattened valid tokens. `logq` is the
/// differentiable `[n]` tensor of current log-probabilities of the sampled tokens.
pub fn pg_loss(
    logq: &Tensor,
    logq_old: &[f32],
    importance: &[f32],
    advantages: &[f32],
    weights: &[f32],
    clip: Option<f64>,
) -> Result<Tensor> {
    let n = logq.dim(0)?;
    if [logq_old.len(), importance.len(), advantages.len(), weights.len()].iter().any(|&l| l != n) {
        bail!(
            "policy loss: {n} log-probabilities but inputs of lengths {}, {}, {}, {}",
            logq_old.len(),
            importance.len(),
            advantages.len(),
            weights.len()
        );
    }
    let dev = logq.device();
    let vec = |v: &[f32]| Tensor::from_slice(v, n, dev);
    let ratio = ((logq - vec(logq_old)?)?.exp()? * vec(importance)?)?;
    let neg_adv = vec(advantages)?.neg()?;
    let unclipped = (&neg_adv * &ratio)?;
    let per_token = match clip {
        Some(eps) => unclipped.maximum(&(&neg_adv * ratio.clamp(1.0 - eps, 1.0 + eps)?)?)?,
        None => unclipped,
    };
    Ok((per_token * vec(weights)?)?.sum_all()?)
}

/// The k3 estimate of KL[q‖p] per token, `e^d − 1 − d` with `d = log p − log q`, averaged.
pub fn k3_estimate(logp: &[f32], logq: &[f32]) -> f64 {
    let n = logp.len().max(1) as f64;
    logp.iter()
        .zip(logq)
        .map(|(&p, &q)| {
            let d = p as f64 - q as f64;
            d.exp() - 1.0 - d
        })
        .sum::<f64>()
        / n
}
