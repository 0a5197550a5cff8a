//! `minillm eval`: a model over sets × seeds, or external predictions.

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::LoadOptions;
use crate::eval::evaluate::{evaluate_model, markdown_table, parse_seeds, score_predictions, EvalOptions};
use crate::eval::metrics::mean_std;
use crate::sample::SamplingConfig;

/// Options of `minillm eval`.
pub struct EvalCommand {
    /// The model (absent with `predictions`).
    pub load: Option<LoadOptions>,
    /// Comma-separated set names or jsonl paths.
    pub sets: String,
    /// Comma-separated seeds.
    pub seeds: String,
    /// Directory of the built-in sets.
    pub data_dir: PathBuf,
    /// Output directory (or scored-predictions file).
    pub out: Option<PathBuf>,
    /// n-gram blocking (6 in the released test script, 0 = off).
    pub no_repeat_ngram_size: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
    /// Only the first N examples of each set.
    pub max_examples: Option<usize>,
    /// Cap on generated tokens.
    pub max_new_tokens: Option<usize>,
    /// Score this predictions file instead of generating.
    pub predictions: Option<PathBuf>,
}

/// Runs the evaluation and prints the table.
pub fn eval(c: EvalCommand) -> Result<()> {
    if let Some(input) = &c.predictions {
        let out = c.out.clone().unwrap_or_else(|| input.with_extension("scored.jsonl"));
        let per_seed = score_predictions(input, &out)?;
        for (seed, v) in &per_seed {
            println!("seed {seed}: Rouge-L {v:.4}");
        }
        let (m, s) = mean_std(&per_seed.values().copied().collect::<Vec<_>>());
        println!("Rouge-L {m:.4} ± {s:.4} over {} seed(s); per-line scores in {}", per_seed.len(), out.display());
        return Ok(());
    }
    let load = c.load.as_ref().ok_or_else(|| anyhow::anyhow!("give --model DIR or --predictions FILE"))?;
    let model = load.load()?;
    let name = load.dir.file_name().map_or("model".into(), |n| n.to_string_lossy().to_string());
    let opts = EvalOptions {
        sets: c.sets.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_string).collect(),
        data_dir: c.data_dir.clone(),
        seeds: parse_seeds(&c.seeds)?,
        out: c.out.clone().unwrap_or_else(|| Path::new("runs").join(format!("eval-{name}"))),
        sampling: SamplingConfig {
            no_repeat_ngram_size: c.no_repeat_ngram_size,
            ..SamplingConfig::sampling(c.max_new_tokens.unwrap_or(usize::MAX))
        },
        max_prompt_len: 256,
        max_len: 512,
        batch_size: c.batch_size,
        max_examples: c.max_examples,
    };
    let results = evaluate_model(&model, &opts)?;
    print!("{}", markdown_table(&results));
    eprintln!("generations and results in {}", opts.out.display());
    Ok(())
}
