//! Activation checkpointing (`train.grad_checkpointing`) changes memory, not results: the
//! gradients of every parameter equal those of the plain backward pass, and a training run
//! with it writes the same metrics and weights.

mod common;

use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::*;
use minillm::model::{load_model, AttentionMask, Model};

/// `∂/∂θ Σ w ⊙ logits` for every parameter, with or without checkpointing.
fn grads(m: &Model, checkpointing: bool) -> Vec<(String, Vec<f32>)> {
    m.lm.set_grad_checkpointing(checkpointing).unwrap();
    let ids: Vec<u32> = (0..3 * 40).map(|i| ((i * 53 + 7) % 383 + 1) as u32).collect();
    let ids = Tensor::from_vec(ids, (3, 40), &Device::Cpu).unwrap();
    let mut rows = vec![vec![1u8; 40]; 3];
    rows[1][..9].iter_mut().for_each(|m| *m = 0); // a left-padded row
    let mask = AttentionMask::from_rows(&rows).unwrap();
    let h = m.lm.forward_hidden(&ids, &mask, None).unwrap();
    let logits = m.lm.logits(&h).unwrap();
    let w = Tensor::arange(0f32, logits.elem_count() as f32, &Device::Cpu).unwrap().reshape(logits.shape()).unwrap();
    let w = (w * 1e-4).unwrap().sin().unwrap();
    let store = (logits * w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut aside = m.lm.take_checkpoint_grads();
    m.lm.params()
        .trainable()
        .map(|(n, v)| {
            let g = match (store.get(v.as_tensor()).cloned(), aside.remove(&v.id())) {
                (Some(a), Some(b)) => (a + b).unwrap(),
                (a, b) => a.or(b).unwrap_or_else(|| panic!("no gradient for {n}")),
            };
            (n.to_string(), g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

#[test]
fn checkpointed_gradients_equal_the_plain_backward() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2", "llama"] {
        let dir = tiny_model_dir(&tmp.path().join(family), family, 64, 3, 2);
        let m = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
        let (plain, ckpt) = (grads(&m, false), grads(&m, true));
        assert_eq!(plain.len(), ckpt.len());
        let mut per_block = 0;
        for ((name, a), (_, b)) in plain.iter().zip(&ckpt) {
            let scale = a.iter().fold(0f32, |s, x| s.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f32, |s, (x, y)| s.max((x - y).abs()));
            assert!(diff <= 1e-6 * scale.max(1.0), "{family} {name}: max |Δ| {diff} (max |g| {scale})");
            per_block += usize::from(name.contains(".h.") || name.contains(".layers."));
        }
        assert!(per_block > 0, "{family}: no block parameter was compared");
        // With checkpointing off again, nothing is set aside.
        assert!(m.lm.take_checkpoint_grads().is_empty());
    }
}

#[test]
fn a_checkpointed_run_writes_the_same_metrics_and_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model_dir(&tmp.path().join("model"), "gpt2", 96, 3, 3);
    let corpus = shared_data().join("minillm_openwebtext_sample/data.txt");
    let run = |name: &str, checkpointing: bool| {
        let ok = Command::new(env!("CARGO_BIN_EXE_minillm"))
            .args(["pretrain", "--max-steps", "4", "--batch-size", "8", "--student"])
            .arg(&model)
            .arg("--corpus")
            .arg(&corpus)
            .arg("--valid")
            .arg(&corpus)
            .args(["--set", "data.corpus_chunk=64", "--set", "data.valid_limit=8", "--set", "train.eval_interval=4"])
            .args(["--set", &format!("train.grad_checkpointing={checkpointing}")])
            .arg("--out")
            .arg(tmp.path().join(name))
            .status()
            .unwrap();
        assert!(ok.success());
    };
    run("plain", false);
    run("ckpt", true);
    let metrics = |name: &str| metrics_without_timings(&tmp.path().join(name));
    assert_eq!(metrics("plain"), metrics("ckpt"));
    let diff = max_param_diff(&params_of(&tmp.path().join("plain/best")), &params_of(&tmp.path().join("ckpt/best")));
    assert!(diff <= 1e-6, "weights differ by {diff}");
}
