//! Model directories in Hugging Face layout: load (`config.json`, `model.safetensors` or a
//! sharded `model.safetensors.index.json`, tokenizer, `generation_config.json`) and save in the
//! layout `transformers.AutoModelForCausalLM.from_pretrained` reads back.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::Value;

use super::config::ArchConfig;
use super::gpt2::Gpt2;
use super::llama::Llama;
use super::opt::Opt;
use super::params::{save_safetensors, ParamBuilder, ParamSource, Weights};
use super::safetensors_files::SafetensorsFiles;
use super::CausalLm;
use crate::ops::packed::PackedMatrix;
use crate::tokenizer::Tokenizer;

/// Files besides weights and config that travel with a model when it is saved.
const AUX_FILES: &[&str] = &[
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
];

/// A loaded model with everything that came with it.
pub struct Model {
    /// The network.
    pub lm: Box<dyn CausalLm>,
    /// `config.json` as read (written back on save, with the dtype updated).
    pub config: Value,
    /// The parsed architecture.
    pub arch: ArchConfig,
    /// The tokenizer, when the directory has one.
    pub tokenizer: Option<Tokenizer>,
    /// End-of-sequence ids (from `generation_config.json`, else `config.json`).
    pub eos_token_ids: Vec<u32>,
    /// Padding id, if the model names one.
    pub pad_token_id: Option<u32>,
    /// The directory the model was loaded from.
    pub source: Option<PathBuf>,
}

impl Model {
    /// Builds a model from a `config.json` value with freshly initialised parameters.
    pub fn random(config: Value, seed: u64, device: &Device, dtype: DType) -> Result<Self> {
        let arch = ArchConfig::parse(&config, "model config")?;
        let source = ParamSource::random(seed, arch.initializer_range());
        let lm = build(&arch, ParamBuilder::new(source, device, dtype))?;
        let (eos_token_ids, pad_token_id) = special_ids(&config, None);
        Ok(Self { lm, config, arch, tokenizer: None, eos_token_ids, pad_token_id, source: None })
    }

    /// The tokenizer, or an error naming the model directory.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        self.tokenizer.as_ref().with_context(|| {
            format!(
                "model {} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)",
                self.source.as_deref().map_or("<in memory>".into(), |p| p.display().to_string())
            )
        })
    }

    /// The padding id: the model's `pad_token_id`, else its first EOS (GPT-2 style), else 0.
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.or(self.eos_token_ids.first().copied()).unwrap_or(0)
    }

    /// The device the model's weights live on.
    pub fn device(&self) -> Device {
        self.lm.lm_head_weight().device().clone()
    }

    /// Replaces every parameter's value with the one in the model directory `dir` (a
    /// checkpoint of the same architecture, e.g. when resuming a run). Not for frozen models.
    pub fn load_weights(&self, dir: &Path) -> Result<()> {
        if self.lm.params().is_frozen() {
            bail!("the weights of a frozen model cannot be replaced (load {} instead)", dir.display());
        }
        let files = weight_files(dir)?;
        let tensors =
            SafetensorsFiles::open(&files).with_context(|| format!("reading the weights of {}", dir.display()))?;
        for (name, var) in self.lm.params().trainable() {
            let t = tensors.load(name).with_context(|| format!("{}: tensor `{name}`", dir.display()))?;
            if t.dims() != var.dims() {
                bail!("{}: tensor `{name}` has shape {:?}, the model's {:?}", dir.display(), t.dims(), var.dims());
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// The first EOS id, or an error when the model defines none.
    pub fn eos(&self) -> Result<u32> {
        self.eos_token_ids.first().copied().context("the model's config defines no eos_token_id")
    }

    /// A frozen copy of the current weights to decode with, where it decodes faster than this
    /// model: a trainable f32 model on the CPU with a matrix worth packing gets its large
    /// matrices packed as a frozen model loads them (decoding's products at 8–64 rows 1.4–3×
    /// faster; BENCHMARKS.md), for the price of one copy of the weights (~0.2 s and 0.5 GB at
    /// GPT-2 124M). `None` otherwise (a frozen model is packed already; small models compute
    /// exactly as before). The copy is taken now: later updates of this model do not reach it.
    pub fn decoding_snapshot(&self) -> Result<Option<Model>> {
        let params = self.lm.params();
        // A trainable model holds every parameter in one dtype, the head's. The cheap checks
        // come first: listing a frozen model's parameters would unpack its packed matrices.
        if params.is_frozen() || !self.device().is_cpu() || self.lm.lm_head_weight().dtype() != DType::F32 {
            return Ok(None);
        }
        if !params.iter().any(|(_, t)| t.rank() == 2 && PackedMatrix::worth_packing(DType::F32, t.elem_count())) {
            return Ok(None);
        }
        let tensors = params.iter().map(|(n, t)| (n.to_string(), t)).collect();
        let builder =
            ParamBuilder::new(ParamSource::Tensors(tensors), &self.device(), DType::F32).weights(Weights::Frozen);
        let lm = build(&self.arch, builder).context("copying the model's weights for decoding")?;
        Ok(Some(Model {
            lm,
            config: self.config.clone(),
            arch: self.arch.clone(),
            tokenizer: self.tokenizer.clone(),
            eos_token_ids: self.eos_token_ids.clone(),
            pad_token_id: self.pad_token_id,
            source: self.source.clone(),
        }))
    }
}

fn build(arch: &ArchConfig, pb: ParamBuilder) -> Result<Box<dyn CausalLm>> {
    Ok(match arch {
        ArchConfig::Gpt2(c) => Box::new(Gpt2::new(c, pb)?),
        ArchConfig::Opt(c) => Box::new(Opt::new(c, pb)?),
        ArchConfig::Llama(c) => Box::new(Llama::new(c, pb)?),
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The parameters a model directory's weight files hold (see
/// [`SafetensorsFiles::parameter_count`]), read from their headers alone.
pub fn stored_parameter_count(dir: &Path) -> Result<usize> {
    let files = weight_files(dir)?;
    let tensors =
        SafetensorsFiles::open(&files).with_context(|| format!("reading the weights of {}", dir.display()))?;
    Ok(tensors.parameter_count())
}

/// The safetensors files of a model directory (one file, or the shards of an index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
        let shards: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let mut files = Vec::new();
        for s in shards {
            let p = dir.join(s);
            if !p.is_file() {
                bail!("{} lists shard {s}, which is missing from {}", index.display(), dir.display());
            }
            files.push(p);
        }
        if files.is_empty() {
            bail!("{}: the weight map is empty", index.display());
        }
        return Ok(files);
    }
    if dir.join("pytorch_model.bin").is_file() || dir.join("pytorch_model.bin.index.json").is_file() {
        bail!(
            "{} holds PyTorch pickle weights (pytorch_model.bin), which minillm does not read. Convert them once with:\n  \
             python -c \"from transformers import AutoModelForCausalLM as M; M.from_pretrained('{0}').save_pretrained('{0}', safe_serialization=True)\"",
            dir.display()
        );
    }
    bail!("{} has no model weights: expected model.safetensors or model.safetensors.index.json", dir.display())
}

/// Loads a model directory onto `device` for training, converting weights to `dtype`.
pub fn load_model(dir: &Path, device: &Device, dtype: DType) -> Result<Model> {
    load_model_as(dir, device, dtype, Weights::Trainable)
}

/// Loads a model directory onto `device`, trainable or frozen (a teacher: no autograd graph
/// on its forward passes), converting weights to `dtype`. A frozen bf16 or f16 model on the
/// CPU stores its matrices in that dtype and computes everything else in f32
/// ([`linear_half`](mod@crate::ops::linear_half)).
pub fn load_model_as(dir: &Path, device: &Device, dtype: DType, weights: Weights) -> Result<Model> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        if dir.join("best").join("config.json").is_file() {
            bail!(
                "{} is a training run directory, not a model; its selected model is {}",
                dir.display(),
                dir.join("best").display()
            );
        }
        bail!("{} has no config.json", dir.display());
    }
    let config = read_json(&config_path)?;
    let arch = ArchConfig::parse(&config, &config_path.display().to_string())?;
    let files = weight_files(dir)?;
    let half = matches!(dtype, DType::BF16 | DType::F16);
    let builder = if half && weights == Weights::Frozen && device.is_cpu() {
        // A frozen bf16/f16 model on the CPU keeps 16-bit matrices but f32 activations: half
        // the memory and the decoding traffic, 16 bits only where the products read weights
        // (candle's CPU half-precision matmul would widen both operands to f32 on every call
        // anyway).
        ParamBuilder::new(ParamSource::from_files(&files)?, device, DType::F32)
            .weights(weights)
            .store_matrices_in(dtype)?
    } else {
        ParamBuilder::new(ParamSource::from_files(&files)?, device, dtype).weights(weights)
    };
    let lm = build(&arch, builder).with_context(|| format!("loading the weights of {}", dir.display()))?;
    let tokenizer = Tokenizer::from_dir(dir)?;
    let gen_path = dir.join("generation_config.json");
    let generation = if gen_path.is_file() { Some(read_json(&gen_path)?) } else { None };
    let (eos_token_ids, pad_token_id) = special_ids(&config, generation.as_ref());
    if let Some(t) = &tokenizer {
        if t.vocab_size() == 0 {
            bail!("{}: the tokenizer has an empty vocabulary", dir.display());
        }
        if t.vocab_size() > lm.info().vocab_size {
            bail!(
                "{}: the tokenizer has {} tokens but the embedding has only {} rows",
                dir.display(),
                t.vocab_size(),
                lm.info().vocab_size
            );
        }
    }
    Ok(Model { lm, config, arch, tokenizer, eos_token_ids, pad_token_id, source: Some(dir.to_path_buf()) })
}

/// EOS ids and pad id: `generation_config.json` wins over `config.json`; ids may be a number
/// or a list.
fn special_ids(config: &Value, generation: Option<&Value>) -> (Vec<u32>, Option<u32>) {
    let ids = |key: &str| -> Vec<u32> {
        let pick = |v: &Value| -> Vec<u32> {
            match v.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
                _ => Vec::new(),
            }
        };
        let from_gen = generation.map(pick).unwrap_or_default();
        if from_gen.is_empty() {
            pick(config)
        } else {
            from_gen
        }
    };
    (ids("eos_token_id"), ids("pad_token_id").first().copied())
}

fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// Saves `model` to `dir` atomically in Hugging Face layout, weights in `dtype`.
pub fn save_model(model: &Model, dir: &Path, dtype: DType) -> Result<()> {
    crate::atomic::write_dir(dir, |tmp| write_model_files(model, tmp, dtype))
        .with_context(|| format!("saving the model to {}", dir.display()))
}

/// Writes the files of a model directory into `dir` (which the caller makes atomic), refusing
/// to write non-finite weights.
pub fn write_model_files(model: &Model, dir: &Path, dtype: DType) -> Result<()> {
    for (name, t) in model.lm.params().iter() {
        if !super::params::all_finite(&t)? {
            bail!("parameter `{name}` holds NaN or infinite values; refusing to write a checkpoint");
        }
    }
    let mut config = model.config.clone();
    if let Some(obj) = config.as_object_mut() {
        // transformers 5 reads `dtype`, 4.x `torch_dtype`; keep whichever the file had.
        let key = if obj.contains_key("dtype") { "dtype" } else { "torch_dtype" };
        obj.insert(key.into(), Value::String(dtype_name(dtype).into()));
    }
    let text = serde_json::to_string_pretty(&config)?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, text).with_context(|| format!("writing {}", config_path.display()))?;
    save_safetensors(model.lm.params(), &[], dtype, &dir.join("model.safetensors"))?;
    if let Some(src) = &model.source {
        for f in AUX_FILES {
            let p = src.join(f);
            if p.is_file() {
                std::fs::copy(&p, dir.join(f)).with_context(|| format!("copying {}", p.display()))?;
            }
        }
    }
    if let Some(t) = &model.tokenizer {
        t.save(&dir.join("tokenizer.json"))?;
    }
    Ok(())
}
