//! Commands write only what they own: a foreign file survives `demo`, `convert`, `init` and
//! `sft --out`; evaluations of different models never share generations; a run is resumed only
//! with the settings and inputs it was made with; outputs are readable as any other file.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn minillm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_minillm")).current_dir(dir).args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// A directory with a file and a nested file of the user's.
fn foreign(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    std::fs::write(dir.join("sub/deep.txt"), "mine too").unwrap();
    dir.to_path_buf()
}

fn intact(dir: &Path) {
    assert_eq!(std::fs::read_to_string(dir.join("notes.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_to_string(dir.join("sub/deep.txt")).unwrap(), "mine too");
}

#[test]
fn demo_refuses_a_directory_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let out = foreign(&tmp.path().join("out"));
    let run = minillm(tmp.path(), &["demo", "--quick", "--out", "out"]);
    assert!(!run.status.success());
    assert!(stderr(&run).contains("did not write"), "{}", stderr(&run));
    intact(&out);
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 2, "nothing was added");
}

#[test]
fn convert_and_init_keep_foreign_files() {
    let tmp = tempfile::tempdir().unwrap();
    let out = foreign(&tmp.path().join("model"));
    let gpt2 = fixtures().join("models/gpt2");
    let convert = |extra: &[&str]| {
        let mut args = vec!["convert", "--model", gpt2.to_str().unwrap(), "--out", "model"];
        args.extend(extra);
        minillm(tmp.path(), &args)
    };
    let refused = convert(&[]);
    assert!(!refused.status.success() && stderr(&refused).contains("--overwrite"), "{}", stderr(&refused));
    assert!(!out.join("config.json").exists());
    assert!(convert(&["--overwrite"]).status.success());
    intact(&out);
    assert!(minillm::model::load_model(&out, &candle_core::Device::Cpu, candle_core::DType::F32).is_ok());

    // `init`: refuses an occupied --out, keeps foreign files with --overwrite.
    let config = tmp.path().join("config.json");
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": 384, "n_positions": 64, "n_embd": 16,
        "n_layer": 1, "n_head": 2, "eos_token_id": 0});
    std::fs::write(&config, cfg.to_string()).unwrap();
    let tok = gpt2.join("tokenizer.json");
    let init = |extra: &[&str]| {
        let mut args = vec!["init", "--config", "config.json", "--tokenizer", tok.to_str().unwrap(), "--out", "model"];
        args.extend(extra);
        minillm(tmp.path(), &args)
    };
    assert!(!init(&[]).status.success());
    let ok = init(&["--overwrite", "--seed", "3"]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    intact(&out);
    let m = minillm::model::load_model(&out, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(m.lm.info().hidden_size, 16);
    assert!(m.tokenizer.is_some());
}

fn sft_args<'a>(student: &'a str, data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "sft",
        "--student",
        student,
        "--train",
        data,
        "--valid",
        data,
        "--out",
        out,
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--set",
        "data.max_len=256",
    ]
}

#[test]
fn sft_refuses_a_foreign_out_and_overwrite_keeps_foreign_files() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 71);
    std::fs::write(tmp.path().join("data.jsonl"), letters_jsonl(16, 72)).unwrap();
    let out = foreign(&tmp.path().join("run"));
    std::fs::create_dir_all(out.join("best")).unwrap();
    std::fs::write(out.join("best/mine.txt"), "kept").unwrap();
    std::fs::write(out.join("metrics.jsonl"), "not a metric\n").unwrap();
    let args = sft_args(student.to_str().unwrap(), "data.jsonl", "run");
    let refused = minillm(tmp.path(), &args);
    assert!(!refused.status.success() && stderr(&refused).contains("did not write"), "{}", stderr(&refused));
    intact(&out);
    assert_eq!(std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(), "not a metric\n");

    let ok = minillm(tmp.path(), &[args.clone(), vec!["--overwrite"]].concat());
    assert!(ok.status.success(), "{}", stderr(&ok));
    intact(&out);
    assert_eq!(std::fs::read_to_string(out.join("best/mine.txt")).unwrap(), "kept", "best/ is rewritten file by file");
    assert!(out.join("best/model.safetensors").is_file());
    assert!(!std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().contains("not a metric"));

    // The run is now minillm's: running again resumes it (nothing to do) without --overwrite,
    // and another method is refused there.
    assert!(minillm(tmp.path(), &args).status.success());
    let teacher = tiny_model_dir(&tmp.path().join("teacher"), "gpt2", 32, 1, 73);
    let mut kd = args.clone();
    kd[0] = "kd";
    kd.extend(["--teacher", teacher.to_str().unwrap()]);
    let other = minillm(tmp.path(), &kd);
    assert!(!other.status.success() && stderr(&other).contains("`sft` output"), "{}", stderr(&other));
}

#[test]
fn a_run_resumes_only_with_its_own_settings_and_inputs() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tiny_model_dir(&tmp.path().join("a"), "gpt2", 32, 1, 74);
    let b = tiny_model_dir(&tmp.path().join("b"), "gpt2", 32, 1, 75);
    std::fs::write(tmp.path().join("data.jsonl"), letters_jsonl(16, 76)).unwrap();
    let args = |student: &Path, steps: &str| {
        let mut v: Vec<String> =
            sft_args(student.to_str().unwrap(), "data.jsonl", "run").into_iter().map(String::from).collect();
        v[10] = steps.to_string();
        v.extend(["--set".into(), "train.save_interval=1".into()]);
        v
    };
    let run = |v: Vec<String>| minillm(tmp.path(), &v.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run(args(&a, "2")).status.success());
    // Another student: refused, naming the setting and the input.
    let e = run(args(&b, "2"));
    let msg = stderr(&e);
    assert!(!e.status.success() && msg.contains("inputs.student"), "{msg}");
    // Another learning rate: refused.
    let mut lr = args(&a, "2");
    lr.extend(["--lr".into(), "0.01".into()]);
    assert!(stderr(&run(lr)).contains("settings.train.lr"));
    // A longer run: allowed, noted, resumed from step 2.
    let longer = run(args(&a, "4"));
    assert!(longer.status.success(), "{}", stderr(&longer));
    assert!(stderr(&longer).contains("max_steps changed from 2 to 4"), "{}", stderr(&longer));
    assert!(stderr(&longer).contains("from step 2"), "{}", stderr(&longer));
    // The same student at another path (a moved directory): its contents decide, resumed.
    let moved = tmp.path().join("a-moved");
    std::fs::create_dir_all(&moved).unwrap();
    for f in std::fs::read_dir(&a).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), moved.join(f.file_name())).unwrap();
    }
    let same = run(args(&moved, "4"));
    assert!(same.status.success(), "{}", stderr(&same));
    // The student's weights changed under the same path: refused.
    tiny_model_dir(&a, "gpt2", 32, 1, 77);
    assert!(stderr(&run(args(&a, "6"))).contains("inputs.student"));
    // --overwrite starts afresh.
    let mut again = args(&a, "2");
    again.push("--overwrite".into());
    assert!(run(again).status.success());
}

/// A tiny evaluation set of letter tasks.
fn eval_set(dir: &Path) -> PathBuf {
    let p = dir.join("set.jsonl");
    std::fs::write(&p, letters_jsonl(4, 78)).unwrap();
    p
}

#[test]
fn evaluations_of_different_models_never_share_generations() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("runs/a/best"), tmp.path().join("runs/b/best"));
    // Peaked next-token distributions, so that the two models' samples differ.
    tiny_model_dir_with_std(&a, "gpt2", 32, 1, 79, 0.5);
    tiny_model_dir_with_std(&b, "gpt2", 32, 1, 80, 0.5);
    let set = eval_set(tmp.path());
    let eval = |model: &Path, extra: &[&str]| {
        let mut args = vec!["eval", "--model", model.to_str().unwrap(), "--sets", set.to_str().unwrap()];
        args.extend(["--seeds", "10"]);
        if !extra.contains(&"--max-new-tokens") {
            args.extend(["--max-new-tokens", "8"]);
        }
        args.extend(extra);
        minillm(tmp.path(), &args)
    };
    for m in [&a, &b] {
        let o = eval(m, &[]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let results = |dir: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join(dir).join("results.json")).unwrap()).unwrap()
    };
    let (ra, rb) = (results("runs/eval-a-best"), results("runs/eval-b-best"));
    assert!(ra["model"].as_str().unwrap().ends_with("a/best") && rb["model"].as_str().unwrap().ends_with("b/best"));
    let preds = |dir: &str| std::fs::read_to_string(tmp.path().join(dir).join("eval/set/seed-10.jsonl")).unwrap();
    assert_ne!(preds("runs/eval-a-best"), preds("runs/eval-b-best"), "each model has its own generations");

    // The same --out for another model, or other decoding settings: refused, never mixed.
    let e = eval(&b, &["--out", "runs/eval-a-best"]);
    assert!(!e.status.success() && stderr(&e).contains("model"), "{}", stderr(&e));
    let e = eval(&a, &["--max-new-tokens", "4", "--out", "runs/eval-a-best"]);
    assert!(!e.status.success() && stderr(&e).contains("max_new_tokens"), "{}", stderr(&e));
    assert_eq!(results("runs/eval-a-best"), ra);
    // --overwrite starts afresh with the other model's generations.
    assert!(eval(&b, &["--out", "runs/eval-a-best", "--overwrite"]).status.success());
    assert_eq!(preds("runs/eval-a-best"), preds("runs/eval-b-best"));

    // `report` labels the two `…/best` models apart.
    let r = minillm(tmp.path(), &["report", "runs/eval-a-best", "runs/eval-b-best", "--out", "rep"]);
    let table = String::from_utf8_lossy(&r.stdout);
    assert!(table.contains("| a-best |") && table.contains("| b-best |"), "{table}");
}

#[test]
fn written_files_have_the_ordinary_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let probe = tmp.path().join("probe");
    std::fs::write(&probe, "x").unwrap();
    let ordinary = std::fs::metadata(&probe).unwrap().permissions().mode() & 0o777;
    let dir = tiny_model_dir(&tmp.path().join("m"), "gpt2", 16, 1, 81);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, ordinary, "{f}: {mode:o}");
    }
    minillm::atomic::write_file(&tmp.path().join("f.txt"), b"x").unwrap();
    assert_eq!(std::fs::metadata(tmp.path().join("f.txt")).unwrap().permissions().mode() & 0o777, ordinary);
}

#[test]
fn stale_temporaries_of_a_killed_writer_are_cleaned_and_interrupted_swaps_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    std::fs::create_dir_all(run.join("best")).unwrap();
    std::fs::write(run.join("best/config.json"), "new").unwrap();
    // A killed process (pid 1 is never ours and never writes here... but it is alive, so use a
    // pid that cannot exist) left a staging directory, a temporary file, and a moved-aside
    // copy of a directory whose replacement never arrived.
    let dead = u32::MAX - 7;
    std::fs::create_dir_all(run.join(format!(".best.tmp-{dead}-0"))).unwrap();
    std::fs::write(run.join(format!(".metrics.jsonl.tmp-{dead}-1")), "torn").unwrap();
    std::fs::create_dir_all(run.join(format!(".gone.old-{dead}-2"))).unwrap();
    std::fs::write(run.join(format!(".gone.old-{dead}-2/file")), "old").unwrap();
    std::fs::create_dir_all(run.join(format!(".best.old-{dead}-3"))).unwrap();
    minillm::train::run_dir::RunDir::new(&run).unwrap();
    let mut names: Vec<String> =
        std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, ["best", "gone"], "temporaries removed, the orphaned old copy put back");
    assert_eq!(std::fs::read_to_string(run.join("gone/file")).unwrap(), "old");
    assert_eq!(std::fs::read_to_string(run.join("best/config.json")).unwrap(), "new");
}
