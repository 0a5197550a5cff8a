//! One pass of the paper's pipeline over one world (one seed): pre-train teacher and student
//! on the corpus → instruction-tune the teacher → SFT the student (its lowest-validation-loss
//! checkpoint is MiniLLM's starting point) → KD and SeqKD from the pre-trained student →
//! MiniLLM from the SFT student with the pre-training term on the same corpus. Every stage is
//! the real method (a [`Recipe`] with its run directory) and resumes where it stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use serde_json::json;

use super::plan::{Arch, Plan, CHUNK, MAX_LEN, MAX_PROMPT_LEN, POSITIONS, PRETRAIN_LR, TEACHER_LR};
use super::tasks::{self, Dataset};
use crate::model::{save_model, Model};
use crate::progress::note;
use crate::recipe::{Method, Recipe, RunConfig};
use crate::train::minillm::DistillConfig;
use crate::train::optim::Schedule;
use crate::train::trainer::Selection;

/// MiniLLM and the paper's Table 4 ablations: run name and the `--set` overrides that make it.
pub const MINILLM_RUNS: [(&str, &[&str]); 5] = [
    ("minillm", &[]),
    ("minillm-no-length-norm", &["distill.policy.length_norm=false"]),
    ("minillm-no-teacher-mix", &["distill.alpha=0.0"]),
    ("minillm-no-single-step", &["distill.single_step=false"]),
    ("minillm-no-pt", &["distill.pt=false"]),
];

/// The student methods compared, in table order: the paper's four, then the on-policy family
/// (GKD and OPD from the SFT checkpoint, as MiniLLM; DistiLLM from the pre-trained student, as
/// KD).
pub const METHODS: [&str; 7] = ["sft", "kd", "seqkd", "minillm", "gkd", "opd", "distillm"];

/// The stages of one seed, under `root`.
pub struct Stages<'a> {
    /// The seed's directory.
    pub root: PathBuf,
    /// Sizes and budgets.
    pub plan: &'a Plan,
    /// Seed of the world, initialisation, data order and sampling.
    pub seed: u64,
    /// Raised to stop (Ctrl-C): the stage in progress checkpoints and the demo stops.
    pub stop: &'a AtomicBool,
}

/// The data and models every student stage starts from.
pub struct Foundation {
    /// The data directory.
    pub data: PathBuf,
    /// The instruction-tuned teacher.
    pub teacher: PathBuf,
    /// The pre-trained student (KD's and SeqKD's start).
    pub pretrained_student: PathBuf,
}

impl Stages<'_> {
    /// Writes the world's data (once).
    pub fn data(&self) -> Result<PathBuf> {
        let dir = self.root.join("data");
        if !dir.join("done").is_file() {
            std::fs::create_dir_all(&dir)?;
            let Dataset { counts, world } = tasks::write_dataset(&dir, &self.plan.sizes, self.seed)?;
            note(&format!(
                "world of {} animals: {} training examples, {} validation, {} test and {} held-out instructions",
                world.animals.len(),
                counts[0],
                counts[1],
                counts[2],
                counts[3]
            ));
            crate::atomic::write_file(&dir.join("done"), b"")?;
        }
        Ok(dir)
    }

    /// Data, both pre-trained models and the instruction-tuned teacher.
    pub fn foundation(&self) -> Result<Foundation> {
        let data = self.data()?;
        let teacher_init = self.init("init/teacher", self.plan.teacher, self.seed)?;
        let student_init = self.init("init/student", self.plan.student, self.seed + 1)?;
        let (pt_teacher, pt_student) = self.plan.pretrain_steps;
        let teacher_pre = self.pretrain("pretrain-teacher", &data, &teacher_init, pt_teacher)?;
        let pretrained_student = self.pretrain("pretrain-student", &data, &student_init, pt_student)?;
        let mut cfg = self.config(&data, "teacher", &teacher_pre, TEACHER_LR, self.plan.teacher_steps);
        cfg.train.select_by = Selection::ValLoss;
        let teacher = self.stage("teacher", Method::Sft, cfg)?.join("best");
        Ok(Foundation { data, teacher, pretrained_student })
    }

    /// The run directory of student method `name` (`sft`, `kd`, `seqkd`) trained at `lr`, in
    /// `dir` (relative to the seed's root).
    pub fn supervised(&self, f: &Foundation, method: &str, dir: &str, lr: f64) -> Result<PathBuf> {
        let mut cfg = self.config(&f.data, dir, &f.pretrained_student, lr, self.plan.student_steps);
        cfg.train.select_by = Selection::ValRougeL;
        let m = match method {
            "sft" => {
                // MiniLLM starts from the SFT checkpoint with the lowest validation loss.
                cfg.train.also_keep = Some(Selection::ValLoss);
                Method::Sft
            }
            "kd" => Method::Kd,
            "seqkd" => Method::SeqKd,
            other => bail!("unknown supervised method {other}"),
        };
        cfg.model.teacher = Some(f.teacher.clone());
        self.stage(dir, m, cfg)
    }

    /// A MiniLLM run (`overrides` make the ablations) from `init` at `lr`, in `dir`.
    pub fn minillm(&self, f: &Foundation, dir: &str, init: &Path, lr: f64, overrides: &[&str]) -> Result<PathBuf> {
        let sets: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        self.rollouts(f, dir, init, lr, RunConfig::load(None, &sets)?.distill, Method::Distill)
    }

    /// An OPD run (the `opd` preset) from `init` at `lr`, in `dir`.
    pub fn opd(&self, f: &Foundation, dir: &str, init: &Path, lr: f64) -> Result<PathBuf> {
        self.rollouts(f, dir, init, lr, DistillConfig::opd(), Method::Opd)
    }

    /// A run of the rollout engine (MiniLLM or OPD) with `distill` settings, at the demo's sizes.
    fn rollouts(
        &self,
        f: &Foundation,
        dir: &str,
        init: &Path,
        lr: f64,
        distill: DistillConfig,
        method: Method,
    ) -> Result<PathBuf> {
        let mut cfg = self.config(&f.data, dir, init, lr, self.plan.student_steps);
        cfg.distill = distill;
        cfg.model.teacher = Some(f.teacher.clone());
        let p = self.plan;
        let t = &mut cfg.train;
        // The released recipe: constant rate after a short warm-up, batches of rollouts.
        t.schedule = Schedule::Constant { warmup: (p.student_steps / 20).max(1) };
        t.batch_size = p.rollout_minibatch;
        t.select_by = Selection::ValRougeL;
        let d = &mut cfg.distill;
        d.num_rollouts = p.num_rollouts;
        d.rollout_batch = 64;
        if method == Method::Distill {
            d.inner_epochs = p.inner_epochs; // OPD keeps its single pass per buffer
        }
        d.max_new_tokens = MAX_LEN;
        d.valid_rollouts = 10_000; // the whole validation set
        self.stage(dir, method, cfg)
    }

    /// A GKD run (from `init`, the SFT checkpoint) or a DistiLLM run (from `init`, the
    /// pre-trained student) at `lr` with their defaults, sampling up to the demo's length.
    pub fn responses_method(&self, f: &Foundation, method: Method, dir: &str, init: &Path, lr: f64) -> Result<PathBuf> {
        let mut cfg = self.config(&f.data, dir, init, lr, self.plan.student_steps);
        cfg.train.select_by = Selection::ValRougeL;
        cfg.model.teacher = Some(f.teacher.clone());
        cfg.gkd.max_new_tokens = MAX_LEN;
        cfg.distillm.max_new_tokens = MAX_LEN;
        self.stage(dir, method, cfg)
    }

    /// A randomly initialised GPT-2-layout model with the demo's tokenizer (once).
    fn init(&self, dir: &str, arch: Arch, seed: u64) -> Result<PathBuf> {
        let dir = self.root.join(dir);
        if !dir.join("config.json").is_file() {
            let vocab = tasks::tokenizer()?.vocab_size();
            let config = json!({"model_type": "gpt2", "vocab_size": vocab, "n_positions": POSITIONS,
                "n_embd": arch.width, "n_layer": arch.layers, "n_head": arch.heads, "eos_token_id": 0,
                "bos_token_id": 0, "pad_token_id": 0, "initializer_range": 0.02});
            let mut m = Model::random(config, seed, &Device::Cpu, DType::F32)?;
            m.tokenizer = Some(tasks::tokenizer()?);
            save_model(&m, &dir, DType::F32)?;
        }
        Ok(dir)
    }

    /// Language modelling on the corpus; returns the selected (lowest validation loss) model.
    fn pretrain(&self, dir: &str, data: &Path, init: &Path, steps: usize) -> Result<PathBuf> {
        let mut cfg = self.config(data, dir, init, PRETRAIN_LR, steps);
        cfg.data.valid = Some(data.join("corpus_valid.txt"));
        cfg.train.select_by = Selection::ValLoss;
        Ok(self.stage(dir, Method::Pretrain, cfg)?.join("best"))
    }

    /// The settings every stage shares; `dir` is relative to the seed's root.
    fn config(&self, data: &Path, dir: &str, student: &Path, lr: f64, steps: usize) -> RunConfig {
        let mut cfg = RunConfig { out: Some(self.root.join(dir)), ..RunConfig::default() };
        cfg.model.student = Some(student.to_path_buf());
        let d = &mut cfg.data;
        d.train = Some(data.join("train.jsonl"));
        d.valid = Some(data.join("valid.jsonl"));
        d.corpus = Some(data.join("corpus.txt"));
        d.corpus_chunk = CHUNK;
        d.max_len = MAX_LEN;
        d.max_prompt_len = MAX_PROMPT_LEN;
        let t = &mut cfg.train;
        t.lr = lr;
        t.max_steps = steps;
        t.batch_size = self.plan.batch_size;
        t.schedule = Schedule::Cosine { warmup: steps / 20, total: None, min_lr: lr / 10.0 };
        t.optimizer.weight_decay = 0.01;
        t.eval_interval = (steps / self.plan.validations).max(1);
        t.save_interval = t.eval_interval;
        t.seed = self.seed;
        cfg.seqkd.max_new_tokens = MAX_LEN;
        cfg.seqkd.batch_size = 64;
        // One set of teacher samples per world, shared by every SeqKD run (e.g. of the sweep).
        cfg.seqkd.generations = Some(data.join("seqkd_generations.jsonl"));
        cfg
    }

    /// Runs a training stage unless it finished before with these settings and inputs (then
    /// the recipe resumes or refuses, never mixes); returns its run directory.
    fn stage(&self, dir: &str, method: Method, cfg: RunConfig) -> Result<PathBuf> {
        let out = self.root.join(dir);
        let recipe = Recipe::new(method, cfg);
        if !recipe.is_complete()? {
            note(&format!("== {} ({}) ==", dir, method.name()));
            let report = recipe.run_until(self.stop)?;
            if report.outcome.interrupted {
                bail!("interrupted during {dir}; run the demo again to resume");
            }
        }
        Ok(out)
    }
}
