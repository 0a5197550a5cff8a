//! Two training processes on the same inputs, run at the same time (so their threads are
//! scheduled differently), produce bit-identical metrics and weights: every parallel kernel
//! adds its partial results in a fixed order. (Before, parallel `reduce`s summed in scheduling
//! order and two runs of the same command differed from the first gradient norm on.)

mod common;

use std::process::Command;

use common::*;

#[test]
fn concurrent_runs_of_one_command_are_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&tmp.path().join("model"), "gpt2", 192, 4, 3);
    let corpus = shared_data().join("minillm_openwebtext_sample/data.txt");
    let run = |k: usize| {
        Command::new(env!("CARGO_BIN_EXE_minillm"))
            .args(["pretrain", "--max-steps", "12", "--batch-size", "32", "--student"])
            .arg(&model)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--valid")
            .arg(&corpus)
            .args(["--set", "data.corpus_chunk=128", "--set", "data.valid_limit=32", "--set", "train.eval_interval=12"])
            .arg("--out")
            .arg(tmp.path().join(format!("run-{k}")))
            .spawn()
            .unwrap()
    };
    let children: Vec<_> = (0..2).map(run).collect();
    for mut c in children {
        assert!(c.wait().unwrap().success());
    }
    let metrics = |k: usize| metrics_without_timings(&tmp.path().join(format!("run-{k}")));
    let (a, b) = (metrics(0), metrics(1));
    assert_eq!(a.len(), 14);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "the two runs differ");
    }
    assert!(params_of(&tmp.path().join("run-0/best")) == params_of(&tmp.path().join("run-1/best")));
}
