//! The training loop, written once for every method: gradient accumulation normalised over the
//! whole window, clipping, AdamW with a schedule, non-finite guards, periodic validation with
//! checkpoint selection, `metrics.jsonl`, progress, atomic checkpoints and exact resume.
//!
//! A method supplies a [`Task`]: the micro-batches of each step and their loss, validation, and
//! its own resumable state (data order, random streams). The loop hands the task the window's
//! shape ([`Window`]) at every step, so the batch size and accumulation live in one place
//! ([`TrainConfig`]). Stopping early is asked for through a flag the caller owns (the command
//! line sets it on SIGINT/SIGTERM); the loop finishes the step, checkpoints and returns.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::optim::{clip_grad_norm, collect_grads, grad_norm, AdamW, AdamWConfig, Schedule};
use super::run_dir::{CheckpointState, RunDir, CHECKPOINT_DTYPE};
use crate::model::{write_model_files, Model};
use crate::ops::matmul_precision::{self, MatmulPrecision};
use crate::progress::Progress;

/// Named scalar statistics of a step or an evaluation.
pub type Stats = BTreeMap<String, f64>;

/// Adds the seconds since `since` to phase `phase` of `phases`.
pub fn add_seconds(phases: &mut Stats, phase: &str, since: Instant) {
    *phases.entry(phase.into()).or_default() += since.elapsed().as_secs_f64();
}

/// The shape of one optimizer step: `grad_accum` micro-batches of `batch_size` sequences.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Sequences (or rollouts) per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
}

/// What a training method provides to the loop.
pub trait Task {
    /// Prepares the micro-batches of optimizer step `step`.
    fn begin_step(&mut self, student: &Model, step: usize, window: Window) -> Result<()>;
    /// Number of micro-batches prepared by [`Task::begin_step`].
    fn micro_batches(&self) -> usize;
    /// Loss of micro-batch `i`, normalised over the whole window (the micro-batch losses of a
    /// step sum to the step's loss), and its statistics (which the loop sums over the window).
    fn micro_loss(&mut self, student: &Model, i: usize) -> Result<(Tensor, Stats)>;
    /// Validation statistics (must include the selection metric, e.g. `val_loss`), computed
    /// in batches of `batch_size`.
    fn validate(&mut self, student: &Model, batch_size: usize) -> Result<Stats>;
    /// Resumable state.
    fn state(&self) -> Result<TaskState>;
    /// Restores [`Task::state`].
    fn load_state(&mut self, state: TaskState) -> Result<()>;
    /// Counts describing the task's data (examples kept, lines skipped, prompts dropped,
    /// responses truncated), logged with the first validation of a run.
    fn data_stats(&self) -> Stats {
        Stats::new()
    }
    /// Seconds the task spent in its own phases since the last call (e.g. distillation's
    /// rollout collection, its pre-training term), logged with the loop's phases.
    fn take_phase_seconds(&mut self) -> Stats {
        Stats::new()
    }
}

/// A task's resumable state: small values as JSON, bulk data (a rollout buffer) as tensors.
#[derive(Clone, Debug, Default)]
pub struct TaskState {
    /// JSON part (in `state.json`).
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
    /// The statistic it reads (`val_loss`, `val_rougeL`).
    pub fn key(self) -> &'static str {
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
    /// Global gradient-norm clip (`"off"` in a settings file: no clipping).
    #[serde(with = "crate::serde_off")]
    pub clip_grad: Option<f64>,
    /// Validate every this many steps (and after the last).
    pub eval_interval: usize,
    /// Write a resumable checkpoint every this many steps (and after the last).
    pub save_interval: usize,
    /// Resumable checkpoints kept (the newest).
    pub keep_checkpoints: usize,
    /// Checkpoint selection criterion.
    pub select_by: Selection,
    /// Also keep the best checkpoint by this second criterion, in `best-<metric>/` (e.g. SFT
    /// selected by validation Rouge-L, with `best-val_loss/` as MiniLLM's starting point).
    pub also_keep: Option<Selection>,
    /// Seed of data order and sampling.
    pub seed: u64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_bad_steps: usize,
    /// Behave as if interrupted (Ctrl-C) after this many steps (testing resume).
    pub stop_after: Option<usize>,
    /// Keep only each block's input during the student's forward passes and recompute the
    /// rest in the backward pass (activation checkpointing: less memory, one more forward).
    pub grad_checkpointing: bool,
    /// The arithmetic of the large matrix products (`"f32"`, or `"bf16"`: operands rounded to
    /// bf16, f32 sums, on CPUs with AVX512-BF16; [`crate::ops::matmul_precision`]).
    #[serde(skip_serializing_if = "MatmulPrecision::is_f32")]
    pub matmul_precision: MatmulPrecision,
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
            also_keep: None,
            seed: 10,
            max_bad_steps: 5,
            stop_after: None,
            grad_checkpointing: false,
            matmul_precision: MatmulPrecision::F32,
        }
    }
}

impl TrainConfig {
    /// The loop's shape of a step.
    pub fn window(&self) -> Window {
        Window { batch_size: self.batch_size, grad_accum: self.grad_accum }
    }

    /// Checks every setting of the loop, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("train.batch_size", self.batch_size),
            ("train.grad_accum", self.grad_accum),
            ("train.eval_interval", self.eval_interval),
            ("train.save_interval", self.save_interval),
            ("train.max_bad_steps", self.max_bad_steps),
        ];
        for (key, v) in positive {
            if v == 0 {
                bail!("{key} must be at least 1, got 0");
            }
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("train.lr must be a positive finite number, got {}", self.lr);
        }
        if let Some(c) = self.clip_grad {
            if !(c.is_finite() && c > 0.0) {
                bail!("train.clip_grad must be a positive finite number, got {c}");
            }
        }
        self.schedule.validate(self.lr)?;
        self.optimizer.validate()
    }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutcome {
    /// Steps completed.
    pub steps: usize,
    /// Whether the run stopped early (stop flag or `stop_after`) and can be resumed.
    pub interrupted: bool,
    /// Best value of the selection metric and its step.
    pub best: Option<(f64, usize)>,
    /// Validation statistics of each evaluation, by step.
    pub evals: Vec<(usize, Stats)>,
}

/// The loop's own resumable state (`state.json` in a checkpoint).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct LoopState {
    /// Steps completed.
    step: usize,
    optimizer_steps: usize,
    best: Option<(f64, usize)>,
    #[serde(default)]
    best_also: Option<(f64, usize)>,
    bad_in_a_row: usize,
    task: Value,
}

/// Trains `student` in place with `task` (resuming from the newest checkpoint in `run`, if
/// any) until `cfg.max_steps` or until `stop` is raised, and returns how the run ended; the
/// selected model is in `run.best()`.
pub fn train(
    student: &Model,
    task: &mut dyn Task,
    cfg: &TrainConfig,
    run: &RunDir,
    stop: &AtomicBool,
) -> Result<TrainOutcome> {
    cfg.validate()?;
    if student.lm.params().is_frozen() {
        bail!("the student was loaded frozen (as a teacher is); it has nothing to train");
    }
    student.lm.set_grad_checkpointing(cfg.grad_checkpointing)?;
    let _precision = matmul_precision::scoped(cfg.matmul_precision);
    if cfg.matmul_precision == MatmulPrecision::Bf16 && !student.device().is_cpu() {
        tracing::warn!("train.matmul_precision = \"bf16\" applies to CPU products; on this device they stay f32");
    } else if matmul_precision::current() != cfg.matmul_precision {
        tracing::warn!("train.matmul_precision = \"bf16\" needs a build with AVX512-BF16; the products stay f32");
    }
    let vars: Vec<Var> = student.lm.params().trainable().map(|(_, v)| v.clone()).collect();
    let mut opt = AdamW::new(student.lm.params().trainable(), cfg.optimizer.clone())?;
    let resumed = resume(student, &mut opt, task, run)?;
    let fresh = resumed.is_none();
    let mut state = resumed.unwrap_or_default();
    let mut metrics = open_metrics(run, fresh)?;
    let progress = Progress::new("training", cfg.max_steps as u64);
    progress.set_position(state.step as u64);
    let mut outcome = TrainOutcome { steps: state.step, interrupted: false, best: state.best, evals: Vec::new() };
    // The starting model is validated too: its curves start at the initial point, and it stays
    // the selected model if training never improves on it (as the released trainer does).
    if fresh && cfg.max_steps > 0 {
        let data = task.data_stats();
        validate_and_select(task, student, cfg, run, &mut state, &mut metrics, &mut outcome, Some(&data))?;
    }

    while state.step < cfg.max_steps {
        let step = state.step;
        let t0 = Instant::now();
        let lr = cfg.schedule.lr(cfg.lr, step, cfg.max_steps);
        task.begin_step(student, step, cfg.window())?;
        let mut phases = Stats::new();
        add_seconds(&mut phases, "prepare", t0);
        let accumulated = accumulate(task, student, &vars, &mut phases)?;
        phases.extend(task.take_phase_seconds());
        match accumulated {
            Err(problem) => {
                state.bad_in_a_row += 1;
                tracing::warn!("step {step}: skipped the update because {problem}");
                metrics.row(&json!({"step": step, "skipped": problem}))?;
                if state.bad_in_a_row >= cfg.max_bad_steps {
                    bail!(
                        "stopping at step {step}: {} consecutive steps with non-finite values (last: {problem})",
                        state.bad_in_a_row
                    );
                }
            }
            Ok((mut grads, gnorm, stats)) => {
                state.bad_in_a_row = 0;
                let t_update = Instant::now();
                if let Some(max) = cfg.clip_grad {
                    clip_grad_norm(&mut grads, max)?;
                }
                opt.step(&grads, lr)?;
                state.optimizer_steps = opt.steps_taken();
                add_seconds(&mut phases, "update", t_update);
                let secs = t0.elapsed().as_secs_f64();
                let tokens = stats.get("tokens").copied().unwrap_or(0.0);
                let mut row = json!({"step": step, "lr": lr, "grad_norm": gnorm, "seconds": secs,
                    "tokens_per_s": tokens / secs, "phases": phases});
                for (k, v) in &stats {
                    row[k] = json!(v);
                }
                metrics.row(&row)?;
                progress.set_message(format!("loss {:.4} lr {lr:.2e} {:.0} tok/s", stats["loss"], tokens / secs));
            }
        }
        state.step += 1;
        progress.inc(1);

        let last = state.step == cfg.max_steps;
        if state.step.is_multiple_of(cfg.eval_interval) || last {
            validate_and_select(task, student, cfg, run, &mut state, &mut metrics, &mut outcome, None)?;
        }
        let stopping = stop.load(Ordering::SeqCst) || cfg.stop_after == Some(state.step);
        if state.step.is_multiple_of(cfg.save_interval) || last || stopping {
            metrics.flush()?;
            save_checkpoint(run, student, &opt, &mut state, task, cfg.keep_checkpoints)?;
        }
        if stopping && !last {
            outcome.interrupted = true;
            break;
        }
    }
    progress.finish();
    outcome.steps = state.step;
    outcome.best = state.best;
    Ok(outcome)
}

/// The summed gradients, their global norm and the summed statistics of the window's
/// micro-batches, or what made the step unusable (a non-finite loss or gradient).
type Accumulated = std::result::Result<(Vec<Option<Tensor>>, f64, Stats), String>;

/// Runs the window's micro-batches, adding the seconds of their forward and backward passes
/// to `phases`.
fn accumulate(task: &mut dyn Task, student: &Model, vars: &[Var], phases: &mut Stats) -> Result<Accumulated> {
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut stats = Stats::new();
    for i in 0..task.micro_batches() {
        let t = Instant::now();
        let (loss, s) = task.micro_loss(student, i)?;
        let value = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        add_seconds(phases, "forward", t);
        if !value.is_finite() {
            return Ok(Err(format!("the loss of micro-batch {i} is {value}")));
        }
        let t = Instant::now();
        let store = loss.backward()?;
        // Blocks under activation checkpointing report their parameters' gradients aside.
        let mut aside = student.lm.take_checkpoint_grads();
        for ((acc, g), v) in grads.iter_mut().zip(collect_grads(&store, vars)).zip(vars) {
            let g = sum_grads(g, aside.remove(&v.id()))?;
            *acc = sum_grads(acc.take(), g)?;
        }
        add_seconds(phases, "backward", t);
        *stats.entry("loss".into()).or_default() += value as f64;
        for (k, v) in s {
            *stats.entry(k).or_default() += v;
        }
    }
    let gnorm = grad_norm(&grads)?;
    if !gnorm.is_finite() {
        return Ok(Err(format!("the gradient norm is {gnorm}")));
    }
    Ok(Ok((grads, gnorm, stats)))
}

/// `a + b` where both gradients exist, else whichever does.
fn sum_grads(a: Option<Tensor>, b: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match (a, b) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
}

/// Restores the newest checkpoint of `run` into the student, the optimizer and the task, and
/// drops the metric rows written after it; `None` when the run has no checkpoint.
fn resume(student: &Model, opt: &mut AdamW, task: &mut dyn Task, run: &RunDir) -> Result<Option<LoopState>> {
    let Some((step, dir)) = run.latest_checkpoint() else { return Ok(None) };
    if student.source.as_deref() != Some(dir.as_path()) {
        student.load_weights(&dir)?;
    }
    let saved = CheckpointState::read(&dir, &student.device())?;
    let state: LoopState =
        serde_json::from_value(saved.json).with_context(|| format!("{}/state.json", dir.display()))?;
    opt.load_state(&saved.optimizer, state.optimizer_steps)?;
    task.load_state(TaskState { json: state.task.clone(), tensors: saved.task })?;
    run.truncate_metrics(step)?;
    crate::progress::note(&format!("resuming {} from step {step}", run.root().display()));
    Ok(Some(state))
}

/// `metrics.jsonl`, opened for appending. A fresh run starts it anew: rows left by a run that
/// stopped before its first checkpoint are recomputed.
fn open_metrics(run: &RunDir, fresh: bool) -> Result<MetricsLog> {
    let path = run.metrics();
    if fresh && path.is_file() {
        std::fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    Ok(MetricsLog { file, path })
}

/// The open `metrics.jsonl`: a failed write (a full disk) names the file.
struct MetricsLog {
    file: std::fs::File,
    path: std::path::PathBuf,
}

impl MetricsLog {
    /// Appends `row` as one line.
    fn row(&mut self, row: &serde_json::Value) -> Result<()> {
        writeln!(self.file, "{row}").with_context(|| format!("writing {}", self.path.display()))
    }

    /// Flushes what was written.
    fn flush(&mut self) -> Result<()> {
        self.file.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

/// Validates `model`, logs the statistics (with `data`, the task's data counts, at the start),
/// and writes it as the best model when the selection metric improved.
#[allow(clippy::too_many_arguments)] // the loop's state, passed explicitly
fn validate_and_select(
    task: &mut dyn Task,
    model: &Model,
    cfg: &TrainConfig,
    run: &RunDir,
    state: &mut LoopState,
    metrics: &mut MetricsLog,
    outcome: &mut TrainOutcome,
    data: Option<&Stats>,
) -> Result<()> {
    let eval = task.validate(model, cfg.batch_size)?;
    let key = cfg.select_by.key();
    let value = *eval.get(key).with_context(|| format!("validation produced no `{key}`"))?;
    let mut row = json!({"step": state.step, "eval": eval});
    if let Some(d) = data.filter(|d| !d.is_empty()) {
        row["data"] = json!(d);
    }
    metrics.row(&row)?;
    if state.best.is_none_or(|(b, _)| cfg.select_by.better(value, b)) {
        state.best = Some((value, state.step));
        crate::atomic::write_dir(&run.best(), |tmp| write_model_files(model, tmp, CHECKPOINT_DTYPE))?;
    }
    if let Some(sel) = cfg.also_keep {
        let key = sel.key();
        let value = *eval.get(key).with_context(|| format!("validation produced no `{key}` (train.also_keep)"))?;
        if state.best_also.is_none_or(|(b, _)| sel.better(value, b)) {
            state.best_also = Some((value, state.step));
            let dir = run.root().join(format!("best-{key}"));
            crate::atomic::write_dir(&dir, |tmp| write_model_files(model, tmp, CHECKPOINT_DTYPE))?;
        }
    }
    outcome.evals.push((state.step, eval));
    Ok(())
}

/// Writes `checkpoints/step-N` atomically (model, optimizer, loop and task state) and prunes
/// old checkpoints.
fn save_checkpoint(
    run: &RunDir,
    model: &Model,
    opt: &AdamW,
    state: &mut LoopState,
    task: &dyn Task,
    keep: usize,
) -> Result<()> {
    let task_state = task.state()?;
    state.task = task_state.json;
    let saved = CheckpointState {
        json: serde_json::to_value(&*state)?,
        optimizer: opt.state().0.into_iter().collect(),
        task: task_state.tensors,
    };
    crate::atomic::write_dir(&run.checkpoint(state.step), |tmp| {
        write_model_files(model, tmp, CHECKPOINT_DTYPE)?;
        saved.write(tmp)
    })?;
    run.prune_checkpoints(keep)
}
