//! The shared training loop on tiny models: SFT lowers validation loss, KD lowers the
//! divergence to the teacher, an interrupted run resumes bit-identically, non-finite steps are
//! skipped and stop the run, and bad data is reported by file and line.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::*;
use minillm::data::instruct::{load_instruct, InstructOptions};
use minillm::loss::Divergence;
use minillm::model::load_model;
use minillm::model::Model;
use minillm::tokenizer::Tokenizer;
use minillm::train::optim::Schedule;
use minillm::train::run_dir::RunDir;
use minillm::train::supervised::{KdTerm, SupervisedTask};
use minillm::train::trainer::{train, Stats, Task, TaskState, TrainConfig, Window};

fn tok() -> Tokenizer {
    Tokenizer::from_file(&fixtures().join("models/gpt2/tokenizer.json")).unwrap()
}

fn data(dir: &Path, n: usize, seed: u64) -> Vec<minillm::data::instruct::InstructExample> {
    let p = dir.join(format!("data-{seed}.jsonl"));
    std::fs::write(&p, letters_jsonl(n, seed)).unwrap();
    load_instruct(&p, &tok(), 0, &InstructOptions::default()).unwrap().0
}

fn cfg(steps: usize) -> TrainConfig {
    TrainConfig {
        lr: 3e-3,
        schedule: Schedule::Cosine { warmup: 2, total: None, min_lr: 3e-4 },
        max_steps: steps,
        batch_size: 8,
        grad_accum: 2,
        eval_interval: 10,
        save_interval: 10,
        ..TrainConfig::default()
    }
}

fn sft_task(dir: &Path, c: &TrainConfig, kd: Option<KdTerm>) -> SupervisedTask {
    SupervisedTask::new(data(dir, 128, 1), data(dir, 32, 2), c.seed, kd)
}

fn student(dir: &Path) -> Model {
    load_model(dir, &Device::Cpu, DType::F32).unwrap()
}

/// Trains the student saved in `dir` (loaded afresh, as a new process would).
fn run(
    dir: &Path,
    task: &mut dyn Task,
    c: &TrainConfig,
    out: &RunDir,
) -> anyhow::Result<minillm::train::trainer::TrainOutcome> {
    train(&student(dir), task, c, out, &std::sync::atomic::AtomicBool::new(false))
}

#[test]
fn sft_lowers_validation_loss_and_selects_the_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 64, 1, 1);
    let c = cfg(40);
    let mut task = sft_task(tmp.path(), &c, None);
    let run = RunDir::new(&tmp.path().join("run")).unwrap();
    let before =
        task.validate(&load_model(&student, &Device::Cpu, DType::F32).unwrap(), c.batch_size).unwrap()["val_loss"];
    let out = self::run(&student, &mut task, &c, &run).unwrap();
    assert_eq!(out.steps, 40);
    let (best, best_step) = out.best.unwrap();
    assert!(best < 0.6 * before, "validation loss {before} → {best}");
    assert!(out.evals.iter().all(|(_, s)| s["val_loss"] >= best));
    let reloaded = load_model(&run.best(), &Device::Cpu, DType::F32).unwrap();
    let again = task.validate(&reloaded, c.batch_size).unwrap()["val_loss"];
    assert!((again - best).abs() < 1e-6, "best/ holds the step-{best_step} model");
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(run.metrics()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.iter().filter(|r| r.get("lr").is_some()).count(), 40);
    // The starting model is validated first, then every 10 steps.
    let evals: Vec<&serde_json::Value> = rows.iter().filter(|r| r.get("eval").is_some()).collect();
    assert_eq!(evals.len(), 5);
    assert_eq!(evals[0]["step"], 0);
    assert!((evals[0]["eval"]["val_loss"].as_f64().unwrap() - before).abs() < 1e-6);
    assert!(rows.iter().all(|r| r.get("eval").is_some() || r["loss"].as_f64().unwrap().is_finite()));
}

/// N steps straight vs N/2, interruption, resume: identical parameters, losses and best model.
#[test]
fn an_interrupted_run_resumes_bit_identically() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 3);
    let c = TrainConfig { save_interval: 4, keep_checkpoints: 1, ..cfg(14) };
    let straight = RunDir::new(&tmp.path().join("straight")).unwrap();
    run(&student, &mut sft_task(tmp.path(), &c, None), &c, &straight).unwrap();

    let resumed = RunDir::new(&tmp.path().join("resumed")).unwrap();
    let stop = TrainConfig { stop_after: Some(7), ..c.clone() };
    let first = run(&student, &mut sft_task(tmp.path(), &stop, None), &stop, &resumed).unwrap();
    assert!(first.interrupted);
    assert_eq!(first.steps, 7);
    assert_eq!(resumed.latest_checkpoint().unwrap().0, 7, "interruption writes a checkpoint");
    let second = run(&student, &mut sft_task(tmp.path(), &c, None), &c, &resumed).unwrap();
    assert_eq!(second.steps, 14);

    let (a, b) = (straight.latest_checkpoint().unwrap().1, resumed.latest_checkpoint().unwrap().1);
    assert!(params_of(&a) == params_of(&b), "parameters differ after resume");
    assert!(params_of(&straight.best()) == params_of(&resumed.best()), "best models differ after resume");
    let losses = |r: &RunDir| -> Vec<(u64, f64)> {
        std::fs::read_to_string(r.metrics())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("loss").is_some())
            .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
            .collect()
    };
    assert_eq!(losses(&straight), losses(&resumed));
}

#[test]
fn kd_lowers_the_divergence_to_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 5);
    let teacher_dir = tiny_model_dir(&tmp.path().join("teacher"), "llama", 64, 2, 6);
    let teacher = load_model(&teacher_dir, &Device::Cpu, DType::F32).unwrap();
    let c = cfg(30);
    let kd = KdTerm::new(teacher, 1.0, Divergence::ForwardKl);
    let mut task = sft_task(tmp.path(), &c, Some(kd));
    let before =
        task.validate(&load_model(&student, &Device::Cpu, DType::F32).unwrap(), c.batch_size).unwrap()["val_kd"];
    let out = run(&student, &mut task, &c, &RunDir::new(&tmp.path().join("run")).unwrap()).unwrap();
    let after = out.evals.last().unwrap().1["val_kd"];
    assert!(after < 0.5 * before, "forward KL to the teacher {before} → {after}");
}

/// `task` with a NaN loss at the steps in `steps`.
fn poisoned(
    task: SupervisedTask,
    steps: std::ops::Range<usize>,
) -> HookedTask<impl FnMut(usize, Tensor) -> anyhow::Result<Tensor>> {
    HookedTask::new(task, move |step, loss| Ok(if steps.contains(&step) { (loss * f64::NAN)? } else { loss }))
}

#[test]
fn non_finite_steps_are_skipped_and_stop_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 7);
    let c = TrainConfig { max_bad_steps: 3, ..cfg(20) };
    let mut task = poisoned(sft_task(tmp.path(), &c, None), 3..usize::MAX);
    let out = RunDir::new(&tmp.path().join("run")).unwrap();
    let e = run(&student, &mut task, &c, &out).unwrap_err().to_string();
    assert!(e.contains("stopping at step 5") && e.contains("3 consecutive"), "{e}");
    let skipped = std::fs::read_to_string(out.metrics()).unwrap().matches("skipped").count();
    assert_eq!(skipped, 3);
}

/// A single non-finite step changes nothing: the checkpoint after it holds the weights from
/// before it (the update and the optimizer moments are skipped, nothing non-finite is saved),
/// and training goes on.
#[test]
fn a_non_finite_step_is_never_applied_or_checkpointed() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 8);
    let c = TrainConfig { save_interval: 1, keep_checkpoints: 10, ..cfg(6) };
    let mut task = poisoned(sft_task(tmp.path(), &c, None), 3..4);
    let out = RunDir::new(&tmp.path().join("run")).unwrap();
    run(&student, &mut task, &c, &out).unwrap();
    let at = |s| params_of(&out.checkpoint(s));
    assert!(at(4) == at(3), "the skipped step 3 changed the weights");
    assert!(max_param_diff(&at(5), &at(4)) > 0.0, "training stopped after the skipped step");
    assert!(at(6).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    let skipped = std::fs::read_to_string(out.metrics()).unwrap().matches("skipped").count();
    assert_eq!(skipped, 1);
}

#[test]
fn bad_instruction_data_is_reported_by_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.jsonl");
    let good = r#"{"instruction": "Say hi", "input": "", "output": "hi"}"#;
    std::fs::write(&p, format!("{good}\n{{\"instruction\": 3}}\nnot json\n{good}\n")).unwrap();
    let e = load_instruct(&p, &tok(), 0, &InstructOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:2") && e.contains("instruction"), "{e}");
    let opts = InstructOptions { skip_malformed: true, ..InstructOptions::default() };
    let (exs, report) = load_instruct(&p, &tok(), 0, &opts).unwrap();
    assert_eq!((exs.len(), report.malformed), (2, 2));
    assert_eq!(exs[1].line, 4);

    std::fs::write(&p, "\n\n").unwrap();
    assert!(load_instruct(&p, &tok(), 0, &opts).unwrap_err().to_string().contains("no usable examples"));
    let long = serde_json::json!({"instruction": "word ".repeat(400), "output": "x"}).to_string();
    std::fs::write(&p, format!("{long}\n{good}\n")).unwrap();
    let (exs, report) = load_instruct(&p, &tok(), 0, &InstructOptions::default()).unwrap();
    assert_eq!((exs.len(), report.long_prompts), (1, 1));
    let e = load_instruct(&tmp.path().join("missing.jsonl"), &tok(), 0, &opts).unwrap_err();
    assert!(format!("{e:#}").contains("missing.jsonl"));
}

#[test]
fn corpus_is_chunked_and_unreadable_corpora_are_reported() {
    let corpus = shared_data().join("minillm_openwebtext_sample/data.txt");
    let chunks = minillm::data::pretrain::load_corpus(&corpus, &tok(), 0, 512).unwrap();
    assert!(chunks.len() > 20 && chunks.iter().all(|c| c.len() == 512));
    let tmp = tempfile::tempdir().unwrap();
    let e = minillm::data::pretrain::load_corpus(&tmp.path().join("none.txt"), &tok(), 0, 512).unwrap_err();
    assert!(format!("{e:#}").contains("none.txt"));
    assert!(minillm::data::pretrain::load_corpus(tmp.path(), &tok(), 0, 512)
        .unwrap_err()
        .to_string()
        .contains("no .txt"));
    std::fs::write(tmp.path().join("a.txt"), "tiny").unwrap();
    assert!(minillm::data::pretrain::load_corpus(tmp.path(), &tok(), 0, 512)
        .unwrap_err()
        .to_string()
        .contains("fewer than"));
}

/// A task whose validation statistics are scripted (one entry per validation: step 0, 1, …),
/// training as SFT does.
struct Scripted {
    inner: SupervisedTask,
    rouge: Vec<f64>,
    loss: Vec<f64>,
    calls: usize,
}

impl Task for Scripted {
    fn begin_step(&mut self, s: &Model, step: usize, window: Window) -> anyhow::Result<()> {
        self.inner.begin_step(s, step, window)
    }
    fn micro_batches(&self) -> usize {
        self.inner.micro_batches()
    }
    fn micro_loss(&mut self, s: &Model, i: usize) -> anyhow::Result<(Tensor, Stats)> {
        self.inner.micro_loss(s, i)
    }
    fn validate(&mut self, _: &Model, _: usize) -> anyhow::Result<Stats> {
        let i = self.calls;
        self.calls += 1;
        Ok(Stats::from([("val_rougeL".to_string(), self.rouge[i]), ("val_loss".to_string(), self.loss[i])]))
    }
    fn state(&self) -> anyhow::Result<TaskState> {
        self.inner.state()
    }
    fn load_state(&mut self, v: TaskState) -> anyhow::Result<()> {
        self.inner.load_state(v)
    }
}

/// Validation Rouge-L 5, 10, 30, 20 at steps 0–3: `best/` holds exactly the step-2 weights
/// (not step 1's or 3's); validation loss 3, 2, 2.5, 1 puts step 3's in `best-val_loss/`.
#[test]
fn selection_by_rouge_keeps_the_weights_of_the_best_validation() {
    use minillm::train::trainer::Selection;
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 9);
    let c = TrainConfig {
        eval_interval: 1,
        save_interval: 1,
        keep_checkpoints: 10,
        select_by: Selection::ValRougeL,
        also_keep: Some(Selection::ValLoss),
        ..cfg(3)
    };
    let mut task = Scripted {
        inner: sft_task(tmp.path(), &c, None),
        rouge: vec![5.0, 10.0, 30.0, 20.0],
        loss: vec![3.0, 2.0, 2.5, 1.0],
        calls: 0,
    };
    let run = RunDir::new(&tmp.path().join("run")).unwrap();
    let out = self::run(&student, &mut task, &c, &run).unwrap();
    assert_eq!(out.best, Some((30.0, 2)));
    let best = params_of(&run.best());
    let at = |s| params_of(&run.checkpoint(s));
    assert!(best == at(2), "best/ holds the step-2 model");
    assert!(best != at(1) && best != at(3), "the steps differ, so the comparison means something");
    assert!(params_of(&run.root().join("best-val_loss")) == at(3), "best-val_loss/ holds the step-3 model");
}

/// Two micro-batches of 4 make the same optimizer step as one batch of 8 (the window's token
/// count normalises both), for SFT and for KD; one step moves the parameters far more than
/// the tolerance.
#[test]
fn gradient_accumulation_equals_one_large_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 13);
    let teacher_dir = tiny_model_dir(&tmp.path().join("teacher"), "llama", 64, 2, 14);
    for kd in [false, true] {
        let after = |batch_size: usize, grad_accum: usize| {
            let c = TrainConfig {
                schedule: Schedule::Constant { warmup: 0 },
                batch_size,
                grad_accum,
                eval_interval: 1,
                save_interval: 1,
                ..cfg(1)
            };
            let name = format!("run-{kd}-{batch_size}x{grad_accum}");
            let kd = kd.then(|| {
                KdTerm::new(load_model(&teacher_dir, &Device::Cpu, DType::F32).unwrap(), 0.5, Divergence::ForwardKl)
            });
            let run = RunDir::new(&tmp.path().join(name)).unwrap();
            self::run(&student, &mut sft_task(tmp.path(), &c, kd), &c, &run).unwrap();
            params_of(&run.checkpoint(1))
        };
        let (one, two) = (after(8, 1), after(4, 2));
        let moved = max_param_diff(&one, &params_of(&student));
        let diff = max_param_diff(&one, &two);
        assert!(moved > 1e-3, "kd {kd}: the step moved the parameters by only {moved}");
        assert!(diff < 1e-6, "kd {kd}: 2 × 4 differs from 1 × 8 by {diff}");
    }
}
