//! Causal self-attention over packed `[q | k | v]` projections, fused forward and backward.
//!
//! The composition (split the packed projections, move heads forward, `q·kᵀ`, scale, mask,
//! softmax, `·v`, move heads back) copies every activation twice forward and its gradient
//! twice backward, and candle's backward of the split pads each piece with zeros to the packed
//! width. Here each sequence's heads are read in place from the packed buffer with strided
//! matmuls, and the backward writes `∂q | ∂k | ∂v` straight into the packed gradient. The
//! `[t × t]` probabilities are recomputed in the backward instead of being stored.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul, MatRef};
use super::{contiguous_f32, fusable, math};

/// Attention of `qkv` `[b, t, 3·heads·d]` (queries, keys, values side by side, each
/// `heads·d` wide with heads in order) under the additive `bias` `[b, 1, t, t]`, with scores
/// scaled by `scale`. Returns `[b, t, heads·d]`, differentiable in `qkv`.
pub fn attention_packed(qkv: &Tensor, bias: &Tensor, heads: usize, scale: f64) -> candle_core::Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    if heads == 0 || w % (3 * heads) != 0 {
        candle_core::bail!("packed q/k/v width {w} is not 3 × {heads} heads × head size");
    }
    if bias.dims() != [b, 1, t, t] {
        candle_core::bail!("attention bias has shape {:?}, expected {:?}", bias.dims(), [b, 1, t, t]);
    }
    if !(fusable(qkv) && fusable(bias)) {
        return attention_packed_composite(qkv, bias, heads, scale);
    }
    qkv.contiguous()?.apply_op2(&bias.contiguous()?, PackedAttention { heads, scale: scale as f32 })
}

/// The same attention as a composition of differentiable candle ops.
pub fn attention_packed_composite(
    qkv: &Tensor,
    bias: &Tensor,
    heads: usize,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, t, w) = qkv.dims3()?;
    let h = w / 3;
    let split = |i: usize| qkv.narrow(2, i * h, h)?.reshape((b, t, heads, h / heads))?.transpose(1, 2)?.contiguous();
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let probs = super::softmax::masked_softmax_composite(&q.matmul(&k.t()?)?, bias, scale)?;
    probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))
}

struct PackedAttention {
    heads: usize,
    scale: f32,
}

/// Where one head's queries, keys and values sit in a sequence's `[t, 3·heads·d]` rows.
struct HeadViews<'a> {
    q: MatRef<'a>,
    k: MatRef<'a>,
    v: MatRef<'a>,
}

impl PackedAttention {
    fn dims(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let &[b, t, w] = l.dims() else { candle_core::bail!("packed q/k/v must be [b, t, 3·heads·d]") };
        Ok((b, t, w / 3 / self.heads))
    }

    fn head<'a>(&self, seq: &'a [f32], t: usize, d: usize, h: usize) -> HeadViews<'a> {
        let width = 3 * self.heads * d;
        let view = |part: usize| MatRef {
            data: seq,
            offset: part * self.heads * d + h * d,
            shape: (t, d),
            strides: (width, 1),
        };
        HeadViews { q: view(0), k: view(1), v: view(2) }
    }

    /// `p ← softmax(scale · q·kᵀ + bias)` for one head (`p` is `[t, t]`).
    fn probabilities(&self, p: &mut [f32], hv: &HeadViews, bias: &[f32], t: usize) {
        matmul(p, 0, t, hv.q, hv.k.t(), self.scale, false);
        for (row, bias) in p.chunks_mut(t).zip(bias.chunks(t)) {
            row.iter_mut().zip(bias).for_each(|(s, &b)| *s += b);
            math::softmax_in_place(row);
        }
    }
}

impl CustomOp2 for PackedAttention {
    fn name(&self) -> &'static str {
        "fused-packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (qkv, bias) = (contiguous_f32(s1, l1, self.name())?, contiguous_f32(s2, l2, self.name())?);
        let (b, t, d) = self.dims(l1)?;
        let width = self.heads * d;
        let mut out = vec![0f32; b * t * width];
        out.par_chunks_mut(t * width).zip(qkv.par_chunks(t * 3 * width).zip(bias.par_chunks(t * t))).for_each(
            |(out, (seq, bias))| {
                let mut p = vec![0f32; t * t];
                for h in 0..self.heads {
                    let hv = self.head(seq, t, d, h);
                    self.probabilities(&mut p, &hv, bias, t);
                    let probs = MatRef { data: &p, offset: 0, shape: (t, t), strides: (t, 1) };
                    matmul(out, h * d, width, probs, hv.v, 1.0, false);
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, t, width))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let op = PackedAttentionGrad { fwd: PackedAttention { heads: self.heads, scale: self.scale } };
        let dqkv = qkv.apply_op3_no_bwd(bias, &grad.contiguous()?, &op)?;
        Ok((Some(dqkv), None))
    }
}

/// `∂L/∂qkv` of [`PackedAttention`] from `∂L/∂out`, in the packed layout.
struct PackedAttentionGrad {
    fwd: PackedAttention,
}

impl candle_core::CustomOp3 for PackedAttentionGrad {
    fn name(&self) -> &'static str {
        "fused-packed-attention-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (qkv, bias, dout) =
            (contiguous_f32(s1, l1, name)?, contiguous_f32(s2, l2, name)?, contiguous_f32(s3, l3, name)?);
        let (_, t, d) = self.fwd.dims(l1)?;
        let (heads, scale) = (self.fwd.heads, self.fwd.scale);
        let width = heads * d;
        let mut dqkv = vec![0f32; qkv.len()];
        dqkv.par_chunks_mut(t * 3 * width)
            .zip(qkv.par_chunks(t * 3 * width).zip(bias.par_chunks(t * t).zip(dout.par_chunks(t * width))))
            .for_each(|(dseq, (seq, (bias, dout)))| {
                let (mut p, mut dp) = (vec![0f32; t * t], vec![0f32; t * t]);
                for h in 0..heads {
                    let hv = self.fwd.head(seq, t, d, h);
                    self.fwd.probabilities(&mut p, &hv, bias, t);
                    let dout_h = MatRef { data: dout, offset: h * d, shape: (t, d), strides: (width, 1) };
                    // ∂p = ∂out·vᵀ, then ∂s = scale · p ⊙ (∂p − ⟨∂p, p⟩) row by row.
                    matmul(&mut dp, 0, t, dout_h, hv.v.t(), 1.0, false);
                    for (dp, p) in dp.chunks_mut(t).zip(p.chunks(t)) {
                        math::softmax_backward_in_place(p, dp, scale);
                    }
                    let ds = MatRef { data: &dp, offset: 0, shape: (t, t), strides: (t, 1) };
                    let probs = MatRef { data: &p, offset: 0, shape: (t, t), strides: (t, 1) };
                    let at = |part: usize| part * width + h * d;
                    matmul(dseq, at(0), 3 * width, ds, hv.k, 1.0, false); // ∂q = ∂s·k
                    matmul(dseq, at(1), 3 * width, ds.t(), hv.q, 1.0, false); // ∂k = ∂sᵀ·q
                    matmul(dseq, at(2), 3 * width, probs.t(), dout_h, 1.0, false);
                    // ∂v = pᵀ·∂out
                }
            });
        Ok((CpuStorage::F32(dqkv), l1.shape().clone()))
    }
}
