//! The `minillm` command: parses arguments and calls the library; nothing else.

mod cli;

use clap::{Parser, Subcommand};

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
    Generate(cli::generate::Generate),
    /// Per-token log-probabilities of every line of a jsonl file.
    Score(cli::score::Score),
    /// Load a model directory and save it again (Hugging Face layout, chosen dtype).
    Convert(cli::convert::Convert),
    /// Make a randomly initialised model from a config.json and a tokenizer.
    Init(cli::init::Init),
    /// Language modelling on a plain-text corpus (pre-training a model made from scratch).
    Pretrain(cli::train::Pretrain),
    /// Supervised fine-tuning (cross-entropy on response tokens); MiniLLM's phase 1.
    Sft(cli::train::Sft),
    /// Word-level knowledge distillation: (1 − r)·CE + r·divergence(teacher ‖ student).
    Kd(cli::train::Kd),
    /// Sequence-level KD: train on responses sampled from the teacher.
    Seqkd(cli::train::SeqKd),
    /// MiniLLM: on-policy reverse-KL distillation (phase 2; start from an `sft` checkpoint).
    Distill(cli::train::Distill),
    /// Generalized KD (TRL GKDConfig meanings): on-policy with probability λ, generalised JSD.
    Gkd(cli::train::Gkd),
    /// On-policy distillation (Tinker cookbook): student samples, per-token reverse-KL
    /// advantage, importance-sampled policy gradient.
    Opd(cli::train::Opd),
    /// DistiLLM: skew KL with the adaptive off-policy schedule (a replay buffer of student
    /// samples used more often as validation loss rises).
    Distillm(cli::train::Distillm),
    /// Evaluate a model on the paper's sets × seeds (Rouge-L, Dist-4, LM loss), or score
    /// predictions made elsewhere.
    Eval(cli::eval::Eval),
    /// Compare evaluation runs: the paper's Table 1 layout and a bar chart.
    Report(cli::eval::Report),
    /// Calibration: ECE and accuracy of zero-shot classification from label-word probabilities.
    Calibrate(cli::analysis::Calibrate),
    /// Exposure bias: ExAccErr(l) of students against a teacher, as JSON and a plot.
    Exposure(cli::analysis::Exposure),
    /// The paper's main experiment in miniature: teacher, SFT/KD/SeqKD/MiniLLM students,
    /// evaluation, plots (see README).
    Demo(cli::demo::Demo),
}

fn main() {
    minillm::runtime::configure();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    minillm::progress::enable();
    cli::signals::install();
    let command = Cli::parse().command;
    // The whole command runs on a worker of the thread pool (see `on_workers`).
    let result = minillm::runtime::on_workers(|| match command {
        Command::Generate(c) => c.run(),
        Command::Score(c) => c.run(),
        Command::Convert(c) => c.run(),
        Command::Init(c) => c.run(),
        Command::Pretrain(c) => c.run(),
        Command::Sft(c) => c.run(),
        Command::Kd(c) => c.run(),
        Command::Seqkd(c) => c.run(),
        Command::Distill(c) => c.run(),
        Command::Gkd(c) => c.run(),
        Command::Opd(c) => c.run(),
        Command::Distillm(c) => c.run(),
        Command::Eval(c) => c.run(),
        Command::Report(c) => c.run(),
        Command::Calibrate(c) => c.run(),
        Command::Exposure(c) => c.run(),
        Command::Demo(c) => c.run(),
    });
    if let Err(e) = result {
        eprintln!("error: {}", minillm::error_text::render(&e));
        std::process::exit(1);
    }
}
