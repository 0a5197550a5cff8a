//! Ctrl-C on a real `minillm sft` process: the step in progress finishes, a checkpoint is
//! written, the process exits with status 130, and running the same command again resumes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigint_writes_a_checkpoint_and_the_run_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 41);
    std::fs::write(tmp.path().join("train.jsonl"), letters_jsonl(64, 42)).unwrap();
    std::fs::write(tmp.path().join("valid.jsonl"), letters_jsonl(8, 43)).unwrap();
    let out = tmp.path().join("run");
    let args = |steps: usize| -> Vec<String> {
        vec![
            "sft".into(),
            "--student".into(),
            student.display().to_string(),
            "--train".into(),
            tmp.path().join("train.jsonl").display().to_string(),
            "--valid".into(),
            tmp.path().join("valid.jsonl").display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--max-steps".into(),
            steps.to_string(),
            "--batch-size".into(),
            "4".into(),
            "--set".into(),
            "data.max_len=256".into(), // the tiny model's context
            "--set".into(),
            "train.save_interval=100000".into(),
            "--set".into(),
            "train.eval_interval=100000".into(),
        ]
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_minillm")).args(args(1_000_000)).spawn().unwrap();
    let metrics = out.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no training progress");
        assert!(child.try_wait().unwrap().is_none(), "the training process exited early");
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "an interrupted run exits with 130");
    let run = minillm::train::run_dir::RunDir::new(&out).unwrap();
    let (step, dir) = run.latest_checkpoint().expect("a checkpoint written on Ctrl-C");
    assert!(step >= 3);
    assert!(dir.join("model.safetensors").is_file() && dir.join("trainer_state.safetensors").is_file());
    let rows = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert_eq!(rows, step + 1, "the starting model's validation, then one metrics row per completed step");

    let status = Command::new(env!("CARGO_BIN_EXE_minillm")).args(args(step + 2)).status().unwrap();
    assert!(status.success());
    assert_eq!(run.latest_checkpoint().unwrap().0, step + 2, "the second invocation resumed and finished");
}
