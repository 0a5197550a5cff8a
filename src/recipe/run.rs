//! A training run from its settings: load the student once (from the run's newest checkpoint
//! when resuming) and the teacher once, check they share a tokenizer, build the method's task,
//! and hand both to the shared trainer.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context, Result};
use candle_core::DType;
use serde_json::{json, Value};

use super::memory;
use super::settings::{RunConfig, SeqKdMode};
use crate::data::instruct::{load_instruct, InstructExample, InstructOptions};
use crate::data::pretrain::load_corpus;
use crate::fingerprint;
use crate::model::checkpoint::stored_parameter_count;
use crate::model::compat::check_compatible;
use crate::model::{load_model, load_model_as, select_device, Model, Precision, Weights};
use crate::outdir::OutDir;
use crate::train::distillm::AdaptiveOffPolicy;
use crate::train::gkd::ResponseSchedule;
use crate::train::minillm::{DistillData, DistillTask};
use crate::train::pretrain::PretrainTask;
use crate::train::run_dir::RunDir;
use crate::train::seqkd::{teacher_generations, GenerationSettings};
use crate::train::supervised::{KdTerm, SupervisedTask};
use crate::train::trainer::{train, Selection, Stats, Task, TrainOutcome};

/// The training methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Language modelling on a plain-text corpus (`data.corpus`, validated on `data.valid`).
    Pretrain,
    /// Supervised fine-tuning.
    Sft,
    /// Word-level knowledge distillation.
    Kd,
    /// Sequence-level knowledge distillation.
    SeqKd,
    /// MiniLLM.
    Distill,
    /// Generalized KD (on-policy with probability λ, generalised JSD).
    Gkd,
    /// On-policy distillation: the `distill` engine with the `opd` preset's settings.
    Opd,
    /// DistiLLM: a skew divergence with the adaptive off-policy schedule.
    Distillm,
}

impl Method {
    /// The subcommand and default run-directory name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pretrain => "pretrain",
            Self::Sft => "sft",
            Self::Kd => "kd",
            Self::SeqKd => "seqkd",
            Self::Distill => "distill",
            Self::Gkd => "gkd",
            Self::Opd => "opd",
            Self::Distillm => "distillm",
        }
    }

    /// Whether the method needs `model.teacher`.
    pub fn needs_teacher(self) -> bool {
        !matches!(self, Self::Pretrain | Self::Sft)
    }
}

/// A method with its settings: everything needed to run (or resume) a training run.
#[derive(Clone, Debug, PartialEq)]
pub struct Recipe {
    /// The method.
    pub method: Method,
    /// Its settings.
    pub config: RunConfig,
    /// Start afresh in a run directory that holds other files, another method's run or a run
    /// made from other settings or inputs, removing only what a training run writes.
    pub overwrite: bool,
}

/// Settings that may change between invocations of one run (each change is noted); any other
/// difference from the run's recorded settings and inputs is refused. The paths of models and
/// data may change (a moved directory keeps working) because their contents are fingerprinted
/// under `inputs`.
const MAY_CHANGE: &[&str] = &[
    "settings.out",
    "settings.model.student",
    "settings.model.teacher",
    "settings.data.train",
    "settings.data.valid",
    "settings.data.corpus",
    "settings.seqkd.generations",
    "settings.model.gpu",
    "settings.train.max_steps",
    "settings.train.eval_interval",
    "settings.train.save_interval",
    "settings.train.keep_checkpoints",
    "settings.train.max_bad_steps",
    "settings.train.stop_after",
    "settings.train.grad_checkpointing",
];

/// Settings sections only one method reads: left out of the other methods' identities, so a
/// run made before a section existed keeps its identity.
const OWN_SECTIONS: &[(Method, &str)] = &[(Method::Gkd, "gkd"), (Method::Distillm, "distillm")];

/// What a finished (or interrupted) run produced.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How training ended.
    pub outcome: TrainOutcome,
    /// The run directory.
    pub dir: PathBuf,
    /// The selected model (`<dir>/best`).
    pub best: PathBuf,
}

/// The models of a run, each loaded once.
struct Models {
    student: Model,
    teacher: Option<Model>,
}

impl Recipe {
    /// `method` with `config`.
    pub fn new(method: Method, config: RunConfig) -> Self {
        Self { method, config, overwrite: false }
    }

    /// `method` with settings from the TOML file `path` (if any) and `key=value` overrides.
    pub fn from_toml(method: Method, path: Option<&Path>, overrides: &[String]) -> Result<Self> {
        Ok(Self::new(method, RunConfig::load(path, overrides)?))
    }

    /// The run directory: `out`, else `runs/<method>`.
    pub fn out_dir(&self) -> PathBuf {
        self.config.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(self.method.name()))
    }

    /// Runs (or resumes) the training run to the end.
    pub fn run(&self) -> Result<RunReport> {
        self.run_until(&AtomicBool::new(false))
    }

    /// Runs (or resumes) the training run until it ends or `stop` is raised; then the step in
    /// progress is finished and checkpointed, and the report says it was interrupted.
    pub fn run_until(&self, stop: &AtomicBool) -> Result<RunReport> {
        let cfg = &self.config;
        cfg.validate()?;
        let out = self.out_dir();
        let identity = self.identity()?;
        let dir = OutDir {
            path: &out,
            kind: self.method.name(),
            reset: &RunDir::reset,
            has_results: &RunDir::has_results,
            overwrite_flag: Some("--overwrite"),
        };
        dir.claim(&identity, MAY_CHANGE, self.overwrite)?;
        let run = RunDir::new(&out)?;
        let Models { student, teacher } = self.load_models(&run)?;
        let mut task = self.task(&student, teacher, &out)?;
        crate::atomic::write_file(&out.join("config.toml"), cfg.to_toml()?.as_bytes())?;
        let outcome = train(&student, task.as_mut(), &cfg.train, &run, stop)?;
        Ok(RunReport { outcome, best: run.best(), dir: out })
    }

    /// Whether the run directory holds this run (same method, settings and inputs) finished:
    /// its newest checkpoint is at `train.max_steps`.
    pub fn is_complete(&self) -> Result<bool> {
        let out = self.out_dir();
        let Ok(text) = std::fs::read_to_string(out.join(crate::outdir::MARKER)) else { return Ok(false) };
        let marker: Value = serde_json::from_str(&text)?;
        if marker.get("kind").and_then(Value::as_str) != Some(self.method.name()) {
            return Ok(false);
        }
        let recorded = marker.get("identity").cloned().unwrap_or(Value::Null);
        let changed = crate::outdir::differences(&recorded, &self.identity()?);
        if changed.iter().any(|(k, _, _)| !MAY_CHANGE.contains(&k.as_str())) {
            return Ok(false);
        }
        let run = RunDir::new(&out)?;
        Ok(run.latest_checkpoint().is_some_and(|(step, _)| step >= self.config.train.max_steps))
    }

    /// What the run's results depend on: the method, every setting, and the fingerprints of
    /// the models and data files it reads.
    fn identity(&self) -> Result<Value> {
        let (m, d) = (&self.config.model, &self.config.data);
        let mut inputs = serde_json::Map::new();
        let mut add = |key: &str, v: Result<String>| -> Result<()> {
            inputs.insert(key.into(), Value::String(v.with_context(|| format!("fingerprinting {key}"))?));
            Ok(())
        };
        add("student", fingerprint::model_dir(required(&m.student, "model.student")?))?;
        if self.method.needs_teacher() {
            add("teacher", fingerprint::model_dir(required(&m.teacher, "model.teacher")?))?;
        }
        if self.method != Method::Pretrain {
            add("train", fingerprint::path(required(&d.train, "data.train")?))?;
        }
        add("valid", fingerprint::path(required(&d.valid, "data.valid")?))?;
        if self.uses_corpus() {
            add("corpus", fingerprint::path(required(&d.corpus, "data.corpus")?))?;
        }
        let mut settings = serde_json::to_value(&self.config)?;
        if let Some(map) = settings.as_object_mut() {
            for (method, section) in OWN_SECTIONS {
                if *method != self.method {
                    map.remove(*section);
                }
            }
        }
        Ok(json!({"method": self.method.name(), "settings": settings, "inputs": inputs}))
    }

    /// Warns when the models alone will not fit the memory available (see [`memory`]). The
    /// weight files' headers give the parameter counts; one that cannot be read is left to the
    /// load to report.
    fn warn_of_memory(&self, student: &Path, dtype: DType, teacher_dtype: DType) {
        let Ok(student_params) = stored_parameter_count(student) else { return };
        let teacher = match (self.method.needs_teacher(), &self.config.model.teacher) {
            (true, Some(dir)) => match stored_parameter_count(dir) {
                Ok(n) => Some((n, teacher_dtype)),
                Err(_) => return,
            },
            _ => None,
        };
        let footprint = memory::Footprint { student_params, student_dtype: dtype, teacher };
        if let Some(warning) = memory::available_memory().and_then(|available| footprint.warning(available)) {
            crate::progress::note(&warning);
        }
    }

    fn load_models(&self, run: &RunDir) -> Result<Models> {
        let cfg = &self.config.model;
        let device = select_device(cfg.gpu)?;
        let dtype = cfg.dtype.dtype();
        let student_dir = required(&cfg.student, "model.student")?;
        // Resuming loads the student straight from its newest checkpoint.
        let from = run.latest_checkpoint().map_or_else(|| student_dir.clone(), |(_, dir)| dir);
        let teacher_dtype = cfg.teacher_dtype.map_or(dtype, Precision::dtype);
        if device.is_cpu() {
            self.warn_of_memory(&from, dtype, teacher_dtype);
        }
        let student = load_model(&from, &device, dtype)?;
        student.tokenizer()?;
        if student.eos_token_ids.is_empty() {
            bail!("{}: config.json defines no eos_token_id", student_dir.display());
        }
        let teacher = if self.method.needs_teacher() {
            // Frozen: its forward passes build no autograd graph, so activations do not pile up.
            let t = load_model_as(required(&cfg.teacher, "model.teacher")?, &device, teacher_dtype, Weights::Frozen)?;
            check_compatible(&student, &t)?;
            Some(t)
        } else {
            None
        };
        // Every sequence a method forms must fit both models' position tables.
        let d = &self.config.data;
        let mut lengths = vec![];
        if self.method != Method::Pretrain {
            lengths.push(("data.max_len", d.max_len));
        }
        if self.uses_corpus() {
            lengths.push(("data.corpus_chunk", d.corpus_chunk));
        }
        for (role, m) in [("student", Some(&student)), ("teacher", teacher.as_ref())] {
            let Some(limit) = m.and_then(|m| m.lm.info().max_positions) else { continue };
            for &(key, len) in &lengths {
                if len > limit {
                    bail!(
                        "{key} = {len} exceeds the {role}'s context of {limit} positions (config.json); \
                         set {key} to at most {limit}"
                    );
                }
            }
        }
        Ok(Models { student, teacher })
    }

    /// Whether the method reads `data.corpus`.
    fn uses_corpus(&self) -> bool {
        self.method == Method::Pretrain
            || (matches!(self.method, Method::Distill | Method::Opd) && self.config.distill.pt)
    }

    /// Loads an instruction file (`role`: train or valid), noting and recording in `stats`
    /// how many examples were kept and how many lines were skipped, dropped or truncated.
    fn instruct(
        &self,
        student: &Model,
        path: &Path,
        limit: Option<usize>,
        role: &str,
        stats: &mut Stats,
    ) -> Result<Vec<InstructExample>> {
        let d = &self.config.data;
        let opts =
            InstructOptions { max_prompt_len: d.max_prompt_len, max_len: d.max_len, skip_malformed: d.skip_malformed };
        let (mut exs, report) = load_instruct(path, student.tokenizer()?, student.eos()?, &opts)?;
        let read = exs.len();
        if let Some(n) = limit {
            exs.truncate(n);
        }
        if report.malformed + report.long_prompts + report.truncated > 0 {
            // The counts are the whole file's, which a limit does not change.
            let of = if exs.len() < read { format!(" (the first {} of {read})", exs.len()) } else { String::new() };
            crate::progress::note(&format!(
                "{}: {} examples used{of}; in the file, {} malformed lines skipped, {} prompts over {} tokens \
                 dropped, {} responses truncated to {} tokens",
                path.display(),
                exs.len(),
                report.malformed,
                report.long_prompts,
                d.max_prompt_len,
                report.truncated,
                d.max_len
            ));
        }
        for (k, v) in [
            ("examples", exs.len()),
            ("malformed", report.malformed),
            ("long_prompts", report.long_prompts),
            ("truncated", report.truncated),
        ] {
            stats.insert(format!("{role}_{k}"), v as f64);
        }
        Ok(exs)
    }

    /// The method's task; the teacher moves into it.
    fn task(&self, student: &Model, teacher: Option<Model>, out: &Path) -> Result<Box<dyn Task>> {
        let cfg = &self.config;
        let d = &cfg.data;
        if self.method == Method::Pretrain {
            if cfg.train.select_by != Selection::ValLoss {
                bail!("pretrain selects by validation loss only (train.select_by = \"val_loss\")");
            }
            let chunks = |path: &Path, limit: Option<usize>| -> Result<Vec<Vec<u32>>> {
                let mut c = load_corpus(path, student.tokenizer()?, student.eos()?, d.corpus_chunk)?;
                c.truncate(limit.unwrap_or(usize::MAX));
                Ok(c)
            };
            let train = chunks(required(&d.corpus, "data.corpus")?, d.train_limit)?;
            let valid = chunks(required(&d.valid, "data.valid")?, d.valid_limit)?;
            return Ok(Box::new(PretrainTask::new(train, valid, cfg.train.seed)?));
        }
        let mut stats = Stats::new();
        let valid = self.instruct(student, required(&d.valid, "data.valid")?, d.valid_limit, "valid", &mut stats)?;
        let train_path = required(&d.train, "data.train")?;
        let teacher = || teacher.context("this method needs a teacher (model.teacher)");
        let mut responses = None;
        let mut adaptive = None;
        let (train_set, kd) = match self.method {
            Method::Pretrain | Method::Sft => {
                (self.instruct(student, train_path, d.train_limit, "train", &mut stats)?, None)
            }
            Method::Kd => {
                let train_set = self.instruct(student, train_path, d.train_limit, "train", &mut stats)?;
                (train_set, Some(self.kd_term(teacher()?)))
            }
            Method::Gkd => {
                let g = &cfg.gkd;
                let train_set = self.instruct(student, train_path, d.train_limit, "train", &mut stats)?;
                responses = Some(ResponseSchedule::new(g, d.max_len, cfg.train.seed));
                (train_set, Some(KdTerm { temperature: g.temperature, ..KdTerm::new(teacher()?, 1.0, g.divergence()) }))
            }
            Method::Distillm => {
                let m = &cfg.distillm;
                let train_set = self.instruct(student, train_path, d.train_limit, "train", &mut stats)?;
                adaptive = Some((
                    AdaptiveOffPolicy::new(m.clone(), cfg.train.seed, cfg.train.max_steps),
                    m.sampling(d.max_len),
                ));
                (train_set, Some(KdTerm::new(teacher()?, m.kd_ratio, m.divergence)))
            }
            Method::SeqKd => {
                let teacher = teacher()?;
                let path = self.teacher_generations(student, &teacher, train_path, out)?;
                let train_set = self.instruct(student, &path, d.train_limit, "train", &mut stats)?;
                (train_set, (cfg.seqkd.mode == SeqKdMode::Lmops).then(|| self.kd_term(teacher)))
            }
            Method::Distill | Method::Opd => {
                let train_set = self.instruct(student, train_path, d.train_limit, "train", &mut stats)?;
                let prompts = train_set.into_iter().map(|e| e.prompt).collect();
                let corpus = if cfg.distill.pt {
                    let path = required(&d.corpus, "data.corpus")?;
                    load_corpus(path, student.tokenizer()?, student.eos()?, d.corpus_chunk)?
                } else {
                    Vec::new()
                };
                let mut settings = cfg.distill.clone();
                settings.max_len = settings.max_len.min(d.max_len);
                let data = DistillData { prompts, valid, corpus };
                let task = DistillTask::new(settings, teacher()?, data, cfg.train.seed)?;
                return Ok(Box::new(task.with_data_stats(stats)));
            }
        };
        let mut task = SupervisedTask::new(train_set, valid, cfg.train.seed, kd).with_data_stats(stats);
        if let Some(schedule) = responses {
            task = task.with_responses(schedule);
        }
        if let Some((schedule, sampling)) = adaptive {
            task = task.with_adaptive(schedule, sampling);
        }
        Ok(Box::new(match cfg.train.select_by {
            Selection::ValRougeL => task.with_rouge(d.max_len),
            Selection::ValLoss => task,
        }))
    }

    fn kd_term(&self, teacher: Model) -> KdTerm {
        KdTerm::new(teacher, self.config.kd.ratio, self.config.kd.divergence)
    }

    /// SeqKD's teacher samples for every training prompt: `seqkd.generations`, else
    /// `<run>/teacher_generations.jsonl`; made once (resumably) and reused.
    fn teacher_generations(&self, student: &Model, teacher: &Model, train_path: &Path, out: &Path) -> Result<PathBuf> {
        let cfg = &self.config;
        let path = cfg.seqkd.generations.clone().unwrap_or_else(|| out.join("teacher_generations.jsonl"));
        if path.is_file() {
            crate::progress::note(&format!("reusing teacher generations from {}", path.display()));
            return Ok(path);
        }
        let prompts = self.instruct(student, train_path, cfg.data.train_limit, "prompts", &mut Stats::new())?;
        let settings = GenerationSettings {
            max_new_tokens: cfg.seqkd.max_new_tokens,
            max_len: cfg.data.max_len,
            batch_size: cfg.seqkd.batch_size,
            seed: cfg.train.seed,
        };
        let tok = student.tokenizer()?;
        teacher_generations(teacher, tok, &student.eos_token_ids, student.pad_id(), &prompts, &settings, &path)?;
        crate::progress::note(&format!("wrote {} teacher generations to {}", prompts.len(), path.display()));
        Ok(path)
    }
}

fn required<'a>(v: &'a Option<PathBuf>, key: &str) -> Result<&'a PathBuf> {
    v.as_ref().with_context(|| format!("`{key}` is not set (in the config file or with --set {key}=...)"))
}
