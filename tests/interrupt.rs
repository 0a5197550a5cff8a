//! SIGINT (Ctrl-C) and SIGTERM on a real `minillm sft` process: the step in progress finishes,
//! a checkpoint is written, the process exits with 130 / 143, and running the same command
//! again resumes — ending with exactly the weights of an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use common::*;

fn args(tmp: &Path, student: &Path, out: &Path, steps: usize) -> Vec<String> {
    let p = |x: &Path| x.display().to_string();
    let mut v: Vec<String> = vec!["sft".into(), "--student".into(), p(student)];
    v.extend(["--train".into(), p(&tmp.join("train.jsonl")), "--valid".into(), p(&tmp.join("valid.jsonl"))]);
    v.extend(["--out".into(), p(out), "--max-steps".into(), steps.to_string(), "--batch-size".into(), "4".into()]);
    for set in ["data.max_len=256", "train.save_interval=100000", "train.eval_interval=100000"] {
        v.extend(["--set".into(), set.into()]);
    }
    v
}

fn params(dir: &Path) -> Vec<Vec<f32>> {
    let m = minillm::model::load_model(dir, &Device::Cpu, DType::F32).unwrap();
    m.lm.params().iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap()).collect()
}

/// Interrupts a long run with `signal` after a few steps, checks the checkpoint and the exit
/// status, resumes it to two more steps, and compares with a straight run of that length.
fn interrupt_and_resume(signal: &str, status: i32) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let student = tiny_model_dir(&t.join("student"), "gpt2", 32, 1, 41);
    std::fs::write(t.join("train.jsonl"), letters_jsonl(64, 42)).unwrap();
    std::fs::write(t.join("valid.jsonl"), letters_jsonl(8, 43)).unwrap();
    let out = t.join("run");
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_minillm")).args(args(t, &student, &out, 1_000_000)).spawn().unwrap();
    let metrics = out.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no training progress");
        assert!(child.try_wait().unwrap().is_none(), "the training process exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap().success());
    assert_eq!(child.wait().unwrap().code(), Some(status), "an interrupted run exits with {status}");
    let run = minillm::train::run_dir::RunDir::new(&out).unwrap();
    let (step, dir) = run.latest_checkpoint().expect("a checkpoint written on the signal");
    assert!(step >= 3);
    assert!(dir.join("model.safetensors").is_file() && dir.join("trainer_state.safetensors").is_file());
    let rows = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(rows, step + 1, "the starting model's validation, then one metrics row per completed step");

    let resumed = Command::new(env!("CARGO_BIN_EXE_minillm")).args(args(t, &student, &out, step + 2)).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let (last, resumed_dir) = run.latest_checkpoint().unwrap();
    assert_eq!(last, step + 2, "the second invocation resumed and finished");

    let straight_out: PathBuf = t.join("straight");
    let straight =
        Command::new(env!("CARGO_BIN_EXE_minillm")).args(args(t, &student, &straight_out, step + 2)).output();
    assert!(straight.unwrap().status.success());
    let straight_dir = straight_out.join(format!("checkpoints/step-{}", step + 2));
    assert!(params(&resumed_dir) == params(&straight_dir), "the resumed run differs from an uninterrupted one");
}

#[test]
fn sigint_writes_a_checkpoint_and_the_run_resumes() {
    interrupt_and_resume("-INT", 130);
}

#[test]
fn sigterm_writes_a_checkpoint_and_the_run_resumes_identically() {
    interrupt_and_resume("-TERM", 143);
}
