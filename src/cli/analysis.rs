//! `minillm calibrate` (ECE and accuracy) and `minillm exposure` (ExAccErr curves).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::analysis::calibration::{calibration, load_classification, ClassifyTemplate};
use minillm::analysis::exposure::{write_exposure, ExposureSettings};
use minillm::eval::sets::load_set;
use minillm::report::{run_label, unique_labels};
use serde_json::json;

use super::{LoadArgs, ModelArgs};

/// `minillm calibrate`.
#[derive(Args, Debug)]
pub struct Calibrate {
    #[command(flatten)]
    model: ModelArgs,
    /// jsonl with the template's fields and a `label` (index, boolean or label word).
    #[arg(long)]
    data: PathBuf,
    /// Built-in template: sst2 (`text`) or boolq (`passage`, `question`).
    #[arg(long, required_unless_present = "instruction")]
    preset: Option<String>,
    /// Custom template: the instruction.
    #[arg(long, requires_all = ["input", "labels"], conflicts_with = "preset")]
    instruction: Option<String>,
    /// Custom template: the input, with `{field}` placeholders.
    #[arg(long)]
    input: Option<String>,
    /// Custom template: label words, comma-separated (label i = word i).
    #[arg(long, value_delimiter = ',')]
    labels: Vec<String>,
    /// Confidence bins.
    #[arg(long, default_value_t = 10)]
    bins: usize,
}

impl Calibrate {
    /// Prints ECE and accuracy (percent).
    pub fn run(self) -> Result<()> {
        let template = match (&self.preset, &self.instruction) {
            (Some(p), _) => ClassifyTemplate::preset(p)?,
            (None, Some(i)) => ClassifyTemplate::custom(i, self.input.as_deref().unwrap_or(""), &self.labels)?,
            (None, None) => anyhow::bail!("give --preset sst2|boolq or --instruction, --input and --labels"),
        };
        let model = self.model.load()?;
        let examples = load_classification(&self.data, &template)?;
        let r = calibration(&model, &template, &examples, self.bins)?;
        let data = self.data.display().to_string();
        println!(
            "{}",
            json!({"data": data, "ece": r.ece * 100.0, "accuracy": r.accuracy * 100.0, "examples": r.examples})
        );
        Ok(())
    }
}

/// `minillm exposure`.
#[derive(Args, Debug)]
pub struct Exposure {
    /// Teacher model directory.
    #[arg(long)]
    teacher: PathBuf,
    /// Student model directories (repeat for several curves).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Prompt set: a built-in name (dolly, self-inst, vicuna, sinst, uinst) or a jsonl path.
    #[arg(long, default_value = "dolly")]
    prompt_set: String,
    /// Where the built-in sets are.
    #[arg(long, default_value = minillm::eval::sets::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Prompts used.
    #[arg(long, default_value_t = 50)]
    prompts: usize,
    /// Sampled prefixes per prompt (10 in the paper).
    #[arg(long, default_value_t = 10)]
    samples: usize,
    /// Longest generation length.
    #[arg(long, default_value_t = 200)]
    max_new_tokens: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output directory.
    #[arg(long, default_value = "runs/exposure")]
    out: PathBuf,
    /// Write into an --out that holds other files (only exposure.json and exposure.svg are
    /// replaced).
    #[arg(long)]
    overwrite: bool,
    #[command(flatten)]
    load: LoadArgs,
}

impl Exposure {
    /// Writes `exposure.json` and `exposure.svg` (ExAccErr(l) of every student).
    pub fn run(self) -> Result<()> {
        super::claim_output(&self.out, "exposure", &["exposure.json", "exposure.svg"], self.overwrite)?;
        let teacher = self.load.load(&self.teacher)?;
        let set = load_set(&self.prompt_set, &self.data_dir)?;
        let tok = teacher.tokenizer()?;
        let prompts: Vec<Vec<u32>> =
            set.examples.iter().take(self.prompts).map(|e| tok.encode(&e.prompt)).collect::<anyhow::Result<_>>()?;
        let labels = unique_labels(self.models.iter().map(|d| run_label(d)).collect());
        let students: Vec<(String, PathBuf)> = labels.into_iter().zip(self.models.iter().cloned()).collect();
        let settings =
            ExposureSettings { samples: self.samples, max_new_tokens: self.max_new_tokens, seed: self.seed, batch: 16 };
        write_exposure(&teacher, &students, |d| self.load.load(d), &set.name, &prompts, &settings, &self.out)?;
        eprintln!("exposure.json and exposure.svg in {}", self.out.display());
        Ok(())
    }
}
