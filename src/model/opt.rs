//! OPT (`OPTForCausalLM`): learned positions with an offset of 2, pre- or post-LN blocks,
//! optional projection between embedding width and hidden width.

use anyhow::Result;
use candle_core::{DType, Tensor};

use super::config::OptConfig;
use super::kv_cache::KvCache;
use super::layers::{
    attention, last_along, position_tensor, split_heads, Activation, AttentionMask, LayerNorm, Linear, LmHead,
};
use super::params::{Init, ParamBuilder, Params};
use super::{CausalLm, Family, ModelInfo, Positions};

/// OPT's learned position table has this many extra leading rows.
const POSITION_OFFSET: i64 = 2;

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    attn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    ffn_norm: LayerNorm,
}

/// An OPT language model.
pub struct Opt {
    info: ModelInfo,
    embed_tokens: Tensor,
    embed_positions: Tensor,
    project_in: Option<Linear>,
    project_out: Option<Linear>,
    layers: Vec<Layer>,
    final_norm: Option<LayerNorm>,
    pre_ln: bool,
    lm_head: LmHead,
    heads: usize,
    act: Activation,
    /// The dtype activations are computed in (f32 also when the matrices are stored in bf16).
    dtype: DType,
    params: Params,
}

impl Opt {
    /// Builds the model, taking every parameter from `pb`.
    pub fn new(cfg: &OptConfig, mut pb: ParamBuilder) -> Result<Self> {
        pb = pb.alias_prefix("model.", "");
        let h = cfg.hidden_size;
        let e = cfg.word_embed_proj_dim.unwrap_or(h);
        let affine = cfg.layer_norm_elementwise_affine;
        let bias = cfg.enable_bias;
        let act = Activation::parse(&cfg.activation_function)?;
        let d = "model.decoder";
        let embed_tokens = pb.get(&format!("{d}.embed_tokens.weight"), &[cfg.vocab_size, e], Init::Normal)?;
        let embed_positions = pb.get(
            &format!("{d}.embed_positions.weight"),
            &[cfg.max_position_embeddings + POSITION_OFFSET as usize, h],
            Init::Normal,
        )?;
        let (project_in, project_out) = if e != h {
            (
                Some(Linear::new(&mut pb, &format!("{d}.project_in"), e, h, false)?),
                Some(Linear::new(&mut pb, &format!("{d}.project_out"), h, e, false)?),
            )
        } else {
            (None, None)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("{d}.layers.{i}");
            layers.push(Layer {
                q: Linear::new(&mut pb, &format!("{p}.self_attn.q_proj"), h, h, bias)?,
                k: Linear::new(&mut pb, &format!("{p}.self_attn.k_proj"), h, h, bias)?,
                v: Linear::new(&mut pb, &format!("{p}.self_attn.v_proj"), h, h, bias)?,
                out: Linear::new(&mut pb, &format!("{p}.self_attn.out_proj"), h, h, bias)?,
                attn_norm: LayerNorm::new(&mut pb, &format!("{p}.self_attn_layer_norm"), h, 1e-5, affine)?,
                fc1: Linear::new(&mut pb, &format!("{p}.fc1"), h, cfg.ffn_dim, bias)?,
                fc2: Linear::new(&mut pb, &format!("{p}.fc2"), cfg.ffn_dim, h, bias)?,
                ffn_norm: LayerNorm::new(&mut pb, &format!("{p}.final_layer_norm"), h, 1e-5, affine)?,
            });
        }
        let final_norm = if cfg.do_layer_norm_before && !cfg.remove_final_layer_norm {
            Some(LayerNorm::new(&mut pb, &format!("{d}.final_layer_norm"), h, 1e-5, affine)?)
        } else {
            None
        };
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            pb.get("lm_head.weight", &[cfg.vocab_size, e], Init::Normal)?
        };
        let dtype = pb.dtype();
        let cache_dtype = pb.cache_dtype();
        let lm_head = LmHead::new(&pb, lm_head)?;
        let params = pb.finish(&["lm_head.weight"]);
        Ok(Self {
            info: ModelInfo {
                family: Family::Opt,
                vocab_size: cfg.vocab_size,
                hidden_size: e,
                num_layers: cfg.num_hidden_layers,
                max_positions: Some(cfg.max_position_embeddings),
                tied_embeddings: cfg.tie_word_embeddings,
                cache_dtype,
            },
            embed_tokens,
            embed_positions,
            project_in,
            project_out,
            layers,
            final_norm,
            pre_ln: cfg.do_layer_norm_before,
            lm_head,
            heads: cfg.num_attention_heads,
            act,
            dtype,
            params,
        })
    }
}

impl CausalLm for Opt {
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
        // OPT derives positions as cumsum(mask)·mask − 1 (padding → −1), then adds the offset.
        let pos: Vec<i64> = mask.position_ids(t, -1).into_iter().map(|p| p + POSITION_OFFSET).collect();
        let pos = position_tensor(pos, b, t, dev)?;
        let bias = mask.bias(t, None, self.dtype, dev)?;
        let mut x =
            self.embed_tokens.embedding(&input_ids.flatten_all()?)?.to_dtype(self.dtype)?.reshape((b, t, ()))?;
        if let Some(p) = &self.project_in {
            x = p.forward(&x)?;
        }
        x = (x + self.embed_positions.embedding(&pos.flatten_all()?)?.to_dtype(self.dtype)?.reshape((b, t, ()))?)?;
        let head_dim = x.dim(2)? / self.heads;
        let scale = 1.0 / (head_dim as f64).sqrt();
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter().enumerate() {
            let h = if self.pre_ln { l.attn_norm.forward(&x)? } else { x.clone() };
            let q = split_heads(&l.q.forward(&h)?, self.heads)?;
            let k = split_heads(&l.k.forward(&h)?, self.heads)?;
            let v = split_heads(&l.v.forward(&h)?, self.heads)?;
            let (q, bias) = if last_only && i == last {
                // Past the keys and values each position is on its own: the last one is kept.
                x = last_along(&x, 1)?;
                (last_along(&q, 2)?, last_along(&bias, 2)?)
            } else {
                (q, bias.clone())
            };
            let a = match cache.as_deref_mut() {
                Some(c) => c.attend(i, &q, k, v, &bias, scale)?,
                None => attention(&q, &k, &v, &bias, scale)?,
            };
            let a = l.out.forward(&a)?;
            x = (x + a)?;
            if !self.pre_ln {
                x = l.attn_norm.forward(&x)?;
            }
            let h = if self.pre_ln { l.ffn_norm.forward(&x)? } else { x.clone() };
            let m = l.fc2.forward(&self.act.forward(&l.fc1.forward(&h)?)?)?;
            x = (x + m)?;
            if !self.pre_ln {
                x = l.ffn_norm.forward(&x)?;
            }
        }
        if last_only {
            // A no-op after the last layer; the embeddings' last position in a model without layers.
            x = last_along(&x, 1)?;
        }
        if let Some(n) = &self.final_norm {
            x = n.forward(&x)?;
        }
        if let Some(p) = &self.project_out {
            x = p.forward(&x)?;
        }
        Ok(x)
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
