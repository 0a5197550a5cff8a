//! Llama family (`LlamaForCausalLM`, `Qwen2ForCausalLM`, `MistralForCausalLM`): RMSNorm,
//! rotary positions, grouped-query attention, SwiGLU MLP. Qwen2 adds q/k/v biases; Mistral
//! may restrict attention to a sliding window.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

use super::checkpointing::Checkpointing;
use super::config::LlamaConfig;
use super::kv_cache::KvCache;
use super::layers::{attention, last_along, split_heads, Activation, AttentionMask, Linear, LmHead, RmsNorm};
use super::params::{Init, ParamBuilder, Params};
use super::{CausalLm, Family, ModelInfo, Positions};

#[derive(Clone)]
struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
}

/// A Llama-family language model.
pub struct Llama {
    info: ModelInfo,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: LmHead,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    inv_freq: Vec<f32>,
    window: Option<usize>,
    act: Activation,
    /// The dtype activations are computed in (f32 also when the matrices are stored in bf16).
    dtype: DType,
    params: Params,
    /// Activation checkpointing of the layers (`train.grad_checkpointing`).
    checkpointing: Checkpointing,
}

/// What a layer's forward needs besides its input: rotary tables, mask, head layout.
#[derive(Clone)]
struct LayerContext {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    scale: f64,
    heads: usize,
    kv_heads: usize,
    act: Activation,
}

impl Layer {
    fn tensors(&self) -> Vec<Tensor> {
        [&self.input_norm, &self.post_attn_norm]
            .into_iter()
            .flat_map(RmsNorm::tensors)
            .chain(
                [&self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down]
                    .into_iter()
                    .flat_map(Linear::tensors),
            )
            .collect()
    }

    /// The layer's output for `x`; with a cache, layer `index`'s keys and values are appended.
    /// With `last_only` the output is the last position's alone (`[b, 1, hidden]`), though
    /// every position's keys and values are computed (and cached).
    fn forward(
        &self,
        x: &Tensor,
        c: &LayerContext,
        cache: Option<(&mut KvCache, usize)>,
        last_only: bool,
    ) -> Result<Tensor> {
        let h = self.input_norm.forward(x)?;
        let q = apply_rope(&split_heads(&self.q.forward(&h)?, c.heads)?, &c.cos, &c.sin)?;
        let k = apply_rope(&split_heads(&self.k.forward(&h)?, c.kv_heads)?, &c.cos, &c.sin)?;
        let v = split_heads(&self.v.forward(&h)?, c.kv_heads)?;
        let (q, bias, x) = if last_only {
            (last_along(&q, 2)?, last_along(&c.bias, 2)?, last_along(x, 1)?)
        } else {
            (q, c.bias.clone(), x.clone())
        };
        let a = match cache {
            Some((cache, index)) => cache.attend(index, &q, k, v, &bias, c.scale)?,
            None => attention(&q, &k, &v, &bias, c.scale)?,
        };
        let x = (&x + self.o.forward(&a)?)?;
        let h = self.post_attn_norm.forward(&x)?;
        let m = self.down.forward(&(c.act.forward(&self.gate.forward(&h)?)? * self.up.forward(&h)?)?)?;
        Ok((x + m)?)
    }
}

impl Llama {
    /// Builds the model, taking every parameter from `pb`.
    pub fn new(cfg: &LlamaConfig, mut pb: ParamBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let (heads, kv_heads, hd) = (cfg.num_attention_heads, cfg.num_kv_heads(), cfg.head_dim());
        let qkv_bias = cfg.attention_bias || cfg.family == Family::Qwen2;
        let o_bias = cfg.attention_bias && cfg.family == Family::Llama;
        let eps = cfg.rms_norm_eps;
        let embed_tokens = pb.get("model.embed_tokens.weight", &[cfg.vocab_size, h], Init::Normal)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let ff = cfg.intermediate_size;
            layers.push(Layer {
                q: Linear::new(&mut pb, &format!("{p}.self_attn.q_proj"), h, heads * hd, qkv_bias)?,
                k: Linear::new(&mut pb, &format!("{p}.self_attn.k_proj"), h, kv_heads * hd, qkv_bias)?,
                v: Linear::new(&mut pb, &format!("{p}.self_attn.v_proj"), h, kv_heads * hd, qkv_bias)?,
                o: Linear::new(&mut pb, &format!("{p}.self_attn.o_proj"), heads * hd, h, o_bias)?,
                gate: Linear::new(&mut pb, &format!("{p}.mlp.gate_proj"), h, ff, cfg.mlp_bias)?,
                up: Linear::new(&mut pb, &format!("{p}.mlp.up_proj"), h, ff, cfg.mlp_bias)?,
                down: Linear::new(&mut pb, &format!("{p}.mlp.down_proj"), ff, h, cfg.mlp_bias)?,
                input_norm: RmsNorm::new(&mut pb, &format!("{p}.input_layernorm"), h, eps)?,
                post_attn_norm: RmsNorm::new(&mut pb, &format!("{p}.post_attention_layernorm"), h, eps)?,
            });
        }
        let norm = RmsNorm::new(&mut pb, "model.norm", h, eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            pb.get("lm_head.weight", &[cfg.vocab_size, h], Init::Normal)?
        };
        let dtype = pb.dtype();
        let cache_dtype = pb.cache_dtype();
        let lm_head = LmHead::new(&pb, lm_head)?;
        let params = pb.finish(&["rotary_emb.inv_freq", "lm_head.weight"]);
        let window = if cfg.family == Family::Mistral { cfg.sliding_window } else { None };
        Ok(Self {
            info: ModelInfo {
                family: cfg.family,
                vocab_size: cfg.vocab_size,
                hidden_size: h,
                num_layers: cfg.num_hidden_layers,
                max_positions: None,
                tied_embeddings: cfg.tie_word_embeddings,
                cache_dtype,
            },
            embed_tokens,
            layers,
            norm,
            lm_head,
            heads,
            kv_heads,
            head_dim: hd,
            inv_freq: cfg.rope.inv_freq(hd).into_iter().map(|f| f as f32).collect(),
            window,
            act: Activation::parse(&cfg.hidden_act)?,
            dtype,
            params,
            checkpointing: Checkpointing::default(),
        })
    }

    /// `cos` and `sin` tables `[b, 1, t, head_dim]` for the given positions, computed in f32
    /// as `transformers` does (`cat(freqs, freqs)` layout).
    fn rope_tables(&self, pos: &[i64], b: usize, t: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(pos.len() * 2 * half);
        let mut sin = Vec::with_capacity(pos.len() * 2 * half);
        for &p in pos {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let shape = (b, 1, t, 2 * half);
        Ok((Tensor::from_vec(cos, shape, dev)?, Tensor::from_vec(sin, shape, dev)?))
    }
}

/// `x·cos + rotate_half(x)·sin`, with `rotate_half([a, b]) = [−b, a]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

impl CausalLm for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn hidden_states(
        &self,
        input_ids: &Tensor,
        mask: &AttentionMask,
        mut cache: Option<&mut KvCache>,
        positions: Positions,
    ) -> Result<Tensor> {
        let last_only = positions == Positions::Last;
        let (b, t) = input_ids.dims2()?;
        let dev = input_ids.device();
        let dtype = self.dtype;
        let pos = mask.position_ids(t, 1);
        let (cos, sin) = self.rope_tables(&pos, b, t, dev)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let bias = mask.bias(t, self.window, dtype, dev)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ctx = LayerContext { cos, sin, bias, scale, heads: self.heads, kv_heads: self.kv_heads, act: self.act };
        let mut x = self.embed_tokens.embedding(&input_ids.flatten_all()?)?.to_dtype(dtype)?.reshape((b, t, ()))?;
        let checkpointing = self.checkpointing.active(cache.is_some());
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            let last_only = last_only && i == last;
            x = if checkpointing && !last_only {
                let (layer, c) = (l.clone(), ctx.clone());
                self.checkpointing.block(&x, move |x| layer.forward(x, &c, None, false), l.tensors())?
            } else {
                l.forward(&x, &ctx, cache.as_deref_mut().map(|c| (c, i)), last_only)?
            };
        }
        if last_only {
            // A no-op after the last layer; the embeddings' last position in a model without layers.
            x = last_along(&x, 1)?;
        }
        self.norm.forward(&x)
    }

    fn checkpointing(&self) -> Option<&Checkpointing> {
        Some(&self.checkpointing)
    }

    fn lm_head_weight(&self) -> &Tensor {
        &self.lm_head.weight
    }

    fn lm_head_packed(&self) -> Option<&std::sync::Arc<crate::ops::packed::PackedMatrix>> {
        self.lm_head.packed.as_ref()
    }

    fn params(&self) -> &Params {
        &self.params
    }
}
