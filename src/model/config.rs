//! `config.json` of each family, read with the defaults `transformers` uses, and validated:
//! options we do not implement are refused instead of silently computing something else.

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use super::Family;

/// A `config.json` field's name and value.
type Named<T> = (&'static str, T);

/// More values than any tensor of a real model holds (2^40): sizes implying more are refused.
const MAX_ELEMENTS: f64 = 1_099_511_627_776.0;

/// The parsed architecture configuration.
#[derive(Clone, Debug)]
pub enum ArchConfig {
    /// GPT-2.
    Gpt2(Gpt2Config),
    /// OPT.
    Opt(OptConfig),
    /// Llama, Qwen2 or Mistral.
    Llama(LlamaConfig),
}

impl ArchConfig {
    /// Parses and validates a `config.json` value; `source` names the file in errors.
    pub fn parse(value: &Value, source: &str) -> Result<Self> {
        let model_type = value
            .get("model_type")
            .and_then(Value::as_str)
            .with_context(|| format!("{source}: no `model_type` field"))?;
        let cfg = match model_type {
            "gpt2" => Self::Gpt2(from_value(value, source)?),
            "opt" => Self::Opt(from_value(value, source)?),
            "llama" | "qwen2" | "mistral" => {
                let family = match model_type {
                    "llama" => Family::Llama,
                    "qwen2" => Family::Qwen2,
                    _ => Family::Mistral,
                };
                let mut c: LlamaConfig = from_value(value, source)?;
                c.family = family;
                c.rope = RopeConfig::parse(value, source)?;
                Self::Llama(c)
            }
            other => {
                bail!("{source}: model_type `{other}` is not supported (supported: gpt2, opt, llama, qwen2, mistral)")
            }
        };
        cfg.validate(source)?;
        Ok(cfg)
    }

    fn validate(&self, source: &str) -> Result<()> {
        let (sizes, floats): (Vec<Named<usize>>, Vec<Named<f64>>) = match self {
            Self::Gpt2(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("n_positions", c.n_positions),
                    ("n_embd", c.n_embd),
                    ("n_layer", c.n_layer),
                    ("n_head", c.n_head),
                    ("n_inner", c.n_inner.unwrap_or(1)),
                ],
                vec![("layer_norm_epsilon", c.layer_norm_epsilon)],
            ),
            Self::Opt(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("max_position_embeddings", c.max_position_embeddings),
                    ("hidden_size", c.hidden_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("ffn_dim", c.ffn_dim),
                    ("word_embed_proj_dim", c.word_embed_proj_dim.unwrap_or(1)),
                ],
                vec![],
            ),
            Self::Llama(c) => (
                vec![
                    ("vocab_size", c.vocab_size),
                    ("max_position_embeddings", c.max_position_embeddings),
                    ("hidden_size", c.hidden_size),
                    ("intermediate_size", c.intermediate_size),
                    ("num_hidden_layers", c.num_hidden_layers),
                    ("num_attention_heads", c.num_attention_heads),
                    ("num_key_value_heads", c.num_key_value_heads.unwrap_or(1)),
                    ("head_dim", c.head_dim.unwrap_or(2)),
                ],
                vec![("rms_norm_eps", c.rms_norm_eps), ("rope_theta", c.rope.theta)],
            ),
        };
        for (key, v) in &sizes {
            if *v == 0 {
                bail!("{source}: `{key}` must be at least 1, got 0");
            }
        }
        for (key, v) in &floats {
            if !(v.is_finite() && *v > 0.0) {
                bail!("{source}: `{key}` must be a positive finite number, got {v}");
            }
        }
        let init = self.initializer_range();
        if !(init.is_finite() && init >= 0.0) {
            bail!("{source}: the initializer range must be a finite number ≥ 0, got {init}");
        }
        match self {
            Self::Gpt2(c) => {
                if c.add_cross_attention {
                    bail!("{source}: GPT-2 with add_cross_attention=true is an encoder-decoder and is not supported");
                }
                if c.n_embd % c.n_head != 0 {
                    bail!("{source}: n_embd {} is not divisible by n_head {}", c.n_embd, c.n_head);
                }
            }
            Self::Opt(c) => {
                if c.hidden_size % c.num_attention_heads != 0 {
                    bail!(
                        "{source}: hidden_size {} is not divisible by num_attention_heads {}",
                        c.hidden_size,
                        c.num_attention_heads
                    );
                }
            }
            Self::Llama(c) => {
                let kv = c.num_kv_heads();
                if c.num_attention_heads % kv != 0 {
                    bail!(
                        "{source}: num_attention_heads {} is not a multiple of num_key_value_heads {kv}",
                        c.num_attention_heads
                    );
                }
                if c.head_dim.is_none() && c.hidden_size % c.num_attention_heads != 0 {
                    bail!(
                        "{source}: hidden_size {} is not divisible by num_attention_heads {} (and no head_dim is given)",
                        c.hidden_size,
                        c.num_attention_heads
                    );
                }
                if c.head_dim() % 2 != 0 {
                    bail!("{source}: the head width {} must be even for rotary embeddings", c.head_dim());
                }
                if c.partial_rotary_factor.is_some_and(|f| f != 1.0) {
                    bail!("{source}: partial_rotary_factor != 1 is not supported");
                }
                if c.family == Family::Qwen2 && c.use_sliding_window {
                    bail!("{source}: Qwen2 with use_sliding_window=true is not supported");
                }
                if let Some(types) = &c.layer_types {
                    if types.iter().any(|t| t != "full_attention") && c.family != Family::Mistral {
                        bail!("{source}: layer_types other than full_attention are not supported");
                    }
                }
                if let RopeScaling::Linear { factor } | RopeScaling::Llama3 { factor, .. } = c.rope.scaling {
                    if !(factor.is_finite() && factor > 0.0) {
                        bail!("{source}: the rope scaling factor must be a positive finite number, got {factor}");
                    }
                }
            }
        }
        // Sizes whose tensors could not exist: refuse before anything is allocated.
        let tensors = self.main_tensors();
        let largest = tensors.into_iter().fold(0.0, f64::max);
        if largest > MAX_ELEMENTS {
            bail!("{source}: these sizes imply a tensor of {largest:.3e} values, more than any real model has ({MAX_ELEMENTS:.3e})");
        }
        let (key, layers) = match self {
            Self::Gpt2(c) => ("n_layer", c.n_layer),
            Self::Opt(c) => ("num_hidden_layers", c.num_hidden_layers),
            Self::Llama(c) => ("num_hidden_layers", c.num_hidden_layers),
        };
        let total = self.approx_parameters();
        if total > MAX_ELEMENTS {
            bail!("{source}: `{key}` = {layers} with these widths implies {total:.3e} parameters, more than any real model has");
        }
        Ok(())
    }

    /// Sizes of the largest tensors: the embedding, the position table (or rotary tables), one
    /// MLP matrix and one layer's attention projections.
    fn main_tensors(&self) -> [f64; 4] {
        let f = |x: usize| x as f64;
        match self {
            Self::Gpt2(c) => {
                let inner = c.n_inner.map_or(4.0 * f(c.n_embd), f);
                [
                    f(c.vocab_size) * f(c.n_embd),
                    f(c.n_positions) * f(c.n_embd),
                    inner * f(c.n_embd),
                    3.0 * f(c.n_embd).powi(2),
                ]
            }
            Self::Opt(c) => [
                f(c.vocab_size) * f(c.word_embed_proj_dim.unwrap_or(c.hidden_size)),
                (f(c.max_position_embeddings) + 2.0) * f(c.hidden_size),
                f(c.ffn_dim) * f(c.hidden_size),
                f(c.hidden_size).powi(2),
            ],
            // Rotary tables hold positions × head width values.
            Self::Llama(c) => [
                f(c.vocab_size) * f(c.hidden_size),
                f(c.max_position_embeddings) * f(c.head_dim()),
                f(c.intermediate_size) * f(c.hidden_size),
                f(c.num_attention_heads) * f(c.head_dim()) * f(c.hidden_size),
            ],
        }
    }

    /// A rough parameter count (embeddings, positions, and per layer its attention
    /// projections and two MLP matrices), for refusing configurations too large to build.
    pub fn approx_parameters(&self) -> f64 {
        let [embed, positions, mlp, attention] = self.main_tensors();
        let layers = match self {
            Self::Gpt2(c) => c.n_layer,
            Self::Opt(c) => c.num_hidden_layers,
            Self::Llama(c) => c.num_hidden_layers,
        };
        layers as f64 * (attention * 4.0 / 3.0 + 2.0 * mlp) + embed + positions
    }

    /// The model family.
    pub fn family(&self) -> Family {
        match self {
            Self::Gpt2(_) => Family::Gpt2,
            Self::Opt(_) => Family::Opt,
            Self::Llama(c) => c.family,
        }
    }

    /// Standard deviation used to initialise a new model of this configuration.
    pub fn initializer_range(&self) -> f64 {
        match self {
            Self::Gpt2(c) => c.initializer_range,
            Self::Opt(c) => c.init_std,
            Self::Llama(c) => c.initializer_range,
        }
    }
}

fn from_value<T: for<'de> Deserialize<'de>>(value: &Value, source: &str) -> Result<T> {
    serde_json::from_value(value.clone()).with_context(|| format!("{source}: invalid configuration"))
}

/// `GPT2Config`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// Vocabulary (embedding rows).
    pub vocab_size: usize,
    /// Learned positions.
    pub n_positions: usize,
    /// Width.
    pub n_embd: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP width (default 4·n_embd).
    pub n_inner: Option<usize>,
    /// MLP activation.
    pub activation_function: String,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Init std.
    pub initializer_range: f64,
    /// Divide attention scores by sqrt(head_dim).
    pub scale_attn_weights: bool,
    /// Also divide by (layer index + 1).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Encoder-decoder variant (refused).
    pub add_cross_attention: bool,
    /// LM head shares wte.
    pub tie_word_embeddings: bool,
}

impl Default for Gpt2Config {
    fn default() -> Self {
        Self {
            vocab_size: 50257,
            n_positions: 1024,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            add_cross_attention: false,
            tie_word_embeddings: true,
        }
    }
}

/// `OPTConfig`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct OptConfig {
    /// Vocabulary.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// MLP width.
    pub ffn_dim: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Positions (the table has 2 more rows: OPT's offset).
    pub max_position_embeddings: usize,
    /// Pre-LN (true) or post-LN (false, opt-350m).
    pub do_layer_norm_before: bool,
    /// Drop the decoder's final norm (some converted checkpoints).
    #[serde(rename = "_remove_final_layer_norm")]
    pub remove_final_layer_norm: bool,
    /// Embedding width when it differs from hidden_size (project_in/out).
    pub word_embed_proj_dim: Option<usize>,
    /// MLP activation.
    pub activation_function: String,
    /// Biases on linear layers.
    pub enable_bias: bool,
    /// LayerNorm has weight and bias.
    pub layer_norm_elementwise_affine: bool,
    /// Init std.
    pub init_std: f64,
    /// LM head shares embed_tokens.
    pub tie_word_embeddings: bool,
}

impl Default for OptConfig {
    fn default() -> Self {
        Self {
            vocab_size: 50272,
            hidden_size: 768,
            num_hidden_layers: 12,
            ffn_dim: 3072,
            num_attention_heads: 12,
            max_position_embeddings: 2048,
            do_layer_norm_before: true,
            remove_final_layer_norm: false,
            word_embed_proj_dim: None,
            activation_function: "relu".into(),
            enable_bias: true,
            layer_norm_elementwise_affine: true,
            init_std: 0.02,
            tie_word_embeddings: true,
        }
    }
}

/// `LlamaConfig` / `Qwen2Config` / `MistralConfig`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    /// Which member of the family (set from `model_type`).
    #[serde(skip)]
    pub family: Family,
    /// Vocabulary.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); default = query heads.
    pub num_key_value_heads: Option<usize>,
    /// Head width; default hidden_size / heads.
    pub head_dim: Option<usize>,
    /// MLP activation.
    pub hidden_act: String,
    /// Positions the model was trained for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Bias on q/k/v/o (Llama `attention_bias`; Qwen2 always has q/k/v bias).
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// LM head shares embed_tokens.
    pub tie_word_embeddings: bool,
    /// Init std.
    pub initializer_range: f64,
    /// Mistral sliding-window size.
    pub sliding_window: Option<usize>,
    /// Qwen2 sliding window switch (refused when true).
    pub use_sliding_window: bool,
    /// Partial rotary (refused unless 1).
    pub partial_rotary_factor: Option<f64>,
    /// Per-layer attention types (transformers 5).
    pub layer_types: Option<Vec<String>>,
    /// Rotary embedding settings (parsed separately from the 4.x or 5.x fields).
    #[serde(skip)]
    pub rope: RopeConfig,
}

impl Default for LlamaConfig {
    fn default() -> Self {
        Self {
            family: Family::Llama,
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_hidden_layers: 32,
            num_attention_heads: 32,
            num_key_value_heads: None,
            head_dim: None,
            hidden_act: "silu".into(),
            max_position_embeddings: 2048,
            rms_norm_eps: 1e-6,
            attention_bias: false,
            mlp_bias: false,
            tie_word_embeddings: false,
            initializer_range: 0.02,
            sliding_window: None,
            use_sliding_window: false,
            partial_rotary_factor: None,
            layer_types: None,
            rope: RopeConfig::default(),
        }
    }
}

impl LlamaConfig {
    /// Key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }
}

/// Rotary position embedding parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base θ.
    pub theta: f64,
    /// Frequency scaling.
    pub scaling: RopeScaling,
}

impl Default for RopeConfig {
    fn default() -> Self {
        Self { theta: 10000.0, scaling: RopeScaling::None }
    }
}

/// The rope scaling types we implement; others are refused.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context length of the original model.
        original_max_position_embeddings: f64,
    },
}

impl RopeConfig {
    /// Reads `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (4.x).
    pub fn parse(value: &Value, source: &str) -> Result<Self> {
        let params = value.get("rope_parameters").filter(|v| !v.is_null());
        let scaling = params.or_else(|| value.get("rope_scaling").filter(|v| !v.is_null()));
        let theta = params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| value.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10000.0);
        let Some(s) = scaling else {
            return Ok(Self { theta, scaling: RopeScaling::None });
        };
        let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            s.get(k)
                .and_then(Value::as_f64)
                .with_context(|| format!("{source}: rope scaling `{kind}` needs a numeric `{k}`"))
        };
        let scaling = match kind {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => {
                bail!("{source}: rope scaling type `{other}` is not supported (supported: default, linear, llama3)")
            }
        };
        Ok(Self { theta, scaling })
    }

    /// Inverse frequencies for a head of width `dim`, with scaling applied.
    pub fn inv_freq(&self, dim: usize) -> Vec<f64> {
        let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / self.theta.powf(2.0 * i as f64 / dim as f64)).collect();
        match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}
