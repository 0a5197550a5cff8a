//! GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LN blocks, fused q/k/v `Conv1D`.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::checkpointing::Checkpointing;
use super::config::Gpt2Config;
use super::kv_cache::KvCache;
use super::layers::{last_along, position_tensor, split_heads, Activation, AttentionMask, LayerNorm, Linear, LmHead};
use super::params::{Init, ParamBuilder, Params};
use super::{CausalLm, Family, ModelInfo, Positions};
use crate::ops::attention_packed;

#[derive(Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_proj: Linear,
    scale: f64,
}

impl Block {
    /// The block's parameters.
    fn tensors(&self) -> Vec<Tensor> {
        [&self.ln_1, &self.ln_2]
            .into_iter()
            .flat_map(LayerNorm::tensors)
            .chain([&self.c_attn, &self.attn_proj, &self.c_fc, &self.mlp_proj].into_iter().flat_map(Linear::tensors))
            .collect()
    }

    /// The block's output for `x`; with a cache, layer `layer`'s keys and values are appended.
    /// With `last_only` the output is the last position's alone (`[b, 1, hidden]`), though
    /// every position's keys and values are cached.
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        n_head: usize,
        act: Activation,
        cache: Option<(&mut KvCache, usize)>,
        last_only: bool,
    ) -> Result<Tensor> {
        let qkv = self.c_attn.forward(&self.ln_1.forward(x)?)?;
        let a = match cache {
            // Without a cache (training, scoring) heads are read in place from the packed
            // projections by one fused op.
            None => attention_packed(&qkv, bias, n_head, self.scale)?,
            Some((c, layer)) => {
                let (b, t, h3) = qkv.dims3()?;
                let h = h3 / 3;
                // Queries are read through their strides; keys and values are copied into the
                // cache.
                let q = qkv.narrow(2, 0, h)?.reshape((b, t, n_head, h / n_head))?.transpose(1, 2)?;
                let k = split_heads(&qkv.narrow(2, h, h)?, n_head)?;
                let v = split_heads(&qkv.narrow(2, 2 * h, h)?, n_head)?;
                let (q, bias) = if last_only { (last_along(&q, 2)?, last_along(bias, 2)?) } else { (q, bias.clone()) };
                c.attend(layer, &q, k, v, &bias, self.scale)?
            }
        };
        // From here on each position is on its own.
        let (x, a) = if last_only { (last_along(x, 1)?, last_along(&a, 1)?) } else { (x.clone(), a) };
        let x = (&x + self.attn_proj.forward(&a)?)?;
        let m = self.mlp_proj.forward(&act.forward(&self.c_fc.forward(&self.ln_2.forward(&x)?)?)?)?;
        Ok((x + m)?)
    }
}

/// A GPT-2 language model.
pub struct Gpt2 {
    info: ModelInfo,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: LmHead,
    n_head: usize,
    act: Activation,
    /// The dtype activations are computed in (f32 also when the matrices are stored in bf16).
    dtype: DType,
    params: Params,
    /// Activation checkpointing of the blocks (`train.grad_checkpointing`).
    checkpointing: Checkpointing,
}

impl Gpt2 {
    /// Builds the model, taking every parameter from `pb`.
    pub fn new(cfg: &Gpt2Config, mut pb: ParamBuilder) -> Result<Self> {
        pb = pb.alias_prefix("transformer.", "");
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let eps = cfg.layer_norm_epsilon;
        let act = Activation::parse(&cfg.activation_function)?;
        let wte = pb.get("transformer.wte.weight", &[cfg.vocab_size, h], Init::Normal)?;
        let wpe = pb.get("transformer.wpe.weight", &[cfg.n_positions, h], Init::Normal)?;
        let head_dim = (h / cfg.n_head) as f64;
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            let mut scale = if cfg.scale_attn_weights { 1.0 / head_dim.sqrt() } else { 1.0 };
            if cfg.scale_attn_by_inverse_layer_idx {
                scale /= (i + 1) as f64;
            }
            blocks.push(Block {
                ln_1: LayerNorm::new(&mut pb, &format!("{p}.ln_1"), h, eps, true)?,
                c_attn: Linear::conv1d(&mut pb, &format!("{p}.attn.c_attn"), h, 3 * h)?,
                attn_proj: Linear::conv1d(&mut pb, &format!("{p}.attn.c_proj"), h, h)?,
                ln_2: LayerNorm::new(&mut pb, &format!("{p}.ln_2"), h, eps, true)?,
                c_fc: Linear::conv1d(&mut pb, &format!("{p}.mlp.c_fc"), h, inner)?,
                mlp_proj: Linear::conv1d(&mut pb, &format!("{p}.mlp.c_proj"), inner, h)?,
                scale,
            });
        }
        let ln_f = LayerNorm::new(&mut pb, "transformer.ln_f", h, eps, true)?;
        let lm_head = if cfg.tie_word_embeddings {
            wte.clone()
        } else {
            pb.get("lm_head.weight", &[cfg.vocab_size, h], Init::Normal)?
        };
        let dtype = pb.dtype();
        let cache_dtype = pb.cache_dtype();
        let lm_head = LmHead::new(&pb, lm_head)?;
        let params = pb.finish(&[".attn.bias", ".attn.masked_bias", "lm_head.weight"]);
        Ok(Self {
            info: ModelInfo {
                family: Family::Gpt2,
                vocab_size: cfg.vocab_size,
                hidden_size: h,
                num_layers: cfg.n_layer,
                max_positions: Some(cfg.n_positions),
                tied_embeddings: cfg.tie_word_embeddings,
                cache_dtype,
            },
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            n_head: cfg.n_head,
            act,
            dtype,
            params,
            checkpointing: Checkpointing::default(),
        })
    }
}

impl CausalLm for Gpt2 {
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
        let pos = position_tensor(mask.position_ids(t, 1), b, t, dev)?;
        let bias = mask.bias(t, None, self.dtype, dev)?;
        let tokens = self.wte.embedding(&input_ids.flatten_all()?)?.to_dtype(self.dtype)?;
        let positions = self.wpe.embedding(&pos.flatten_all()?)?.to_dtype(self.dtype)?;
        let mut x = (tokens.reshape((b, t, ()))? + positions.reshape((b, t, ()))?)?;
        let checkpointing = self.checkpointing.active(cache.is_some());
        let last = self.blocks.len().saturating_sub(1);
        for (i, blk) in self.blocks.iter().enumerate() {
            let last_only = last_only && i == last;
            x = if checkpointing && !last_only {
                let (blk2, bias, n_head, act) = (blk.clone(), bias.clone(), self.n_head, self.act);
                self.checkpointing.block(
                    &x,
                    move |x| blk2.forward(x, &bias, n_head, act, None, false),
                    blk.tensors(),
                )?
            } else {
                blk.forward(&x, &bias, self.n_head, self.act, cache.as_deref_mut().map(|c| (c, i)), last_only)?
            };
        }
        if last_only {
            // A no-op after the last block; the embeddings' last position in a model without blocks.
            x = last_along(&x, 1)?;
        }
        self.ln_f.forward(&x)
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
