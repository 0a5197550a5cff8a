//! Cross-entropy against hard labels, `Σ_r w_r · (logsumexp(z_r) − z_r[y_r])`, as a fused CPU
//! op with the analytic gradient `w_r · (softmax(z_r) − onehot(y_r))` (no `[rows × vocab]`
//! probability tensor), and a differentiable composition elsewhere.

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::ops::math;

/// Weighted cross-entropy of `logits` `[rows, vocab]` against `targets`.
pub fn cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let (rows, vocab) = logits.dims2()?;
    if targets.len() != rows || weights.len() != rows {
        bail!("cross-entropy: {rows} rows but {} targets and {} weights", targets.len(), weights.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("cross-entropy: target {t} is outside the vocabulary of {vocab}");
    }
    if !logits.device().is_cpu() {
        return cross_entropy_reference(logits, targets, weights);
    }
    let z = logits.to_dtype(DType::F32)?.contiguous()?;
    Ok(z.apply_op1(FusedCrossEntropy { targets: targets.to_vec(), weights: weights.to_vec(), grad: false })?)
}

/// The composition `−Σ w · log_softmax(z)[y]`.
pub fn cross_entropy_reference(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor> {
    let n = targets.len();
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let idx = Tensor::from_slice(targets, (n, 1), logits.device())?;
    let picked = lp.gather(&idx, D::Minus1)?.squeeze(1)?;
    let w = Tensor::from_slice(weights, n, logits.device())?;
    Ok((picked * w)?.sum_all()?.neg()?)
}

struct FusedCrossEntropy {
    targets: Vec<u32>,
    weights: Vec<f32>,
    /// When set, the op computes the gradient instead of the loss.
    grad: bool,
}

impl CustomOp1 for FusedCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("cross-entropy: input must be contiguous")
        };
        let z = &s.as_slice::<f32>()?[a..b];
        let vocab = l.dims()[1];
        let lse = |r: &[f32]| {
            let m = math::max(r);
            m as f64 + (math::sum_map(r, |v| math::exp(v - m)) as f64).ln()
        };
        if !self.grad {
            let total: f64 = z
                .par_chunks(vocab)
                .zip(self.targets.par_iter().zip(self.weights.par_iter()))
                .filter(|(_, (_, &w))| w != 0.0)
                .map(|(r, (&y, &w))| w as f64 * (lse(r) - r[y as usize] as f64))
                .collect::<Vec<f64>>()
                .iter()
                .sum(); // in row order: a parallel sum's order would depend on scheduling
            return Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())));
        }
        let mut out = vec![0f32; z.len()];
        out.par_chunks_mut(vocab)
            .zip(z.par_chunks(vocab))
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .for_each(|((g, r), (&y, &w))| {
                if w != 0.0 {
                    let l = lse(r) as f32;
                    for (gi, &v) in g.iter_mut().zip(r) {
                        *gi = w * math::exp(v - l);
                    }
                    g[y as usize] -= w;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let op = FusedCrossEntropy {
            targets: self.targets.clone(),
            weights: self.weights.iter().map(|w| w * scale).collect(),
            grad: true,
        };
        Ok(Some(arg.apply_op1_no_bwd(&op)?))
    }
}
