//! `minillm convert`: load a model directory and write it back (Hugging Face layout, chosen
//! dtype).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::model::save_model;

use super::ModelArgs;

/// `minillm convert`.
#[derive(Args, Debug)]
pub struct Convert {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory (must not hold other files unless --overwrite).
    #[arg(long)]
    out: PathBuf,
    /// Replace the model files of an existing --out (other files in it are kept).
    #[arg(long)]
    overwrite: bool,
}

impl Convert {
    /// Loads the model and saves it to `--out` atomically.
    pub fn run(self) -> Result<()> {
        super::refuse_foreign_dir(&self.out, self.overwrite)?;
        let model = self.model.load()?;
        save_model(&model, &self.out, self.model.load.dtype.dtype())?;
        eprintln!(
            "saved {} ({} parameters) to {}",
            self.model.model.display(),
            model.lm.params().num_elements(),
            self.out.display()
        );
        Ok(())
    }
}
