//! AdamW's update as two in-place passes over the optimizer state and one over the parameter
//! (instead of a dozen tensor ops, each allocating a parameter-sized buffer).

use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, fusable};

/// Hyper-parameters of one AdamW update of one parameter.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// β1, β2.
    pub betas: (f64, f64),
    /// ε.
    pub eps: f64,
    /// Learning rate.
    pub lr: f64,
    /// Decoupled weight decay for this parameter (0 for biases and norms).
    pub weight_decay: f64,
    /// Bias corrections `1 − β1^k`, `1 − β2^k`.
    pub bias_corrections: (f64, f64),
}

/// Whether [`adamw_in_place`] applies to these tensors (f32 on the CPU).
pub fn in_place_supported(param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    [param, grad, m, v].into_iter().all(fusable)
}

/// Updates `m`, `v` and then `param` in place; `grad` must have the parameter's shape.
pub fn adamw_in_place(param: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor, s: AdamStep) -> candle_core::Result<()> {
    let grad = grad.contiguous()?;
    m.inplace_op2(&grad, &Ema { beta: s.betas.0 as f32, square: false })?;
    v.inplace_op2(&grad, &Ema { beta: s.betas.1 as f32, square: true })?;
    param.inplace_op3(m, v, &Update(s))
}

const BLOCK: usize = 16_384;

fn contiguous_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a mut [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: target must be contiguous") };
    match s {
        CpuStorage::F32(v) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: target must be f32"),
    }
}

/// `m ← β·m + (1 − β)·g` (or `g²`).
struct Ema {
    beta: f32,
    square: bool,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let g = contiguous_f32(s2, l2, self.name())?;
        let m = contiguous_mut(s1, l1, self.name())?;
        if m.len() != g.len() {
            candle_core::bail!("{}: {} moments for {} gradients", self.name(), m.len(), g.len());
        }
        let (b, c) = (self.beta, 1.0 - self.beta);
        m.par_chunks_mut(BLOCK).zip(g.par_chunks(BLOCK)).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                *m = *m * b + if self.square { g * g * c } else { g * c };
            }
        });
        Ok(())
    }
}

/// `p ← p·(1 − lr·wd) − lr/bc1 · m / (√v / √bc2 + ε)`.
struct Update(AdamStep);

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (m, v) = (contiguous_f32(s2, l2, self.name())?, contiguous_f32(s3, l3, self.name())?);
        let p = contiguous_mut(s1, l1, self.name())?;
        if p.len() != m.len() || p.len() != v.len() {
            candle_core::bail!("{}: state does not match the parameter", self.name());
        }
        let s = self.0;
        let decay = (1.0 - s.lr * s.weight_decay) as f32;
        let step = (s.lr / s.bias_corrections.0) as f32;
        let sqrt_bc2 = s.bias_corrections.1.sqrt() as f32;
        let eps = s.eps as f32;
        p.par_chunks_mut(BLOCK).zip(m.par_chunks(BLOCK).zip(v.par_chunks(BLOCK))).for_each(|(p, (m, v))| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * decay - m / (v.sqrt() / sqrt_bc2 + eps) * step;
            }
        });
        Ok(())
    }
}
