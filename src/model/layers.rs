//! Building blocks shared by the model families.
//!
//! candle's fused `LayerNorm`/`RmsNorm`/`softmax_last_dim`/`sdpa` kernels compute the right
//! values but propagate no gradient, so training-capable models must not use them: the hot
//! pieces use our fused ops with their own backward ([`crate::ops`]), the rest differentiable
//! compositions.

use std::sync::Arc;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};

use super::params::{Init, ParamBuilder};
use crate::ops::packed::PackedMatrix;
use crate::ops::WeightLayout;

/// A dense layer `y = x·W + b`.
#[derive(Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

/// How a [`Linear`] holds its weight.
#[derive(Clone)]
enum LinearWeight {
    /// A tensor `[out, in]` when `out_in` (`nn.Linear`, some frozen `Conv1D`s), else
    /// `[in, out]` (GPT-2's `Conv1D` as saved).
    Tensor { weight: Tensor, out_in: bool },
    /// A frozen weight packed at load ([`ParamBuilder::get_packed`]).
    Packed(Arc<PackedMatrix>),
}

impl Linear {
    /// An `nn.Linear` named `name` (`name.weight` `[out, in]`, optional `name.bias`).
    pub fn new(pb: &mut ParamBuilder, name: &str, din: usize, dout: usize, bias: bool) -> Result<Self> {
        let name_w = format!("{name}.weight");
        let weight = if pb.packs_matrix(din, dout) {
            LinearWeight::Packed(pb.get_packed(&name_w, (din, dout), WeightLayout::OutIn, Init::Normal)?)
        } else {
            LinearWeight::Tensor { weight: pb.get(&name_w, &[dout, din], Init::Normal)?, out_in: true }
        };
        let bias = if bias { Some(pb.get(&format!("{name}.bias"), &[dout], Init::Zeros)?) } else { None };
        Ok(Self { weight, bias })
    }

    /// A GPT-2 `Conv1D` named `name` (`name.weight` `[in, out]`, `name.bias`); a frozen model
    /// may store the weight transposed or packed (below).
    pub fn conv1d(pb: &mut ParamBuilder, name: &str, din: usize, dout: usize) -> Result<Self> {
        let name_w = format!("{name}.weight");
        let bias = |pb: &mut ParamBuilder| pb.get(&format!("{name}.bias"), &[dout], Init::Zeros);
        if pb.packs_matrix(din, dout) {
            let weight =
                LinearWeight::Packed(pb.get_packed(&name_w, (din, dout), WeightLayout::InOut, Init::Normal)?);
            return Ok(Self { weight, bias: Some(bias(pb)?) });
        }
        // A frozen model stores a weight with at least as many outputs as inputs `[out, in]`:
        // decoding's products then read each output column as one contiguous run (the
        // dot-product kernel; `[in, out]` needs bands copied out first), 16-row GPT-2
        // decoding ~3% faster, while the packing product (prefill, a teacher's forward) is
        // unchanged within 1%. A weight with more inputs than outputs stays `[in, out]`:
        // `gemm` packs it 25% faster that way (GPT-2's 3072 × 768 for 1,024 rows: 22 vs 29
        // ms). BENCHMARKS.md, "Real sizes".
        let out_in = pb.is_frozen() && din <= dout;
        let shape = [din, dout];
        let weight = if out_in {
            pb.get_transposed(&name_w, shape, Init::Normal)?
        } else {
            pb.get(&name_w, &shape, Init::Normal)?
        };
        Ok(Self { weight: LinearWeight::Tensor { weight, out_in }, bias: Some(bias(pb)?) })
    }

    /// The weight and the bias (if any), for activation checkpointing, which recomputes a
    /// trainable model's blocks; a packed weight (frozen, so never checkpointed) is left out.
    pub fn tensors(&self) -> Vec<Tensor> {
        let weight = match &self.weight {
            LinearWeight::Tensor { weight, .. } => Some(weight.clone()),
            LinearWeight::Packed(_) => None,
        };
        weight.into_iter().chain(self.bias.clone()).collect()
    }

    /// Applies the layer to `x` of shape `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let din = dims[dims.len() - 1];
        let rows = x.elem_count() / din.max(1);
        let x2 = x.reshape((rows, din))?;
        let y = match &self.weight {
            LinearWeight::Packed(w) => crate::ops::packed::linear_packed(&x2, w, self.bias.as_ref())?,
            LinearWeight::Tensor { weight, out_in } => {
                let layout = if *out_in { WeightLayout::OutIn } else { WeightLayout::InOut };
                match &self.bias {
                    Some(b) => crate::ops::linear(&x2, weight, b, layout)?,
                    None => crate::ops::linear_no_bias(&x2, weight, layout)?,
                }
            }
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = y.dim(1)?;
        Ok(y.reshape(out_dims)?)
    }
}

/// The output projection's weight `[vocab, hidden]`, and for a frozen model that packs its
/// matrices ([`ParamBuilder::packs_matrix`]) a packed copy of it ([`PackedMatrix`]), from
/// which [`CausalLm::logits`] (decoding, rescoring) computes: at decoding's 16–64 rows the
/// packed product is ~1.6× the decoding kernel on GPT-2's 50,257-column head. The tensor stays
/// for what reads the head otherwise (the embedding it is often tied to, the fused losses);
/// the copy costs the head's bytes again (bf16: 77 MB for GPT-2, 161 MB for GPT-2 XL; f32
/// twice that).
///
/// [`CausalLm::logits`]: super::CausalLm::logits
#[derive(Clone)]
pub struct LmHead {
    /// `[vocab, hidden]`.
    pub weight: Tensor,
    /// The packed copy (`hidden × vocab`), where the model packs its matrices.
    pub packed: Option<Arc<PackedMatrix>>,
}

impl LmHead {
    /// The head with weight `weight` (`[vocab, hidden]`), packed too where `pb` packs matrices.
    pub fn new(pb: &ParamBuilder, weight: Tensor) -> Result<Self> {
        let (vocab, hidden) = weight.dims2()?;
        let packed = if pb.packs_matrix(hidden, vocab) && PackedMatrix::packs(weight.dtype()) {
            Some(Arc::new(PackedMatrix::pack(&weight, WeightLayout::OutIn)?))
        } else {
            None
        };
        Ok(Self { weight, packed })
    }
}

/// Layer normalisation over the last dimension, with optional affine parameters.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    /// Weight and bias, both present or both absent.
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl LayerNorm {
    /// The weight and bias (none without affine parameters).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.affine.iter().flat_map(|(w, b)| [w.clone(), b.clone()]).collect()
    }

    /// `name.weight` and `name.bias` of size `dim` (both omitted when `affine` is false).
    pub fn new(pb: &mut ParamBuilder, name: &str, dim: usize, eps: f64, affine: bool) -> Result<Self> {
        if !affine {
            return Ok(Self { affine: None, eps });
        }
        let weight = pb.get(&format!("{name}.weight"), &[dim], Init::Ones)?;
        let bias = pb.get(&format!("{name}.bias"), &[dim], Init::Zeros)?;
        Ok(Self { affine: Some((weight, bias)), eps })
    }

    /// Normalises `x` over its last dimension (statistics in f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.affine {
            Some((w, b)) => crate::ops::layer_norm(x, w, b, self.eps)?,
            None => crate::ops::layer_norm::normalize_composite(x, self.eps)?,
        })
    }
}

/// Root-mean-square normalisation (Llama family).
#[derive(Clone, Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// `name.weight` of size `dim`.
    pub fn new(pb: &mut ParamBuilder, name: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = pb.get(&format!("{name}.weight"), &[dim], Init::Ones)?;
        Ok(Self { weight, eps })
    }

    /// The weight.
    pub fn tensors(&self) -> Vec<Tensor> {
        vec![self.weight.clone()]
    }

    /// `x / sqrt(mean(x²) + eps) · w`, statistics in f32 as `transformers` does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
        let y = x.broadcast_div(&(ms + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        Ok(y.broadcast_mul(&self.weight)?)
    }
}

/// Feed-forward activation functions, by their `transformers` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// GELU, tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// GELU with the exact erf (`gelu`).
    GeluErf,
    /// `relu`.
    Relu,
    /// `silu` / `swish`.
    Silu,
}

impl Activation {
    /// Parses a `transformers` activation name; anything else is refused.
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "gelu" => Self::GeluErf,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("unsupported activation function `{other}` in config.json (supported: gelu_new, gelu_pytorch_tanh, gelu, relu, silu)"),
        })
    }

    /// Applies the activation.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::GeluTanh => crate::ops::gelu_tanh(x)?,
            Self::GeluErf => x.gelu_erf()?,
            Self::Relu => x.relu()?,
            Self::Silu => x.silu()?,
        })
    }
}

/// Which key positions each query may attend to: a host-side `[batch, total_len]` 0/1 mask
/// (1 = real token) covering the cached prefix and the new tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionMask {
    batch: usize,
    len: usize,
    data: Vec<u8>,
}

impl AttentionMask {
    /// From per-row 0/1 values; all rows must have the same length.
    pub fn from_rows(rows: &[Vec<u8>]) -> Result<Self> {
        let len = rows.first().map_or(0, |r| r.len());
        if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != len) {
            bail!("attention mask row {i} has length {}, expected {len}", r.len());
        }
        Ok(Self { batch: rows.len(), len, data: rows.concat() })
    }

    /// A mask with every position valid.
    pub fn full(batch: usize, len: usize) -> Self {
        Self { batch, len, data: vec![1; batch * len] }
    }

    /// Number of rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Total length (cached prefix + new tokens).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the mask has no columns.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Row `b`.
    pub fn row(&self, b: usize) -> &[u8] {
        &self.data[b * self.len..(b + 1) * self.len]
    }

    /// Rows `keep` of the mask, in that order (decoding drops finished rows).
    pub fn keep_rows(&self, keep: &[usize]) -> Self {
        let data = keep.iter().flat_map(|&b| self.row(b).iter().copied()).collect();
        Self { batch: keep.len(), len: self.len, data }
    }

    /// The mask extended by one column (a decoding step), valid where `valid[b]` is true.
    pub fn extended(&self, valid: &[bool]) -> Self {
        let mut data = Vec::with_capacity(self.batch * (self.len + 1));
        for (b, &v) in valid.iter().enumerate().take(self.batch) {
            data.extend_from_slice(self.row(b));
            data.push(v as u8);
        }
        Self { batch: self.batch, len: self.len + 1, data }
    }

    /// Position ids of the last `t` columns as `transformers`' generation computes them:
    /// `cumsum(mask) - 1`, with padding positions set to `pad_value`.
    pub fn position_ids(&self, t: usize, pad_value: i64) -> Vec<i64> {
        let mut out = Vec::with_capacity(self.batch * t);
        for b in 0..self.batch {
            let mut count = 0i64;
            for (j, &m) in self.row(b).iter().enumerate() {
                count += m as i64;
                if j >= self.len - t {
                    out.push(if m == 1 { count - 1 } else { pad_value });
                }
            }
        }
        out
    }

    /// Additive attention bias `[batch, 1, t, len]` for the last `t` columns as queries:
    /// 0 where the key is a real token at or before the query, the dtype's minimum elsewhere
    /// (finite, so that fully masked padding rows stay finite, as in `transformers`: `f32::MIN`
    /// itself rounds to −∞ in bf16 and f16, which made a padded batch's cached pad rows NaN).
    /// `window` limits how far back a query may look (sliding-window attention).
    pub fn bias(&self, t: usize, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
        let past = self.len - t;
        let min = match dtype {
            DType::BF16 => -3.389_531_4e38, // bf16's most negative finite value
            DType::F16 => -65_504.0,
            _ => f32::MIN,
        };
        let mut data = Vec::with_capacity(self.batch * t * self.len);
        for b in 0..self.batch {
            let row = self.row(b);
            for i in 0..t {
                let q = past + i;
                for (k, &m) in row.iter().enumerate() {
                    let in_window = window.is_none_or(|w| q - k.min(q) < w);
                    let ok = m == 1 && k <= q && in_window;
                    data.push(if ok { 0f32 } else { min });
                }
            }
        }
        let bias = Tensor::from_vec(data, (self.batch, 1, t, self.len), device)?;
        Ok(bias.to_dtype(dtype)?)
    }
}

/// Scaled dot-product attention with an additive bias.
///
/// `q`: `[b, heads, t, d]`; `k`, `v`: `[b, kv_heads, s, d]` (grouped-query attention when
/// `kv_heads < heads`); `bias`: `[b, 1, t, s]`. Returns `[b, t, heads·d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, heads, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let (k, v) = if kv_heads == heads {
        (k.clone(), v.clone())
    } else {
        (repeat_kv(k, heads / kv_heads)?, repeat_kv(v, heads / kv_heads)?)
    };
    // k and v may be views into a preallocated cache: matmul reads them strided.
    let scores = q.contiguous()?.matmul(&k.t()?)?;
    let probs = crate::ops::masked_softmax(&scores, bias, scale)?;
    let out = probs.matmul(&v)?;
    Ok(out.transpose(1, 2)?.reshape((b, t, heads * d))?)
}

/// Repeats each key/value head `n` times: `[b, kv, s, d]` → `[b, kv·n, s, d]`.
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?.expand((b, kv, n, s, d))?.reshape((b, kv * n, s, d))?)
}

/// The last entry along dimension `dim`, kept as a dimension of size 1 (`[…, t, …]` →
/// `[…, 1, …]`): a block computing its output at the last position only narrows its queries
/// (dimension 2), their bias rows (2) and its residual stream (1) with it.
pub fn last_along(x: &Tensor, dim: usize) -> Result<Tensor> {
    let t = x.dim(dim)?;
    Ok(x.narrow(dim, t - 1, 1)?)
}

/// Splits `[b, t, heads·d]` into `[b, heads, t, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, hd) = x.dims3()?;
    Ok(x.reshape((b, t, heads, hd / heads))?.transpose(1, 2)?.contiguous()?)
}

/// Converts host position ids to a `[b, t]` tensor.
pub fn position_tensor(pos: Vec<i64>, b: usize, t: usize, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(pos, (b, t), device)?)
}
