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

/// A freshly initialised model with the fixture tokenizer (384 tokens, EOS = 0) saved in
/// `dir`: GPT-2 (`"gpt2"`) or Llama (`"llama"`) of the given width and depth, 256 positions.
pub fn tiny_model_dir(dir: &std::path::Path, family: &str, width: usize, layers: usize, seed: u64) -> PathBuf {
    tiny_model_dir_with_std(dir, family, width, layers, seed, 0.02)
}

/// [`tiny_model_dir`] with initialisation standard deviation `std` (larger = more peaked
/// next-token distributions, e.g. for an opinionated teacher).
pub fn tiny_model_dir_with_std(
    dir: &std::path::Path,
    family: &str,
    width: usize,
    layers: usize,
    seed: u64,
    std: f64,
) -> PathBuf {
    let mut config = match family {
        "gpt2" => serde_json::json!({"model_type": "gpt2", "vocab_size": 384, "n_positions": 256, "n_embd": width,
            "n_layer": layers, "n_head": 4, "eos_token_id": 0, "bos_token_id": 0, "pad_token_id": 0}),
        _ => serde_json::json!({"model_type": "llama", "vocab_size": 384, "hidden_size": width,
            "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": 0, "pad_token_id": 0,
            "tie_word_embeddings": false}),
    };
    config["initializer_range"] = std.into();
    let mut m = Model::random(config, seed, &Device::Cpu, DType::F32).unwrap();
    m.tokenizer =
        Some(minillm::tokenizer::Tokenizer::from_file(&fixtures().join("models/gpt2/tokenizer.json")).unwrap());
    minillm::model::save_model(&m, dir, DType::F32).unwrap();
    dir.to_path_buf()
}

/// A small synthetic instruction set (copy / reverse short letter lists) as jsonl lines.
pub fn letters_jsonl(n: usize, seed: u64) -> String {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (s >> 33) as usize
    };
    let mut out = String::new();
    for _ in 0..n {
        let len = 2 + next() % 4;
        let letters: Vec<String> = (0..len).map(|_| ((b'a' + (next() % 6) as u8) as char).to_string()).collect();
        let (task, answer) = if next() % 2 == 0 {
            ("Copy", letters.join(" "))
        } else {
            ("Reverse", letters.iter().rev().cloned().collect::<Vec<_>>().join(" "))
        };
        let line = serde_json::json!({"prompt": format!("{task}: {}\nAnswer:", letters.join(" ")), "output": format!(" {answer}")});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// A `Var` of deterministic values spread over `[−std, std]` (no random-number dependency).
pub fn spread_var(shape: &[usize], seed: u64, std: f32) -> candle_core::Var {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| {
            let h = (i as u64 + 1)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .wrapping_add(seed.wrapping_mul(0xBF58_476D_1CE4_E5B9));
            ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * std
        })
        .collect();
    candle_core::Var::from_tensor(&Tensor::from_vec(data, shape, &Device::Cpu).unwrap()).unwrap()
}

/// The parameters of the model saved in `dir`, by name, as flat vectors.
pub fn params_of(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let m = load_model(dir, &Device::Cpu, DType::F32).unwrap();
    m.lm.params().iter().map(|(n, v)| (n.to_string(), v.flatten_all().unwrap().to_vec1().unwrap())).collect()
}

/// Largest absolute difference between two models' parameters (same names, same order).
pub fn max_param_diff(a: &[(String, Vec<f32>)], b: &[(String, Vec<f32>)]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|((na, va), (nb, vb))| {
            assert_eq!(na, nb);
            va.iter().zip(vb).map(|(x, y)| (x - y).abs())
        })
        .fold(0.0, f32::max)
}

/// Splits a flat i32 tensor into consecutive token lists of the given lengths.
pub fn split(flat: &Tensor, lens: &Tensor) -> Vec<Vec<u32>> {
    let flat = flat.to_vec1::<i32>().unwrap();
    let mut at = 0;
    lens.to_vec1::<i32>()
        .unwrap()
        .iter()
        .map(|&n| {
            let piece = flat[at..at + n as usize].iter().map(|&x| x as u32).collect();
            at += n as usize;
            piece
        })
        .collect()
}

/// `n` letters examples (seeded) written under `dir` and loaded with the fixtures' tokenizer.
pub fn letters_examples(dir: &std::path::Path, n: usize, seed: u64) -> Vec<minillm::data::instruct::InstructExample> {
    use minillm::data::instruct::{load_instruct, InstructOptions};
    let tok = minillm::tokenizer::Tokenizer::from_file(&fixtures().join("models/gpt2/tokenizer.json")).unwrap();
    let p = dir.join(format!("letters-{n}-{seed}.jsonl"));
    std::fs::write(&p, letters_jsonl(n, seed)).unwrap();
    load_instruct(&p, &tok, 0, &InstructOptions::default()).unwrap().0
}

/// A tiny llama teacher (initialised with `seed`) fine-tuned for 60 steps on the letters
/// task, so its distribution has structure a student can learn; returns its `best/`.
pub fn letters_teacher(dir: &std::path::Path, seed: u64) -> PathBuf {
    use minillm::train::run_dir::RunDir;
    use minillm::train::supervised::SupervisedTask;
    use minillm::train::trainer::{train, TrainConfig};
    let init =
        load_model(&tiny_model_dir(&dir.join("teacher-init"), "llama", 64, 2, seed), &Device::Cpu, DType::F32).unwrap();
    let c = TrainConfig {
        lr: 3e-3,
        max_steps: 60,
        batch_size: 16,
        eval_interval: 60,
        save_interval: 60,
        ..TrainConfig::default()
    };
    let run = RunDir::new(&dir.join("teacher")).unwrap();
    let mut task = SupervisedTask::new(letters_examples(dir, 256, 1), letters_examples(dir, 32, 2), 1, None);
    train(&init, &mut task, &c, &run, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    run.best()
}

/// The rows of a run's `metrics.jsonl` without their timings (`seconds`, `tokens_per_s`,
/// `phases`), for comparing two runs that must compute the same.
pub fn metrics_without_timings(run: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(o) = v.as_object_mut() {
                o.remove("seconds");
                o.remove("tokens_per_s");
                o.remove("phases");
            }
            v
        })
        .collect()
}

/// An SFT task whose micro-batch losses pass through `hook(step, loss)` before the trainer
/// sees them: a fault injected at some steps, or a look at the state the trainer runs in.
pub struct HookedTask<F> {
    inner: minillm::train::supervised::SupervisedTask,
    step: usize,
    hook: F,
}

impl<F: FnMut(usize, Tensor) -> anyhow::Result<Tensor>> HookedTask<F> {
    /// `inner` with its losses passed through `hook`.
    pub fn new(inner: minillm::train::supervised::SupervisedTask, hook: F) -> Self {
        Self { inner, step: 0, hook }
    }
}

impl<F: FnMut(usize, Tensor) -> anyhow::Result<Tensor>> minillm::train::trainer::Task for HookedTask<F> {
    fn begin_step(&mut self, s: &Model, step: usize, window: minillm::train::trainer::Window) -> anyhow::Result<()> {
        self.step = step;
        self.inner.begin_step(s, step, window)
    }
    fn micro_batches(&self) -> usize {
        self.inner.micro_batches()
    }
    fn micro_loss(&mut self, s: &Model, i: usize) -> anyhow::Result<(Tensor, minillm::train::trainer::Stats)> {
        let (loss, stats) = self.inner.micro_loss(s, i)?;
        Ok(((self.hook)(self.step, loss)?, stats))
    }
    fn validate(&mut self, s: &Model, batch_size: usize) -> anyhow::Result<minillm::train::trainer::Stats> {
        self.inner.validate(s, batch_size)
    }
    fn state(&self) -> anyhow::Result<minillm::train::trainer::TaskState> {
        self.inner.state()
    }
    fn load_state(&mut self, v: minillm::train::trainer::TaskState) -> anyhow::Result<()> {
        self.inner.load_state(v)
    }
}
