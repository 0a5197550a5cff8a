//! The `minillm` command: parses arguments and calls the library; nothing else.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use minillm::cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Knowledge distillation of large language models (MiniLLM, SFT, KD, SeqKD).
#[derive(Parser)]
#[command(name = "minillm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt (or of an instruction wrapped in the template).
    Generate(GenerateArgs),
    /// Per-token log-probabilities of every line of a jsonl file.
    Score(ScoreArgs),
    /// Load a model directory and save it again (Hugging Face layout, chosen dtype).
    Convert(ConvertArgs),
    /// Supervised fine-tuning (cross-entropy on response tokens); MiniLLM's phase 1.
    Sft(TrainArgs),
    /// Word-level knowledge distillation: (1 − r)·CE + r·divergence(teacher ‖ student).
    Kd(TrainArgs),
    /// Sequence-level KD: train on responses sampled from the teacher.
    Seqkd(TrainArgs),
    /// MiniLLM: on-policy reverse-KL distillation (phase 2; start from an `sft` checkpoint).
    Distill(DistillArgs),
    /// Evaluate a model on the paper's sets × seeds (Rouge-L, Dist-4, LM loss), or score
    /// predictions made elsewhere.
    Eval(EvalArgs),
    /// Compare evaluation runs: the paper's Table 1 layout and a bar chart.
    Report(ReportArgs),
    /// Calibration: ECE and accuracy of zero-shot classification from label-word probabilities.
    Calibrate(CalibrateArgs),
    /// Exposure bias: ExAccErr(l) of students against a teacher, as JSON and a plot.
    Exposure(ExposureArgs),
    /// Walk through the model stack on the built-in tiny models (see README).
    Demo(DemoArgs),
}

#[derive(Args)]
struct CalibrateArgs {
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
    /// Custom template: comma-separated label words (label i = word i).
    #[arg(long)]
    labels: Option<String>,
    /// Confidence bins.
    #[arg(long, default_value_t = 10)]
    bins: usize,
}

#[derive(Args)]
struct ExposureArgs {
    /// Teacher model directory.
    #[arg(long)]
    teacher: PathBuf,
    /// Student model directories (repeat for several curves).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Prompt set: a built-in name or a jsonl path.
    #[arg(long, default_value = "dolly")]
    set: String,
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
    /// Working precision.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// GPU index.
    #[arg(long)]
    gpu: Option<usize>,
}

#[derive(Args)]
struct ReportArgs {
    /// Evaluation directories (`minillm eval --out DIR`), one per model.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where report.md and rouge_l.svg go.
    #[arg(long, default_value = "runs/report")]
    out: PathBuf,
}

#[derive(Args)]
struct EvalArgs {
    /// Model directory.
    #[arg(long, required_unless_present = "predictions", conflicts_with = "predictions")]
    model: Option<PathBuf>,
    /// Working precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// GPU index (needs the `cuda` feature).
    #[arg(long)]
    gpu: Option<usize>,
    /// Sets: dolly, self-inst, vicuna, sinst, uinst, or paths to jsonl files.
    #[arg(long, default_value = "dolly,self-inst,vicuna,sinst,uinst")]
    sets: String,
    /// Sampling seeds.
    #[arg(long, default_value = "10,20,30,40,50")]
    seeds: String,
    /// Where the built-in sets are.
    #[arg(long, default_value = minillm::eval::sets::DEFAULT_DATA_DIR)]
    data_dir: PathBuf,
    /// Output directory (default runs/eval-<model>), or the scored file with --predictions.
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
}

/// Options shared by the training commands; each is a shorthand for a `--set` override.
#[derive(Args)]
struct TrainArgs {
    /// Run configuration (TOML); see configs/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Student model directory (model.student).
    #[arg(long)]
    student: Option<PathBuf>,
    /// Teacher model directory (model.teacher).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Training jsonl (data.train).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Validation jsonl (data.valid).
    #[arg(long)]
    valid: Option<PathBuf>,
    /// Run directory (out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps (train.max_steps).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Peak learning rate (train.lr).
    #[arg(long)]
    lr: Option<f64>,
    /// Sequences per micro-batch (train.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per step (train.grad_accum).
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Seed (train.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// KD divergence: fkl, sce, rkl, jsd[:β], tvd, sfkl[:λ], srkl[:λ] (kd.divergence).
    #[arg(long)]
    divergence: Option<String>,
    /// KD weight r (kd.ratio).
    #[arg(long)]
    kd_ratio: Option<f64>,
    /// Any setting, as section.key=value (repeatable), e.g. --set train.eval_interval=50.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct DistillArgs {
    #[command(flatten)]
    common: TrainArgs,
    /// Pre-training corpus (data.corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// `lmops` (released implementation, default) or `paper` (equations as printed).
    #[arg(long)]
    preset: Option<String>,
    /// Teacher-mix coefficient α (distill.alpha; 0 = no teacher mixing).
    #[arg(long)]
    alpha: Option<f32>,
    /// Ablation: no length normalisation.
    #[arg(long)]
    no_length_norm: bool,
    /// Ablation: no single-step term.
    #[arg(long)]
    no_single_step: bool,
    /// Ablation: no pre-training term.
    #[arg(long)]
    no_pt: bool,
}

impl TrainArgs {
    /// The flags as `key=value` overrides (explicit `--set` last, so they win).
    fn overrides(&self) -> Vec<String> {
        let q = |p: &PathBuf| format!("{:?}", p.display().to_string());
        let mut o = Vec::new();
        let mut push = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                o.push(format!("{k}={v}"));
            }
        };
        push("model.student", self.student.as_ref().map(q));
        push("model.teacher", self.teacher.as_ref().map(q));
        push("data.train", self.train.as_ref().map(q));
        push("data.valid", self.valid.as_ref().map(q));
        push("out", self.out.as_ref().map(q));
        push("train.max_steps", self.max_steps.map(|v| v.to_string()));
        push("train.lr", self.lr.map(|v| format!("{v:e}")));
        push("train.batch_size", self.batch_size.map(|v| v.to_string()));
        push("train.grad_accum", self.grad_accum.map(|v| v.to_string()));
        push("train.seed", self.seed.map(|v| v.to_string()));
        push("kd.divergence", self.divergence.as_ref().map(|v| format!("{v:?}")));
        push("kd.ratio", self.kd_ratio.map(|v| v.to_string()));
        o.extend(self.set.iter().cloned());
        o
    }
}

impl DistillArgs {
    fn overrides(&self) -> Vec<String> {
        let mut o = Vec::new();
        if let Some(c) = &self.corpus {
            o.push(format!("data.corpus={:?}", c.display().to_string()));
        }
        if let Some(p) = &self.preset {
            o.push(format!("distill.preset={p:?}"));
        }
        if let Some(a) = self.alpha {
            o.push(format!("distill.alpha={a}"));
        }
        if self.no_length_norm {
            o.push("distill.policy.length_norm=false".into());
        }
        if self.no_single_step {
            o.push("distill.single_step=false".into());
        }
        if self.no_pt {
            o.push("distill.pt=false".into());
        }
        o.extend(self.common.overrides());
        o
    }
}

#[derive(Args)]
struct ModelArgs {
    /// Model directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Working precision: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Run on the GPU with this index (needs the `cuda` feature).
    #[arg(long)]
    gpu: Option<usize>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Raw prompt text.
    #[arg(long, conflicts_with = "instruction", required_unless_present = "instruction")]
    prompt: Option<String>,
    /// Instruction, wrapped in the MiniLLM prompt template.
    #[arg(long)]
    instruction: Option<String>,
    /// Optional input for the instruction template.
    #[arg(long, requires = "instruction", default_value = "")]
    input: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Temperature (0 = greedy).
    #[arg(long, default_value_t = 1.0)]
    temperature: f32,
    /// Top-k (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Top-p (1 = off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Forbid repeated n-grams of this size (0 = off).
    #[arg(long, default_value_t = 0)]
    no_repeat_ngram_size: usize,
    /// Number of samples.
    #[arg(long, default_value_t = 1)]
    num_samples: usize,
    /// Random seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct ScoreArgs {
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

#[derive(Args)]
struct ConvertArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct DemoArgs {
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

fn main() {
    minillm::runtime::configure();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn train_command(method: cli::Method, config: Option<&std::path::Path>, overrides: &[String]) -> Result<()> {
    let cfg = minillm::config::RunConfig::load(config, overrides)?;
    if cli::run_method(method, &cfg)?.interrupted {
        // Interrupted (Ctrl-C) after writing a checkpoint: the conventional status for SIGINT.
        std::process::exit(130);
    }
    Ok(())
}

fn load_opts(m: &ModelArgs) -> cli::LoadOptions {
    cli::LoadOptions { dir: m.model.clone(), dtype: m.dtype.clone(), gpu: m.gpu }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => cli::generate(cli::GenerateOptions {
            load: load_opts(&a.model),
            prompt: a.prompt,
            instruction: a.instruction.map(|i| (i, a.input)),
            sampling: minillm::sample::SamplingConfig {
                max_new_tokens: a.max_new_tokens,
                max_length: None,
                temperature: a.temperature,
                top_k: a.top_k,
                top_p: a.top_p,
                no_repeat_ngram_size: a.no_repeat_ngram_size,
            },
            num_samples: a.num_samples,
            seed: a.seed,
        }),
        Command::Score(a) => cli::score(&load_opts(&a.model), &a.input, a.output.as_deref(), a.batch_tokens),
        Command::Convert(a) => cli::convert(&load_opts(&a.model), &a.out),
        Command::Sft(a) => train_command(cli::Method::Sft, a.config.as_deref(), &a.overrides()),
        Command::Kd(a) => train_command(cli::Method::Kd, a.config.as_deref(), &a.overrides()),
        Command::Seqkd(a) => train_command(cli::Method::SeqKd, a.config.as_deref(), &a.overrides()),
        Command::Distill(a) => train_command(cli::Method::Distill, a.common.config.as_deref(), &a.overrides()),
        Command::Eval(a) => cli::eval(cli::EvalCommand {
            load: a.model.map(|dir| cli::LoadOptions { dir, dtype: a.dtype, gpu: a.gpu }),
            sets: a.sets,
            seeds: a.seeds,
            data_dir: a.data_dir,
            out: a.out,
            no_repeat_ngram_size: a.no_repeat_ngram_size,
            batch_size: a.batch_size,
            max_examples: a.max_examples,
            max_new_tokens: a.max_new_tokens,
            predictions: a.predictions,
        }),
        Command::Report(a) => {
            print!("{}", minillm::report::write_report(&a.runs, &a.out)?);
            eprintln!("report.md and rouge_l.svg in {}", a.out.display());
            Ok(())
        }
        Command::Calibrate(a) => cli::calibrate(cli::CalibrateCommand {
            load: load_opts(&a.model),
            data: a.data,
            preset: a.preset,
            custom: match (a.instruction, a.input, a.labels) {
                (Some(i), Some(x), Some(l)) => Some((i, x, l)),
                _ => None,
            },
            bins: a.bins,
        }),
        Command::Exposure(a) => {
            let load = |dir: PathBuf| cli::LoadOptions { dir, dtype: a.dtype.clone(), gpu: a.gpu };
            cli::exposure(cli::ExposureCommand {
                teacher: load(a.teacher.clone()),
                students: a.models.iter().cloned().map(load).collect(),
                set: a.set,
                data_dir: a.data_dir,
                prompts: a.prompts,
                samples: a.samples,
                max_new_tokens: a.max_new_tokens,
                seed: a.seed,
                out: a.out,
            })
        }
        Command::Demo(a) => {
            cli::demo(&cli::DemoOptions { seed: a.seed, quick: a.quick, ablations: a.ablations, out: a.out })
        }
    }
}
