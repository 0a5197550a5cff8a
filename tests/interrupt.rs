//! SIGINT (Ctrl-C) and SIGTERM on a real `minillm sft` process: the step in progress finishes,
//! a checkpoint is written, the process exits with 130 / 143, and running the same command
//! again resumes — ending with exactly the weights of an uninterrupted run. And a disk that
//! refuses a checkpoint's bytes: a clear error, the previous checkpoint intact, then a resume.

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

/// A temporary directory with a tiny GPT-2 student (seed `seed`), `train` training examples in
/// `train.jsonl` and 8 in `valid.jsonl`.
fn workspace(train: usize, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let student = tiny_model_dir(&t.join("student"), "gpt2", 32, 1, seed);
    std::fs::write(t.join("train.jsonl"), letters_jsonl(train, seed + 1)).unwrap();
    std::fs::write(t.join("valid.jsonl"), letters_jsonl(8, seed + 2)).unwrap();
    (tmp, student)
}

fn params(dir: &Path) -> Vec<Vec<f32>> {
    let m = minillm::model::load_model(dir, &Device::Cpu, DType::F32).unwrap();
    m.lm.params().iter().map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap()).collect()
}

/// Interrupts a long run with `signal` after a few steps, checks the checkpoint and the exit
/// status, resumes it to two more steps, and compares with a straight run of that length.
fn interrupt_and_resume(signal: &str, status: i32) {
    let (tmp, student) = workspace(64, 41);
    let t = tmp.path();
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

/// `minillm` run by bash with writes capped at `kib` KiB per file (`ulimit -f`, with SIGXFSZ
/// ignored so that a write past the cap fails with `EFBIG` instead of killing the process):
/// the disk refusing a checkpoint's bytes, as a full one does.
fn minillm_with_file_cap(args: &[String], kib: usize) -> std::process::Output {
    let quoted: Vec<String> = args.iter().map(|a| format!("'{}'", a.replace('\'', r"'\''"))).collect();
    let script =
        format!("trap '' XFSZ; ulimit -f {kib}; exec '{}' {}", env!("CARGO_BIN_EXE_minillm"), quoted.join(" "));
    Command::new("bash").args(["-c", &script]).output().unwrap()
}

/// Every `.<name>.tmp-*` / `.<name>.old-*` entry under `dir`: what an atomic write leaves
/// behind if it does not clean up after a failure.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-")) {
            found.push(path.clone());
        }
        if path.is_dir() {
            found.extend(temporaries(&path));
        }
    }
    found
}

#[test]
fn a_checkpoint_the_disk_refuses_fails_the_run_cleanly_and_the_last_one_stands() {
    let (tmp, student) = workspace(32, 44);
    let t = tmp.path();
    let out = t.join("run");
    let with_saves = |steps: usize| {
        let mut a = args(t, &student, &out, steps);
        a.extend(["--set".into(), "train.save_interval=1".into()]);
        a
    };
    let first = Command::new(env!("CARGO_BIN_EXE_minillm")).args(with_saves(2)).output().unwrap();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let run = minillm::train::run_dir::RunDir::new(&out).unwrap();
    let (step, saved) = run.latest_checkpoint().unwrap();
    assert_eq!(step, 2);
    let before = params(&saved);
    let weights = saved.join("model.safetensors");
    let cap_kib = (std::fs::metadata(&weights).unwrap().len() / 1024 / 2) as usize;
    assert!(cap_kib >= 64, "the cap leaves room for the run's logs ({cap_kib} KiB)");

    // Resumed from step 2 with the cap, the run trains step 3 and fails writing its checkpoint.
    let capped = minillm_with_file_cap(&with_saves(4), cap_kib);
    let stderr = String::from_utf8_lossy(&capped.stderr);
    assert_eq!(capped.status.code(), Some(1), "a refused write is an error exit, not a signal: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let step3 = out.join("checkpoints/step-3");
    let named = format!("{}: ", step3.join("model.safetensors").display());
    assert!(
        stderr.contains(&named) && stderr.matches("File too large").count() == 1 && !stderr.contains(".tmp-"),
        "the error names the checkpoint's file (not its staging copy) and the system's reason once: {stderr}"
    );
    assert!(!step3.exists(), "no half-written checkpoint in place");
    assert_eq!(temporaries(&out), Vec::<PathBuf>::new(), "temporaries are removed");
    let (step, kept) = run.latest_checkpoint().unwrap();
    assert_eq!(step, 2, "the last complete checkpoint is still the latest");
    assert!(params(&kept) == before, "and it is intact");

    // A row torn off mid-write, as a killed process or a full disk leaves it: dropped on resume.
    let mut log = std::fs::OpenOptions::new().append(true).open(out.join("metrics.jsonl")).unwrap();
    std::io::Write::write_all(&mut log, br#"{"step": 3, "lr": 0.0"#).unwrap();
    drop(log);

    // Room again: the same command resumes from step 2 and finishes.
    let resumed = Command::new(env!("CARGO_BIN_EXE_minillm")).args(with_saves(4)).output().unwrap();
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    assert_eq!(run.latest_checkpoint().unwrap().0, 4);
    let trained: Vec<u64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|row| row.get("lr").is_some())
        .map(|row| row["step"].as_u64().unwrap())
        .collect();
    // Rows carry the step count before the update: 0..4, each once.
    assert_eq!(trained, [0, 1, 2, 3], "the failed run's third step is logged once, by the run that kept it");
}
