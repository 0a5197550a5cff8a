//! GELU with the tanh approximation (GPT-2's `gelu_new`), fused forward and backward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{contiguous_f32, fusable, math};

/// √(2/π).
const C: f32 = 0.797_884_6;
/// The cubic coefficient of the approximation.
const A: f32 = 0.044_715;

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, differentiable.
pub fn gelu_tanh(x: &Tensor) -> candle_core::Result<Tensor> {
    if !fusable(x) {
        return x.gelu();
    }
    x.contiguous()?.apply_op1(GeluTanh)
}

#[inline(always)]
fn value(x: f32) -> f32 {
    0.5 * x * (1.0 + math::tanh(C * x * (1.0 + A * x * x)))
}

#[inline(always)]
fn derivative(x: f32) -> f32 {
    let x2 = x * x;
    let t = math::tanh(C * x * (1.0 + A * x2));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * A * x2)
}

struct GeluTanh;

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = value(x);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&grad.contiguous()?, &GeluTanhGrad)?))
    }
}

/// `∂L/∂x = g · gelu'(x)`.
struct GeluTanhGrad;

impl CustomOp2 for GeluTanhGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, g) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(g.par_chunks(4096))).for_each(|(dx, (x, g))| {
            for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(g) {
                *dx = g * derivative(x);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}
