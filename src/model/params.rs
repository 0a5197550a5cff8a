//! Named model parameters: where their values come from (a checkpoint or a seeded random
//! initialisation) and how they are written back in Hugging Face naming.
//!
//! A trained model's parameters are candle [`Var`]s (autograd tracks every op on them); a
//! frozen model's — a teacher's — are plain tensors, so its forward passes record no graph
//! and each activation is freed as soon as the next layer has read it. Names are the exact
//! `transformers` state-dict names, so saving is a plain dump.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::safetensors_files::SafetensorsFiles;
use crate::ops::packed::PackedMatrix;
use crate::ops::WeightLayout;

/// How a freshly created (not loaded) parameter is initialised.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Normal(0, std) with the model's `initializer_range`.
    Normal,
    /// All zeros (biases).
    Zeros,
    /// All ones (normalisation weights).
    Ones,
}

/// Where parameter values come from.
pub enum ParamSource {
    /// Safetensors files of a checkpoint (one or several shards), read tensor by tensor.
    Checkpoint {
        /// The files' tensors.
        tensors: SafetensorsFiles,
        /// The files, for error messages.
        files: Vec<PathBuf>,
    },
    /// Seeded random initialisation, as `transformers` does for a new model.
    Random {
        /// Random stream (ChaCha8: stable across platforms and crate versions).
        rng: Box<ChaCha8Rng>,
        /// Standard deviation of [`Init::Normal`] parameters.
        std: f64,
    },
    /// Another model's parameters by name ([`Params::iter`]), each copied as it is fetched:
    /// a snapshot that the other model's later updates leave unchanged.
    Tensors(BTreeMap<String, Tensor>),
}

impl ParamSource {
    /// Reads the headers of the given safetensors files.
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let tensors = SafetensorsFiles::open(files)
            .with_context(|| format!("reading safetensors file(s) {}", show_paths(files)))?;
        Ok(Self::Checkpoint { tensors, files: files.to_vec() })
    }

    /// Random initialisation with the given seed and standard deviation.
    pub fn random(seed: u64, std: f64) -> Self {
        Self::Random { rng: Box::new(ChaCha8Rng::seed_from_u64(seed)), std }
    }
}

fn show_paths(files: &[PathBuf]) -> String {
    files.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// One parameter: trainable (a [`Var`]) or frozen (a plain tensor, or a matrix packed for a
/// register-blocked product).
#[derive(Clone)]
enum Param {
    Trainable(Var),
    Frozen(Tensor),
    /// A frozen matrix held only in [`PackedMatrix`]'s layout (`in × out`); `layout` is the
    /// checkpoint's.
    Packed {
        weight: Arc<PackedMatrix>,
        layout: WeightLayout,
    },
}

impl Param {
    /// The parameter in the checkpoint's layout (a packed matrix is unpacked into a new tensor).
    fn tensor(&self) -> Tensor {
        match self {
            Self::Trainable(v) => v.as_tensor().clone(),
            Self::Frozen(t) => t.clone(),
            Self::Packed { weight, layout } => {
                // Infallible: the values are exactly `k × cols`, and a matrix has a transpose.
                let t = weight.unpack().expect("unpacked weight shape");
                match layout {
                    WeightLayout::InOut => t,
                    WeightLayout::OutIn => t.t().expect("transpose of a matrix"),
                }
            }
        }
    }

    fn elem_count(&self) -> usize {
        match self {
            Self::Packed { weight, .. } => weight.shape().0 * weight.shape().1,
            other => other.tensor().elem_count(),
        }
    }
}

/// Whether a model is built to be trained or only evaluated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weights {
    /// Parameters are [`Var`]s: gradients flow to them and the optimizer updates them.
    #[default]
    Trainable,
    /// Parameters are plain tensors: no autograd graph is ever built on them (teachers).
    Frozen,
}

/// The ordered list of a model's parameters, by Hugging Face name.
#[derive(Clone, Default)]
pub struct Params {
    named: Vec<(String, Param)>,
}

impl Params {
    /// Parameters in creation order (the order of the model's layers), trainable or not, in
    /// the checkpoint's layout. A matrix stored packed ([`ParamBuilder::get_packed`]) is
    /// unpacked into a new tensor as the iterator reaches it.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Tensor)> {
        self.named.iter().map(|(n, p)| (n.as_str(), p.tensor()))
    }

    /// The trainable parameters in creation order (none for a frozen model).
    pub fn trainable(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.named.iter().filter_map(|(n, p)| match p {
            Param::Trainable(v) => Some((n.as_str(), v)),
            Param::Frozen(_) | Param::Packed { .. } => None,
        })
    }

    /// Whether the model was built frozen (no trainable parameter).
    pub fn is_frozen(&self) -> bool {
        self.named.iter().all(|(_, p)| !matches!(p, Param::Trainable(_)))
    }

    /// Number of parameter tensors.
    pub fn len(&self) -> usize {
        self.named.len()
    }

    /// True when the model has no parameters.
    pub fn is_empty(&self) -> bool {
        self.named.is_empty()
    }

    /// Total number of scalar parameters.
    pub fn num_elements(&self) -> usize {
        self.named.iter().map(|(_, p)| p.elem_count()).sum()
    }

    /// Looks a parameter up by name (in the checkpoint's layout, as [`Self::iter`]).
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.named.iter().find(|(n, _)| n == name).map(|(_, p)| p.tensor())
    }

    /// All parameters as a name → tensor map, ready for `safetensors` serialisation.
    pub fn to_map(&self, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (n, t) in self.iter() {
            out.insert(n.to_string(), t.to_dtype(dtype)?.contiguous()?);
        }
        Ok(out)
    }
}

/// Builds the parameters of one model: fetches (or creates) each tensor by name, checks its
/// shape, converts it to the working dtype and records it (as a [`Var`] unless frozen).
pub struct ParamBuilder {
    source: ParamSource,
    device: Device,
    dtype: DType,
    /// Storage dtype of matrices (weights of two or more dimensions); `dtype` unless set.
    matrix_dtype: DType,
    weights: Weights,
    params: Params,
    /// Prefixes that checkpoints of this family are sometimes saved without (or with), e.g.
    /// the original `gpt2` files lack `transformer.`.
    aliases: Vec<(String, String)>,
    used: HashSet<String>,
}

impl ParamBuilder {
    /// A builder reading from `source`, producing tensors of `dtype` on `device`.
    pub fn new(source: ParamSource, device: &Device, dtype: DType) -> Self {
        Self {
            source,
            device: device.clone(),
            dtype,
            matrix_dtype: dtype,
            weights: Weights::Trainable,
            params: Params::default(),
            aliases: Vec::new(),
            used: HashSet::new(),
        }
    }

    /// Builds the parameters trainable or frozen.
    pub fn weights(mut self, weights: Weights) -> Self {
        self.weights = weights;
        self
    }

    /// Stores matrices (linear and embedding weights) in `dtype` while vectors (biases,
    /// normalisation weights) and the computation stay in the builder's dtype: bf16 or f16 weights
    /// read by [`linear_half`](mod@crate::ops::linear_half) for a frozen model. Refused for a trainable one (its
    /// optimizer and gradients work in one dtype).
    pub fn store_matrices_in(mut self, dtype: DType) -> Result<Self> {
        if self.weights == Weights::Trainable && dtype != self.dtype {
            bail!("only a frozen model can store its matrices in {dtype:?} and compute in {:?}", self.dtype);
        }
        self.matrix_dtype = dtype;
        Ok(self)
    }

    /// The dtype the model computes in (its activations).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Also accept checkpoint names where the leading `from` is replaced by `to`.
    pub fn alias_prefix(mut self, from: &str, to: &str) -> Self {
        self.aliases.push((from.to_string(), to.to_string()));
        self
    }

    fn resolve(&self, name: &str) -> Option<String> {
        let ParamSource::Checkpoint { tensors, .. } = &self.source else {
            return None;
        };
        let exists = |n: &str| tensors.contains(n);
        if exists(name) {
            return Some(name.to_string());
        }
        for (from, to) in &self.aliases {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                let alt = format!("{to}{rest}");
                if exists(&alt) {
                    return Some(alt);
                }
            }
        }
        None
    }

    /// Fetches parameter `name` with the given shape and registers it (trainable unless the
    /// builder is frozen).
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let tensor = self.fetch(name, shape, init)?;
        let param = match self.weights {
            Weights::Trainable => Param::Trainable(Var::from_tensor(&tensor)?),
            Weights::Frozen => Param::Frozen(tensor),
        };
        let t = param.tensor();
        self.params.named.push((name.to_string(), param));
        Ok(t)
    }

    /// The dtype a KV cache of the model stores keys and values in, when not the one they
    /// are computed in: bf16 for a frozen model on the CPU that computes in f32 with its
    /// matrices stored in bf16 ([`crate::model::KvCache::storing`]).
    pub fn cache_dtype(&self) -> Option<DType> {
        (self.weights == Weights::Frozen
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && self.matrix_dtype == DType::BF16)
            .then_some(DType::BF16)
    }

    /// Whether a `din × dout` matrix fetched through [`Self::get_packed`] is packed: in a
    /// frozen model on the CPU with f32 activations (matrices stored in f32, bf16 or f16), a
    /// matrix [`PackedMatrix::worth_packing`].
    pub fn packs_matrix(&self, din: usize, dout: usize) -> bool {
        self.weights == Weights::Frozen
            && self.device.is_cpu()
            && self.dtype == DType::F32
            && PackedMatrix::worth_packing(self.matrix_dtype, din * dout)
    }

    /// Fetches the matrix `name` of a dense layer with `din` inputs and `dout` outputs, stored
    /// in `layout` by the checkpoint, and keeps it only as a
    /// [`PackedMatrix`] (`din × dout`), which it returns: every product with it then skips
    /// the packing (decoding's few rows 1.4–1.9× faster; BENCHMARKS.md). The parameter list shows
    /// it in the checkpoint's layout. Only where [`Self::packs_matrix`].
    pub fn get_packed(
        &mut self,
        name: &str,
        (din, dout): (usize, usize),
        layout: WeightLayout,
        init: Init,
    ) -> Result<Arc<PackedMatrix>> {
        if !self.packs_matrix(din, dout) {
            bail!("`{name}` can be packed only in a frozen model that computes in f32 on the CPU");
        }
        let shape = match layout {
            WeightLayout::InOut => [din, dout],
            WeightLayout::OutIn => [dout, din],
        };
        let weight = Arc::new(PackedMatrix::pack(&self.fetch(name, &shape, init)?, layout)?);
        self.params.named.push((name.to_string(), Param::Packed { weight: weight.clone(), layout }));
        Ok(weight)
    }

    /// Whether the parameters are built frozen.
    pub fn is_frozen(&self) -> bool {
        self.weights == Weights::Frozen
    }

    /// Fetches the `[rows, cols]` matrix `name` of a frozen model and stores it transposed
    /// (`[cols, rows]`, contiguous), which it returns. The parameter list records the
    /// transpose's view under `name`, so saving and fingerprints see the checkpoint's layout.
    /// Refused for a trainable model, whose gradients and optimizer state keep the
    /// checkpoint's layout.
    pub fn get_transposed(&mut self, name: &str, shape: [usize; 2], init: Init) -> Result<Tensor> {
        if self.weights == Weights::Trainable {
            bail!("only a frozen model can store `{name}` transposed");
        }
        let stored = self.fetch(name, &shape, init)?.t()?.contiguous()?;
        self.params.named.push((name.to_string(), Param::Frozen(stored.t()?)));
        Ok(stored)
    }

    fn fetch(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let resolved = self.resolve(name);
        let dtype = if shape.len() >= 2 { self.matrix_dtype } else { self.dtype };
        match &mut self.source {
            ParamSource::Checkpoint { tensors, files } => {
                let Some(key) = resolved else {
                    bail!("tensor `{name}` (shape {shape:?}) is missing from {}", show_paths(files));
                };
                let t = tensors.load(&key).with_context(|| format!("loading tensor `{key}`"))?;
                if t.dims() != shape {
                    bail!(
                        "tensor `{key}` in {} has shape {:?}, but config.json implies {:?}",
                        show_paths(files),
                        t.dims(),
                        shape
                    );
                }
                if !all_finite(&t)? {
                    bail!("tensor `{key}` in {} holds NaN or infinite values", show_paths(files));
                }
                self.used.insert(key);
                Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
            }
            ParamSource::Random { rng, std } => {
                let n: usize = shape.iter().product();
                let data: Vec<f32> = match init {
                    Init::Zeros => vec![0.0; n],
                    Init::Ones => vec![1.0; n],
                    Init::Normal => (0..n).map(|_| normal(rng) * *std as f32).collect(),
                };
                Ok(Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(&self.device)?)
            }
            ParamSource::Tensors(tensors) => {
                let Some(t) = tensors.get(name) else {
                    bail!("tensor `{name}` (shape {shape:?}) is missing from the model being copied");
                };
                if t.dims() != shape {
                    bail!("tensor `{name}` has shape {:?} in the model being copied, not {shape:?}", t.dims());
                }
                Ok(t.detach().to_dtype(dtype)?.to_device(&self.device)?.copy()?)
            }
        }
    }

    /// Finishes building; warns about checkpoint tensors the model did not use, except the
    /// non-parameter buffers `transformers` is known to save (`ignored` suffixes).
    pub fn finish(self, ignored: &[&str]) -> Params {
        if let ParamSource::Checkpoint { tensors, files } = &self.source {
            let mut unused: Vec<String> = tensors
                .names()
                .map(str::to_string)
                .filter(|n| !self.used.contains(n))
                .filter(|n| !ignored.iter().any(|s| n.ends_with(s)))
                .collect();
            unused.sort();
            if !unused.is_empty() {
                tracing::warn!(
                    "{} tensor(s) in {} are not used by the model: {}",
                    unused.len(),
                    show_paths(files),
                    unused.join(", ")
                );
            }
        }
        self.params
    }
}

/// One standard-normal draw (Box–Muller), so that initialisation needs no extra crate and is
/// reproducible from the seed alone.
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random::<f64>();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// Writes `params` (minus `skip`, e.g. a tied `lm_head.weight`) to `path` as safetensors.
/// The caller is responsible for atomicity (it writes into a temporary directory).
pub fn save_safetensors(params: &Params, skip: &[&str], dtype: DType, path: &Path) -> Result<()> {
    let mut map: std::collections::HashMap<String, Tensor> = params.to_map(dtype)?.into_iter().collect();
    map.retain(|k, _| !skip.contains(&k.as_str()));
    candle_core::safetensors::save(&map, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Whether every value of a floating-point tensor is finite (integer tensors always are).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let t = match t.dtype() {
        DType::F32 => t.clone(),
        DType::F16 | DType::BF16 | DType::F64 => t.to_dtype(DType::F32)?,
        _ => return Ok(true),
    };
    let (storage, layout) = t.storage_and_layout();
    if let (candle_core::Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
        return Ok(cpu.as_slice::<f32>()?[start..end].iter().all(|x| x.is_finite()));
    }
    drop(storage);
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite()))
}
