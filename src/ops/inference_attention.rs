//! Attention for decoding: queries against cached keys and values, forward only.
//!
//! Each decoding step attends one new query per row and head to a few hundred cached keys.
//! As a composition that is two tiny matrix products per (row, head), each paying the
//! `gemm` call's packing and dispatch, plus copies to move heads forward and back; here each
//! query row is one pass over its keys and values, read in place through their strides (the
//! cache is a view of a larger buffer, the queries a view of the packed projection).
//!
//! Keys and values may be cached in bf16 (a frozen bf16 model's cache: [`crate::model::KvCache`])
//! and are then widened as they are read. At 64 rows a step's attention reads the whole cache
//! and is bound by memory bandwidth, so half the bytes is nearly half the time.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::simd::{prefetch, F32x, LANES};
use super::skinny::WeightEntry;
use super::{fusable, math};

/// Whether [`attention_inference`] takes these operands: f32 queries and bias and f32 or
/// bf16 keys and values (both the same), all on the CPU.
pub(crate) fn applies(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> bool {
    fusable(q)
        && fusable(bias)
        && k.device().is_cpu()
        && v.device().is_cpu()
        && k.dtype() == v.dtype()
        && matches!(k.dtype(), DType::F32 | DType::BF16)
}

/// `softmax(scale·q·kᵀ + bias)·v` for `q` `[b, heads, t, d]`, `k` and `v`
/// `[b, kv_heads, s, d]` (grouped-query attention when `kv_heads` divides `heads`) and `bias`
/// `[b, 1, t, s]`; returns `[b, t, heads·d]`. `k` and `v` may be bf16 (see the module
/// documentation). Not differentiable: callers take it only when no input tracks gradients, and
/// otherwise (or off the CPU) the composition.
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
    if !applies(q, k, v, bias) {
        candle_core::bail!("attention_inference takes f32 CPU queries and bias, and f32 or bf16 CPU keys and values");
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

/// A 4-d view: the backing slice, its start offset and the strides of the first three
/// dimensions (the last is 1).
struct View<'a, T> {
    data: &'a [T],
    start: usize,
    strides: [usize; 3],
}

impl<'a, T: candle_core::WithDType> View<'a, T> {
    fn new(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<Self> {
        let st = l.stride();
        Ok(Self { data: s.as_slice::<T>()?, start: l.start_offset(), strides: [st[0], st[1], st[2]] })
    }

    /// The `d` values at `[i, j, k, ..]`.
    fn row(&self, i: usize, j: usize, k: usize, d: usize) -> &'a [T] {
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
        let q = View::new(s1, l1)?;
        match (s2, s3) {
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => {
                self.forward::<bf16>(q, l1, (View::new(s2, l2)?, View::new(s3, l3)?), l2)
            }
            _ => self.forward::<f32>(q, l1, (View::new(s2, l2)?, View::new(s3, l3)?), l2),
        }
    }
}

impl InferenceAttention {
    /// The attention for keys and values stored as `T`; `lq` and `lk` are the layouts of the
    /// queries and the keys (the values' is alike).
    fn forward<T: WeightEntry + candle_core::WithDType>(
        &self,
        q: View<f32>,
        lq: &Layout,
        (k, v): (View<T>, View<T>),
        lk: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "inference-attention";
        let &[b, heads, t, d] = lq.dims() else { candle_core::bail!("{name}: q must be 4-d") };
        let &[_, kv_heads, s, _] = lk.dims() else { candle_core::bail!("{name}: k must be 4-d") };
        let (bias_storage, bias_layout) = self.bias.storage_and_layout();
        let bias = match &*bias_storage {
            candle_core::Storage::Cpu(st) => super::contiguous_f32(st, bias_layout, name)?,
            _ => candle_core::bail!("{name}: the bias must be on the CPU"),
        };
        let group = heads / kv_heads;
        let mut out = vec![0f32; b * t * heads * d];
        // One task per query position of a sequence: all its heads.
        out.par_chunks_mut(heads * d).enumerate().for_each(|(row, out)| {
            let (bi, ti) = (row / t, row % t);
            let bias = &bias[row * s..(row + 1) * s];
            let mut p = vec![0f32; s];
            let mut widened = vec![0f32; d];
            for (h, out) in out.chunks_mut(d).enumerate() {
                // Decoding's attention reads the whole cache from memory, and demand misses
                // one head at a time left most of the bandwidth unused. The row's first head
                // is asked for as the row starts; after that, the next head's key at each
                // position is asked for as this head's key there is scored, and its value as
                // this head's value there is summed, so the next head's lines arrive spread
                // over this head's two passes. GPT-2 124M decoding 64 rows (64 + 64 tokens,
                // f32; one process alternating the two): attention 1.84–2.16 s a run with the
                // next head asked for whole as each head starts, 1.48–1.63 s spread.
                let kv_head = |h: usize| h / group;
                if h == 0 {
                    for j in 0..s {
                        prefetch_row(k.row(bi, 0, j, d));
                        prefetch_row(v.row(bi, 0, j, d));
                    }
                }
                let next = (h + 1 < heads && kv_head(h + 1) != kv_head(h)).then_some(kv_head(h + 1));
                let one = Query {
                    q: q.row(bi, h, ti, d),
                    key: |j| k.row(bi, h / group, j, d),
                    value: |j| v.row(bi, h / group, j, d),
                    ahead: |j, values| {
                        if let Some(next) = next {
                            prefetch_row(if values { v.row(bi, next, j, d) } else { k.row(bi, next, j, d) });
                        }
                    },
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
                    _ => one.attend(&mut p, &mut widened, out),
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((b, t, heads * d))))
    }
}

/// Asks for every cache line of `row`.
#[inline(always)]
fn prefetch_row<T>(row: &[T]) {
    let step = super::skinny::LINE_BYTES / std::mem::size_of::<T>();
    for at in (0..row.len()).step_by(step) {
        prefetch(row[at..].as_ptr());
    }
}

/// One query row of one head against its `s` cached keys and values.
struct Query<'a, K, V, A> {
    q: &'a [f32],
    key: K,
    value: V,
    /// Called with each position as its key is scored (`false`) and as its value is summed
    /// (`true`): prefetches another head's.
    ahead: A,
    /// `[s]`: the mask's additive bias for this query.
    bias: &'a [f32],
    scale: f32,
}

impl<'a, T: WeightEntry, K: Fn(usize) -> &'a [T], V: Fn(usize) -> &'a [T], A: Fn(usize, bool)> Query<'a, K, V, A> {
    /// `scale·q·k_j + bias_j` into `p[j]`. A masked position (bias `f32::MIN`) keeps the bias
    /// alone, as the sum would: `f32::MIN` absorbs any score below 10³¹ in magnitude.
    fn scores(&self, p: &mut [f32], mut dot: impl FnMut(&[T]) -> f32) {
        for (j, (p, &bj)) in p.iter_mut().zip(self.bias).enumerate() {
            (self.ahead)(j, false);
            *p = if bj == f32::MIN { bj } else { self.scale * dot((self.key)(j)) + bj };
        }
    }

    /// `Σ_j softmax(p)_j · v_j` into `out` (zeroed), with plain loops; each key and value is
    /// widened into `widened` (`d` long) first.
    fn attend(&self, p: &mut [f32], widened: &mut [f32], out: &mut [f32]) {
        self.scores(p, |k| {
            T::widen(k, widened);
            math::dot(self.q, widened)
        });
        math::softmax_in_place(p);
        for (j, &pj) in p.iter().enumerate() {
            (self.ahead)(j, true);
            if pj != 0.0 {
                T::widen((self.value)(j), widened);
                out.iter_mut().zip(&*widened).for_each(|(o, &x)| *o += pj * x);
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
                acc = acc.mul_add(q[c], T::load(&k[c * LANES..]));
            }
            acc.sum()
        });
        math::softmax_in_place(p);
        let mut acc = [F32x::zero(); C];
        for (j, &pj) in p.iter().enumerate() {
            (self.ahead)(j, true);
            if pj != 0.0 {
                let (w, v) = (F32x::splat(pj), (self.value)(j));
                for c in 0..C {
                    acc[c] = acc[c].mul_add(w, T::load(&v[c * LANES..]));
                }
            }
        }
        for c in 0..C {
            acc[c].add_to(&mut out[c * LANES..]);
        }
    }
}
