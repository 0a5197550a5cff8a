//! The `minillm` command line: one file per subcommand, each a clap struct (one declaration per
//! option) with a `run` that resolves it into the library's settings once and calls the
//! library.

pub mod analysis;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod init;
pub mod score;
pub mod signals;
pub mod train;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::model::{load_model_as, select_device, Model, Precision, Weights};

/// Where a model is and how to load it.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub load: LoadArgs,
}

/// How to load models: precision and device.
#[derive(Args, Clone, Copy, Debug)]
pub struct LoadArgs {
    /// Working precision: f32, bf16 or f16 (on the CPU: 16-bit matrices, f32 activations; bf16
    /// multiplies bf16-rounded inputs with f32 sums, f16 the f32 inputs).
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
    /// Run on the GPU with this index (needs the `cuda` feature).
    #[arg(long)]
    pub gpu: Option<usize>,
}

impl LoadArgs {
    /// Loads the model directory `dir` for inference (frozen: no autograd graph).
    pub fn load(&self, dir: &std::path::Path) -> Result<Model> {
        load_model_as(dir, &select_device(self.gpu)?, self.dtype.dtype(), Weights::Frozen)
    }
}

impl ModelArgs {
    /// Loads the model.
    pub fn load(&self) -> Result<Model> {
        self.load.load(&self.model)
    }
}

/// Claims an output directory for a command whose outputs (`files`) are recomputed in full
/// each time: refused when it holds anything else than an earlier output of the same command,
/// unless `overwrite` (then only `files` are replaced).
pub fn claim_output(dir: &std::path::Path, kind: &str, files: &[&str], overwrite: bool) -> Result<()> {
    let reset = |d: &std::path::Path, _ours: bool| minillm::outdir::remove_entries(d, files);
    let out = minillm::outdir::OutDir {
        path: dir,
        kind,
        reset: &reset,
        has_results: &|_| false,
        overwrite_flag: Some("--overwrite"),
    };
    out.claim(&serde_json::Value::Null, &[], overwrite)?;
    Ok(())
}

/// Refuses an output directory that exists and holds anything, unless `overwrite` is given.
pub fn refuse_foreign_dir(dir: &std::path::Path, overwrite: bool) -> Result<()> {
    let occupied = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied && !overwrite {
        anyhow::bail!(
            "{} already exists and is not empty; choose another --out, or pass --overwrite to replace the \
             model files in it (other files are kept)",
            dir.display()
        );
    }
    Ok(())
}
