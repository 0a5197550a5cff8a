//! `minillm convert`: load a model directory and write it back (HF layout, chosen dtype).

use std::path::Path;

use anyhow::Result;

use super::{parse_dtype, LoadOptions};
use crate::model::save_model;

/// Loads `load` and saves it to `out` atomically.
pub fn convert(load: &LoadOptions, out: &Path) -> Result<()> {
    let model = load.load()?;
    save_model(&model, out, parse_dtype(&load.dtype)?)?;
    eprintln!("saved {} ({} parameters) to {}", load.dir.display(), model.lm.params().num_elements(), out.display());
    Ok(())
}
