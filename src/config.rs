//! Run configuration: a TOML file with one section per concern, overridden by
//! `--set section.key=value` flags, validated up front (unknown keys are errors), and written
//! fully resolved into the run directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::loss::Divergence;
use crate::train::minillm::DistillConfig;
use crate::train::trainer::TrainConfig;

/// Everything a training run needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// Run directory (default `runs/<method>`).
    pub out: Option<PathBuf>,
    /// Models.
    pub model: ModelSection,
    /// Data.
    pub data: DataSection,
    /// The training loop.
    pub train: TrainConfig,
    /// Word-level KD (and SeqKD's `lmops` mode).
    pub kd: KdSection,
    /// SeqKD.
    pub seqkd: SeqKdSection,
    /// MiniLLM.
    pub distill: DistillConfig,
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Student model directory (the starting point).
    pub student: Option<PathBuf>,
    /// Teacher model directory.
    pub teacher: Option<PathBuf>,
    /// Working precision.
    pub dtype: String,
    /// GPU index.
    pub gpu: Option<usize>,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self { student: None, teacher: None, dtype: "f32".into(), gpu: None }
    }
}

/// `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Training instruction jsonl.
    pub train: Option<PathBuf>,
    /// Validation instruction jsonl.
    pub valid: Option<PathBuf>,
    /// Use at most this many validation examples.
    pub valid_limit: Option<usize>,
    /// Use at most this many training examples.
    pub train_limit: Option<usize>,
    /// Plain-text corpus of the pre-training term (distill).
    pub corpus: Option<PathBuf>,
    /// Corpus chunk length.
    pub corpus_chunk: usize,
    /// Prompts longer than this are dropped.
    pub max_prompt_len: usize,
    /// Prompt + response limit.
    pub max_len: usize,
    /// Skip malformed lines (counted) instead of stopping.
    pub skip_malformed: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: None,
            valid: None,
            valid_limit: None,
            train_limit: None,
            corpus: None,
            corpus_chunk: 512,
            max_prompt_len: 256,
            max_len: 512,
            skip_malformed: false,
        }
    }
}

/// `[kd]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KdSection {
    /// Weight of the divergence; 1 − ratio goes to cross-entropy.
    pub ratio: f64,
    /// `fkl`, `sce`, `rkl`, `jsd[:β]`, `tvd`, `sfkl[:λ]`, `srkl[:λ]`.
    pub divergence: String,
}

impl Default for KdSection {
    fn default() -> Self {
        Self { ratio: 0.5, divergence: "fkl".into() }
    }
}

impl KdSection {
    /// The parsed divergence.
    pub fn divergence(&self) -> Result<Divergence> {
        if !(0.0..=1.0).contains(&self.ratio) {
            bail!("kd.ratio must be in [0, 1], got {}", self.ratio);
        }
        Divergence::parse(&self.divergence)
    }
}

/// `[seqkd]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeqKdSection {
    /// `pure` (cross-entropy on teacher samples) or `lmops` (the KD mix on them, as the
    /// released scripts do).
    pub mode: String,
    /// Where teacher generations are written (and reused from if present).
    pub generations: Option<PathBuf>,
    /// Most tokens the teacher generates per prompt.
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
}

impl Default for SeqKdSection {
    fn default() -> Self {
        Self { mode: "lmops".into(), generations: None, max_new_tokens: 256, batch_size: 16 }
    }
}

impl RunConfig {
    /// Reads `path` (if any), applies `key=value` overrides (TOML values; bare words are taken
    /// as strings) and the distill preset, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        let mut root: toml::Table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading config {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("{} is not valid TOML", p.display()))?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            let (key, value) = o.split_once('=').with_context(|| format!("override `{o}` is not key=value"))?;
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            set_path(&mut root, key.trim(), value)?;
        }
        // A distill preset supplies defaults that explicit keys override.
        if let Some(toml::Value::Table(d)) = root.get_mut("distill") {
            if let Some(preset) = d.remove("preset") {
                let name = preset.as_str().context("distill.preset must be a string")?;
                let base = toml::Table::try_from(DistillConfig::preset(name)?)?;
                let explicit = std::mem::take(d);
                *d = base;
                merge(d, explicit);
            }
        }
        let cfg: RunConfig = toml::Value::Table(root).try_into().context("invalid configuration")?;
        cfg.kd.divergence()?;
        if !["pure", "lmops"].contains(&cfg.seqkd.mode.as_str()) {
            bail!("seqkd.mode must be `pure` or `lmops`, got `{}`", cfg.seqkd.mode);
        }
        Ok(cfg)
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

fn set_path(root: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    let mut table = root;
    for p in &parts[..parts.len() - 1] {
        let entry = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().with_context(|| format!("`{p}` in `{key}` is not a section"))?;
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}
