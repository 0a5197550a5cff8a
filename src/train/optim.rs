//! AdamW with decoupled weight decay (none on biases and normalisation weights), learning-rate
//! schedules, and gradient-norm clipping — PyTorch's and `transformers`' semantics exactly.

use std::collections::HashMap;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};

use crate::ops::adamw::{adamw_in_place, AdamStep};

/// AdamW hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// β1.
    pub beta1: f64,
    /// β2.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (applied to matrices only).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The released MiniLLM settings: β = (0.9, 0.95), ε = 1e-8, weight decay 1e-6.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 1e-6 }
    }
}

impl AdamWConfig {
    /// Checks the hyper-parameters, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        for (key, b) in [("train.optimizer.beta1", self.beta1), ("train.optimizer.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                bail!("{key} must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("train.optimizer.eps must be a positive finite number, got {}", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("train.optimizer.weight_decay must be a finite number ≥ 0, got {}", self.weight_decay);
        }
        Ok(())
    }
}

/// Learning-rate schedule, as `transformers`' schedulers compute it for optimizer step `k`
/// (0-based; the first step of a warm-up therefore uses a learning rate of 0).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Schedule {
    /// Linear warm-up to the peak, then constant (`get_constant_schedule_with_warmup`).
    Constant {
        /// Warm-up steps.
        warmup: usize,
    },
    /// Linear warm-up, then a half cosine from the peak down to `min_lr` at `total` steps
    /// (`get_cosine_schedule_with_warmup` with a floor).
    Cosine {
        /// Warm-up steps.
        warmup: usize,
        /// Steps of the whole schedule (default: the run's `max_steps`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        total: Option<usize>,
        /// Floor.
        min_lr: f64,
    },
}

impl Schedule {
    /// Checks the schedule against the peak learning rate `lr`.
    pub fn validate(&self, lr: f64) -> Result<()> {
        if let Self::Cosine { min_lr, .. } = *self {
            if !(min_lr.is_finite() && (0.0..=lr).contains(&min_lr)) {
                bail!("train.schedule.min_lr must be in [0, train.lr = {lr}], got {min_lr}");
            }
        }
        Ok(())
    }

    /// The learning rate at step `k` for peak rate `lr`, in a run of `max_steps` steps.
    pub fn lr(&self, lr: f64, k: usize, max_steps: usize) -> f64 {
        let warm = |w: usize| if k < w { Some(lr * k as f64 / w.max(1) as f64) } else { None };
        match *self {
            Self::Constant { warmup } => warm(warmup).unwrap_or(lr),
            Self::Cosine { warmup, total, min_lr } => warm(warmup).unwrap_or_else(|| {
                let total = total.unwrap_or(max_steps);
                let progress = (k - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
                let c = (0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())).max(0.0);
                min_lr + (lr - min_lr) * c
            }),
        }
    }
}

/// AdamW over a model's named parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var, bool)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    /// An optimizer for `params`; parameters with one dimension (biases, norm weights) get no
    /// weight decay.
    pub fn new<'a>(params: impl IntoIterator<Item = (&'a str, &'a Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut list = Vec::new();
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for (name, var) in params {
            let decay = var.rank() >= 2;
            m.push(var.zeros_like()?.to_dtype(DType::F32)?);
            v.push(var.zeros_like()?.to_dtype(DType::F32)?);
            list.push((name.to_string(), var.clone(), decay));
        }
        Ok(Self { cfg, params: list, m, v, step: 0 })
    }

    /// Number of updates taken.
    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update with learning rate `lr` from `grads`, given in parameter order (parameters
    /// without a gradient are left unchanged, as PyTorch skips those whose `.grad` is None).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("{} gradients for {} parameters", grads.len(), self.params.len());
        }
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bc1 = 1.0 - beta1.powi(self.step as i32);
        let bc2 = 1.0 - beta2.powi(self.step as i32);
        for (i, (_, var, decay)) in self.params.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            let p = var.as_tensor();
            if crate::ops::adamw::in_place_supported(p, g, &self.m[i], &self.v[i]) {
                let wd = if *decay { weight_decay } else { 0.0 };
                let step = AdamStep { betas: (beta1, beta2), eps, lr, weight_decay: wd, bias_corrections: (bc1, bc2) };
                adamw_in_place(p, &g.detach(), &self.m[i], &self.v[i], step)?;
                continue;
            }
            // Detached: candle's backward builds gradients with tracked ops, and a moment that
            // kept that graph would hold every earlier step's activations alive.
            let g = g.to_dtype(DType::F32)?.detach();
            let m = ((&self.m[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let mut p = var.as_tensor().to_dtype(DType::F32)?;
            if *decay && weight_decay != 0.0 {
                p = (p * (1.0 - lr * weight_decay))?;
            }
            let denom = ((v.sqrt()? / bc2.sqrt())? + eps)?;
            p = (p - (m.div(&denom)? * (lr / bc1))?)?;
            var.set(&p.to_dtype(var.dtype())?)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// Optimizer state for a checkpoint: `m.NAME` and `v.NAME` tensors, and the step count.
    pub fn state(&self) -> (HashMap<String, Tensor>, usize) {
        let mut map = HashMap::new();
        for (i, (name, _, _)) in self.params.iter().enumerate() {
            map.insert(format!("m.{name}"), self.m[i].clone());
            map.insert(format!("v.{name}"), self.v[i].clone());
        }
        (map, self.step)
    }

    /// Restores [`AdamW::state`].
    pub fn load_state(&mut self, map: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, var, _)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{name}");
                let t = map.get(&key).with_context(|| format!("optimizer state has no `{key}`"))?;
                if t.dims() != var.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), var.dims());
                }
                *slot = t.to_dtype(DType::F32)?.to_device(var.device())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of `grads` (f64 accumulation).
pub fn grad_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` so that their global norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (`coef = max_norm / (norm + 1e-6)`, capped at 1).
/// Returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Option<Tensor>], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut().flatten() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

/// Gradients of `vars` from a backward pass, in order.
pub fn collect_grads<'a>(
    store: &candle_core::backprop::GradStore,
    vars: impl IntoIterator<Item = &'a Var>,
) -> Vec<Option<Tensor>> {
    // Gradients are values: detached from the graph the backward pass built them with.
    vars.into_iter().map(|v| store.get(v.as_tensor()).map(Tensor::detach)).collect()
}
