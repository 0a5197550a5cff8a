//! A dense layer with bias, `y = x·W + b`, fused forward and backward.
//!
//! candle adds the bias as a separate broadcast op, and its backward sums the gradient over
//! rows with a strided reduction that cost as much as a third of the layer's matmuls. Here the
//! bias seeds the output that the matmul accumulates into, and its gradient is a contiguous
//! column sum.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul_parallel, MatRef};
use super::{contiguous_f32, fusable, rows_per_task};

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[in, out]` (GPT-2's `Conv1D`).
    InOut,
    /// `[out, in]` (`nn.Linear`).
    OutIn,
}

/// `x·W + b` for `x` `[rows, in]`, differentiable in all three.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, layout: WeightLayout) -> candle_core::Result<Tensor> {
    let (_, din) = x.dims2()?;
    let (wi, wo) = match layout {
        WeightLayout::InOut => w.dims2()?,
        WeightLayout::OutIn => {
            let (o, i) = w.dims2()?;
            (i, o)
        }
    };
    if wi != din || b.dims() != [wo] {
        candle_core::bail!("linear: input width {din}, weight {:?} ({layout:?}), bias {:?}", w.dims(), b.dims());
    }
    if super::linear_half::applies(x, w) {
        return super::linear_half(x, w, Some(b), layout);
    }
    if !(fusable(x) && fusable(w) && fusable(b)) {
        return linear_composite(x, w, b, layout);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Linear { layout })
}

/// `x·W` for `x` `[rows, in]` without a bias (an LM head, bias-free projections),
/// differentiable in both; the weight's gradient comes out in its own layout, contiguous.
pub fn linear_no_bias(x: &Tensor, w: &Tensor, layout: WeightLayout) -> candle_core::Result<Tensor> {
    let (_, din) = x.dims2()?;
    let wi = match layout {
        WeightLayout::InOut => w.dim(0)?,
        WeightLayout::OutIn => w.dim(1)?,
    };
    if wi != din {
        candle_core::bail!("linear: input width {din}, weight {:?} ({layout:?})", w.dims());
    }
    if super::linear_half::applies(x, w) {
        return super::linear_half(x, w, None, layout);
    }
    if !(fusable(x) && fusable(w)) {
        return match layout {
            WeightLayout::InOut => x.matmul(w),
            WeightLayout::OutIn => x.matmul(&w.t()?),
        };
    }
    x.contiguous()?.apply_op2(&w.contiguous()?, Matmul { layout })
}

/// The same layer as differentiable candle ops.
pub fn linear_composite(x: &Tensor, w: &Tensor, b: &Tensor, layout: WeightLayout) -> candle_core::Result<Tensor> {
    let y = match layout {
        WeightLayout::InOut => x.matmul(w)?,
        WeightLayout::OutIn => x.matmul(&w.t()?)?,
    };
    y.broadcast_add(b)
}

struct Linear {
    layout: WeightLayout,
}

/// [`Linear`] without the bias.
struct Matmul {
    layout: WeightLayout,
}

impl candle_core::CustomOp2 for Matmul {
    fn name(&self) -> &'static str {
        "fused-matmul"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_f32(sx, lx, self.name())?, contiguous_f32(sw, lw, self.name())?);
        let (rows, din) = lx.shape().dims2()?;
        let dout = w.len() / din.max(1);
        let mut y = vec![0f32; rows * dout];
        let xm = MatRef { data: x, offset: 0, shape: (rows, din), strides: (din, 1) };
        matmul_parallel(&mut y, xm, Linear { layout: self.layout }.weight(w, din, dout), false);
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = linear_grads(x, w, grad, self.layout, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl Linear {
    /// The weight as an `[in, out]` matrix view.
    fn weight<'a>(&self, w: &'a [f32], din: usize, dout: usize) -> MatRef<'a> {
        weight_view(w, din, dout, self.layout)
    }
}

/// A weight stored in `layout` as an `[in, out]` matrix view.
pub(super) fn weight_view<T>(w: &[T], din: usize, dout: usize, layout: WeightLayout) -> MatRef<'_, T> {
    match layout {
        WeightLayout::InOut => MatRef { data: w, offset: 0, shape: (din, dout), strides: (dout, 1) },
        WeightLayout::OutIn => MatRef { data: w, offset: 0, shape: (din, dout), strides: (1, din) },
    }
}

/// A `rows × dout` output with every row set to `bias` (zeros without one), for a product to
/// accumulate into.
pub(super) fn seeded_output(rows: usize, dout: usize, bias: Option<&[f32]>) -> Vec<f32> {
    let mut y = vec![0f32; rows * dout];
    if let Some(b) = bias {
        y.par_chunks_mut(rows_per_task(dout) * dout)
            .for_each(|y| y.chunks_mut(dout).for_each(|r| r.copy_from_slice(b)));
    }
    y
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            contiguous_f32(sx, lx, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
            contiguous_f32(sb, lb, self.name())?,
        );
        let (rows, din) = lx.shape().dims2()?;
        let dout = b.len();
        let mut y = seeded_output(rows, dout, Some(b));
        let xm = MatRef { data: x, offset: 0, shape: (rows, din), strides: (din, 1) };
        matmul_parallel(&mut y, xm, self.weight(w, din, dout), true);
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = linear_grads(x, w, grad, self.layout, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

/// `∂x`, `∂W` and (with `bias`) `∂b` of `x·W (+ b)` from the output gradient `grad`, by one
/// [`LinearGrad`] pass.
fn linear_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    layout: WeightLayout,
    bias: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let (rows, din) = x.dims2()?;
    let dout = grad.dim(1)?;
    let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearGrad { fwd: Linear { layout }, bias })?;
    let dx = all.narrow(0, 0, rows * din)?.reshape((rows, din))?;
    let dw = all.narrow(0, rows * din, din * dout)?.reshape(w.shape())?;
    let db = if bias { Some(all.narrow(0, rows * din + din * dout, dout)?) } else { None };
    Ok((dx, dw, db))
}

/// `∂x | ∂W | ∂b` of [`Linear`], flattened one after the other (`∂W` in the weight's layout;
/// `∂b` left at zero without a bias).
struct LinearGrad {
    fwd: Linear,
    bias: bool,
}

impl CustomOp3 for LinearGrad {
    fn name(&self) -> &'static str {
        "fused-linear-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, g) = (
            contiguous_f32(sx, lx, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
            contiguous_f32(sg, lg, self.name())?,
        );
        let (rows, din) = lx.shape().dims2()?;
        let dout = lg.shape().dims2()?.1;
        let mut out = vec![0f32; rows * din + din * dout + dout];
        let (dx, rest) = out.split_at_mut(rows * din);
        let (dw, db) = rest.split_at_mut(din * dout);
        let xm = MatRef { data: x, offset: 0, shape: (rows, din), strides: (din, 1) };
        let gm = MatRef { data: g, offset: 0, shape: (rows, dout), strides: (dout, 1) };
        // ∂x = ∂y·Wᵀ.
        matmul_parallel(dx, gm, self.fwd.weight(w, din, dout).t(), false);
        // ∂W = xᵀ·∂y, or its transpose for `[out, in]` storage.
        match self.fwd.layout {
            WeightLayout::InOut => matmul_parallel(dw, xm.t(), gm, false),
            WeightLayout::OutIn => matmul_parallel(dw, gm.t(), xm, false),
        }
        if !self.bias {
            let n = out.len();
            return Ok((CpuStorage::F32(out), Shape::from(n)));
        }
        // ∂b = Σ_rows ∂y: partial column sums over blocks of rows, then their sum.
        let sums = g
            .par_chunks(rows_per_task(dout) * dout)
            .map(|block| {
                let mut s = vec![0f32; dout];
                block.chunks(dout).for_each(|r| s.iter_mut().zip(r).for_each(|(s, v)| *s += v));
                s
            })
            .collect::<Vec<_>>()
            .into_iter()
            // In block order, so the sum does not depend on thread scheduling.
            .fold(vec![0f32; dout], |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                a
            });
        db.copy_from_slice(&sums);
        let n = out.len();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
}
