//! Attention for decoding: queries against cached keys and values, forward only.
//!
//! Each decoding step attends one new query per row and head to a few hundred cached keys.
//! As a composition that is two tiny matrix products per (row, head), each paying the
//! `gemm` call's packing and dispatch, plus copies to move heads forward and back; here each
//! query row is one pass over its keys and values, read in place through their strides (the
//! cache is a view of a larger buffer, the queries a view of the packed projection).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::simd::{F32x, LANES};
use super::{fusable, math};

/// `softmax(scale·q·kᵀ + bias)·v` for `q` `[b, heads, t, d]`, `k` and `v`
/// `[b, kv_heads, s, d]` (grouped-query attention when `kv_heads` divides `heads`) and `bias`
/// `[b, 1, t, s]`; returns `[b, t, heads·d]`. Not differentiable: callers take it only when no
/// input tracks gradients, and otherwise (or off the CPU) the composition.
pub fn attention_inference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let (kb, kv_heads, s, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || kv_heads == 0 || heads % kv_heads != 0 {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not fit together", q.dims(), k.dims(), v.dims());
    }
    if bias.dims() != [b, 1, t, s] {
        candle_core::bail!("attention bias has shape {:?}, expected {:?}", bias.dims(), [b, 1, t, s]);
    }
    if ![q, k, v, bias].iter().all(|x| fusable(x)) {
        candle_core::bail!("attention_inference takes f32 CPU tensors");
    }
    // The strided reads need unit stride along the head dimension.
    let unit = |x: &Tensor| -> candle_core::Result<Tensor> {
        if x.stride()[3] == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    let op = InferenceAttention { bias: bias.contiguous()?, scale: scale as f32 };
    unit(q)?.apply_op3(&unit(k)?, &unit(v)?, op)
}

struct InferenceAttention {
    /// `[b, 1, t, s]`, contiguous; read under its storage lock.
    bias: Tensor,
    scale: f32,
}

/// A 4-d f32 view: the backing slice, its start offset and the strides of the first three
/// dimensions (the last is 1).
struct View<'a> {
    data: &'a [f32],
    start: usize,
    strides: [usize; 3],
}

impl<'a> View<'a> {
    fn new(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Self> {
        let st = l.stride();
        Ok(Self { data: s.as_slice::<f32>()?, start: l.start_offset(), strides: [st[0], st[1], st[2]] })
    }

    /// The `d` values at `[i, j, k, ..]`.
    fn row(&self, i: usize, j: usize, k: usize, d: usize) -> &'a [f32] {
        let at = self.start + i * self.strides[0] + j * self.strides[1] + k * self.strides[2];
        &self.data[at..at + d]
    }
}

impl CustomOp3 for InferenceAttention {
    fn name(&self) -> &'static str {
        "inference-attention"
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
        let &[b, heads, t, d] = l1.dims() else { candle_core::bail!("{}: q must be 4-d", self.name()) };
        let &[_, kv_heads, s, _] = l2.dims() else { candle_core::bail!("{}: k must be 4-d", self.name()) };
        let (q, k, v) = (View::new(s1, l1)?, View::new(s2, l2)?, View::new(s3, l3)?);
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let bias = match &*bias_storage {
            candle_core::Storage::Cpu(st) => super::contiguous_f32(st, bias_layout, self.name())?,
            _ => candle_core::bail!("{}: the bias must be on the CPU", self.name()),
        };
        let group = heads / kv_heads;
        let mut out = vec![0f32; b * t * heads * d];
        // One task per query position of a sequence: all its heads.
        out.par_chunks_mut(heads * d).enumerate().for_each(|(row, out)| {
            let (bi, ti) = (row / t, row % t);
            let bias = &bias[row * s..(row + 1) * s];
            let mut p = vec![0f32; s];
            for (h, out) in out.chunks_mut(d).enumerate() {
                let one = Query {
                    q: q.row(bi, h, ti, d),
                    key: |j| k.row(bi, h / group, j, d),
                    value: |j| v.row(bi, h / group, j, d),
                    bias,
                    scale: self.scale,
                };
                // Head widths that are a whole number of registers keep the query and the
                // output in registers; others take the plain loops.
                match (d % LANES == 0).then_some(d / LANES) {
                    Some(1) => one.attend_in_registers::<1>(&mut p, out),
                    Some(2) => one.attend_in_registers::<2>(&mut p, out),
                    Some(4) => one.attend_in_registers::<4>(&mut p, out),
                    Some(8) => one.attend_in_registers::<8>(&mut p, out),
                    Some(16) => one.attend_in_registers::<16>(&mut p, out),
                    _ => one.attend(&mut p, out),
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }
}

/// One query row of one head against its `s` cached keys and values.
struct Query<'a, K, V> {
    q: &'a [f32],
    key: K,
    value: V,
    /// `[s]`: the mask's additive bias for this query.
    bias: &'a [f32],
    scale: f32,
}

impl<'a, K: Fn(usize) -> &'a [f32], V: Fn(usize) -> &'a [f32]> Query<'a, K, V> {
    /// `scale·q·k_j + bias_j` into `p[j]`. A masked position (bias `f32::MIN`) keeps the bias
    /// alone, as the sum would: `f32::MIN` absorbs any score below 10³¹ in magnitude.
    fn scores(&self, p: &mut [f32], dot: impl Fn(&[f32]) -> f32) {
        for (j, (p, &bj)) in p.iter_mut().zip(self.bias).enumerate() {
            *p = if bj == f32::MIN { bj } else { self.scale * dot((self.key)(j)) + bj };
        }
    }

    /// `Σ_j softmax(p)_j · v_j` into `out` (zeroed), with plain loops.
    fn attend(&self, p: &mut [f32], out: &mut [f32]) {
        self.scores(p, |k| math::dot(self.q, k));
        math::softmax_in_place(p);
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                out.iter_mut().zip((self.value)(j)).for_each(|(o, &x)| *o += pj * x);
            }
        }
    }

    /// [`Self::attend`] for a head of `C` registers: the query and the output stay in
    /// registers across all keys, one horizontal sum per key.
    fn attend_in_registers<const C: usize>(&self, p: &mut [f32], out: &mut [f32]) {
        let q: [F32x; C] = std::array::from_fn(|c| F32x::load(&self.q[c * LANES..]));
        self.scores(p, |k| {
            let mut acc = F32x::zero();
            for c in 0..C {
                acc = acc.mul_add(q[c], F32x::load(&k[c * LANES..]));
            }
            acc.sum()
        });
        math::softmax_in_place(p);
        let mut acc = [F32x::zero(); C];
        for (j, &pj) in p.iter().enumerate() {
            if pj != 0.0 {
                let (w, v) = (F32x::splat(pj), (self.value)(j));
                for c in 0..C {
                    acc[c] = acc[c].mul_add(w, F32x::load(&v[c * LANES..]));
                }
            }
        }
        for c in 0..C {
            acc[c].add_to(&mut out[c * LANES..]);
        }
    }
}
