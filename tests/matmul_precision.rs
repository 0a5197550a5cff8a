//! `train.matmul_precision = "bf16"`: training's large products round both operands to bf16
//! and keep f32 sums. The setting is process-wide, so its tests live in this binary of their
//! own: a test elsewhere that compares f32 products exactly never runs beside one that sets it.
//! Checked here: the dispatch (a large product takes the bf16 kernel exactly while the setting
//! is in force, and f32 again once its guard drops), a training step's loss and gradients
//! against the f32 step (close, and not identical where the CPU has the kernel), and the
//! trainer holding the setting for its run only.

mod common;

use std::path::Path;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};
use common::*;
use minillm::data::batch::LmBatch;
use minillm::loss::{head_loss, TargetTerm};
use minillm::model::Model;
use minillm::ops::gemm::{matmul_parallel, MatRef};
use minillm::ops::matmul_precision::{current, scoped, MatmulPrecision};
use minillm::ops::{gemm_bf16, gemm_f32};
use minillm::train::optim::collect_grads;
use minillm::train::run_dir::RunDir;
use minillm::train::supervised::SupervisedTask;
use minillm::train::trainer::{train, TrainConfig};

/// The tests of this file change the process-wide setting one at a time.
static SETTING: Mutex<()> = Mutex::new(());

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

#[test]
fn a_large_product_takes_the_bf16_kernel_only_while_the_setting_holds() {
    let _one = SETTING.lock().unwrap();
    // Large enough for the packed paths (2²² multiply-adds and more).
    let (rows, k, cols) = (96, 320, 200);
    let (av, bv) = (values(rows * k, 1), values(k * cols, 2));
    let a = MatRef { data: &av, offset: 0, shape: (rows, k), strides: (k, 1) };
    let b = MatRef { data: &bv, offset: 0, shape: (k, cols), strides: (1, k) };
    assert!(gemm_f32::large_with_unit_strides(&a, &b));
    let product = || {
        let mut dst = vec![0f32; rows * cols];
        matmul_parallel(&mut dst, a, b, false);
        dst
    };
    let f32_result = product();
    assert_eq!(current(), MatmulPrecision::F32, "f32 is the default");
    let in_bf16 = {
        let _bf16 = scoped(MatmulPrecision::Bf16);
        product()
    };
    assert_eq!(current(), MatmulPrecision::F32, "the guard restores f32");
    assert_eq!(product(), f32_result, "f32 products again after the guard");
    if gemm_bf16::AVAILABLE {
        let mut want = vec![0f32; rows * cols];
        gemm_bf16::matmul_f32(&mut want, 0, cols, a, b, false);
        assert_eq!(in_bf16, want, "the bf16 kernel's result");
        assert_ne!(in_bf16, f32_result, "rounding to bf16 changes the product");
    } else {
        assert_eq!(in_bf16, f32_result, "without AVX512-BF16 the products stay f32");
    }
}

/// A GPT-2 whose LM head (8,192 tokens) and MLP products are large enough to take the kernel.
fn model() -> Model {
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": 8192, "n_positions": 128, "n_embd": 128,
        "n_layer": 2, "n_head": 4, "eos_token_id": 0, "pad_token_id": 0});
    Model::random(cfg, 7, &Device::Cpu, DType::F32).unwrap()
}

/// The SFT loss on a random batch of 4 × 64 tokens and its gradient for every parameter.
fn loss_and_grads(model: &Model) -> (f32, Vec<(String, Vec<f32>)>) {
    let seqs: Vec<Vec<u32>> =
        (0..4).map(|r| (0..64).map(|i| 1 + ((r * 131 + i * 71) % 8000) as u32).collect()).collect();
    let batch = LmBatch::new(&seqs, &[1; 4], 0, &Device::Cpu).unwrap();
    let w = vec![1.0 / batch.num_targets() as f32; batch.num_targets()];
    let hidden = model.lm.forward_hidden(&batch.input_ids, &batch.mask, None).unwrap();
    let hidden = batch.gather(&hidden).unwrap();
    let ce = TargetTerm::CrossEntropy { weights: &w, coef: 1.0 };
    let loss = head_loss(&hidden, model.lm.lm_head_weight(), &batch.targets, ce, None, None).unwrap().loss;
    let (names, vars): (Vec<String>, Vec<_>) =
        model.lm.params().trainable().map(|(n, v)| (n.to_string(), v.clone())).unzip();
    let grads = collect_grads(&loss.backward().unwrap(), &vars);
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (
        loss.to_scalar::<f32>().unwrap(),
        names
            .into_iter()
            .zip(grads.iter().map(|g| flat(g.as_ref().expect("every parameter has a gradient"))))
            .collect(),
    )
}

#[test]
fn a_bf16_training_step_stays_close_to_the_f32_step() {
    let _one = SETTING.lock().unwrap();
    let model = model();
    let (loss, grads) = loss_and_grads(&model);
    let (loss_bf16, grads_bf16) = {
        let _bf16 = scoped(MatmulPrecision::Bf16);
        loss_and_grads(&model)
    };
    // bf16 keeps 8 bits of each operand: a relative error of ~2⁻⁹ per term, which averages
    // down over the sums.
    assert!((loss - loss_bf16).abs() <= 1e-3 * loss.abs(), "loss {loss} against {loss_bf16} in bf16");
    let mut moved = false;
    for ((name, g), (_, gb)) in grads.iter().zip(&grads_bf16) {
        let norm = g.iter().map(|v| v * v).sum::<f32>().sqrt();
        let diff = g.iter().zip(gb).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        assert!(diff <= 2e-2 * norm + 1e-7, "{name}: gradient moved by {diff} of {norm}");
        moved |= diff > 0.0;
    }
    assert_eq!(moved, gemm_bf16::AVAILABLE, "the bf16 products change the gradients exactly where the CPU has them");
}

#[test]
fn the_trainer_holds_the_setting_for_its_run_only() {
    let _one = SETTING.lock().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir: &Path = tmp.path();
    let student = tiny_model_dir(&dir.join("student"), "gpt2", 32, 1, 3);
    let c =
        TrainConfig { max_steps: 2, batch_size: 4, matmul_precision: MatmulPrecision::Bf16, ..TrainConfig::default() };
    // Records the precision in force whenever the trainer asks for a micro-batch's loss.
    let mut seen = vec![];
    let sft = SupervisedTask::new(letters_examples(dir, 16, 1), letters_examples(dir, 8, 2), 1, None);
    let mut task = HookedTask::new(sft, |_, loss| {
        seen.push(current());
        Ok(loss)
    });
    let model = minillm::model::load_model(&student, &Device::Cpu, DType::F32).unwrap();
    let run = RunDir::new(&dir.join("run")).unwrap();
    train(&model, &mut task, &c, &run, &std::sync::atomic::AtomicBool::new(false)).unwrap();
    drop(task);
    let want = if gemm_bf16::AVAILABLE { MatmulPrecision::Bf16 } else { MatmulPrecision::F32 };
    assert_eq!(seen, vec![want; 2], "every micro-batch's loss under the run's setting");
    assert_eq!(current(), MatmulPrecision::F32, "the setting ends with the run");
    // The run's settings name it; f32, the default, stays unwritten (older runs keep their
    // identity).
    let toml = |c: &TrainConfig| toml::to_string(c).unwrap();
    assert!(toml(&c).contains("matmul_precision = \"bf16\""), "{}", toml(&c));
    assert!(!toml(&TrainConfig::default()).contains("matmul_precision"));
    let parsed: TrainConfig = toml::from_str("matmul_precision = \"bf16\"").unwrap();
    assert_eq!(parsed.matmul_precision, MatmulPrecision::Bf16);
}
