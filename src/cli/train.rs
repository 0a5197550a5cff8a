//! `minillm pretrain | sft | kd | seqkd | distill | gkd | opd | distillm`: a run configuration from the config file, `--set`
//! overrides and the typed flags (which win), run as a [`Recipe`].

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use minillm::loss::Divergence;
use minillm::model::Precision;
use minillm::recipe::{Method, Preset, Recipe, RunConfig, SeqKdMode};

use super::signals::{interrupted_status, STOP};

/// Options every training command has.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// Run configuration (TOML); see configs/.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Student model directory (model.student): the model trained.
    #[arg(long)]
    student: Option<PathBuf>,
    /// Run directory (out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps (train.max_steps).
    #[arg(long)]
    max_steps: Option<usize>,
    /// Peak learning rate (train.lr).
    #[arg(long)]
    lr: Option<f64>,
    /// Sequences per micro-batch (train.batch_size).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Micro-batches per step (train.grad_accum).
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Seed (train.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Any setting, as section.key=value (repeatable), e.g. --set train.eval_interval=50.
    /// The flags above win over --set and the config file.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Start afresh in an --out that holds other files, another method's run, or a run made
    /// with other settings or inputs (only the files a training run writes are removed).
    #[arg(long)]
    overwrite: bool,
}

/// The instruction data of the instruction-tuning commands.
#[derive(Args, Debug)]
pub struct InstructArgs {
    /// Training jsonl (data.train).
    #[arg(long)]
    train: Option<PathBuf>,
    /// Validation jsonl (data.valid).
    #[arg(long)]
    valid: Option<PathBuf>,
}

/// The teacher of a distillation command.
#[derive(Args, Debug)]
pub struct TeacherArgs {
    /// Teacher model directory (model.teacher).
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Precision of the teacher's weights, f32, bf16 or f16 (model.teacher_dtype; default: the
    /// working precision). bf16 or f16 halves the memory of a large teacher (on the CPU only
    /// its matrices are stored in 16 bits; its activations stay f32).
    #[arg(long)]
    teacher_dtype: Option<Precision>,
}

/// The word-level KD term (KD, and SeqKD's `lmops` mode).
#[derive(Args, Debug)]
pub struct KdArgs {
    /// KD divergence: fkl, sce, rkl, jsd[:β], tvd, sfkl[:λ], srkl[:λ] (kd.divergence).
    #[arg(long)]
    divergence: Option<Divergence>,
    /// KD weight r (kd.ratio).
    #[arg(long)]
    kd_ratio: Option<f64>,
}

/// `minillm pretrain`.
#[derive(Args, Debug)]
pub struct Pretrain {
    #[command(flatten)]
    run: RunArgs,
    /// Training text: one document per line, or a directory of .txt files (data.corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Validation text, in the same form (data.valid).
    #[arg(long)]
    valid: Option<PathBuf>,
}

/// `minillm sft`.
#[derive(Args, Debug)]
pub struct Sft {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
}

/// `minillm kd`.
#[derive(Args, Debug)]
pub struct Kd {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    #[command(flatten)]
    kd: KdArgs,
}

/// `minillm seqkd`.
#[derive(Args, Debug)]
pub struct SeqKd {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// `lmops` (the KD mix on the teacher's samples, as the released scripts) or `pure`
    /// (cross-entropy only) (seqkd.mode).
    #[arg(long)]
    mode: Option<SeqKdMode>,
    #[command(flatten)]
    kd: KdArgs,
}

/// `minillm distill`.
#[derive(Args, Debug)]
pub struct Distill {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Pre-training corpus (data.corpus).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// `lmops` (released implementation, default) or `paper` (equations as printed): defaults
    /// for every [distill] key not set explicitly.
    #[arg(long)]
    preset: Option<Preset>,
    /// Teacher-mix coefficient α (distill.alpha; 0 = no teacher mixing).
    #[arg(long)]
    alpha: Option<f32>,
    /// Ablation: no length normalisation.
    #[arg(long)]
    no_length_norm: bool,
    /// Ablation: no single-step term.
    #[arg(long)]
    no_single_step: bool,
    /// Ablation: no pre-training term.
    #[arg(long)]
    no_pt: bool,
}

/// `minillm gkd`.
#[derive(Args, Debug)]
pub struct Gkd {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Probability λ of an on-policy step (gkd.lmbda).
    #[arg(long)]
    lmbda: Option<f64>,
    /// JSD interpolation β: 0 forward KL, 1 reverse KL (gkd.beta).
    #[arg(long)]
    beta: Option<f64>,
    /// Temperature τ of sampling and of the loss (gkd.temperature).
    #[arg(long)]
    temperature: Option<f64>,
    /// Off-policy steps on teacher samples instead of the data's responses (gkd.seq_kd).
    #[arg(long)]
    seq_kd: bool,
}

/// `minillm distillm`.
#[derive(Args, Debug)]
pub struct Distillm {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Skew divergence: sfkl[:λ] or srkl[:λ] (distillm.divergence).
    #[arg(long)]
    divergence: Option<Divergence>,
    /// Starting probability of student-generated data (distillm.init_threshold).
    #[arg(long)]
    init_threshold: Option<f64>,
}

/// `minillm opd`.
#[derive(Args, Debug)]
pub struct Opd {
    #[command(flatten)]
    run: RunArgs,
    #[command(flatten)]
    data: InstructArgs,
    #[command(flatten)]
    teacher: TeacherArgs,
    /// Teacher-mix coefficient α of the sampler (distill.alpha; 0 = the student alone).
    #[arg(long)]
    alpha: Option<f32>,
    /// Discount γ of the per-token advantages (distill.policy.gamma; 0 = each token's own
    /// reverse-KL estimate, 1 = the sequence-level gradient).
    #[arg(long)]
    gamma: Option<f64>,
    /// PPO-clipped surrogate with this ε instead of the plain importance-sampled loss
    /// (distill.policy.clip_ratio).
    #[arg(long)]
    ppo_clip: Option<f64>,
}

impl RunArgs {
    /// The config file, `--set` overrides (and the preset), then the flags.
    fn config(&self, preset: Option<Preset>) -> Result<RunConfig> {
        let mut cfg = RunConfig::load_with_preset(self.config.as_deref(), &self.set, preset)?;
        set(&mut cfg.model.student, &self.student);
        set(&mut cfg.out, &self.out);
        let t = &mut cfg.train;
        t.max_steps = self.max_steps.unwrap_or(t.max_steps);
        t.lr = self.lr.unwrap_or(t.lr);
        t.batch_size = self.batch_size.unwrap_or(t.batch_size);
        t.grad_accum = self.grad_accum.unwrap_or(t.grad_accum);
        t.seed = self.seed.unwrap_or(t.seed);
        Ok(cfg)
    }
}

/// Sets `slot` when the flag was given.
fn set(slot: &mut Option<PathBuf>, v: &Option<PathBuf>) {
    if v.is_some() {
        slot.clone_from(v);
    }
}

impl InstructArgs {
    fn apply(&self, cfg: &mut RunConfig) {
        set(&mut cfg.data.train, &self.train);
        set(&mut cfg.data.valid, &self.valid);
    }
}

impl TeacherArgs {
    fn apply(&self, cfg: &mut RunConfig) {
        set(&mut cfg.model.teacher, &self.teacher);
        if self.teacher_dtype.is_some() {
            cfg.model.teacher_dtype = self.teacher_dtype;
        }
    }
}

impl KdArgs {
    fn apply(&self, cfg: &mut RunConfig) {
        cfg.kd.divergence = self.divergence.unwrap_or(cfg.kd.divergence);
        cfg.kd.ratio = self.kd_ratio.unwrap_or(cfg.kd.ratio);
    }
}

impl Pretrain {
    /// Runs `minillm pretrain`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(None)?;
        set(&mut cfg.data.corpus, &self.corpus);
        set(&mut cfg.data.valid, &self.valid);
        train(Method::Pretrain, cfg, self.run.overwrite)
    }
}

impl Sft {
    /// Runs `minillm sft`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(None)?;
        self.data.apply(&mut cfg);
        train(Method::Sft, cfg, self.run.overwrite)
    }
}

impl Kd {
    /// Runs `minillm kd`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(None)?;
        self.data.apply(&mut cfg);
        self.teacher.apply(&mut cfg);
        self.kd.apply(&mut cfg);
        train(Method::Kd, cfg, self.run.overwrite)
    }
}

impl SeqKd {
    /// Runs `minillm seqkd`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(None)?;
        self.data.apply(&mut cfg);
        self.teacher.apply(&mut cfg);
        self.kd.apply(&mut cfg);
        cfg.seqkd.mode = self.mode.unwrap_or(cfg.seqkd.mode);
        train(Method::SeqKd, cfg, self.run.overwrite)
    }
}

impl Distill {
    /// Runs `minillm distill`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(self.preset)?;
        self.data.apply(&mut cfg);
        self.teacher.apply(&mut cfg);
        set(&mut cfg.data.corpus, &self.corpus);
        let d = &mut cfg.distill;
        d.alpha = self.alpha.unwrap_or(d.alpha);
        d.policy.length_norm &= !self.no_length_norm;
        d.single_step &= !self.no_single_step;
        d.pt &= !self.no_pt;
        train(Method::Distill, cfg, self.run.overwrite)
    }
}

impl Gkd {
    /// Runs `minillm gkd`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(None)?;
        self.data.apply(&mut cfg);
        self.teacher.apply(&mut cfg);
        let g = &mut cfg.gkd;
        g.lmbda = self.lmbda.unwrap_or(g.lmbda);
        g.beta = self.beta.unwrap_or(g.beta);
        g.temperature = self.temperature.unwrap_or(g.temperature);
        g.seq_kd |= self.seq_kd;
        train(Method::Gkd, cfg, self.run.overwrite)
    }
}

impl Distillm {
    /// Runs `minillm distillm`.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(None)?;
        self.data.apply(&mut cfg);
        self.teacher.apply(&mut cfg);
        let m = &mut cfg.distillm;
        m.divergence = self.divergence.unwrap_or(m.divergence);
        m.init_threshold = self.init_threshold.unwrap_or(m.init_threshold);
        train(Method::Distillm, cfg, self.run.overwrite)
    }
}

impl Opd {
    /// Runs `minillm opd`: the `distill` engine with the `opd` preset's defaults.
    pub fn run(self) -> Result<()> {
        let mut cfg = self.run.config(Some(Preset::Opd))?;
        self.data.apply(&mut cfg);
        self.teacher.apply(&mut cfg);
        let d = &mut cfg.distill;
        d.alpha = self.alpha.unwrap_or(d.alpha);
        d.policy.gamma = self.gamma.unwrap_or(d.policy.gamma);
        if self.ppo_clip.is_some() {
            d.policy.clip_ratio = self.ppo_clip;
        }
        train(Method::Opd, cfg, self.run.overwrite)
    }
}

/// Runs the method, stopping cleanly on Ctrl-C, and says where the selected model is.
fn train(method: Method, config: RunConfig, overwrite: bool) -> Result<()> {
    let select_by = config.train.select_by;
    let report = Recipe { method, config, overwrite }.run_until(&STOP)?;
    let o = &report.outcome;
    match (&o.best, o.interrupted) {
        (_, true) => {
            eprintln!("stopped at step {}; run the same command again to resume", o.steps);
            // Interrupted after writing a checkpoint: the conventional status of the signal.
            std::process::exit(interrupted_status());
        }
        (Some((v, step)), false) => {
            eprintln!("done: best {select_by:?} = {v:.4} at step {step}; model in {}", report.best.display())
        }
        (None, false) => eprintln!("done"),
    }
    Ok(())
}
