//! Tensors read by name from one or several safetensors files with positioned reads.
//!
//! A memory map would make every page of a checkpoint part of the process's resident set
//! while the model is built, on top of the copies the model keeps: loading a 6.2 GB teacher
//! peaked at twice that. Reading each tensor into its own buffer keeps the extra memory to
//! one tensor at a time.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// Where one tensor's bytes are.
struct Entry {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// Absolute byte offset in the file, and length.
    start: u64,
    len: usize,
}

/// The tensors of a checkpoint's safetensors files, by name.
pub struct SafetensorsFiles {
    files: Vec<(PathBuf, File)>,
    entries: HashMap<String, Entry>,
}

impl SafetensorsFiles {
    /// Reads the headers of `paths` (a tensor named in two files is an error).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (i, path) in paths.iter().enumerate() {
            let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
            for (name, entry) in read_header(&file, path, i)? {
                if entries.insert(name.clone(), entry).is_some() {
                    bail!("tensor `{name}` appears in more than one of the files ({})", path.display());
                }
            }
            files.push((path.clone(), file));
        }
        Ok(Self { files, entries })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// How many entries the tensors hold, less those of the buffers checkpoints store beside
    /// the parameters (GPT-2's causal masks `attn.bias` / `attn.masked_bias`, rotary
    /// `inv_freq` tables), which no model here loads as a parameter.
    pub fn parameter_count(&self) -> usize {
        let buffer =
            |name: &str| [".attn.bias", ".attn.masked_bias", ".inv_freq"].iter().any(|suffix| name.ends_with(suffix));
        self.entries.iter().filter(|(name, _)| !buffer(name)).map(|(_, e)| e.shape.iter().product::<usize>()).sum()
    }

    /// Every tensor name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// Tensor `name` on the CPU, in its stored dtype.
    pub fn load(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).with_context(|| format!("no tensor `{name}`"))?;
        let (path, file) = &self.files[e.file];
        let mut bytes = vec![0u8; e.len];
        file.read_exact_at(&mut bytes, e.start)
            .with_context(|| format!("reading tensor `{name}` from {}", path.display()))?;
        Ok(Tensor::from_raw_buffer(&bytes, e.dtype, &e.shape, &Device::Cpu)?)
    }
}

/// The entries of one file's header (`u64` little-endian length, then JSON).
fn read_header(file: &File, path: &Path, index: usize) -> Result<Vec<(String, Entry)>> {
    let size = file.metadata().with_context(|| format!("reading {}", path.display()))?.len();
    let bad = |what: String| anyhow::anyhow!("{} is not a valid safetensors file: {what}", path.display());
    let mut len = [0u8; 8];
    file.read_exact_at(&mut len, 0).map_err(|_| bad("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > size.saturating_sub(8) || header_len > 100_000_000 {
        return Err(bad(format!("header length {header_len} for a file of {size} bytes")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| bad(e.to_string()))?;
    let json: HashMap<String, Value> = serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
    let data_start = 8 + header_len;
    let mut out = Vec::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let field = |k: &str| v.get(k).ok_or_else(|| bad(format!("tensor `{name}` has no `{k}`")));
        let dtype = match field("dtype")?.as_str().unwrap_or_default() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "U8" => DType::U8,
            "U32" => DType::U32,
            "I64" => DType::I64,
            other => bail!("{}: tensor `{name}` has dtype {other}, which minillm does not read", path.display()),
        };
        let numbers = |k: &str| -> Result<Vec<u64>> {
            field(k)?
                .as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
                .ok_or_else(|| bad(format!("tensor `{name}`: `{k}` is not a list of integers")))
        };
        let shape: Vec<usize> = numbers("shape")?.into_iter().map(|d| d as usize).collect();
        let offsets = numbers("data_offsets")?;
        let [begin, end] = offsets[..] else { return Err(bad(format!("tensor `{name}`: two data offsets expected"))) };
        let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if end < begin || (end - begin) as usize != expected || data_start + end > size {
            return Err(bad(format!(
                "tensor `{name}` spans bytes {begin}..{end} but its shape {shape:?} needs {expected} (file: {size} bytes)"
            )));
        }
        out.push((name, Entry { file: index, dtype, shape, start: data_start + begin, len: expected }));
    }
    Ok(out)
}
