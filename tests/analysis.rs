//! Calibration (ECE, accuracy from label-word probabilities) and exposure bias (ExAccErr).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use minillm::analysis::calibration::{calibration, ece, label_probabilities, load_classification, ClassifyTemplate};
use minillm::analysis::exposure::ex_acc_err;
use minillm::model::load_model;
use minillm::score::{score, ScoreRequest};

#[test]
fn ece_of_a_hand_computed_case() {
    // Bins of width 0.1: {0.95 ✓}, {0.85 ✗}, {0.65 ✓, 0.62 ✓}, {0.55 ✗}.
    let conf = [0.95, 0.85, 0.65, 0.62, 0.55];
    let ok = [true, false, true, true, false];
    let want = ((1.0f64 - 0.95).abs() + 0.85 + (2.0f64 - 1.27).abs() + 0.55) / 5.0;
    assert!((ece(&conf, &ok, 10) - want).abs() < 1e-12);
    assert_eq!(ece(&[1.0, 1.0], &[true, true], 10), 0.0, "confidence 1 falls in the last bin");
}

#[test]
fn calibration_uses_normalised_label_word_probabilities() {
    let tmp = tempfile::tempdir().unwrap();
    let model =
        load_model(&tiny_model_dir(&tmp.path().join("m"), "gpt2", 32, 1, 61), &Device::Cpu, DType::F32).unwrap();
    let data = tmp.path().join("sst.jsonl");
    std::fs::write(
        &data,
        "{\"text\": \"a great film\", \"label\": 1}\n{\"text\": \"dull and long\", \"label\": 0}\n\
         {\"text\": \"i loved it\", \"label\": \"positive\"}\n{\"text\": \"awful\", \"label\": false}\n",
    )
    .unwrap();
    let t = ClassifyTemplate::preset("sst2").unwrap();
    let exs = load_classification(&data, &t).unwrap();
    assert_eq!(exs.iter().map(|e| e.label).collect::<Vec<_>>(), vec![1, 0, 1, 0]);
    let probs = label_probabilities(&model, &t, &exs).unwrap();
    // Independent check: score "prompt + word" directly and normalise.
    let tok = model.tokenizer().unwrap();
    for (e, p) in exs.iter().zip(&probs) {
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let totals: Vec<f64> = t
            .label_words
            .iter()
            .map(|w| {
                let prompt = tok.encode(&e.prompt).unwrap();
                let full = tok.encode(&format!("{}{w}", e.prompt)).unwrap();
                score(model.lm.as_ref(), &[ScoreRequest { score_from: prompt.len(), ids: full }], 4096).unwrap()[0]
                    .total
            })
            .collect();
        let z: f64 = totals.iter().map(|x| x.exp()).sum();
        for (a, b) in p.iter().zip(&totals) {
            assert!((a - b.exp() / z).abs() < 1e-6);
        }
    }
    let c = calibration(&model, &t, &exs, 10).unwrap();
    let conf: Vec<f64> = probs.iter().map(|p| p.iter().copied().fold(0.0, f64::max)).collect();
    let ok: Vec<bool> = probs.iter().zip(&exs).map(|(p, e)| p[e.label] >= p[1 - e.label]).collect();
    assert!((c.ece - ece(&conf, &ok, 10)).abs() < 1e-12);
    assert_eq!(c.accuracy, ok.iter().filter(|&&x| x).count() as f64 / 4.0);

    std::fs::write(&data, "{\"text\": \"fine\", \"label\": 1}\n{\"sentence\": \"x\", \"label\": 0}\n").unwrap();
    let e = load_classification(&data, &t).unwrap_err().to_string();
    assert!(e.contains("sst.jsonl:2") && e.contains("`text`"), "{e}");
    std::fs::write(&data, "{\"text\": \"x\", \"label\": 7}\n").unwrap();
    assert!(load_classification(&data, &t).unwrap_err().to_string().contains("out of range"));
    assert!(ClassifyTemplate::preset("mnli").is_err());
    let boolq = ClassifyTemplate::preset("boolq").unwrap();
    std::fs::write(&data, "{\"passage\": \"Water is wet.\", \"question\": \"is water wet\", \"label\": true}\n")
        .unwrap();
    let b = load_classification(&data, &boolq).unwrap();
    assert!(b[0].prompt.contains("Water is wet.\nQuestion: is water wet?") && b[0].label == 1);
}

#[test]
fn exposure_bias_vanishes_when_the_student_matches_the_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model_dir_with_std(&tmp.path().join("t"), "gpt2", 32, 1, 62, 0.1);
    let teacher = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![10 + i, 20 + i, 30 + i]).collect();
    let run = |student: &minillm::model::Model| {
        ex_acc_err(student.lm.as_ref(), teacher.lm.as_ref(), &prompts, 8, 12, &[0], 0, 5, 16).unwrap()
    };
    // Identical models: no regret at all, so ExAccErr is undefined (0/0).
    let same = run(&load_model(&dir, &Device::Cpu, DType::F32).unwrap());
    assert!(same.regret.iter().chain(&same.oracle).all(|&v| v == 0.0));
    assert!(same.ex_acc_err.iter().all(Option::is_none));
    // A student that is the teacher plus small noise: regret grows with l, ExAccErr stays near 0.
    let near = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
    for (_, v) in near.lm.params().iter() {
        // A fixed pseudo-noise pattern of amplitude 0.003 (deterministic, unlike randn).
        let n = v.elem_count();
        let noise = (Tensor::arange(0f32, n as f32, &Device::Cpu).unwrap() * 12.9898).unwrap().sin().unwrap();
        let noise = (noise.reshape(v.dims()).unwrap() * 0.003).unwrap();
        v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
    }
    let c = run(&near);
    assert!(c.oracle[0] > 0.0 && c.oracle.windows(2).all(|w| w[1] >= w[0]));
    for (l, e) in c.ex_acc_err.iter().enumerate() {
        let e = e.expect("defined");
        assert!(e.abs() < 5.0, "ExAccErr({}) = {e}%", l + 1);
    }
    // A different student: regret and oracle error are both clearly positive.
    let other =
        load_model(&tiny_model_dir_with_std(&tmp.path().join("s"), "gpt2", 32, 1, 63, 0.1), &Device::Cpu, DType::F32)
            .unwrap();
    let d = run(&other);
    assert!(d.regret[11] > 10.0 * c.regret[11] && d.ex_acc_err[11].unwrap().is_finite());
}

#[test]
fn exposure_and_calibrate_commands_write_their_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tiny_model_dir_with_std(&tmp.path().join("teacher"), "llama", 48, 1, 64, 0.1);
    let a = tiny_model_dir(&tmp.path().join("a"), "gpt2", 32, 1, 65);
    let b = tiny_model_dir(&tmp.path().join("b"), "gpt2", 32, 1, 66);
    let set = tmp.path().join("prompts.jsonl");
    std::fs::write(&set, letters_jsonl(6, 67)).unwrap();
    let minillm = |args: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_minillm")).args(args).output().unwrap()
    };
    let out = tmp.path().join("exposure");
    let run = minillm(&[
        "exposure".as_ref(),
        "--teacher".as_ref(),
        teacher.as_os_str(),
        "--model".as_ref(),
        a.as_os_str(),
        "--model".as_ref(),
        b.as_os_str(),
        "--prompt-set".as_ref(),
        set.as_os_str(),
        "--prompts".as_ref(),
        "3".as_ref(),
        "--samples".as_ref(),
        "2".as_ref(),
        "--max-new-tokens".as_ref(),
        "10".as_ref(),
        "--out".as_ref(),
        out.as_os_str(),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("exposure.json")).unwrap()).unwrap();
    assert_eq!(doc["results"].as_array().unwrap().len(), 2);
    assert_eq!(doc["results"][0]["curve"]["ex_acc_err"].as_array().unwrap().len(), 10);
    let svg = std::fs::read_to_string(out.join("exposure.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);

    let data = tmp.path().join("sst.jsonl");
    std::fs::write(&data, "{\"text\": \"good\", \"label\": 1}\n").unwrap();
    let calibrate = |extra: &[&str]| {
        let mut args: Vec<&std::ffi::OsStr> =
            vec!["calibrate".as_ref(), "--model".as_ref(), a.as_os_str(), "--data".as_ref(), data.as_os_str()];
        args.extend(extra.iter().map(|x| std::ffi::OsStr::new(*x)));
        minillm(&args)
    };
    let run = calibrate(&["--preset", "sst2"]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let line: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert!(line["ece"].is_number() && line["accuracy"].is_number());
    assert!(!calibrate(&[]).status.success(), "a template is required");
    assert!(!calibrate(&["--instruction", "x", "--input", "{text}", "--labels", "only"]).status.success());
}
