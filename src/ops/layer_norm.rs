//! Affine layer normalisation over the last dimension, fused forward and backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::{contiguous_f32, fusable, math, rows_per_task};

/// `(x − mean) / √(var + eps) · w + b` over the last dimension of `x` (statistics in f32),
/// differentiable in `x`, `w` and `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if !(fusable(x) && fusable(w) && fusable(b)) {
        return layer_norm_composite(x, w, b, eps);
    }
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })
}

/// The same normalisation as a composition of differentiable candle ops (any device, any
/// dtype: statistics in f32).
pub fn layer_norm_composite(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    normalize_composite(x, eps)?.broadcast_mul(w)?.broadcast_add(b)
}

/// `(x − mean) / √(var + eps)` over the last dimension without affine parameters, as
/// differentiable candle ops (statistics in f32, result in `x`'s dtype).
pub fn normalize_composite(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)
}

/// Mean and 1/√(var + eps) of one row.
fn stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = math::sum_map(x, |v| v) / n;
    let var = math::sum_map(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

struct LayerNorm {
    eps: f32,
}

fn check(l: &Layout, lw: &Layout, lb: &Layout) -> candle_core::Result<usize> {
    let h = *l.dims().last().unwrap_or(&0);
    if lw.dims() != [h] || lb.dims() != [h] {
        candle_core::bail!("layer norm: weight {:?} and bias {:?} for rows of {h}", lw.dims(), lb.dims());
    }
    Ok(h)
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = check(l, lw, lb)?;
        let (x, w, b) = (
            contiguous_f32(s, l, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
            contiguous_f32(sb, lb, self.name())?,
        );
        let mut y = vec![0f32; x.len()];
        let block = rows_per_task(h) * h;
        y.par_chunks_mut(block).zip(x.par_chunks(block)).for_each(|(y, x)| {
            for (y, x) in y.chunks_mut(h).zip(x.chunks(h)) {
                let (mean, rstd) = stats(x, self.eps);
                for i in 0..h {
                    y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.dim(0)?;
        let rows = x.elem_count() / h.max(1);
        let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = all.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dw = all.narrow(0, rows, 1)?.reshape(h)?;
        let db = all.narrow(0, rows + 1, 1)?.reshape(h)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The gradients of [`LayerNorm`] in one pass, stacked as `[rows + 2, h]`: `∂L/∂x` by row,
/// then `∂L/∂w` and `∂L/∂b`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = check(l, lw, lw)?;
        let (x, w, g) = (
            contiguous_f32(s, l, self.name())?,
            contiguous_f32(sw, lw, self.name())?,
            contiguous_f32(sg, lg, self.name())?,
        );
        let rows = x.len() / h.max(1);
        let mut out = vec![0f32; (rows + 2) * h];
        let (dx, dwb) = out.split_at_mut(rows * h);
        let block = rows_per_task(h) * h;
        let (dw, db) = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(g.par_chunks(block)))
            .map(|(dx, (x, g))| {
                let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let (mean, rstd) = stats(x, self.eps);
                    let (mut sum_gw, mut sum_gwx) = (0f32, 0f32);
                    for i in 0..h {
                        let xhat = (x[i] - mean) * rstd;
                        let gw = g[i] * w[i];
                        sum_gw += gw;
                        sum_gwx += gw * xhat;
                        dw[i] += g[i] * xhat;
                        db[i] += g[i];
                    }
                    let (mean_gw, mean_gwx) = (sum_gw / h as f32, sum_gwx / h as f32);
                    for i in 0..h {
                        let xhat = (x[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] * w[i] - mean_gw - xhat * mean_gwx);
                    }
                }
                (dw, db)
            })
            .collect::<Vec<_>>()
            .into_iter()
            // Block partials summed in block order (a parallel reduce's order would depend on
            // thread scheduling): runs are bit-identical.
            .fold((vec![0f32; h], vec![0f32; h]), |(mut aw, mut ab), (bw, bb)| {
                aw.iter_mut().zip(&bw).for_each(|(a, b)| *a += b);
                ab.iter_mut().zip(&bb).for_each(|(a, b)| *a += b);
                (aw, ab)
            });
        dwb[..h].copy_from_slice(&dw);
        dwb[h..].copy_from_slice(&db);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}
