//! Bad input gets a clear error naming the setting, file, line or tensor — never a panic, never
//! a silent wrong answer: numeric settings, seed and set lists, config.json fields (a property
//! test over every field), contexts shorter than the data, non-UTF-8 lines, NaN weights; skipped
//! lines are counted; progress reaches logs that are not terminals.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use common::*;
use minillm::model::load_model;

fn minillm(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_minillm")).current_dir(dir).args(args).output().unwrap()
}

fn fails_with(o: &Output, needle: &str) {
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure mentioning `{needle}`");
    assert_ne!(o.status.code(), Some(101), "a panic: {e}");
    assert!(e.contains(needle), "expected `{needle}` in: {e}");
}

#[test]
fn bad_numbers_and_lists_are_refused_naming_the_setting() {
    let tmp = tempfile::tempdir().unwrap();
    let student = tiny_model_dir(&tmp.path().join("s"), "gpt2", 32, 1, 91);
    std::fs::write(tmp.path().join("d.jsonl"), letters_jsonl(8, 92)).unwrap();
    let s = student.to_str().unwrap();
    let sft = |extra: &[&str]| {
        let mut a = vec!["sft", "--student", s, "--train", "d.jsonl", "--valid", "d.jsonl", "--out", "r"];
        a.extend(["--set", "data.max_len=256"]);
        a.extend(extra);
        minillm(tmp.path(), &a)
    };
    fails_with(&sft(&["--lr=-1"]), "train.lr");
    fails_with(&sft(&["--lr", "nan"]), "train.lr");
    fails_with(&sft(&["--batch-size", "0"]), "train.batch_size");
    fails_with(&sft(&["--set", "train.optimizer.beta2=1.5"]), "train.optimizer.beta2");
    fails_with(&sft(&["--set", "kd.ratio=2"]), "kd.ratio");
    fails_with(&sft(&["--teacher", s]), "unexpected argument '--teacher'");
    assert!(!tmp.path().join("r").exists(), "nothing is written for a refused configuration");

    let set = tmp.path().join("d.jsonl");
    let eval = |extra: &[&str]| {
        let mut a = vec!["eval", "--model", s, "--out", "e"];
        a.extend(extra);
        minillm(tmp.path(), &a)
    };
    fails_with(&eval(&["--sets", ""]), "empty");
    let twice = format!("{0},{0}", set.display());
    fails_with(&eval(&["--sets", &twice]), "twice");
    fails_with(&eval(&["--sets", set.to_str().unwrap(), "--seeds", "10,10"]), "twice");
    fails_with(&eval(&["--sets", set.to_str().unwrap(), "--seeds", "x"]), "--seeds");

    std::fs::write(tmp.path().join("p.jsonl"), "{\"prediction\": \"a\", \"output\": \"a\", \"seed\": \"x\"}\n")
        .unwrap();
    fails_with(&minillm(tmp.path(), &["eval", "--predictions", "p.jsonl"]), "p.jsonl:1: `seed`");

    std::fs::write(tmp.path().join("c.jsonl"), "{\"text\": \"good\", \"label\": 1}\n").unwrap();
    let cal = ["calibrate", "--model", s, "--data", "c.jsonl", "--preset", "sst2", "--bins", "0"];
    fails_with(&minillm(tmp.path(), &cal), "bins");
}

#[test]
fn config_json_fields_never_cause_a_panic() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2", "opt", "llama", "mistral", "qwen2"] {
        let dir = fixtures().join("models").join(family);
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        let keys: Vec<String> = base.as_object().unwrap().keys().cloned().collect();
        let bad = [
            serde_json::json!(0),
            serde_json::json!(-1),
            serde_json::json!(1_000_000_000_000_000u64),
            serde_json::json!(u64::MAX),
            serde_json::json!(1.5),
            serde_json::json!("x"),
            serde_json::json!(null),
            serde_json::json!(true),
            serde_json::json!([]),
            serde_json::json!({}),
        ];
        let copy = tmp.path().join(family);
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["model.safetensors", "tokenizer.json"] {
            std::fs::copy(dir.join(f), copy.join(f)).unwrap();
        }
        let mut cases = 0;
        for key in &keys {
            for v in &bad {
                let mut cfg = base.clone();
                cfg[key] = v.clone();
                std::fs::write(copy.join("config.json"), cfg.to_string()).unwrap();
                let outcome = std::panic::catch_unwind(|| {
                    let parsed = minillm::model::config::ArchConfig::parse(&cfg, "config.json").is_ok();
                    let loaded = load_model(&copy, &Device::Cpu, DType::F32).is_ok();
                    (parsed, loaded)
                });
                assert!(outcome.is_ok(), "{family}: `{key}` = {v} panicked");
                cases += 1;
            }
        }
        assert!(cases >= 100, "{family}: {cases} cases");
    }
    // The cases the issue names get errors that name the field.
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models/gpt2/config.json")).unwrap()).unwrap();
    cfg["n_head"] = 0.into();
    let e = minillm::model::config::ArchConfig::parse(&cfg, "config.json").unwrap_err().to_string();
    assert!(e.contains("n_head"), "{e}");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("models/llama/config.json")).unwrap()).unwrap();
    for key in ["num_key_value_heads", "num_attention_heads"] {
        let mut c = cfg.clone();
        c[key] = 0.into();
        let e = minillm::model::config::ArchConfig::parse(&c, "config.json").unwrap_err().to_string();
        assert!(e.contains(key), "{e}");
    }
    cfg["hidden_size"] = 1_000_000_000_000u64.into();
    let e = minillm::model::config::ArchConfig::parse(&cfg, "config.json").unwrap_err().to_string();
    assert!(e.contains("more than any real model"), "{e}");

    // `init` from a broken config: an error, not a panic.
    std::fs::write(tmp.path().join("bad.json"), r#"{"model_type": "gpt2", "n_head": 0}"#).unwrap();
    let tok = fixtures().join("models/gpt2/tokenizer.json");
    let o = minillm(tmp.path(), &["init", "--config", "bad.json", "--tokenizer", tok.to_str().unwrap(), "--out", "m"]);
    fails_with(&o, "n_head");
}

#[test]
fn a_context_shorter_than_the_data_limit_is_reported_at_setup() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixture GPT-2 has 64 positions; the default data.max_len is 512.
    let gpt2 = fixtures().join("models/gpt2");
    std::fs::write(tmp.path().join("d.jsonl"), letters_jsonl(8, 93)).unwrap();
    let o = minillm(
        tmp.path(),
        &["sft", "--student", gpt2.to_str().unwrap(), "--train", "d.jsonl", "--valid", "d.jsonl", "--out", "r"],
    );
    fails_with(&o, "data.max_len = 512 exceeds the student's context of 64 positions");
    let o = minillm(
        tmp.path(),
        &[
            "kd",
            "--student",
            gpt2.to_str().unwrap(),
            "--teacher",
            gpt2.to_str().unwrap(),
            "--train",
            "d.jsonl",
            "--valid",
            "d.jsonl",
            "--out",
            "r",
        ],
    );
    fails_with(&o, "exceeds the student's context");
}

#[test]
fn unreadable_lines_are_named_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = minillm::tokenizer::Tokenizer::from_file(&fixtures().join("models/gpt2/tokenizer.json")).unwrap();
    let p = tmp.path().join("d.jsonl");
    let good = "{\"prompt\": \"Copy: a b\\nAnswer:\", \"output\": \" a b\"}\n";
    // A byte-order mark, a good line, a line that is not UTF-8, a good line.
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend(good.as_bytes());
    bytes.extend(b"{\"prompt\": \"\xff\xfe\", \"output\": \"x\"}\n");
    bytes.extend(good.as_bytes());
    std::fs::write(&p, &bytes).unwrap();
    let opts = minillm::data::instruct::InstructOptions::default();
    let e = format!("{:#}", minillm::data::instruct::load_instruct(&p, &tok, 0, &opts).unwrap_err());
    assert!(e.contains("d.jsonl:2") && e.contains("UTF-8"), "{e}");
    let skip = minillm::data::instruct::InstructOptions { skip_malformed: true, ..opts };
    let (exs, report) = minillm::data::instruct::load_instruct(&p, &tok, 0, &skip).unwrap();
    assert_eq!((exs.len(), report.malformed), (2, 1), "the BOM line parses, the bad line is skipped and counted");

    // A training run reports the counts in its log and in metrics.jsonl.
    let student = tiny_model_dir(&tmp.path().join("s"), "gpt2", 32, 1, 94);
    let mut train = letters_jsonl(8, 95);
    train.push_str("not json\n");
    train.push_str(&format!("{}\n", serde_json::json!({"prompt": "word ".repeat(300), "output": "x"})));
    std::fs::write(tmp.path().join("t.jsonl"), train).unwrap();
    let o = minillm(
        tmp.path(),
        &[
            "sft",
            "--student",
            student.to_str().unwrap(),
            "--train",
            "t.jsonl",
            "--valid",
            "t.jsonl",
            "--out",
            "r",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--set",
            "data.max_len=256",
            "--set",
            "data.skip_malformed=true",
        ],
    );
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("1 malformed lines skipped, 1 prompts over 256 tokens dropped"), "{log}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(tmp.path().join("r/metrics.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert_eq!(first["data"]["train_malformed"], 1.0);
    assert_eq!(first["data"]["train_long_prompts"], 1.0);
    assert_eq!(first["data"]["train_examples"], 8.0);
    // Progress reaches a log that is not a terminal.
    assert!(log.contains("training: 1/1"), "{log}");
}

#[test]
fn models_with_nan_weights_and_run_directories_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir(&tmp.path().join("m"), "gpt2", 16, 1, 96);
    let st = dir.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let name = "transformer.h.0.mlp.c_fc.weight".to_string();
    let t = &tensors[&name];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    v[3] = f32::NAN;
    tensors.insert(name.clone(), candle_core::Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap());
    candle_core::safetensors::save(&tensors, &st).unwrap();
    let e = format!("{:#}", load_model(&dir, &Device::Cpu, DType::F32).err().unwrap());
    assert!(e.contains(&name) && e.contains("NaN"), "{e}");
    let o = minillm(tmp.path(), &["generate", "--model", "m", "--prompt", "hello"]);
    fails_with(&o, "NaN");

    std::fs::create_dir_all(tmp.path().join("run/best")).unwrap();
    tiny_model_dir(&tmp.path().join("run/best"), "gpt2", 16, 1, 97);
    let o = minillm(tmp.path(), &["eval", "--model", "run", "--sets", "x"]);
    fails_with(&o, "run/best");
}

#[test]
fn unwritable_outputs_are_named_once() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = fixtures().join("models/gpt2");
    std::fs::write(tmp.path().join("in.jsonl"), "{\"text\": \"hello\"}\n").unwrap();
    std::fs::create_dir_all(tmp.path().join("adir")).unwrap();
    let o =
        minillm(tmp.path(), &["score", "--model", gpt2.to_str().unwrap(), "--input", "in.jsonl", "--output", "adir"]);
    fails_with(&o, "adir");
    let e = String::from_utf8_lossy(&o.stderr);
    assert_eq!(e.matches("adir").count(), 1, "{e}");
}
