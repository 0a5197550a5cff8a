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

    /// Drops metric rows of steps at or after `step` (they are recomputed after a resume).
    pub fn truncate_metrics(&self, step: usize) -> Result<()> {
        let path = self.metrics();
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
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
        candle_core::safetensors::save(&self.optimizer, dir.join("trainer_state.safetensors"))?;
        if !self.task.is_empty() {
            candle_core::safetensors::save(&self.task, dir.join("task_state.safetensors"))?;
        }
        std::fs::write(dir.join("state.json"), serde_json::to_string_pretty(&self.json)?)?;
        Ok(())
    }
}

/// The model files of a checkpoint are written in f32 whatever the working precision.
pub const CHECKPOINT_DTYPE: DType = DType::F32;
