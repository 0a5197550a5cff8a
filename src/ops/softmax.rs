//! The attention softmax `softmax(scale · scores + bias)` over the last dimension, fused
//! forward and backward (the bias is the additive mask and gets no gradient).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{contiguous_f32, fusable, math, rows_per_task};

/// `softmax(scale · scores + bias)` for `scores` `[b, heads, t, s]` and `bias` `[b, 1, t, s]`,
/// differentiable in `scores`.
pub fn masked_softmax(scores: &Tensor, bias: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    if !(fusable(scores) && fusable(bias)) {
        return masked_softmax_composite(scores, bias, scale);
    }
    let (b, _, t, s) = scores.dims4()?;
    if bias.dims() != [b, 1, t, s] {
        candle_core::bail!("attention bias has shape {:?}, expected {:?}", bias.dims(), [b, 1, t, s]);
    }
    scores.contiguous()?.apply_op2(&bias.contiguous()?, MaskedSoftmax { scale: scale as f32 })
}

/// The same softmax as a composition of differentiable candle ops.
pub fn masked_softmax_composite(scores: &Tensor, bias: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(bias)?, D::Minus1)
}

struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "fused-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, bias) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let &[_, heads, t, s] = l1.dims() else { candle_core::bail!("{}: scores must be 4-d", self.name()) };
        let mut p = vec![0f32; x.len()];
        let per_task = rows_per_task(s);
        p.par_chunks_mut(per_task * s).zip(x.par_chunks(per_task * s)).enumerate().for_each(|(task, (p, x))| {
            for (j, (p, x)) in p.chunks_mut(s).zip(x.chunks(s)).enumerate() {
                let row = task * per_task + j;
                // Query `row % t` of sequence `row / (heads·t)` shares its bias row across heads.
                let bias_row = (row / (heads * t)) * t + row % t;
                let bias = &bias[bias_row * s..(bias_row + 1) * s];
                for ((p, &x), &b) in p.iter_mut().zip(x).zip(bias) {
                    *p = x * self.scale + b;
                }
                math::softmax_in_place(p);
            }
        });
        Ok((CpuStorage::F32(p), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _scores: &Tensor,
        _bias: &Tensor,
        probs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ds = probs.apply_op2_no_bwd(&grad.contiguous()?, &MaskedSoftmaxGrad { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `∂L/∂scores = scale · p ⊙ (g − ⟨g, p⟩)` row by row.
struct MaskedSoftmaxGrad {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (p, g) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let s = *l1.dims().last().unwrap_or(&1);
        let mut ds = g.to_vec();
        let block = rows_per_task(s) * s;
        ds.par_chunks_mut(block).zip(p.par_chunks(block)).for_each(|(ds, p)| {
            for (ds, p) in ds.chunks_mut(s).zip(p.chunks(s)) {
                math::softmax_backward_in_place(p, ds, self.scale);
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}
