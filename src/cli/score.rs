//! `minillm score`: per-token log-probabilities of every line of a jsonl file.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::score::score_jsonl;

use super::ModelArgs;

/// `minillm score`.
#[derive(Args, Debug)]
pub struct Score {
    #[command(flatten)]
    model: ModelArgs,
    /// jsonl with `{"text": ...}` or `{"prompt": ..., "response": ...}` per line.
    #[arg(long)]
    input: PathBuf,
    /// Output jsonl (default: standard output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Most padded tokens per forward batch.
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
}

impl Score {
    /// Scores the file: to `--output` (written atomically at the end) or streamed to stdout.
    pub fn run(self) -> Result<()> {
        let model = self.model.load()?;
        match &self.output {
            Some(path) => {
                let mut buffer = Vec::new();
                score_jsonl(&model, &self.input, &mut buffer, self.batch_tokens)?;
                minillm::atomic::write_file(path, &buffer)
            }
            None => score_jsonl(&model, &self.input, &mut std::io::stdout().lock(), self.batch_tokens),
        }
    }
}
