//! `minillm demo`: the paper's main experiment in miniature (see README).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::demo::DemoOptions;

/// `minillm demo`.
#[derive(Args, Debug)]
pub struct Demo {
    /// Seed of the world, initialisation, data order and sampling (of the first repeat).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The CI-sized run (under 2 minutes): a smaller world and models, fewer steps, same code.
    #[arg(long)]
    quick: bool,
    /// Also run the paper's Table 4 ablations (no length normalisation, no teacher-mixed
    /// sampling, no single-step term, no pre-training term).
    #[arg(long)]
    ablations: bool,
    /// Re-run the learning-rate sweep (every method over one grid, chosen by validation
    /// Rouge-L), write its table, and use its choices.
    #[arg(long)]
    sweep: bool,
    /// Run the whole pipeline with this many seeds and report 95% intervals.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Output directory.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Train every stage and stop before measuring anything on test data (design work).
    #[arg(long, hide = true)]
    train_only: bool,
}

impl Demo {
    /// Runs the demo and prints its table.
    pub fn run(self) -> Result<()> {
        let opts = DemoOptions {
            seed: self.seed,
            quick: self.quick,
            ablations: self.ablations,
            sweep: self.sweep,
            repeats: self.repeats,
            out: self.out,
            train_only: self.train_only,
        };
        print!("{}", minillm::demo::run(&opts, &super::signals::STOP)?);
        Ok(())
    }
}
