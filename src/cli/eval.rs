//! `minillm eval` (a model over sets × seeds, or predictions made elsewhere) and
//! `minillm report` (several evaluations side by side).

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use minillm::eval::evaluate::{evaluate_model, markdown_table, score_predictions, EvalOptions};
use minillm::eval::metrics::mean_std;
use minillm::generate::SamplingConfig;

use super::LoadArgs;

/// `minillm eval`.
#[derive(Args, Debug)]
pub struct Eval {
    /// Model directory.
    #[arg(long, required_unless_present = "predictions", conflicts_with = "predictions")]
    model: Option<PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
    /// Sets: dolly, self-inst, vicuna, sinst, uinst, or paths to jsonl files (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "dolly,self-inst,vicuna,sinst,uinst")]
    sets: Vec<String>,
    /// Sampling seeds (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10,20,30,40,50")]
    seeds: Vec<u64>,
    /// Where the built-in sets are.
    #[arg(long, default_value = minillm::eval::sets::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Output directory (default runs/eval-<model>, e.g. runs/eval-sft-best for runs/sft/best),
    /// or the scored file with --predictions.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Block repeated n-grams of this size (6 as the released test script; 0 = off).
    #[arg(long, default_value_t = 6)]
    no_repeat_ngram_size: usize,
    /// Prompts decoded together.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Only the first N examples of each set.
    #[arg(long)]
    max_examples: Option<usize>,
    /// Cap on generated tokens (the protocol's only limit is 512 tokens in total).
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// Score this jsonl of {"prediction", "output"} lines instead of generating.
    #[arg(long)]
    predictions: Option<PathBuf>,
    /// Start afresh in an --out that holds other files or another model's generations
    /// (only the files an evaluation writes are removed).
    #[arg(long)]
    overwrite: bool,
}

impl Eval {
    /// Runs the evaluation and prints the table.
    pub fn run(self) -> Result<()> {
        if let Some(input) = &self.predictions {
            let out = self.out.clone().unwrap_or_else(|| input.with_extension("scored.jsonl"));
            let per_seed = score_predictions(input, &out)?;
            for (seed, v) in &per_seed {
                println!("seed {seed}: Rouge-L {v:.4}");
            }
            let (m, s) = mean_std(&per_seed.values().copied().collect::<Vec<_>>());
            println!("Rouge-L {m:.4} ± {s:.4} over {} seed(s); per-line scores in {}", per_seed.len(), out.display());
            return Ok(());
        }
        let Some(dir) = &self.model else { anyhow::bail!("give --model DIR or --predictions FILE") };
        let name = minillm::report::run_label(dir);
        let opts = EvalOptions {
            sets: self.sets.iter().map(|s| s.trim().to_string()).collect(),
            data_dir: self.data_dir.clone(),
            seeds: self.seeds.clone(),
            out: self.out.clone().unwrap_or_else(|| Path::new("runs").join(format!("eval-{name}"))),
            sampling: SamplingConfig {
                no_repeat_ngram_size: self.no_repeat_ngram_size,
                ..SamplingConfig::sampling(self.max_new_tokens.unwrap_or(usize::MAX))
            },
            max_prompt_len: 256,
            max_len: 512,
            batch_size: self.batch_size,
            max_examples: self.max_examples,
            overwrite: self.overwrite,
        };
        opts.validate()?;
        let model = self.load.load(dir)?;
        let results = evaluate_model(&model, &opts)?;
        print!("{}", markdown_table(&results));
        eprintln!("generations and results in {}", opts.out.display());
        Ok(())
    }
}

/// `minillm report`.
#[derive(Args, Debug)]
pub struct Report {
    /// Evaluation directories (`minillm eval --out DIR`), one per model.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where report.md and rouge_l.svg go.
    #[arg(long, default_value = "runs/report")]
    out: PathBuf,
    /// Write into an --out that holds other files (only report.md and rouge_l.svg are replaced).
    #[arg(long)]
    overwrite: bool,
}

impl Report {
    /// Writes the report and prints its table.
    pub fn run(self) -> Result<()> {
        super::claim_output(&self.out, "report", &["report.md", "rouge_l.svg"], self.overwrite)?;
        print!("{}", minillm::report::write_report(&self.runs, &self.out)?);
        eprintln!("report.md and rouge_l.svg in {}", self.out.display());
        Ok(())
    }
}
