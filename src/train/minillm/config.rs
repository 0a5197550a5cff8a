//! Settings of `minillm distill` (REFERENCE.md §1–5): the released implementation's defaults,
//! and the `paper` preset (the equations as printed).

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use crate::loss::policy::PolicyConfig;

/// Settings of `minillm distill` (defaults: the released implementation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistillConfig {
    /// Teacher share α of the sampling mixture (0 = pure student sampling).
    pub alpha: f32,
    /// Rollouts per collection.
    pub num_rollouts: usize,
    /// Prompts decoded together while collecting.
    pub rollout_batch: usize,
    /// Passes over each buffer.
    pub inner_epochs: usize,
    /// Prompt + response length limit.
    pub max_len: usize,
    /// Response length limit (also bounded by `max_len`).
    pub max_new_tokens: usize,
    /// The long-term term.
    pub policy: PolicyConfig,
    /// Add the exact single-step reverse KL.
    pub single_step: bool,
    /// Weight the single-step term by the importance weight w_t (paper) or not (released).
    pub single_step_weighted: bool,
    /// Add the pre-training term.
    pub pt: bool,
    /// Share of the teacher soft cross-entropy in the pre-training term (0.5 released, 0 paper).
    pub pt_kd_ratio: f64,
    /// Coefficient of the pre-training term.
    pub pt_coef: f64,
    /// Validation prompts sampled (pure student) for the reverse-KL estimate and Rouge-L.
    pub valid_rollouts: usize,
    /// Whiten advantages over each rollout's generation-batch width, as the released storage
    /// pads them (`true`), or over the minibatch's longest response (`false`, default: the
    /// statistics of a minibatch do not depend on which rollouts were decoded together).
    /// Not written when off, so runs made before the switch existed keep their identity.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub released_padding: bool,
}

impl Default for DistillConfig {
    fn default() -> Self {
        Self {
            alpha: 0.2,
            num_rollouts: 256,
            rollout_batch: 32,
            inner_epochs: 4,
            max_len: 512,
            max_new_tokens: 256,
            policy: PolicyConfig::default(),
            single_step: true,
            single_step_weighted: false,
            pt: true,
            pt_kd_ratio: 0.5,
            pt_coef: 1.0,
            valid_rollouts: 64,
            released_padding: false,
        }
    }
}

impl DistillConfig {
    /// The `paper` preset: Eq. 6–7 as printed (future rewards only, undiscounted, unscaled,
    /// not whitened, w_t on the single-step term, plain LM loss for the PT term).
    pub fn paper() -> Self {
        Self { policy: PolicyConfig::paper(), single_step_weighted: true, pt_kd_ratio: 0.0, ..Self::default() }
    }

    /// The `opd` preset: on-policy distillation as the Tinker cookbook recipe defines it —
    /// samples from the current student alone (α = 0), each buffer used once, per-token
    /// advantage A_t = log p(y_t) − log q_old(y_t) (discount γ = 0: the token's own reverse-KL
    /// estimate; γ = 1 makes it the unbiased sequence-level gradient), the importance-sampled
    /// policy-gradient loss (`policy.clip_ratio` set gives the PPO-clipped variant), no
    /// single-step or pre-training term. At α = 0 the teacher scores the finished samples in
    /// one forward pass.
    pub fn opd() -> Self {
        let policy = PolicyConfig {
            returns: crate::loss::policy::Returns::Discounted,
            gamma: 0.0,
            reward_scaling: 1.0,
            reward_clip: None,
            length_norm: false,
            whiten: false,
            clip_ratio: None,
        };
        Self { alpha: 0.0, inner_epochs: 1, policy, single_step: false, pt: false, ..Self::default() }
    }

    /// Whether collection can sample from the student alone and let the teacher score the
    /// finished samples (no teacher mixing, no teacher hidden states needed).
    pub fn student_only_sampling(&self) -> bool {
        self.alpha == 0.0 && !self.single_step
    }
}

impl DistillConfig {
    /// Checks every setting, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("distill.num_rollouts", self.num_rollouts),
            ("distill.rollout_batch", self.rollout_batch),
            ("distill.inner_epochs", self.inner_epochs),
            ("distill.max_len", self.max_len),
            ("distill.max_new_tokens", self.max_new_tokens),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be at least 1, got 0");
            }
        }
        let unit = |key: &str, v: f64| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key} must be in [0, 1], got {v}");
            }
            Ok(())
        };
        unit("distill.alpha", self.alpha as f64)?;
        unit("distill.pt_kd_ratio", self.pt_kd_ratio)?;
        unit("distill.policy.gamma", self.policy.gamma)?;
        if !(self.pt_coef.is_finite() && self.pt_coef >= 0.0) {
            bail!("distill.pt_coef must be a finite number ≥ 0, got {}", self.pt_coef);
        }
        if !(self.policy.reward_scaling.is_finite() && self.policy.reward_scaling > 0.0) {
            bail!("distill.policy.reward_scaling must be a positive finite number, got {}", self.policy.reward_scaling);
        }
        for (key, v) in [
            ("distill.policy.reward_clip", self.policy.reward_clip),
            ("distill.policy.clip_ratio", self.policy.clip_ratio),
        ] {
            if let Some(v) = v {
                if !(v.is_finite() && v > 0.0) {
                    bail!("{key} must be a positive finite number, got {v}");
                }
            }
        }
        Ok(())
    }
}
