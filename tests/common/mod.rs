//! Helpers shared by the integration tests: fixture paths and loading.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use minillm::model::{load_model, AttentionMask, Model};

/// Every fixture model (scripts/make_fixtures.py).
pub const FAMILIES: &[&str] = &["gpt2", "opt", "opt_postln", "llama", "qwen2", "mistral"];

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn shared_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

pub fn load(name: &str) -> Model {
    load_model(&fixtures().join("models").join(name), &Device::Cpu, DType::F32).unwrap()
}

pub fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("logits").join(format!("{name}.safetensors")), &Device::Cpu).unwrap()
}

/// Rows of a 0/1 `[b, t]` integer tensor.
pub fn rows_u8(t: &Tensor) -> Vec<Vec<u8>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u8).collect())
        .collect()
}

pub fn mask_of(t: &Tensor) -> AttentionMask {
    AttentionMask::from_rows(&rows_u8(t)).unwrap()
}

pub fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// Largest |a − b| over positions where `mask` is 1 (`a`, `b`: `[b, t, v]`).
pub fn max_diff_masked(a: &Tensor, b: &Tensor, mask: &AttentionMask) -> f32 {
    let a = a.to_vec3::<f32>().unwrap();
    let b = b.to_vec3::<f32>().unwrap();
    let mut worst = 0f32;
    for (i, (ra, rb)) in a.iter().zip(&b).enumerate() {
        for (j, (pa, pb)) in ra.iter().zip(rb).enumerate() {
            if mask.row(i)[j] == 1 {
                for (x, y) in pa.iter().zip(pb) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}
