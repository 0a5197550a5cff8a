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
    /// Walk through the model stack on the built-in tiny models (see README).
    Demo(DemoArgs),
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
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    // candle asks for its thread count on every op and, unless RAYON_NUM_THREADS is set,
    // answers by parsing /proc/cpuinfo each time (thousands of file reads per second while
    // decoding). Fix the answer once, before any thread starts.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
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
        Command::Demo(a) => cli::demo(a.seed),
    }
}
