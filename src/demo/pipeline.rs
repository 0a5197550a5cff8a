//! `minillm demo`: the paper's main result in miniature, on a laptop CPU, with nothing to
//! download.
//!
//! A teacher is trained from scratch on the built-in synthetic instruction task
//! ([`super::synthetic`]); a much smaller student is then trained by SFT, word-level KD
//! and SeqKD, and distilled by MiniLLM starting from its SFT checkpoint. Every stage is the
//! real method (a [`Recipe`] with its [`RunConfig`], as `minillm sft|kd|seqkd|distill`
//! would run it, config written into the run directory), and every model is evaluated with
//! the paper's protocol (`evaluate_model`, five sampling seeds) on in-distribution test
//! prompts and on two task families held out of training. The table, a bar chart, the
//! reverse-KL and response-length curves of MiniLLM training and the Figure 2 toy are written
//! to the output directory.
//!
//! Each stage resumes from what an interrupted run left behind; a directory made with other
//! settings (seed, `--quick`) is cleared first.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::synthetic::{self, Sizes};
use super::toy::{self, ToyFit};
use crate::data::jsonl::read_jsonl;
use crate::eval::evaluate::{evaluate_model, EvalOptions};
use crate::generate::SamplingConfig;
use crate::model::{load_model, save_model, Model};
use crate::outdir::OutDir;
use crate::progress::note;
use crate::recipe::{Method, Recipe, RunConfig};
use crate::report::{line_chart_svg, write_report, LineSeries};
use crate::train::optim::Schedule;
use crate::train::trainer::Selection;

/// Bumped whenever the demo's recipe changes, so old run directories are not reused.
const RECIPE: u32 = 1;

/// The evaluation seeds of the paper's protocol.
const EVAL_SEEDS: [u64; 5] = [10, 20, 30, 40, 50];

/// Options of `minillm demo`.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Seed of data, initialisation, data order and sampling.
    pub seed: u64,
    /// The CI-sized run: fewer steps and examples, same code.
    pub quick: bool,
    /// Also run the paper's Table 4 ablations of MiniLLM.
    pub ablations: bool,
    /// Output directory.
    pub out: PathBuf,
}

/// Sizes and step counts of one demo flavour.
struct Plan {
    sizes: Sizes,
    teacher_steps: usize,
    student_steps: usize,
    distill_steps: usize,
    num_rollouts: usize,
    eval_examples: usize,
}

impl Plan {
    fn new(quick: bool) -> Self {
        if quick {
            Plan {
                sizes: Sizes { train: 3000, valid: 64, test: 64, held_out: 32, corpus_docs: 300 },
                teacher_steps: 150,
                student_steps: 100,
                distill_steps: 16,
                num_rollouts: 64,
                eval_examples: 64,
            }
        } else {
            Plan {
                sizes: Sizes { train: 6000, valid: 128, test: 210, held_out: 100, corpus_docs: 1000 },
                teacher_steps: 1000,
                student_steps: 600,
                distill_steps: 400,
                num_rollouts: 128,
                eval_examples: 1000,
            }
        }
    }
}

/// The students in table order (run directory names).
const BASELINES: [(&str, Method); 3] = [("sft", Method::Sft), ("kd", Method::Kd), ("seqkd", Method::SeqKd)];

/// MiniLLM and its ablations: run name and the `--set` overrides that make it.
const MINILLM_RUNS: [(&str, &[&str]); 4] = [
    ("minillm", &[]),
    ("minillm-no-length-norm", &["distill.policy.length_norm=false"]),
    ("minillm-no-teacher-mix", &["distill.alpha=0.0"]),
    ("minillm-no-single-step", &["distill.single_step=false"]),
];

fn gpt2_config(vocab: usize, layers: usize, width: usize, heads: usize) -> Value {
    json!({"model_type": "gpt2", "vocab_size": vocab, "n_positions": 128, "n_embd": width, "n_layer": layers,
           "n_head": heads, "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0, "initializer_range": 0.02})
}

/// What the demo writes at the top of its output directory (stage directories, data, models,
/// evaluations, report and plots); the stage directories are wholly the demo's.
const DEMO_OUTPUTS: &[&str] = &[
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
    "report.md",
    "rouge_l.svg",
    "summary.md",
    "summary.json",
    "reverse_kl.svg",
    "response_length.svg",
    "toy_gaussian.svg",
    "demo.json",
    crate::outdir::MARKER,
];

/// Claims the output directory for the demo: new, or a demo made with these settings (to
/// resume it), or a demo made with other settings (its outputs are removed and it starts
/// afresh). A directory holding anything the demo did not write is refused and left as it is.
fn prepare_out(opts: &DemoOptions) -> Result<()> {
    let identity = json!({"recipe": RECIPE, "seed": opts.seed, "quick": opts.quick});
    let reset = |dir: &Path, _ours: bool| {
        note(&format!("{} holds a demo with other settings: starting afresh", dir.display()));
        crate::outdir::remove_entries(dir, DEMO_OUTPUTS)
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

/// Writes a randomly initialised model with the task's tokenizer (once).
fn init_model(dir: &Path, config: Value, seed: u64) -> Result<PathBuf> {
    if !dir.join("config.json").is_file() {
        let mut m = Model::random(config, seed, &Device::Cpu, DType::F32)?;
        m.tokenizer = Some(synthetic::tokenizer()?);
        save_model(&m, dir, DType::F32)?;
    }
    Ok(dir.to_path_buf())
}

/// The configuration shared by every training stage; `overrides` are `--set` strings.
fn config(out: &Path, data: &Path, student: &Path, overrides: &[String]) -> Result<RunConfig> {
    let mut cfg = RunConfig::load(None, overrides)?;
    cfg.out = Some(out.to_path_buf());
    cfg.model.student = Some(student.to_path_buf());
    cfg.data.train = Some(data.join("train.jsonl"));
    cfg.data.valid = Some(data.join("valid.jsonl"));
    cfg.data.corpus = Some(data.join("corpus.txt"));
    cfg.data.corpus_chunk = 64;
    cfg.data.max_len = 96;
    cfg.data.max_prompt_len = 48;
    Ok(cfg)
}

fn supervised(cfg: &mut RunConfig, steps: usize, lr: f64, seed: u64) {
    let t = &mut cfg.train;
    t.lr = lr;
    t.max_steps = steps;
    t.batch_size = 32;
    t.schedule = Schedule::Cosine { warmup: steps / 20, total: None, min_lr: lr / 10.0 };
    t.optimizer.weight_decay = 0.01;
    t.eval_interval = (steps / 5).max(1);
    t.save_interval = t.eval_interval;
    t.select_by = Selection::ValLoss;
    t.seed = seed;
    cfg.seqkd.max_new_tokens = 48;
    cfg.seqkd.batch_size = 64;
}

/// Runs one training stage unless its selected model already exists.
fn stage(name: &str, method: Method, cfg: &RunConfig, stop: &AtomicBool) -> Result<PathBuf> {
    let out = cfg.out.clone().context("stage without an output directory")?;
    let best = out.join("best");
    if !out.join("done").is_file() {
        note(&format!("== {name} =="));
        let t0 = Instant::now();
        let report = Recipe::new(method, cfg.clone()).run_until(stop)?;
        if report.outcome.interrupted {
            bail!("interrupted during {name}; run the demo again to resume");
        }
        crate::atomic::write_file(&out.join("done"), format!("{:.1}\n", t0.elapsed().as_secs_f64()).as_bytes())?;
    }
    Ok(best)
}

/// Runs the demo (resuming what an earlier run left) and returns the report to print: the
/// table, the summary and where the plots are.
pub fn run(opts: &DemoOptions, stop: &AtomicBool) -> Result<String> {
    let started = Instant::now();
    let plan = Plan::new(opts.quick);
    prepare_out(opts)?;
    let out = &opts.out;
    let data = out.join("data");
    if !data.join("tokenizer.json").is_file() {
        std::fs::create_dir_all(&data)?;
        synthetic::write_dataset(&data, &plan.sizes, opts.seed)?;
    }
    let vocab = synthetic::tokenizer()?.vocab_size();
    let teacher_init = init_model(&out.join("init/teacher"), gpt2_config(vocab, 4, 128, 4), opts.seed)?;
    let student_init = init_model(&out.join("init/student"), gpt2_config(vocab, 2, 64, 4), opts.seed + 1)?;
    let info =
        |dir: &Path| -> Result<usize> { Ok(load_model(dir, &Device::Cpu, DType::F32)?.lm.params().num_elements()) };
    note(&format!(
        "synthetic task: {} training examples, vocabulary {vocab}; teacher {} parameters, student {}",
        plan.sizes.train,
        info(&teacher_init)?,
        info(&student_init)?
    ));

    let mut teacher_cfg = config(&out.join("teacher"), &data, &teacher_init, &[])?;
    supervised(&mut teacher_cfg, plan.teacher_steps, 1e-3, opts.seed);
    let teacher = stage("teacher (trained from scratch)", Method::Sft, &teacher_cfg, stop)?;

    let mut models: Vec<(String, PathBuf)> = vec![("teacher".into(), teacher.clone())];
    for (name, method) in BASELINES {
        let mut cfg = config(&out.join(name), &data, &student_init, &[])?;
        supervised(&mut cfg, plan.student_steps, 1e-3, opts.seed);
        cfg.model.teacher = Some(teacher.clone());
        models.push((name.into(), stage(name, method, &cfg, stop)?));
    }
    let sft_best = models[1].1.clone();
    let runs: &[(&str, &[&str])] = if opts.ablations { &MINILLM_RUNS } else { &MINILLM_RUNS[..1] };
    for (name, extra) in runs {
        let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let mut cfg = config(&out.join(name), &data, &sft_best, &overrides)?;
        cfg.model.teacher = Some(teacher.clone());
        let t = &mut cfg.train;
        // Policy-gradient fine-tuning of an SFT model needs a much smaller step than SFT (the
        // paper: 5e-6 after 5e-4 for GPT-2); here a twentieth of the SFT rate.
        t.lr = 5e-5;
        t.max_steps = plan.distill_steps;
        t.batch_size = 16;
        t.schedule = Schedule::Constant { warmup: 0 };
        t.eval_interval = (plan.distill_steps / 8).max(1);
        t.save_interval = t.eval_interval;
        t.select_by = Selection::ValRougeL;
        t.seed = opts.seed;
        let d = &mut cfg.distill;
        d.num_rollouts = plan.num_rollouts;
        d.rollout_batch = 64;
        d.max_new_tokens = 48;
        d.valid_rollouts = plan.sizes.valid;
        models.push((name.to_string(), stage(name, Method::Distill, &cfg, stop)?));
    }

    let eval_dirs = evaluate_all(&models, &data, out, plan.eval_examples)?;
    let table = write_report(&eval_dirs, out)?;
    let fit = toy::fit(&toy::MIXTURE);
    let stats = eval_dirs.iter().map(|d| test_stats(d, &data)).collect::<Result<Vec<_>>>()?;
    let plots = write_plots(out, &models, stats[0].mean_tokens, &fit)?;
    let summary = summarise(&models, &eval_dirs, &stats, &fit, out)?;
    let mut text = format!("\nRouge-L ×100, mean ± std over {} sampling seeds (test = held-out prompts of the trained tasks; held_out = task families never trained on):\n\n", EVAL_SEEDS.len());
    text.push_str(&table);
    text.push_str(&format!("\n{summary}\n"));
    text.push_str(&format!(
        "plots: {}\n",
        plots.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    ));
    text.push_str(&format!("everything is under {} ({:.0} s)\n", out.display(), started.elapsed().as_secs_f64()));
    Ok(text)
}

/// Evaluates every model on both test sets with the paper's protocol.
fn evaluate_all(models: &[(String, PathBuf)], data: &Path, out: &Path, max_examples: usize) -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for (name, dir) in models {
        let eval_out = out.join("eval").join(name);
        if !eval_out.join("results.json").is_file() {
            note(&format!("== evaluating {name} =="));
            let model = load_model(dir, &Device::Cpu, DType::F32)?;
            let opts = EvalOptions {
                sets: vec![
                    data.join("test.jsonl").display().to_string(),
                    data.join("held_out.jsonl").display().to_string(),
                ],
                data_dir: data.to_path_buf(),
                seeds: EVAL_SEEDS.to_vec(),
                out: eval_out.clone(),
                sampling: SamplingConfig { no_repeat_ngram_size: 6, ..SamplingConfig::sampling(48) },
                max_prompt_len: 48,
                max_len: 96,
                batch_size: 64,
                max_examples: Some(max_examples),
                overwrite: false,
            };
            evaluate_model(&model, &opts)?;
        }
        dirs.push(eval_out);
    }
    Ok(dirs)
}

/// `metrics.jsonl` rows of a run that carry `key`, as (step, value).
fn metric(run: &Path, key: &str) -> Result<Vec<(f64, f64)>> {
    let path = run.join("metrics.jsonl");
    let mut points = Vec::new();
    for (line, row) in read_jsonl(&path)? {
        let row = row.with_context(|| format!("{}:{line}", path.display()))?;
        // Validation statistics are nested under `eval`.
        let value = row.get(key).or_else(|| row.get("eval").and_then(|e| e.get(key))).and_then(Value::as_f64);
        if let (Some(step), Some(v)) = (row.get("step").and_then(Value::as_f64), value) {
            points.push((step, v));
        }
    }
    Ok(points)
}

/// The reverse-KL and response-length curves of MiniLLM training (against the teacher's mean
/// test response length), and the Figure 2 toy.
fn write_plots(out: &Path, models: &[(String, PathBuf)], teacher_len: f64, fit: &ToyFit) -> Result<Vec<PathBuf>> {
    let runs: Vec<(&str, PathBuf)> = models
        .iter()
        .filter(|(n, _)| n.starts_with("minillm"))
        .map(|(n, best)| (n.as_str(), best.parent().unwrap_or(out).to_path_buf()))
        .collect();
    let mut written = Vec::new();
    let mut plot = |file: &str, svg: String| -> Result<()> {
        let p = out.join(file);
        crate::atomic::write_file(&p, svg.as_bytes())?;
        written.push(p);
        Ok(())
    };
    let series = |key: &str| -> Result<Vec<LineSeries>> {
        runs.iter().map(|(n, dir)| Ok((n.to_string(), metric(dir, key)?))).collect()
    };
    plot(
        "reverse_kl.svg",
        line_chart_svg(
            "Reverse KL(student ‖ teacher) on validation prompts during MiniLLM",
            "optimizer step",
            "k3 estimate per token",
            &series("val_rev_kl_k3")?,
        ),
    )?;
    let mut lengths = series("val_len")?;
    let xmax = lengths.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0, f64::max);
    lengths.push(("teacher (test mean)".into(), vec![(0.0, teacher_len), (xmax, teacher_len)]));
    plot(
        "response_length.svg",
        line_chart_svg("Student response length on validation prompts", "optimizer step", "tokens", &lengths),
    )?;
    let [p, f, r] = toy::curves(&toy::MIXTURE, fit);
    plot(
        "toy_gaussian.svg",
        line_chart_svg(
            "Fitting a Gaussian mixture p with one Gaussian q",
            "x",
            "density",
            &[("p (mixture)".into(), p), ("argmin KL(p‖q)".into(), f), ("argmin KL(q‖p)".into(), r)],
        ),
    )?;
    Ok(written)
}

/// What the per-example rows of the `test` set say, over every seed.
struct TestStats {
    /// Mean generated tokens per response.
    mean_tokens: f64,
    /// Mean Rouge-L of the single-answer families.
    single: f64,
    /// Mean Rouge-L of the multi-answer families.
    multi: f64,
}

/// Reads the `test` generations of an evaluation directory once.
fn test_stats(eval_dir: &Path, data: &Path) -> Result<TestStats> {
    let multi: Vec<bool> = read_jsonl(&data.join("test.jsonl"))?
        .into_iter()
        .map(|(_, r)| {
            let family = r.ok().and_then(|r| r.get("family").and_then(Value::as_str).map(str::to_string));
            synthetic::Family::ALL.iter().any(|f| Some(f.name()) == family.as_deref() && f.is_multi_answer())
        })
        .collect();
    let (mut tokens, mut rows) = (0.0, 0usize);
    let mut sums = [(0.0, 0usize); 2];
    for seed in EVAL_SEEDS {
        for (_, row) in read_jsonl(&eval_dir.join(format!("eval/test/seed-{seed}.jsonl")))? {
            let row = row?;
            if let Some(t) = row.get("tokens").and_then(Value::as_f64) {
                tokens += t;
                rows += 1;
            }
            let i = row["index"].as_u64().unwrap_or(0) as usize;
            let slot = &mut sums[usize::from(multi.get(i).copied().unwrap_or(false))];
            slot.0 += row["rougeL"].as_f64().unwrap_or(f64::NAN);
            slot.1 += 1;
        }
    }
    let mean = |(sum, n): (f64, usize)| sum / n.max(1) as f64;
    Ok(TestStats { mean_tokens: mean((tokens, rows)), single: mean(sums[0]), multi: mean(sums[1]) })
}

/// Per-model parameters, Rouge-L by answer kind, Dist-4, LM loss and response length, as
/// markdown; also `summary.json`.
fn summarise(
    models: &[(String, PathBuf)],
    eval_dirs: &[PathBuf],
    stats: &[TestStats],
    fit: &ToyFit,
    out: &Path,
) -> Result<String> {
    let mut md = String::from(
        "| model | parameters | test Rouge-L, single-answer tasks | test Rouge-L, multi-answer tasks | test Dist-4 | test LM loss | mean response tokens |\n|---|---|---|---|---|---|---|\n",
    );
    let mut rows = Vec::new();
    for (((name, dir), eval), st) in models.iter().zip(eval_dirs).zip(stats) {
        let results: Value = serde_json::from_str(&std::fs::read_to_string(eval.join("results.json"))?)?;
        let test = results["results"]
            .as_array()
            .and_then(|a| a.iter().find(|r| r["set"] == "test"))
            .context("results.json has no `test` set")?;
        let params = load_model(dir, &Device::Cpu, DType::F32)?.lm.params().num_elements();
        let (len, single, multi) = (st.mean_tokens, st.single, st.multi);
        let (dist4, lm) = (test["dist4"].as_f64().unwrap_or(f64::NAN), test["lm_loss"].as_f64().unwrap_or(f64::NAN));
        md.push_str(&format!("| {name} | {params} | {single:.2} | {multi:.2} | {dist4:.4} | {lm:.4} | {len:.2} |\n"));
        rows.push(json!({"model": name, "dir": dir, "parameters": params, "test": test, "mean_response_tokens": len,
                         "test_rouge_l_single_answer": single, "test_rouge_l_multi_answer": multi,
                         "held_out": results["results"].as_array().and_then(|a| a.iter().find(|r| r["set"] == "held_out")).cloned()}));
    }
    crate::atomic::write_file(&out.join("summary.md"), md.as_bytes())?;
    let summary = json!({"models": rows, "toy": {"forward": fit.forward, "reverse": fit.reverse,
                         "forward_kl": fit.forward_kl, "reverse_kl": fit.reverse_kl}});
    crate::atomic::write_file(&out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(md)
}
