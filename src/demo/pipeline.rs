//! `minillm demo`: the paper's main experiment in miniature, on a CPU, with nothing to
//! download (design and verdict in RESULTS.md).
//!
//! A synthetic world of invented animals ([`super::world`]) gives a pre-training corpus and
//! instruction tasks with long, many-answer responses whose facts can be checked. Per seed
//! ([`super::stages`]): teacher and student are pre-trained on the corpus, the teacher is
//! instruction-tuned, and the student is trained by SFT, word-level KD and SeqKD and distilled
//! by MiniLLM from its SFT checkpoint — each at the learning rate a sweep over one shared grid
//! chose on validation Rouge-L (`--sweep` re-runs it). Every model is then measured
//! ([`super::measure`]): Rouge-L over five sampling seeds, the precision of its statements,
//! length buckets, exposure bias; `--repeats N` runs the whole pipeline with N seeds and
//! reports 95% intervals and whether MiniLLM's differences exceed the noise
//! ([`super::summary`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::measure::{exposure, measure, SETS};
use super::plan::{Plan, CHOSEN_LR, EVAL_SEEDS, LR_GRID};
use super::stages::{Foundation, Stages, METHODS, MINILLM_RUNS};
use super::summary::{comparisons, length_table, main_table, plots, to_json, ModelResults};
use super::world::World;
use crate::model::load_model;
use crate::outdir::OutDir;
use crate::progress::note;
use crate::recipe::Method;

/// Bumped whenever the demo's recipe changes, so old output directories are not reused.
const RECIPE: u32 = 2;

/// Options of `minillm demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seed of the first repeat (world, initialisation, data order and sampling).
    pub seed: u64,
    /// The CI-sized run: a smaller world and models, fewer steps, same code.
    pub quick: bool,
    /// Also run the paper's Table 4 ablations of MiniLLM.
    pub ablations: bool,
    /// Re-run the learning-rate sweep and use its choices.
    pub sweep: bool,
    /// Whole pipelines, with seeds `seed`, `seed + 1`, ….
    pub repeats: usize,
    /// Output directory.
    pub out: PathBuf,
    /// Train every stage and stop before anything is measured on test data (design work
    /// looks at validation numbers only).
    pub train_only: bool,
}

/// Runs the demo (resuming what an earlier run left) and returns the report to print.
pub fn run(opts: &DemoOptions, stop: &AtomicBool) -> Result<String> {
    if opts.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let started = Instant::now();
    let plan = Plan::new(opts.quick);
    prepare_out(opts)?;
    let out = &opts.out;
    let mut text = String::new();
    let lrs: BTreeMap<String, f64> = if opts.sweep {
        let (lrs, table) = sweep(opts, &plan, stop)?;
        text.push_str(&format!("\nLearning-rate sweep (validation Rouge-L, seed {}):\n\n{table}", opts.seed));
        lrs
    } else {
        CHOSEN_LR.iter().map(|(m, lr)| (m.to_string(), *lr)).collect()
    };
    let lr_line = lrs.iter().map(|(m, lr)| format!("{m} {lr:e}")).collect::<Vec<_>>().join(", ");
    let source = if opts.sweep { "this sweep" } else { "the sweep recorded in RESULTS.md; `demo --sweep` re-runs it" };
    note(&format!("learning rates: {lr_line} (from {source})"));

    let mut names: Vec<String> = vec!["teacher".into()];
    names.extend(METHODS.iter().map(|m| m.to_string()));
    if opts.ablations {
        names.extend(MINILLM_RUNS[1..].iter().map(|(n, _)| n.to_string()));
    }
    let mut results: Vec<ModelResults> = Vec::new();
    let (mut exposure_curves, mut curves, mut teacher_len) = (Vec::new(), Vec::new(), f64::NAN);
    for r in 0..opts.repeats {
        let seed = opts.seed + r as u64;
        let stages = Stages { root: out.join(format!("seed-{seed}")), plan: &plan, seed, stop };
        let f = stages.foundation()?;
        let models = train_students(&stages, &f, &lrs, opts.ablations)?;
        let world = world_of(&f.data)?;
        if opts.train_only {
            text.push_str(&validation_summary(&stages.root, &models, &f.data, &world, &plan)?);
            continue;
        }
        for (k, (name, best)) in models.iter().enumerate() {
            let m = measure(best, &f.data, &stages.root.join("eval").join(name), &world, &plan, &SETS, &EVAL_SEEDS)?;
            if results.len() <= k {
                let parameters = load_model(best, &Device::Cpu, DType::F32)?.lm.params().num_elements();
                results.push(ModelResults { name: name.clone(), parameters, repeats: Vec::new() });
            }
            results[k].repeats.push(m);
        }
        if r == 0 {
            let students: Vec<(String, PathBuf)> = models[1..].to_vec();
            exposure_curves =
                exposure(&f.teacher, &students, &f.data, &stages.root.join("exposure.json"), &plan, seed)?;
            curves = models
                .iter()
                .filter(|(n, _)| n.starts_with("minillm"))
                .map(|(n, best)| (n.clone(), best.parent().unwrap_or(out).to_path_buf()))
                .collect();
            teacher_len = results[0].repeats[0].get("test").map_or(f64::NAN, |m| m.length);
        }
    }

    if opts.train_only {
        text.push_str(&format!(
            "trained in {:.0} s; nothing measured on test data (--train-only)\n",
            started.elapsed().as_secs_f64()
        ));
        return Ok(text);
    }
    let table = main_table(&results);
    let lengths = length_table(&results);
    let (diffs, diffs_json) = comparisons(&results);
    let written = plots(out, &results, &exposure_curves, &curves, teacher_len)?;
    let spread = if opts.repeats > 1 {
        format!(
            "mean ± 95% interval over {} repeated pipelines (seeds {}–{})",
            opts.repeats,
            opts.seed,
            opts.seed + opts.repeats as u64 - 1
        )
    } else {
        "mean ± s.d. over five sampling seeds (one pipeline; `--repeats N` gives intervals over whole pipelines)".into()
    };
    let mut report = format!("# minillm demo\n\nRouge-L ×100 and precision, {spread}. test = unseen prompts of the trained task families; held-out = task families never trained on.\n\n{table}");
    report.push_str(&format!("\nRouge-L by reference length:\n\n{lengths}"));
    if !diffs.is_empty() && opts.repeats > 1 {
        report.push_str(&format!("\nMiniLLM minus each baseline, paired by repeat (95% interval):\n\n{diffs}"));
    }
    report.push_str(&format!("\nLearning rates: {lr_line} (from {source}).\n"));
    crate::atomic::write_file(&out.join("report.md"), report.as_bytes())?;
    let summary = to_json(&results, diffs_json);
    let summary =
        json!({"lrs": lrs, "repeats": opts.repeats, "seed": opts.seed, "quick": opts.quick, "results": summary});
    crate::atomic::write_file(&out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    text.push_str(&format!("\n{report}"));
    let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    text.push_str(&format!("plots: {}\n", paths.join(", ")));
    text.push_str(&format!("everything is under {} ({:.0} s)\n", out.display(), started.elapsed().as_secs_f64()));
    Ok(text)
}

/// Trains (or finds) every student of one seed at the given learning rates; returns the models
/// in table order (teacher first) with their selected checkpoints.
fn train_students(
    s: &Stages,
    f: &Foundation,
    lrs: &BTreeMap<String, f64>,
    ablations: bool,
) -> Result<Vec<(String, PathBuf)>> {
    let lr = |m: &str| lrs.get(m).copied().context("no learning rate for a method");
    let mut models = vec![("teacher".to_string(), f.teacher.clone())];
    let mut sft_run = PathBuf::new();
    for m in ["sft", "kd", "seqkd"] {
        let run = s.supervised(f, m, &run_name(m, lr(m)?), lr(m)?)?;
        if m == "sft" {
            sft_run = run.clone();
        }
        models.push((m.to_string(), run.join("best")));
    }
    let init = sft_run.join("best-val_loss");
    let mini_lr = lr("minillm")?;
    let (first, ablation_runs) = MINILLM_RUNS.split_at(1);
    for (name, overrides) in first {
        let run = s.minillm(f, &minillm_run_name(name, mini_lr, lr("sft")?), &init, mini_lr, overrides)?;
        models.push((name.to_string(), run.join("best")));
    }
    for m in ["gkd", "opd", "distillm"] {
        let run = on_policy_run(s, f, m, lr(m)?, lr("sft")?)?;
        models.push((m.to_string(), run.join("best")));
    }
    if ablations {
        for (name, overrides) in ablation_runs {
            let run = s.minillm(f, &minillm_run_name(name, mini_lr, lr("sft")?), &init, mini_lr, overrides)?;
            models.push((name.to_string(), run.join("best")));
        }
    }
    Ok(models)
}

/// A GKD or OPD run (from the SFT checkpoint with the lowest validation loss, as MiniLLM) or a
/// DistiLLM run (from the pre-trained student, as KD) at `lr`.
fn on_policy_run(s: &Stages, f: &Foundation, method: &str, lr: f64, sft_lr: f64) -> Result<PathBuf> {
    let sft_init = s.root.join(run_name("sft", sft_lr)).join("best-val_loss");
    match method {
        "gkd" => s.responses_method(f, Method::Gkd, &minillm_run_name("gkd", lr, sft_lr), &sft_init, lr),
        "opd" => s.opd(f, &minillm_run_name("opd", lr, sft_lr), &sft_init, lr),
        "distillm" => s.responses_method(f, Method::Distillm, &run_name("distillm", lr), &f.pretrained_student, lr),
        other => bail!("unknown on-policy method {other}"),
    }
}

/// Validation numbers of every stage of a seed (best validation Rouge-L and loss, and the
/// stage's time), for design work that must not look at test data.
fn validation_summary(
    root: &Path,
    models: &[(String, PathBuf)],
    data: &Path,
    world: &World,
    plan: &Plan,
) -> Result<String> {
    let mut s = format!("\nvalidation ({}):\n| run | best val_rougeL | best val_loss | last val_loss | seconds | valid Rouge-L (seed 10) | valid precision | valid tokens |\n|---|---|---|---|---|---|---|---|\n", root.display());
    let mut runs: Vec<PathBuf> = vec![root.join("pretrain-teacher"), root.join("pretrain-student")];
    runs.extend(models.iter().filter_map(|(_, best)| best.parent().map(Path::to_path_buf)));
    for run in runs {
        let name = run.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let valid = if name.starts_with("pretrain") {
            String::from("| | |")
        } else {
            let m =
                measure(&run.join("best"), data, &root.join("valid-eval").join(&name), world, plan, &["valid"], &[10])?;
            let v = &m["valid"];
            format!("{:.2} | {:.1} | {:.1} |", v.rouge_l.0, 100.0 * v.precision.0, v.length)
        };
        let rouge = super::summary::metric(&run, "val_rougeL")?;
        let loss = super::summary::metric(&run, "val_loss")?;
        let best_r = rouge.iter().map(|p| p.1).fold(f64::NAN, f64::max);
        let best_l = loss.iter().map(|p| p.1).fold(f64::NAN, f64::min);
        let last_l = loss.last().map_or(f64::NAN, |p| p.1);
        let secs = training_seconds(&run)?;
        s.push_str(&format!("| {name} | {best_r:.2} | {best_l:.4} | {last_l:.4} | {secs:.1} | {valid}\n"));
    }
    Ok(s)
}

/// Seconds a run spent in optimizer steps (from its metrics).
fn training_seconds(run: &Path) -> Result<f64> {
    Ok(super::summary::metric(run, "seconds")?.iter().map(|p| p.1).sum())
}

/// A run's directory name: the method and its learning rate (so the sweep's runs and the
/// demo's are the same runs).
fn run_name(method: &str, lr: f64) -> String {
    format!("{method}-lr{lr:e}")
}

/// A MiniLLM run's directory name: its rate and the SFT run it starts from.
fn minillm_run_name(name: &str, lr: f64, sft_lr: f64) -> String {
    format!("{}-from-{}", run_name(name, lr), run_name("sft", sft_lr))
}

/// The learning-rate sweep on the first seed: every student method at every rate of the grid
/// (MiniLLM from the SFT run the sweep chose), the same step budget; the rate with the highest
/// best validation Rouge-L wins. Writes `sweep.md` and `sweep.json`.
fn sweep(opts: &DemoOptions, plan: &Plan, stop: &AtomicBool) -> Result<(BTreeMap<String, f64>, String)> {
    let stages = Stages { root: opts.out.join(format!("seed-{}", opts.seed)), plan, seed: opts.seed, stop };
    let f = stages.foundation()?;
    let mut scores: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let mut chosen: BTreeMap<String, f64> = BTreeMap::new();
    let best_rouge = |run: &Path| -> Result<f64> {
        let points = super::summary::metric(run, "val_rougeL")?;
        Ok(points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max))
    };
    for m in METHODS {
        for lr in LR_GRID {
            let run = match m {
                "minillm" => {
                    let sft = stages.root.join(run_name("sft", chosen["sft"]));
                    stages.minillm(&f, &minillm_run_name(m, lr, chosen["sft"]), &sft.join("best-val_loss"), lr, &[])?
                }
                "gkd" | "opd" | "distillm" => on_policy_run(&stages, &f, m, lr, chosen["sft"])?,
                _ => stages.supervised(&f, m, &run_name(m, lr), lr)?,
            };
            scores.entry(m.to_string()).or_default().push((lr, best_rouge(&run)?));
        }
        let best = scores[m].iter().copied().fold((f64::NAN, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
        chosen.insert(m.to_string(), best.0);
    }
    let mut table = String::from("| method |");
    for lr in LR_GRID {
        table.push_str(&format!(" lr {lr:e} |"));
    }
    table.push_str(" chosen |\n|---|");
    table.push_str(&"---|".repeat(LR_GRID.len() + 1));
    table.push('\n');
    for m in METHODS {
        table.push_str(&format!("| {m} |"));
        for (_, v) in &scores[m] {
            table.push_str(&format!(" {v:.2} |"));
        }
        table.push_str(&format!(" {:e} |\n", chosen[m]));
    }
    let doc = format!(
        "# Learning-rate sweep\n\nBest validation Rouge-L of each run (seed {}, {} steps each).\n\n{table}",
        opts.seed, plan.student_steps
    );
    crate::atomic::write_file(&opts.out.join("sweep.md"), doc.as_bytes())?;
    let j = json!({"grid": LR_GRID, "scores": scores, "chosen": chosen});
    crate::atomic::write_file(&opts.out.join("sweep.json"), serde_json::to_string_pretty(&j)?.as_bytes())?;
    Ok((chosen, table))
}

/// The world of a data directory (`world.json` is informational; the world is rebuilt from the
/// same seed's generator by [`super::tasks::write_dataset`], whose result is read back here).
fn world_of(data: &Path) -> Result<World> {
    let text = std::fs::read_to_string(data.join("world.json"))
        .with_context(|| format!("reading {}/world.json", data.display()))?;
    let v: Value = serde_json::from_str(&text)?;
    World::from_json(&v).with_context(|| format!("{}/world.json", data.display()))
}

/// The demo's top-level outputs (the `seed-N` directories are its too).
const DEMO_OUTPUTS: &[&str] = &[
    "report.md",
    "sweep.md",
    "sweep.json",
    "summary.json",
    "rouge_l.svg",
    "precision.svg",
    "length_buckets.svg",
    "exposure.svg",
    "reverse_kl.svg",
    "response_length.svg",
    "toy_gaussian.svg",
    crate::outdir::MARKER,
];

/// What the first version of the demo wrote (removed when a directory of it is reused).
const LEGACY_OUTPUTS: &[&str] = &[
    "data",
    "init",
    "teacher",
    "sft",
    "kd",
    "seqkd",
    "minillm",
    "minillm-no-length-norm",
    "minillm-no-teacher-mix",
    "minillm-no-single-step",
    "eval",
    "summary.md",
    "demo.json",
];

/// Claims the output directory for the demo: new, or a demo made with these settings (to
/// resume it), or a demo made with other settings (its outputs are removed and it starts
/// afresh). A directory holding anything the demo did not write is refused and left as it is.
fn prepare_out(opts: &DemoOptions) -> Result<()> {
    let identity = json!({"recipe": RECIPE, "seed": opts.seed, "quick": opts.quick});
    let reset = |dir: &Path, _ours: bool| -> Result<()> {
        note(&format!("{} holds a demo with other settings: starting afresh", dir.display()));
        crate::outdir::remove_entries(dir, DEMO_OUTPUTS)?;
        crate::outdir::remove_entries(dir, LEGACY_OUTPUTS)?;
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.strip_prefix("seed-").is_some_and(|n| n.parse::<u64>().is_ok()) {
                std::fs::remove_dir_all(e.path()).with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        Ok(())
    };
    // A demo written before output directories carried markers has only its `demo.json`.
    let legacy = opts.out.join("demo.json");
    if !opts.out.join(crate::outdir::MARKER).exists() && legacy.is_file() {
        let stamp: Option<Value> = std::fs::read_to_string(&legacy).ok().and_then(|t| serde_json::from_str(&t).ok());
        if stamp.is_some_and(|s| s.get("recipe").is_some()) {
            reset(&opts.out, true)?;
        }
    }
    let dir = OutDir { path: &opts.out, kind: "demo", reset: &reset, has_results: &|_| false, overwrite_flag: None };
    dir.claim(&identity, &[], false)?;
    Ok(())
}
