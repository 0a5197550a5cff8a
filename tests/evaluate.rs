//! `minillm eval`: the built-in sets load; evaluation over sets × seeds is deterministic,
//! resumes from a torn file, and `--predictions` reproduces the in-process scores; metrics with
//! known answers; bad input is reported by file and line.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::*;
use minillm::eval::evaluate::{evaluate_model, parse_seeds, score_predictions, EvalOptions};
use minillm::eval::metrics::{distinct_n, lm_loss, mean_std};
use minillm::eval::sets::{load_set, DEFAULT_DATA_DIR};
use minillm::generate::SamplingConfig;
use minillm::model::load_model;

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_DATA_DIR)
}

#[test]
fn the_papers_sets_load_with_their_references() {
    for (name, n) in [("dolly", 500), ("self-inst", 242), ("vicuna", 80), ("sinst", 1694), ("uinst", 1050)] {
        let set = load_set(name, &data_dir()).unwrap();
        assert_eq!(set.examples.len(), n, "{name}");
        assert!(set.examples.iter().all(|e| !e.references.is_empty() && e.prompt.ends_with("### Response:\n")));
    }
    let sinst = load_set("sinst", &data_dir()).unwrap();
    assert!(sinst.examples.iter().any(|e| e.references.len() > 1), "S-NI has several references per example");
}

fn opts(set: &Path, out: &Path, batch: usize) -> EvalOptions {
    EvalOptions {
        sets: vec![set.display().to_string()],
        data_dir: data_dir(),
        seeds: vec![10, 20],
        out: out.to_path_buf(),
        sampling: SamplingConfig { no_repeat_ngram_size: 6, ..SamplingConfig::sampling(12) },
        max_prompt_len: 256,
        max_len: 512,
        batch_size: batch,
        max_examples: None,
        overwrite: false,
    }
}

#[test]
fn evaluation_is_deterministic_resumable_and_matches_scoring_predictions() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tiny_model_dir(&tmp.path().join("m"), "gpt2", 32, 1, 51);
    let model = load_model(&model_dir, &Device::Cpu, DType::F32).unwrap();
    let set = tmp.path().join("letters.jsonl");
    std::fs::write(&set, letters_jsonl(20, 52)).unwrap();

    let a = evaluate_model(&model, &opts(&set, &tmp.path().join("a"), 8)).unwrap();
    let b = evaluate_model(&model, &opts(&set, &tmp.path().join("b"), 8)).unwrap();
    assert_eq!(a[0].rouge_l_per_seed, b[0].rouge_l_per_seed);
    let file = |root: &str, seed: u64| tmp.path().join(root).join(format!("eval/letters/seed-{seed}.jsonl"));
    for seed in [10, 20] {
        assert_eq!(
            std::fs::read_to_string(file("a", seed)).unwrap(),
            std::fs::read_to_string(file("b", seed)).unwrap()
        );
    }
    let r = &a[0];
    assert_eq!((r.examples, r.rouge_l_per_seed.len()), (20, 2));
    // A reference longer than the model's 256 positions is scored within the limit.
    let long = tmp.path().join("long.jsonl");
    std::fs::write(&long, format!("{}\n", serde_json::json!({"prompt": "Say:\n", "output": "word ".repeat(400)})))
        .unwrap();
    let l = evaluate_model(&model, &opts(&long, &tmp.path().join("long"), 8)).unwrap();
    assert!(l[0].lm_loss.is_finite());
    let (m, s) = mean_std(&r.rouge_l_per_seed.values().copied().collect::<Vec<_>>());
    assert_eq!(r.rouge_l, (m, s));
    assert!((0.0..=1.0).contains(&r.dist4));
    // The set's LM loss is the metric (checked against a plain forward pass below) on its
    // references, encoded as training data is.
    let tok = model.tokenizer().unwrap();
    let (examples, _) = minillm::data::instruct::load_instruct(&set, tok, 0, &Default::default()).unwrap();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = examples.into_iter().map(|e| (e.prompt, e.response)).collect();
    let want = lm_loss(model.lm.as_ref(), &pairs, 4096).unwrap();
    assert!((r.lm_loss - want).abs() < 1e-9 * want, "set LM loss {} vs {want}", r.lm_loss);
    assert_ne!(r.rouge_l_per_seed[&10], r.rouge_l_per_seed[&20], "seeds give different samples");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("a/results.json")).unwrap()).unwrap();
    assert_eq!(json["results"][0]["rouge_l_per_seed"]["10"].as_f64().unwrap(), r.rouge_l_per_seed[&10]);
    assert!(std::fs::read_to_string(tmp.path().join("a/results.md")).unwrap().contains("| letters | 20 |"));

    // Resume: keep 7 complete lines and a torn one, run again: the same file as before.
    let full = std::fs::read_to_string(file("a", 20)).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    std::fs::write(file("a", 20), format!("{}\n{}", lines[..7].join("\n"), &lines[7][..10])).unwrap();
    let again = evaluate_model(&model, &opts(&set, &tmp.path().join("a"), 8)).unwrap();
    assert_eq!(std::fs::read_to_string(file("a", 20)).unwrap(), full);
    assert_eq!(again[0].rouge_l_per_seed, r.rouge_l_per_seed);

    // --predictions over the generation files reproduces the per-seed means.
    let joined = tmp.path().join("preds.jsonl");
    let text: String = [10, 20].iter().map(|&s| std::fs::read_to_string(file("a", s)).unwrap()).collect();
    std::fs::write(&joined, text.replace("\"references\"", "\"output\"")).unwrap();
    let scored = score_predictions(&joined, &tmp.path().join("scored.jsonl")).unwrap();
    for (seed, v) in &scored {
        assert!((v - r.rouge_l_per_seed[seed]).abs() < 1e-9, "seed {seed}: {v} vs {}", r.rouge_l_per_seed[seed]);
    }
}

#[test]
fn metrics_have_known_values() {
    let seqs = vec![vec![1, 2, 3, 4, 5], vec![1, 2, 3, 4], vec![9, 9]];
    // 4-grams: [1234], [2345], [1234] → 2 distinct of 3.
    assert!((distinct_n(&seqs, 4) - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(distinct_n(&[vec![1, 2]], 4), 0.0);
    let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
    assert!((m - 2.5).abs() < 1e-12 && (s - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    assert_eq!(mean_std(&[7.0]), (7.0, 0.0));
    // LM loss = mean over examples of the per-token NLL of the response, computed here from a
    // plain forward pass of each sequence (not through the scorer the metric uses).
    let model = load("gpt2");
    let ex = vec![(vec![5u32, 6, 7], vec![8u32, 9, 0]), (vec![1u32, 2], vec![3u32, 0])];
    let nll = |p: &[u32], r: &[u32]| -> f64 {
        let ids = [p, r].concat();
        let x = candle_core::Tensor::new(&ids[..], &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mask = minillm::model::AttentionMask::full(1, ids.len());
        let logits = model.lm.forward(&x, &mask, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let total: f64 = (0..r.len())
            .map(|j| {
                let row = &logits[p.len() + j - 1];
                let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
                let lse = m + row.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
                lse - row[r[j] as usize] as f64
            })
            .sum();
        total / r.len() as f64
    };
    let want = (nll(&ex[0].0, &ex[0].1) + nll(&ex[1].0, &ex[1].1)) / 2.0;
    let got = lm_loss(model.lm.as_ref(), &ex, 1024).unwrap();
    assert!((got - want).abs() < 1e-5 * want, "LM loss {got} vs {want}");
}

#[test]
fn bad_evaluation_input_is_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_set("nonexistent", &data_dir()).unwrap_err().to_string();
    assert!(e.contains("unknown evaluation set") && e.contains("dolly"), "{e}");
    let missing = tmp.path().join("missing.jsonl");
    assert!(load_set(&missing.display().to_string(), &data_dir()).unwrap_err().to_string().contains("does not exist"));
    let empty = tmp.path().join("empty.jsonl");
    std::fs::write(&empty, "\n").unwrap();
    assert!(load_set(&empty.display().to_string(), &data_dir()).unwrap_err().to_string().contains("is empty"));
    let noref = tmp.path().join("noref.jsonl");
    std::fs::write(&noref, "{\"prompt\": \"a\", \"output\": \"b\"}\n{\"prompt\": \"c\"}\n").unwrap();
    let e = load_set(&noref.display().to_string(), &data_dir()).unwrap_err().to_string();
    assert!(e.contains("noref.jsonl:2") && e.contains("output"), "{e}");
    let empty_list = tmp.path().join("emptylist.jsonl");
    std::fs::write(&empty_list, "{\"prompt\": \"a\", \"output\": []}\n").unwrap();
    assert!(load_set(&empty_list.display().to_string(), &data_dir())
        .unwrap_err()
        .to_string()
        .contains("emptylist.jsonl:1"));

    assert!(parse_seeds("10,x").unwrap_err().to_string().contains("invalid seed `x`"));
    assert!(parse_seeds("10,10").unwrap_err().to_string().contains("twice"));
    assert!(parse_seeds(" , ").unwrap_err().to_string().contains("empty"));
    assert_eq!(parse_seeds("10, 20,30").unwrap(), vec![10, 20, 30]);

    let preds = tmp.path().join("p.jsonl");
    std::fs::write(&preds, "{\"prediction\": \"a\", \"output\": \"a\"}\n{\"prediction\": \"b\"}\n").unwrap();
    let e = format!("{:#}", score_predictions(&preds, &tmp.path().join("o.jsonl")).unwrap_err());
    assert!(e.contains("p.jsonl:2") && e.contains("no references"), "{e}");
}

/// S-NI and UnNI results are broken down by the token length of the first reference.
#[test]
fn sinst_results_have_reference_length_buckets() {
    let tmp = tempfile::tempdir().unwrap();
    let model =
        load_model(&tiny_model_dir(&tmp.path().join("m"), "gpt2", 32, 1, 71), &Device::Cpu, DType::F32).unwrap();
    let dir = tmp.path().join("data/sinst/11_");
    std::fs::create_dir_all(&dir).unwrap();
    // References of 1, 8 and 20 words fall in three different buckets.
    let rows = [("a", 1), ("b", 8), ("c", 20), ("d", 20)];
    let text: String = rows
        .iter()
        .map(|(p, n)| {
            format!("{}\n", serde_json::json!({"prompt": format!("Say {p}:\n"), "output": ["word ".repeat(*n).trim()]}))
        })
        .collect();
    std::fs::write(dir.join("valid.jsonl"), text).unwrap();
    let mut o = opts(Path::new("sinst"), &tmp.path().join("out"), 4);
    o.data_dir = tmp.path().join("data");
    let r = evaluate_model(&model, &o).unwrap().remove(0);
    let tok = model.tokenizer().unwrap();
    let bucket =
        |n: usize| minillm::eval::sets::length_bucket(tok.encode(&"word ".repeat(n)).unwrap().len()).to_string();
    let mut want: std::collections::BTreeMap<String, usize> = Default::default();
    for (_, n) in rows {
        *want.entry(bucket(n)).or_default() += 1;
    }
    let got: std::collections::BTreeMap<String, usize> =
        r.buckets.iter().map(|(b, (_, _, n))| (b.clone(), *n)).collect();
    assert_eq!(got, want);
    assert!(got.len() >= 2, "the references span several buckets: {got:?}");
}
