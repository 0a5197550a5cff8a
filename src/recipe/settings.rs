//! A run's settings: a TOML file with one section per concern, overridden by
//! `--set section.key=value`, parsed into typed values (unknown keys are errors), validated up
//! front with messages that name the key, and written fully resolved into the run directory.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::loss::Divergence;
use crate::model::Precision;
use crate::train::distillm::DistillmConfig;
use crate::train::gkd::GkdConfig;
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
    /// GKD (TRL `GKDConfig` meanings).
    pub gkd: GkdConfig,
    /// DistiLLM (skew divergence, adaptive off-policy schedule).
    pub distillm: DistillmConfig,
}

/// `[model]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// Student model directory (the starting point).
    pub student: Option<PathBuf>,
    /// Teacher model directory.
    pub teacher: Option<PathBuf>,
    /// Working precision.
    pub dtype: Precision,
    /// Precision of the teacher's weights (the working precision when unset): bf16 halves a
    /// frozen teacher's memory; its logits and losses are taken in f32. Left out of the run's
    /// identity when unset, so runs made before the setting existed still resume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_dtype: Option<Precision>,
    /// GPU index.
    pub gpu: Option<usize>,
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
    pub divergence: Divergence,
}

impl Default for KdSection {
    fn default() -> Self {
        Self { ratio: 0.5, divergence: Divergence::ForwardKl }
    }
}

/// How SeqKD trains on the teacher's samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeqKdMode {
    /// Cross-entropy on the teacher's samples.
    Pure,
    /// The KD mix on them, as the released scripts do.
    #[default]
    Lmops,
}

impl std::str::FromStr for SeqKdMode {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pure" => Ok(Self::Pure),
            "lmops" => Ok(Self::Lmops),
            other => bail!("unknown SeqKD mode `{other}` (pure, lmops)"),
        }
    }
}

/// `[seqkd]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SeqKdSection {
    /// `pure` or `lmops`.
    pub mode: SeqKdMode,
    /// Where teacher generations are written (and reused from if present).
    pub generations: Option<PathBuf>,
    /// Most tokens the teacher generates per prompt.
    pub max_new_tokens: usize,
    /// Prompts decoded together.
    pub batch_size: usize,
}

impl Default for SeqKdSection {
    fn default() -> Self {
        Self { mode: SeqKdMode::Lmops, generations: None, max_new_tokens: 256, batch_size: 16 }
    }
}

/// A `[distill]` preset: defaults that explicitly set keys override.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The released implementation (the defaults).
    Lmops,
    /// The paper's equations as printed.
    Paper,
    /// On-policy distillation (the Tinker cookbook recipe; `minillm opd`).
    Opd,
}

impl std::str::FromStr for Preset {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lmops" => Ok(Self::Lmops),
            "paper" => Ok(Self::Paper),
            "opd" => Ok(Self::Opd),
            other => bail!("unknown preset `{other}` (lmops, paper, opd)"),
        }
    }
}

impl Preset {
    /// The distill settings of the preset.
    pub fn settings(self) -> DistillConfig {
        match self {
            Self::Lmops => DistillConfig::default(),
            Self::Paper => DistillConfig::paper(),
            Self::Opd => DistillConfig::opd(),
        }
    }
}

impl RunConfig {
    /// Reads `path` (if any) and applies `key=value` overrides (TOML values; bare words are
    /// taken as strings), then the `[distill]` preset (`distill.preset` in the file or an
    /// override, or `preset` when given), and validates the result.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        Self::load_with_preset(path, overrides, None)
    }

    /// [`RunConfig::load`] with a preset that takes precedence over `distill.preset`.
    pub fn load_with_preset(path: Option<&Path>, overrides: &[String], preset: Option<Preset>) -> Result<Self> {
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
        let distill = root.entry("distill").or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let d = distill.as_table_mut().context("`distill` is not a section")?;
        let named = match d.remove("preset") {
            Some(v) => Some(v.as_str().context("distill.preset must be a string")?.parse::<Preset>()?),
            None => None,
        };
        if let Some(preset) = preset.or(named) {
            let explicit = std::mem::take(d);
            *d = toml::Table::try_from(preset.settings())?;
            merge(d, explicit);
        }
        let cfg: RunConfig = toml::Value::Table(root).try_into().context("invalid configuration")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every setting, naming the offending key.
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        self.distill.validate()?;
        self.gkd.validate()?;
        self.distillm.validate()?;
        if !(0.0..=1.0).contains(&self.kd.ratio) {
            bail!("kd.ratio must be in [0, 1], got {}", self.kd.ratio);
        }
        self.kd.divergence.validate()?;
        let d = &self.data;
        for (key, v) in [("data.max_len", d.max_len), ("data.max_prompt_len", d.max_prompt_len)] {
            if v == 0 {
                bail!("{key} must be at least 1, got 0");
            }
        }
        if d.corpus_chunk < 2 {
            bail!("data.corpus_chunk must be at least 2 tokens, got {}", d.corpus_chunk);
        }
        for (key, v) in
            [("seqkd.max_new_tokens", self.seqkd.max_new_tokens), ("seqkd.batch_size", self.seqkd.batch_size)]
        {
            if v == 0 {
                bail!("{key} must be at least 1, got 0");
            }
        }
        Ok(())
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
