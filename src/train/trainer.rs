//! The training loop, written once for every method: gradient accumulation normalised over the
//! whole window, clipping, AdamW with a schedule, non-finite guards, periodic validation with
//! checkpoint selection, `metrics.jsonl`, a progress bar, atomic checkpoints and exact resume.
//!
//! A method supplies a [`Task`]: the micro-batches of each step and their loss, validation, and
//! its own resumable state (data order, random streams).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::optim::{clip_grad_norm, collect_grads, grad_norm, AdamW, AdamWConfig, Schedule};
use crate::model::{load_model, write_model_files, Model};

/// Named scalar statistics of a step or an evaluation.
pub type Stats = BTreeMap<String, f64>;

/// What a training method provides to the loop.
pub trait Task {
    /// Prepares the micro-batches of optimizer step `step` and returns the number of loss
    /// units (target tokens) in the whole window: every micro-batch loss is divided by it.
    fn begin_step(&mut self, student: &Model, step: usize) -> Result<f64>;
    /// Number of micro-batches prepared by [`Task::begin_step`].
    fn micro_batches(&self) -> usize;
    /// Loss of micro-batch `i`, already divided by `norm`, and its statistics (which the loop
    /// sums over the window).
    fn micro_loss(&mut self, student: &Model, i: usize, norm: f64) -> Result<(Tensor, Stats)>;
    /// Validation statistics (must include the selection metric, e.g. `val_loss`).
    fn validate(&mut self, student: &Model) -> Result<Stats>;
    /// Resumable state.
    fn state(&self) -> Result<TaskState>;
    /// Restores [`Task::state`].
    fn load_state(&mut self, state: TaskState) -> Result<()>;
}

/// A task's resumable state: small values as JSON, bulk data (a rollout buffer) as tensors.
#[derive(Clone, Debug, Default)]
pub struct TaskState {
    /// JSON part (`state.json`).
    pub json: Value,
    /// Tensor part (`task_state.safetensors`).
    pub tensors: std::collections::HashMap<String, Tensor>,
}

impl TaskState {
    /// A state with no tensors.
    pub fn json(json: Value) -> Self {
        Self { json, tensors: Default::default() }
    }
}

/// How the best checkpoint is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Selection {
    /// Lowest `val_loss`.
    ValLoss,
    /// Highest `val_rougeL`.
    ValRougeL,
}

impl Selection {
    fn key(self) -> &'static str {
        match self {
            Self::ValLoss => "val_loss",
            Self::ValRougeL => "val_rougeL",
        }
    }

    fn better(self, new: f64, old: f64) -> bool {
        match self {
            Self::ValLoss => new < old,
            Self::ValRougeL => new > old,
        }
    }
}

/// Settings of the loop (the `[train]` section of a run config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Optimizer.
    pub optimizer: AdamWConfig,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Global gradient-norm clip (none when absent).
    pub clip_grad: Option<f64>,
    /// Validate every this many steps (and after the last).
    pub eval_interval: usize,
    /// Write a resumable checkpoint every this many steps (and after the last).
    pub save_interval: usize,
    /// Resumable checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// Checkpoint selection criterion.
    pub select_by: Selection,
    /// Seed of data order and sampling.
    pub seed: u64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_bad_steps: usize,
    /// Behave as if interrupted (Ctrl-C) after this many steps (testing resume).
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            lr: 5e-4,
            schedule: Schedule::Constant { warmup: 0 },
            optimizer: AdamWConfig::default(),
            max_steps: 1000,
            batch_size: 8,
            grad_accum: 1,
            clip_grad: Some(1.0),
            eval_interval: 100,
            save_interval: 100,
            keep_checkpoints: 2,
            select_by: Selection::ValLoss,
            seed: 10,
            max_bad_steps: 5,
            stop_after: None,
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Steps completed.
    pub steps: usize,
    /// Whether the run stopped early (Ctrl-C or `stop_after`) and can be resumed.
    pub interrupted: bool,
    /// Best value of the selection metric and its step.
    pub best: Option<(f64, usize)>,
    /// Validation statistics of each evaluation, by step.
    pub evals: Vec<(usize, Stats)>,
}

/// The loop's own resumable state (`state.json` in a checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LoopState {
    /// Steps completed.
    step: usize,
    optimizer_steps: usize,
    best: Option<(f64, usize)>,
    bad_in_a_row: usize,
    task: Value,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static HANDLER: std::sync::Once = std::sync::Once::new();

fn install_ctrlc() {
    HANDLER.call_once(|| {
        // A second Ctrl-C while the checkpoint is written kills the process as usual.
        let _ = ctrlc::set_handler(|| {
            if INTERRUPTED.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\ninterrupted: finishing this step and writing a checkpoint (Ctrl-C again to abort)");
        });
    });
}

/// Where a run keeps its files.
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// `root` (created if missing).
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating run directory {}", root.display()))?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// The run's root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `checkpoints/step-N`.
    pub fn checkpoint(&self, step: usize) -> PathBuf {
        self.root.join("checkpoints").join(format!("step-{step}"))
    }

    /// The selected model.
    pub fn best(&self) -> PathBuf {
        self.root.join("best")
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// Steps of the `checkpoints/step-N` directories, ascending (complete or not).
    fn checkpoint_steps(&self) -> Vec<usize> {
        let mut steps: Vec<usize> = std::fs::read_dir(self.root.join("checkpoints"))
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
            .collect();
        steps.sort_unstable();
        steps
    }

    /// The newest complete checkpoint and its step.
    pub fn latest_checkpoint(&self) -> Option<(usize, PathBuf)> {
        self.checkpoint_steps()
            .into_iter()
            .rev()
            .map(|s| (s, self.checkpoint(s)))
            .find(|(_, p)| p.join("state.json").is_file())
    }
}

/// Validates `model`, logs the statistics, and writes it as the best model when the selection
/// metric improved.
fn validate_and_select(
    task: &mut dyn Task,
    model: &Model,
    cfg: &TrainConfig,
    run: &RunDir,
    state: &mut LoopState,
    metrics: &mut std::fs::File,
    outcome: &mut TrainOutcome,
) -> Result<()> {
    let eval = task.validate(model)?;
    let key = cfg.select_by.key();
    let value = *eval.get(key).with_context(|| format!("validation produced no `{key}`"))?;
    writeln!(metrics, "{}", json!({"step": state.step, "eval": eval}))?;
    if state.best.is_none_or(|(b, _)| cfg.select_by.better(value, b)) {
        state.best = Some((value, state.step));
        crate::atomic::write_dir(&run.best(), |tmp| write_model_files(model, tmp, DType::F32))?;
    }
    outcome.evals.push((state.step, eval));
    Ok(())
}

/// Trains the student from `student_dir` (or resumes from the newest checkpoint in `run`) and
/// returns how the run ended; the selected model is in `run.best()`.
pub fn train(
    student_dir: &Path,
    device: &Device,
    dtype: DType,
    task: &mut dyn Task,
    cfg: &TrainConfig,
    run: &RunDir,
) -> Result<TrainOutcome> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.eval_interval == 0 || cfg.save_interval == 0 {
        bail!("batch_size, grad_accum, eval_interval and save_interval must be at least 1");
    }
    install_ctrlc();
    INTERRUPTED.store(false, Ordering::SeqCst);
    let resume = run.latest_checkpoint();
    let model = match &resume {
        Some((_, dir)) => load_model(dir, device, dtype)?,
        None => load_model(student_dir, device, dtype)?,
    };
    let mut opt = AdamW::new(model.lm.params().iter(), cfg.optimizer.clone())?;
    let mut state = LoopState { step: 0, optimizer_steps: 0, best: None, bad_in_a_row: 0, task: Value::Null };
    if let Some((step, dir)) = &resume {
        let text = std::fs::read_to_string(dir.join("state.json"))?;
        state = serde_json::from_str(&text).with_context(|| format!("{}/state.json", dir.display()))?;
        let tensors = candle_core::safetensors::load(dir.join("trainer_state.safetensors"), device)?;
        opt.load_state(&tensors.into_iter().collect(), state.optimizer_steps)?;
        let task_tensors = match dir.join("task_state.safetensors") {
            p if p.is_file() => candle_core::safetensors::load(p, device)?,
            _ => Default::default(),
        };
        task.load_state(TaskState { json: state.task.clone(), tensors: task_tensors })?;
        truncate_metrics(&run.metrics(), *step)?;
        eprintln!("resuming {} from step {step}", run.root().display());
    }
    if resume.is_none() && run.metrics().is_file() {
        // Rows of a run that stopped before its first checkpoint: that run restarts from scratch.
        std::fs::remove_file(run.metrics()).with_context(|| format!("removing stale {}", run.metrics().display()))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(run.metrics())
        .with_context(|| format!("opening {}", run.metrics().display()))?;
    let bar = indicatif::ProgressBar::new(cfg.max_steps as u64).with_style(indicatif::ProgressStyle::with_template(
        "{msg} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    )?);
    bar.set_position(state.step as u64);
    let mut outcome = TrainOutcome { steps: state.step, interrupted: false, best: state.best, evals: Vec::new() };
    let vars: Vec<_> = model.lm.params().iter().map(|(_, v)| v.clone()).collect();
    // The starting model is validated too: its curves start at the initial point, and it stays
    // the selected model if training never improves on it (as the released trainer does).
    if resume.is_none() && cfg.max_steps > 0 {
        validate_and_select(task, &model, cfg, run, &mut state, &mut metrics, &mut outcome)?;
    }

    while state.step < cfg.max_steps {
        let step = state.step;
        let t0 = Instant::now();
        let lr = cfg.schedule.lr(cfg.lr, step);
        let norm = task.begin_step(&model, step)?;
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut stats = Stats::new();
        let mut problem = None;
        for i in 0..task.micro_batches() {
            let (loss, s) = task.micro_loss(&model, i, norm)?;
            let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
            if !value.is_finite() {
                problem = Some(format!("the loss of micro-batch {i} is {value}"));
                break;
            }
            let store = loss.backward()?;
            for (acc, g) in grads.iter_mut().zip(collect_grads(&store, &vars)) {
                *acc = match (acc.take(), g) {
                    (Some(a), Some(g)) => Some((a + g)?),
                    (a, g) => a.or(g),
                };
            }
            *stats.entry("loss".into()).or_default() += value as f64;
            for (k, v) in s {
                *stats.entry(k).or_default() += v;
            }
        }
        let gnorm = if problem.is_none() { grad_norm(&grads)? } else { f64::NAN };
        if problem.is_none() && !gnorm.is_finite() {
            problem = Some(format!("the gradient norm is {gnorm}"));
        }
        if let Some(what) = problem {
            state.bad_in_a_row += 1;
            tracing::warn!("step {step}: skipped the update because {what}");
            writeln!(metrics, "{}", json!({"step": step, "skipped": what}))?;
            if state.bad_in_a_row >= cfg.max_bad_steps {
                bail!(
                    "stopping at step {step}: {} consecutive steps with non-finite values (last: {what})",
                    state.bad_in_a_row
                );
            }
        } else {
            state.bad_in_a_row = 0;
            if let Some(max) = cfg.clip_grad {
                clip_grad_norm(&mut grads, max)?;
            }
            opt.step(&grads, lr)?;
            state.optimizer_steps = opt.steps_taken();
            let secs = t0.elapsed().as_secs_f64();
            let tokens = stats.get("tokens").copied().unwrap_or(0.0);
            let mut row =
                json!({"step": step, "lr": lr, "grad_norm": gnorm, "seconds": secs, "tokens_per_s": tokens / secs});
            for (k, v) in &stats {
                row[k] = json!(v);
            }
            writeln!(metrics, "{row}")?;
            bar.set_message(format!("loss {:.4} lr {lr:.2e} {:.0} tok/s", stats["loss"], tokens / secs));
        }
        state.step += 1;
        bar.inc(1);

        let last = state.step == cfg.max_steps;
        if state.step.is_multiple_of(cfg.eval_interval) || last {
            validate_and_select(task, &model, cfg, run, &mut state, &mut metrics, &mut outcome)?;
        }
        let stop = INTERRUPTED.load(Ordering::SeqCst) || cfg.stop_after == Some(state.step);
        if state.step.is_multiple_of(cfg.save_interval) || last || stop {
            metrics.flush()?;
            let task_state = task.state()?;
            state.task = task_state.json;
            save_checkpoint(run, &model, &opt, &state, &task_state.tensors, cfg.keep_checkpoints)?;
        }
        if stop && !last {
            outcome.interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    outcome.steps = state.step;
    outcome.best = state.best;
    Ok(outcome)
}

fn save_checkpoint(
    run: &RunDir,
    model: &Model,
    opt: &AdamW,
    state: &LoopState,
    task_tensors: &std::collections::HashMap<String, Tensor>,
    keep: usize,
) -> Result<()> {
    let dir = run.checkpoint(state.step);
    crate::atomic::write_dir(&dir, |tmp| {
        write_model_files(model, tmp, DType::F32)?;
        let (tensors, _) = opt.state();
        candle_core::safetensors::save(&tensors, tmp.join("trainer_state.safetensors"))?;
        if !task_tensors.is_empty() {
            candle_core::safetensors::save(task_tensors, tmp.join("task_state.safetensors"))?;
        }
        std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
        Ok(())
    })?;
    // Keep the newest `keep` checkpoints.
    let steps = run.checkpoint_steps();
    for s in steps.iter().take(steps.len().saturating_sub(keep.max(1))) {
        std::fs::remove_dir_all(run.checkpoint(*s))?;
    }
    Ok(())
}

/// Drops metric rows of steps at or after `step` (they are recomputed after a resume).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or(Value::Null);
            let s = v.get("step").and_then(Value::as_u64).unwrap_or(0) as usize;
            // Evaluation rows carry the number of completed steps, training rows the index.
            if v.get("eval").is_some() {
                s <= step
            } else {
                s < step
            }
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::atomic::write_file(path, kept.as_bytes())
}
