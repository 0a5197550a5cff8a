//! The key/value cache of incremental decoding: preallocated per-layer buffers written in
//! place, and the removal of finished rows from them.

use anyhow::Result;
use candle_core::{CpuStorage, DType, Layout, Tensor};

use super::layers::attention;

/// Key/value cache of every layer for incremental decoding.
///
/// Each layer's keys and values live in a preallocated `[b, kv_heads, capacity, d]` buffer
/// written in place; attention reads views of the filled part. The capacity doubles when
/// exceeded, so decoding does not allocate (and fault in fresh memory) at every token.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// The dtype keys and values are stored in, when not the one they are computed in.
    storage: Option<DType>,
}

#[derive(Clone, Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// Room reserved beyond the prompt when a cache is first filled.
const INITIAL_HEADROOM: usize = 64;

impl LayerCache {
    fn with_capacity(k: &Tensor, cap: usize) -> Result<(Tensor, Tensor)> {
        let (b, h, _, d) = k.dims4()?;
        let z = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
        Ok((z.clone(), z.zeros_like()?))
    }
}

impl KvCache {
    /// An empty cache for a model with `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self { layers: vec![None; n_layers], storage: None }
    }

    /// The cache storing keys and values in `dtype` (`None`: as computed). A frozen bf16
    /// model on the CPU stores them in bf16, as its products round their inputs to bf16
    /// anyway: half the bytes for decoding's attention to read (the model's
    /// [`ModelInfo::cache_dtype`](super::ModelInfo::cache_dtype)).
    pub fn storing(mut self, dtype: Option<DType>) -> Self {
        self.storage = dtype;
        self
    }

    /// Number of cached positions.
    pub fn seq_len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |c| c.len)
    }

    /// Appends this step's keys/values `[b, kv_heads, t, d]` to layer `layer` and returns
    /// views of all cached keys/values.
    pub fn append(&mut self, layer: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let (k, v) = match self.storage {
            Some(dtype) => (k.to_dtype(dtype)?.contiguous()?, v.to_dtype(dtype)?.contiguous()?),
            None => (k.contiguous()?, v.contiguous()?),
        };
        let entry = &mut self.layers[layer];
        let needed = entry.as_ref().map_or(0, |c| c.len) + t;
        let capacity = entry.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        if needed > capacity {
            let cap = (2 * capacity).max(needed + INITIAL_HEADROOM);
            let (nk, nv) = LayerCache::with_capacity(&k, cap)?;
            if let Some(old) = entry.as_ref() {
                nk.slice_set(&old.k.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&old.v.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
            }
            *entry = Some(LayerCache { k: nk, v: nv, len: entry.as_ref().map_or(0, |c| c.len) });
        }
        let c = entry.as_mut().expect("cache entry exists after growth");
        c.k.slice_set(&k, 2, c.len)?;
        c.v.slice_set(&v, 2, c.len)?;
        c.len += t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }

    /// Keeps batch rows `keep` (increasing indices) and drops the others, so that later steps
    /// compute only for the rows kept: decoding drops rows that have finished. On the CPU the
    /// kept rows' filled positions move down within each buffer, which then narrows to them
    /// (no allocation; the buffers are shared with clones of this cache, as [`Self::append`]'s
    /// writes are); elsewhere the buffers are gathered afresh.
    pub fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) {
            anyhow::bail!("KV cache rows to keep must be increasing, got {keep:?}");
        }
        for c in self.layers.iter_mut().flatten() {
            let b = c.k.dim(0)?;
            if keep.last().is_some_and(|&r| r >= b) {
                anyhow::bail!("KV cache has {b} rows, asked to keep {keep:?}");
            }
            if keep.len() == b {
                continue;
            }
            for buffer in [&mut c.k, &mut c.v] {
                *buffer = if buffer.device().is_cpu() && buffer.is_contiguous() {
                    buffer.inplace_op1(&MoveRows { keep, len: c.len })?;
                    buffer.narrow(0, 0, keep.len())?
                } else {
                    let ids: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
                    buffer.index_select(&Tensor::new(ids, buffer.device())?, 0)?
                };
            }
        }
        Ok(())
    }

    /// Appends this step's keys/values to layer `layer` and attends the queries `q`
    /// `[b, heads, t, d]` to everything cached: [`attention`]'s result, by the fused
    /// decoding kernel on f32 CPU tensors (not differentiable: caches serve generation only).
    pub fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        bias: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (k, v) = self.append(layer, k, v)?;
        if crate::ops::inference_attention::applies(q, &k, &v, bias) {
            Ok(crate::ops::attention_inference(q, &k, &v, bias, scale)?)
        } else {
            attention(q, &k.to_dtype(q.dtype())?, &v.to_dtype(q.dtype())?, bias, scale)
        }
    }
}

/// Moves row `keep[i]` of a contiguous `[b, heads, capacity, d]` buffer to row `i`: the first
/// `len` positions of each head, the rest of the buffer being unwritten room.
struct MoveRows<'a> {
    keep: &'a [usize],
    len: usize,
}

impl candle_core::InplaceOp1 for MoveRows<'_> {
    fn name(&self) -> &'static str {
        "kv-cache-move-rows"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let &[_, heads, cap, d] = layout.dims() else {
            candle_core::bail!("{}: expected a 4-d buffer, got {:?}", self.name(), layout.dims())
        };
        let start = layout.start_offset();
        let (row, head, filled) = (heads * cap * d, cap * d, self.len * d);
        // Rows only move down (`keep` increases), so each copy reads a row not yet overwritten.
        fn move_rows<T: Copy>(x: &mut [T], keep: &[usize], start: usize, sizes: (usize, usize, usize, usize)) {
            let (heads, row, head, filled) = sizes;
            for (to, &from) in keep.iter().enumerate().filter(|(to, from)| to != *from) {
                for h in 0..heads {
                    let src = start + from * row + h * head;
                    x.copy_within(src..src + filled, start + to * row + h * head);
                }
            }
        }
        let sizes = (heads, row, head, filled);
        match storage {
            CpuStorage::F32(x) => move_rows(x, self.keep, start, sizes),
            CpuStorage::BF16(x) => move_rows(x, self.keep, start, sizes),
            CpuStorage::F16(x) => move_rows(x, self.keep, start, sizes),
            other => {
                use candle_core::backend::BackendStorage;
                candle_core::bail!("{}: unexpected dtype {:?}", self.name(), other.dtype())
            }
        }
        Ok(())
    }
}
