//! Models, data and the optimizer update shared by the benches (the same shapes as
//! `scripts/bench_reference.py`).

// Each bench uses only some of these helpers.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use minillm::model::Model;
use minillm::train::optim::{collect_grads, AdamW};
use rand::{Rng, SeedableRng};

/// The benches' vocabulary.
pub const VOCAB: usize = 8192;

/// A random GPT-2 with `layers` layers of `width`, 4 heads, the benches' vocabulary.
pub fn gpt2(layers: usize, width: usize, seed: u64) -> Model {
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 512, "n_embd": width,
        "n_layer": layers, "n_head": 4, "eos_token_id": 0, "pad_token_id": 0});
    Model::random(cfg, seed, &Device::Cpu, DType::F32).unwrap()
}

/// `n` sequences of `len` random non-EOS tokens of the benches' vocabulary.
pub fn random_ids(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    random_ids_in(n, len, seed, 1..VOCAB as u32)
}

/// `n` sequences of `len` random tokens drawn from `tokens`.
pub fn random_ids_in(n: usize, len: usize, seed: u64, tokens: std::ops::Range<u32>) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (0..len).map(|_| rng.random_range(tokens.clone())).collect()).collect()
}

/// Backward through `loss` and one AdamW step on every parameter of `model`.
pub fn update(model: &Model, opt: &mut AdamW, loss: &Tensor) {
    let store = loss.backward().unwrap();
    let vars: Vec<_> = model.lm.params().trainable().map(|(_, v)| v.clone()).collect();
    opt.step(&collect_grads(&store, &vars), 1e-4).unwrap();
}
