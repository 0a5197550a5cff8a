//! `minillm sft | kd | seqkd | distill`: build the task of each method from a run
//! configuration and hand it to the shared trainer.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::json;

use super::{device, parse_dtype};
use crate::config::RunConfig;
use crate::data::instruct::{load_instruct, InstructExample, InstructOptions};
use crate::data::pretrain::load_corpus;
use crate::model::compat::check_compatible;
use crate::model::{load_model, Model};
use crate::sample::{generate, row_rngs, SamplingConfig};
use crate::train::minillm::{DistillData, DistillTask};
use crate::train::supervised::{KdTerm, RougeValidation, SupervisedTask};
use crate::train::trainer::{train, RunDir, Selection, Task, TrainOutcome};

/// The training methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Supervised fine-tuning.
    Sft,
    /// Word-level knowledge distillation.
    Kd,
    /// Sequence-level knowledge distillation.
    SeqKd,
    /// MiniLLM.
    Distill,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Kd => "kd",
            Self::SeqKd => "seqkd",
            Self::Distill => "distill",
        }
    }
}

struct Setup {
    device: Device,
    dtype: DType,
    student_dir: PathBuf,
    student: Model,
    teacher: Option<Model>,
    eos: Vec<u32>,
    pad: u32,
}

fn required<'a>(v: &'a Option<PathBuf>, key: &str) -> Result<&'a PathBuf> {
    v.as_ref().with_context(|| format!("`{key}` is not set (in the config file or with --set {key}=...)"))
}

fn setup(cfg: &RunConfig, needs_teacher: bool) -> Result<Setup> {
    let device = device(cfg.model.gpu)?;
    let dtype = parse_dtype(&cfg.model.dtype)?;
    let student_dir = required(&cfg.model.student, "model.student")?.clone();
    let student = load_model(&student_dir, &device, dtype)?;
    student.tokenizer()?;
    let teacher = if needs_teacher {
        let t = load_model(required(&cfg.model.teacher, "model.teacher")?, &device, dtype)?;
        check_compatible(&student, &t)?;
        Some(t)
    } else {
        None
    };
    let eos = student.eos_token_ids.clone();
    if eos.is_empty() {
        bail!("{}: config.json defines no eos_token_id", student_dir.display());
    }
    let pad = student.pad_id();
    Ok(Setup { device, dtype, student_dir, student, teacher, eos, pad })
}

fn instruct(cfg: &RunConfig, s: &Setup, path: &Path, limit: Option<usize>) -> Result<Vec<InstructExample>> {
    let opts = InstructOptions {
        max_prompt_len: cfg.data.max_prompt_len,
        max_len: cfg.data.max_len,
        skip_malformed: cfg.data.skip_malformed,
    };
    let (mut exs, _) = load_instruct(path, s.student.tokenizer()?, s.eos[0], &opts)?;
    if let Some(n) = limit {
        exs.truncate(n);
    }
    Ok(exs)
}

/// Runs `method` with `cfg` and prints where the selected model is.
pub fn run_method(method: Method, cfg: &RunConfig) -> Result<TrainOutcome> {
    let out = cfg.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(method.name()));
    let run = RunDir::new(&out)?;
    crate::atomic::write_file(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
    let mut s = setup(cfg, method != Method::Sft)?;
    let valid = instruct(cfg, &s, required(&cfg.data.valid, "data.valid")?, cfg.data.valid_limit)?;
    let t = &cfg.train;
    let take_teacher = |s: &mut Setup| s.teacher.take().context("this method needs a teacher (model.teacher)");
    let mut task: Box<dyn Task> = match method {
        Method::Sft | Method::Kd | Method::SeqKd => {
            // SeqKD trains on teacher samples; KD and SeqKD's `lmops` mode add the teacher term.
            let train_path = match method {
                Method::SeqKd => teacher_generations(cfg, &s, &out)?,
                _ => required(&cfg.data.train, "data.train")?.clone(),
            };
            let train_set = instruct(cfg, &s, &train_path, cfg.data.train_limit)?;
            let wants_kd = method == Method::Kd || (method == Method::SeqKd && cfg.seqkd.mode == "lmops");
            let kd = if wants_kd { Some(kd_term(cfg, take_teacher(&mut s)?)?) } else { None };
            let mut task =
                SupervisedTask::new(train_set, valid, t.batch_size, t.grad_accum, t.seed, s.pad, s.device.clone(), kd);
            if t.select_by == Selection::ValRougeL {
                let tokenizer = s.student.tokenizer()?.clone();
                task = task.with_rouge(RougeValidation {
                    tokenizer,
                    eos: s.eos.clone(),
                    max_len: cfg.data.max_len,
                    seed: t.seed,
                });
            }
            Box::new(task)
        }
        Method::Distill => {
            let train_set = instruct(cfg, &s, required(&cfg.data.train, "data.train")?, cfg.data.train_limit)?;
            let corpus = if cfg.distill.pt {
                let path = required(&cfg.data.corpus, "data.corpus")?;
                load_corpus(path, s.student.tokenizer()?, s.eos[0], cfg.data.corpus_chunk)?
            } else {
                Vec::new()
            };
            let data = DistillData { prompts: train_set.into_iter().map(|e| e.prompt).collect(), valid, corpus };
            let teacher = take_teacher(&mut s)?;
            let mut d = cfg.distill.clone();
            d.max_len = d.max_len.min(cfg.data.max_len);
            Box::new(DistillTask::new(
                d,
                teacher,
                data,
                s.eos.clone(),
                s.pad,
                s.device.clone(),
                t.batch_size,
                t.grad_accum,
                t.seed,
            )?)
        }
    };
    let outcome = train(&s.student_dir, &s.device, s.dtype, task.as_mut(), t, &run)?;
    match (&outcome.best, outcome.interrupted) {
        (_, true) => eprintln!("stopped at step {}; run the same command again to resume", outcome.steps),
        (Some((v, step)), false) => {
            eprintln!("done: best {:?} = {v:.4} at step {step}; model in {}", t.select_by, run.best().display())
        }
        (None, false) => eprintln!("done"),
    }
    Ok(outcome)
}

fn kd_term(cfg: &RunConfig, teacher: Model) -> Result<KdTerm> {
    Ok(KdTerm { teacher, ratio: cfg.kd.ratio, divergence: cfg.kd.divergence()? })
}

/// SeqKD's first phase: the teacher samples a response (temperature 1) for every training
/// prompt; written as jsonl (`prompt`, `output`) and reused when it already exists.
fn teacher_generations(cfg: &RunConfig, s: &Setup, out: &Path) -> Result<PathBuf> {
    let path = cfg.seqkd.generations.clone().unwrap_or_else(|| out.join("teacher_generations.jsonl"));
    if path.is_file() {
        eprintln!("reusing teacher generations from {}", path.display());
        return Ok(path);
    }
    let teacher = s.teacher.as_ref().context("seqkd needs model.teacher")?;
    let tok = s.student.tokenizer()?;
    let train_set = instruct(cfg, s, required(&cfg.data.train, "data.train")?, cfg.data.train_limit)?;
    let bar = indicatif::ProgressBar::new(train_set.len() as u64).with_style(indicatif::ProgressStyle::with_template(
        "teacher generations {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    )?);
    let mut lines = String::new();
    for (k, chunk) in train_set.chunks(cfg.seqkd.batch_size.max(1)).enumerate() {
        let prompts: Vec<Vec<u32>> = chunk.iter().map(|e| e.prompt.clone()).collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let sampling = SamplingConfig {
            max_new_tokens: cfg.seqkd.max_new_tokens.min(cfg.data.max_len.saturating_sub(longest)).max(1),
            max_length: Some(cfg.data.max_len),
            ..SamplingConfig::sampling(0)
        };
        let start = (k * cfg.seqkd.batch_size) as u64;
        let mut rngs = row_rngs(cfg.train.seed, start..start + prompts.len() as u64);
        let g = generate(teacher.lm.as_ref(), &prompts, &s.eos, s.pad, &sampling, &mut rngs)?;
        for (p, y) in g.prompts.iter().zip(&g.responses) {
            let text: Vec<u32> = y.iter().copied().filter(|t| !s.eos.contains(t)).collect();
            let row = json!({"prompt": tok.decode(p, true)?, "output": tok.decode(&text, true)?});
            lines.push_str(&format!("{row}\n"));
        }
        bar.inc(prompts.len() as u64);
    }
    bar.finish_and_clear();
    crate::atomic::write_file(&path, lines.as_bytes())?;
    eprintln!("wrote {} teacher generations to {}", train_set.len(), path.display());
    Ok(path)
}
