//! The subcommands behind `minillm`'s command line, one file each.

mod analysis;
mod convert;
mod demo;
mod eval;
mod generate;
mod methods;
mod score;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

pub use analysis::{calibrate, exposure, CalibrateCommand, ExposureCommand};
pub use convert::convert;
pub use demo::{demo, DemoOptions};
pub use eval::{eval, EvalCommand};
pub use generate::{generate, GenerateOptions};
pub use methods::{run_method, Method};
pub use score::score;

use crate::model::{load_model, Model};

/// How to load a model from the command line.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Model directory.
    pub dir: PathBuf,
    /// `f32`, `bf16` or `f16`.
    pub dtype: String,
    /// GPU index, if any.
    pub gpu: Option<usize>,
}

/// Parses a dtype name.
pub fn parse_dtype(name: &str) -> Result<DType> {
    Ok(match name {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unknown dtype `{other}` (expected f32, bf16 or f16)"),
    })
}

/// The CPU, or the requested GPU.
pub fn device(gpu: Option<usize>) -> Result<Device> {
    match gpu {
        None => Ok(Device::Cpu),
        Some(i) => {
            Device::new_cuda(i).with_context(|| format!("opening GPU {i} (was minillm built with --features cuda?)"))
        }
    }
}

impl LoadOptions {
    /// Loads the model.
    pub fn load(&self) -> Result<Model> {
        load_model(&self.dir, &device(self.gpu)?, parse_dtype(&self.dtype)?)
    }
}
