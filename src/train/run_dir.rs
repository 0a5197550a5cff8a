//! A training run's directory: `metrics.jsonl`, `checkpoints/step-N/` (the model in Hugging Face
//! layout plus optimizer and task state, written atomically), and `best/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

/// Where a run keeps its files.
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// `root` (created if missing), cleaned of the temporaries a killed process left.
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).with_context(|| format!("creating run directory {}", root.display()))?;
        crate::atomic::clean_stale(root)?;
        crate::atomic::clean_stale(&root.join("checkpoints"))?;
        Ok(Self { root: root.to_path_buf() })
    }

    /// Whether a run has results: metrics or a checkpoint.
    pub fn has_results(root: &Path) -> bool {
        root.join("metrics.jsonl").is_file() || root.join("checkpoints").is_dir()
    }

    /// Removes what a training run writes into `root`: its config, metrics, marker, teacher
    /// generations and `checkpoints/step-N` directories, and `best/` when the directory was
    /// a minillm run (`ours`; otherwise `best/` is rewritten file by file at the first
    /// validation, keeping anything else in it). Nothing else is touched.
    pub fn reset(root: &Path, ours: bool) -> Result<()> {
        let mut names = vec![
            "config.toml",
            "metrics.jsonl",
            "teacher_generations.jsonl",
            "teacher_generations.jsonl.partial",
            crate::outdir::MARKER,
        ];
        if ours {
            names.extend(["best", "best-val_loss", "best-val_rougeL"]);
        }
        crate::outdir::remove_entries(root, &names)?;
        let run = Self { root: root.to_path_buf() };
        for step in run.checkpoint_steps() {
            let dir = run.checkpoint(step);
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        let checkpoints = root.join("checkpoints");
        if std::fs::read_dir(&checkpoints).is_ok_and(|mut e| e.next().is_none()) {
            std::fs::remove_dir(&checkpoints).with_context(|| format!("removing {}", checkpoints.display()))?;
        }
        Ok(())
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
    pub fn checkpoint_steps(&self) -> Vec<usize> {
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

    /// Keeps the newest `keep` (at least one) checkpoints.
    pub fn prune_checkpoints(&self, keep: usize) -> Result<()> {
        let steps = self.checkpoint_steps();
        for s in steps.iter().take(steps.len().saturating_sub(keep.max(1))) {
            let dir = self.checkpoint(*s);
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        Ok(())
    }

    /// Drops metric rows of steps at or after `step` (they are recomputed after a resume), and
    /// any line that is not a JSON row: what a process killed mid-write (or a full disk) left.
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let kept: String = text
            .lines()
            .filter(|l| {
                let Ok(v) = serde_json::from_str::<Value>(l) else { return false };
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
        crate::atomic::write_file(&path, kept.as_bytes())
    }
}

/// What a checkpoint holds besides the model: the loop's state (`state.json`), the optimizer's
/// moments and the task's bulk state (safetensors).
pub struct CheckpointState {
    /// `state.json`.
    pub json: Value,
    /// `trainer_state.safetensors`.
    pub optimizer: HashMap<String, Tensor>,
    /// `task_state.safetensors` (empty when the task keeps none).
    pub task: HashMap<String, Tensor>,
}

impl CheckpointState {
    /// Reads the state files of checkpoint `dir` onto `device`.
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let path = dir.join("state.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let json = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let optimizer = candle_core::safetensors::load(dir.join("trainer_state.safetensors"), device)
            .with_context(|| format!("reading the optimizer state of {}", dir.display()))?;
        let task = match dir.join("task_state.safetensors") {
            p if p.is_file() => candle_core::safetensors::load(p, device)?,
            _ => HashMap::new(),
        };
        Ok(Self { json, optimizer, task })
    }

    /// Writes the state files into `dir` (a temporary directory the caller renames into place).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let writing = |name: &str| format!("writing {}", dir.join(name).display());
        candle_core::safetensors::save(&self.optimizer, dir.join("trainer_state.safetensors"))
            .with_context(|| writing("trainer_state.safetensors"))?;
        if !self.task.is_empty() {
            candle_core::safetensors::save(&self.task, dir.join("task_state.safetensors"))
                .with_context(|| writing("task_state.safetensors"))?;
        }
        std::fs::write(dir.join("state.json"), serde_json::to_string_pretty(&self.json)?)
            .with_context(|| writing("state.json"))
    }
}

/// The model files of a checkpoint are written in f32 whatever the working precision.
pub const CHECKPOINT_DTYPE: DType = DType::F32;
