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
    for (_, v) in near.lm.params().trainable() {
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

/// Exact per-prompt quantities of a two-token horizon: the step-1 KL(p‖q), and the step-2
/// KL(p‖q) after every first token (0 after EOS, where a row has finished), with the first
/// token's probabilities under the student (q) and the teacher (p).
struct TwoSteps {
    kl1: f64,
    kl2: Vec<f64>,
    q1: Vec<f64>,
    p1: Vec<f64>,
}

fn log_probs(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + logits.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    logits.iter().map(|&x| x as f64 - lse).collect()
}

fn kl(lp: &[f64], lq: &[f64]) -> f64 {
    lp.iter().zip(lq).map(|(p, q)| p.exp() * (p - q)).sum()
}

fn two_steps(student: &minillm::model::Model, teacher: &minillm::model::Model, prompt: &[u32], eos: u32) -> TwoSteps {
    let last = |m: &minillm::model::Model, rows: &[Vec<u32>]| -> Vec<Vec<f64>> {
        let (b, t) = (rows.len(), rows[0].len());
        let ids = Tensor::new(rows.concat(), &Device::Cpu).unwrap().reshape((b, t)).unwrap();
        let mask = minillm::model::AttentionMask::full(b, t);
        let l = m.lm.forward_last(&ids, &mask, None).unwrap().to_vec2::<f32>().unwrap();
        l.iter().map(|r| log_probs(r)).collect()
    };
    let (lq1, lp1) = (last(student, &[prompt.to_vec()])[0].clone(), last(teacher, &[prompt.to_vec()])[0].clone());
    let rows: Vec<Vec<u32>> = (0..lq1.len() as u32).map(|v| [prompt, &[v]].concat()).collect();
    let (lq2, lp2) = (last(student, &rows), last(teacher, &rows));
    let kl2 = (0..rows.len()).map(|v| if v as u32 == eos { 0.0 } else { kl(&lp2[v], &lq2[v]) }).collect();
    TwoSteps {
        kl1: kl(&lp1, &lq1),
        kl2,
        q1: lq1.iter().map(|x| x.exp()).collect(),
        p1: lp1.iter().map(|x| x.exp()).collect(),
    }
}

/// R(l) and l·ε(l) at l = 1, 2 against an independent exact computation by enumerating every
/// first token (full forward passes, f64): R(1) = l·ε(1) = KL(p₁‖q₁) exactly; R(2) adds
/// E_{y₁∼q}[KL(p₂‖q₂)] and l·ε(2) adds E_{y₁∼p}[…], each matched within 5 standard errors
/// (the exact variance of the sampled mean). Prefixes from the wrong model, or the wrong KL
/// direction, miss by many standard errors.
#[test]
fn exposure_curves_equal_their_exact_expectation() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher =
        load_model(&tiny_model_dir_with_std(&tmp.path().join("t"), "gpt2", 32, 1, 64, 0.4), &Device::Cpu, DType::F32)
            .unwrap();
    let student =
        load_model(&tiny_model_dir_with_std(&tmp.path().join("s"), "gpt2", 32, 1, 65, 0.4), &Device::Cpu, DType::F32)
            .unwrap();
    let prompts: Vec<Vec<u32>> = (0..4).map(|i| vec![10 + i, 20 + i, 30 + i]).collect();
    let samples = 1024;
    let got = ex_acc_err(student.lm.as_ref(), teacher.lm.as_ref(), &prompts, samples, 2, &[0], 0, 7, 512).unwrap();
    let exact: Vec<TwoSteps> = prompts.iter().map(|p| two_steps(&student, &teacher, p, 0)).collect();
    let k = prompts.len() as f64;
    let step1 = exact.iter().map(|e| e.kl1).sum::<f64>() / k;
    // Mean and standard error of the sampled average of the step-2 KL with y₁ ~ `first`.
    let second = |first: &dyn Fn(&TwoSteps) -> &Vec<f64>| -> (f64, f64) {
        let (mut mean, mut var) = (0.0, 0.0);
        for e in &exact {
            let w = first(e);
            let m: f64 = w.iter().zip(&e.kl2).map(|(a, b)| a * b).sum();
            let m2: f64 = w.iter().zip(&e.kl2).map(|(a, b)| a * b * b).sum();
            mean += m / k;
            var += (m2 - m * m) / samples as f64 / (k * k);
        }
        (mean, var.sqrt())
    };
    let (r2, r2_se) = second(&|e| &e.q1);
    let (o2, o2_se) = second(&|e| &e.p1);
    eprintln!(
        "exact R(2) {:.5} ± {r2_se:.5}, l·ε(2) {:.5} ± {o2_se:.5}; sampled {:.5}, {:.5}",
        step1 + r2,
        step1 + o2,
        got.regret[1],
        got.oracle[1]
    );
    for (name, v) in [("R(1)", got.regret[0]), ("l·ε(1)", got.oracle[0])] {
        assert!((v - step1).abs() < 1e-5 * step1.max(1.0), "{name} = {v}, exact {step1}");
    }
    assert!(
        (got.regret[1] - step1 - r2).abs() < 5.0 * r2_se,
        "R(2) = {}, exact {} ± {r2_se}",
        got.regret[1],
        step1 + r2
    );
    assert!(
        (got.oracle[1] - step1 - o2).abs() < 5.0 * o2_se,
        "l·ε(2) = {}, exact {} ± {o2_se}",
        got.oracle[1],
        step1 + o2
    );
    assert!((r2 - o2).abs() > 10.0 * (r2_se + o2_se), "the two prefix distributions must be told apart");
    let want = 100.0 * (r2 - o2) / (step1 + o2);
    let e = got.ex_acc_err[1].unwrap();
    eprintln!("ExAccErr(2) = {e:.2}% (exact {want:.2}%)");
    assert!((e - want).abs() < 100.0 * 5.0 * (r2_se + o2_se) / (step1 + o2), "ExAccErr(2) {e} vs exact {want}");
}
