//! MiniLLM's teacher-mixed sampling (§2.2): student and teacher decode in lockstep, each with its
//! own KV cache, and each token is drawn from `(1 − α)·softmax(student) + α·softmax(teacher)`.

use anyhow::{bail, Result};
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::decode::{decode, Choice, Decoded, Generation};
use super::processors::sample_from_weights;
use crate::loss::divergence::kl_value;
use crate::loss::Divergence;
use crate::model::CausalLm;
use crate::ops::math;

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
    let models: [&dyn CausalLm; 2] = [student, teacher];
    let keep = cfg.keep_teacher_hidden.then_some(1);
    // Each row's random stream and the forward KL it records.
    let mut rows: Vec<(&mut ChaCha8Rng, Vec<f32>)> = rngs.iter_mut().map(|rng| (rng, Vec::new())).collect();
    let Decoded { generation, logq, logp, hidden } = decode(
        &models,
        prompts,
        eos,
        pad,
        cfg.max_new_tokens,
        cfg.max_length,
        keep,
        &mut rows,
        |(rng, kl), logits, _| {
            let (zq, zp) = (&logits[0][..vocab], &logits[1][..vocab]);
            let (lse_q, lse_p) = (math::logsumexp(zq), math::logsumexp(zp));
            if cfg.record_forward_kl {
                kl.push(kl_value(Divergence::ForwardKl, zq, zp, lse_q, lse_p) as f32);
            }
            // The mixture's probabilities themselves (they sum to one): no log-space round trip.
            let mixed: Vec<f32> = zq
                .iter()
                .zip(zp)
                .map(|(&a, &b)| (1.0 - alpha) * math::exp(a - lse_q) + alpha * math::exp(b - lse_p))
                .collect();
            let token = sample_from_weights(&mixed, rng.random()) as usize;
            Ok(Choice { token: token as u32, logq: zq[token] - lse_q, logp: zp[token] - lse_p })
        },
    )?;
    let forward_kl = if cfg.record_forward_kl { rows.into_iter().map(|(_, kl)| kl).collect() } else { Vec::new() };
    let teacher_hidden = if hidden.is_empty() { None } else { Some(Tensor::stack(&hidden, 1)?) };
    Ok(MixedRollout { generation, logq, logp, teacher_hidden, forward_kl })
}

/// `log((1 − α)·e^{log q} + α·e^{log p})`: the log-probability of the teacher-mixed sampler.
pub fn mix_log_prob(logq: f32, logp: f32, alpha: f32) -> f32 {
    math::log_mix(1.0 - alpha as f64, logq as f64, alpha as f64, logp as f64) as f32
}
