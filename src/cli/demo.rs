//! `minillm demo`: the paper's main experiment in miniature (see README).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::demo::DemoOptions;

/// `minillm demo`.
#[derive(Args, Debug)]
pub struct Demo {
    /// Seed of data, initialisation, data order and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The CI-sized run (about 2 minutes): fewer steps and examples, same code paths.
    #[arg(long)]
    quick: bool,
    /// Also run the paper's Table 4 ablations (no length normalisation, no teacher-mixed
    /// sampling, no single-step term).
    #[arg(long)]
    ablations: bool,
    /// Output directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
}

impl Demo {
    /// Runs the demo and prints its table.
    pub fn run(self) -> Result<()> {
        let opts = DemoOptions { seed: self.seed, quick: self.quick, ablations: self.ablations, out: self.out };
        print!("{}", minillm::demo::run(&opts, &super::signals::STOP)?);
        Ok(())
    }
}
