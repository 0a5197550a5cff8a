//! Causal language models in Hugging Face layout: GPT-2, OPT and the Llama family (Llama,
//! Qwen2, Mistral), one file each, behind the [`CausalLm`] trait.

pub mod checkpoint;
pub mod checkpointing;
pub mod compat;
pub mod config;
pub mod gpt2;
pub mod kv_cache;
pub mod layers;
pub mod llama;
pub mod opt;
pub mod params;
pub mod safetensors_files;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, D};

pub use checkpoint::{load_model, load_model_as, save_model, write_model_files, Model};
pub use kv_cache::KvCache;
pub use layers::AttentionMask;
pub use params::{ParamSource, Params, Weights};

/// The working precision of a model's weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats.
    #[default]
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl Precision {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" | "float32" => Self::F32,
            "bf16" | "bfloat16" => Self::Bf16,
            "f16" | "float16" => Self::F16,
            other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
        })
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

/// The CPU, or GPU number `gpu` (needs a build with the `cuda` feature).
pub fn select_device(gpu: Option<usize>) -> Result<Device> {
    match gpu {
        None => Ok(Device::Cpu),
        Some(i) => {
            Device::new_cuda(i).with_context(|| format!("opening GPU {i} (was minillm built with --features cuda?)"))
        }
    }
}

/// The architecture family of a model, from `model_type` in `config.json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// `GPT2LMHeadModel`.
    Gpt2,
    /// `OPTForCausalLM`.
    Opt,
    /// `LlamaForCausalLM`.
    #[default]
    Llama,
    /// `Qwen2ForCausalLM` (Llama with q/k/v biases).
    Qwen2,
    /// `MistralForCausalLM` (Llama with optional sliding-window attention).
    Mistral,
}

/// Facts about a loaded model that the rest of the program needs.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    /// Architecture family.
    pub family: Family,
    /// Rows of the (input and output) embedding matrix.
    pub vocab_size: usize,
    /// Width of the residual stream (the final hidden state).
    pub hidden_size: usize,
    /// Number of transformer blocks.
    pub num_layers: usize,
    /// Longest sequence the position scheme supports (learned positions), if bounded.
    pub max_positions: Option<usize>,
    /// Whether the output projection shares the input embedding.
    pub tied_embeddings: bool,
    /// The dtype its KV cache stores keys and values in, when not the one they are computed in
    /// ([`KvCache::storing`]).
    pub cache_dtype: Option<DType>,
}

/// Which positions a forward pass computes final hidden states for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Positions {
    /// Every position (training, scoring).
    All,
    /// The last position only (decoding). The last block still computes and caches every
    /// position's keys and values, but its attention output, projection and MLP only at the
    /// last position: a twelfth of a 12-layer model's per-position products over a prompt.
    Last,
}

/// A causal language model: hidden states and logits for a batch, with an optional cache.
pub trait CausalLm: Send + Sync {
    /// Static facts about the model.
    fn info(&self) -> &ModelInfo;

    /// Final hidden states (after the last norm) for `input_ids` `[b, t]`: `[b, t, hidden]`
    /// at every position, or `[b, 1, hidden]` at the last ([`Positions`]).
    ///
    /// `mask` covers the cached prefix plus the `t` new tokens (`[b, past + t]`). Position ids
    /// are derived from it as `transformers` does for the family, so left and right padding
    /// both give the unpadded result at real positions. With `cache`, keys and values of the
    /// new tokens are appended to it (of every new token, whichever `positions`).
    fn hidden_states(
        &self,
        input_ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
        positions: Positions,
    ) -> Result<Tensor>;

    /// Final hidden states `[b, t, hidden]` at every position ([`Self::hidden_states`]).
    fn forward_hidden(&self, input_ids: &Tensor, mask: &AttentionMask, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.hidden_states(input_ids, mask, cache, Positions::All)
    }

    /// The output projection (LM head) weight `[vocab, hidden]`.
    fn lm_head_weight(&self) -> &Tensor;

    /// The LM head packed for the bf16 product, where the model keeps such a copy
    /// ([`layers::LmHead`]); [`Self::logits`] then multiplies by it.
    fn lm_head_packed(&self) -> Option<&std::sync::Arc<crate::ops::packed::PackedMatrix>> {
        None
    }

    /// All parameters (trainable, or frozen for a teacher), by Hugging Face name.
    fn params(&self) -> &Params;

    /// The family's activation checkpointing (`None` where it has none).
    fn checkpointing(&self) -> Option<&checkpointing::Checkpointing> {
        None
    }

    /// Turns activation checkpointing of the blocks on or off for forwards without a cache
    /// (`train.grad_checkpointing`); families without it refuse to turn it on.
    fn set_grad_checkpointing(&self, on: bool) -> Result<()> {
        match self.checkpointing() {
            Some(c) => c.set(on),
            None if on => bail!(
                "{:?} models do not support train.grad_checkpointing yet (GPT-2 and the Llama family do)",
                self.info().family
            ),
            None => {}
        }
        Ok(())
    }

    /// Parameter gradients that checkpointed blocks found in backward passes since the last
    /// call, by parameter (empty without checkpointing).
    fn take_checkpoint_grads(&self) -> std::collections::HashMap<candle_core::TensorId, Tensor> {
        self.checkpointing().map(checkpointing::Checkpointing::take).unwrap_or_default()
    }

    /// Logits `[..., vocab]` from hidden states `[..., hidden]`.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = self.lm_head_weight();
        let dims = hidden.dims().to_vec();
        let h = dims[dims.len() - 1];
        let rows = hidden.elem_count() / h.max(1);
        let hidden = hidden.reshape((rows, h))?;
        let logits = match self.lm_head_packed() {
            Some(packed) if hidden.dtype() == DType::F32 => crate::ops::packed::linear_packed(&hidden, packed, None)?,
            _ => crate::ops::linear_no_bias(&hidden, w, crate::ops::WeightLayout::OutIn)?,
        };
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = w.dim(0)?;
        Ok(logits.reshape(out)?)
    }

    /// Logits `[b, t, vocab]` for every position.
    fn forward(&self, input_ids: &Tensor, mask: &AttentionMask, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, mask, cache)?;
        self.logits(&h)
    }

    /// Final hidden states `[b, hidden]` of the last position only ([`Positions::Last`]): what
    /// decoding needs after a prompt.
    fn forward_hidden_last(
        &self,
        input_ids: &Tensor,
        mask: &AttentionMask,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        Ok(self.hidden_states(input_ids, mask, cache, Positions::Last)?.squeeze(1)?)
    }

    /// Logits `[b, vocab]` of the last position only (what decoding needs; avoids the LM head
    /// and the last block's per-position work over the whole prompt).
    fn forward_last(&self, input_ids: &Tensor, mask: &AttentionMask, cache: Option<&mut KvCache>) -> Result<Tensor> {
        self.logits(&self.forward_hidden_last(input_ids, mask, cache)?)
    }

    /// A new, empty KV cache for this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info().num_layers).storing(self.info().cache_dtype)
    }
}

/// `log_softmax` over the last dimension, differentiable.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(x, D::Minus1)?)
}
