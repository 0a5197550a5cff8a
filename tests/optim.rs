//! AdamW + gradient clipping + schedule equal PyTorch's `AdamW`, `clip_grad_norm_` and a
//! `LambdaLR` warm-up/cosine schedule (fixture from scripts/make_loss_fixtures.py).

mod common;

use candle_core::{Device, Var};
use minillm::train::optim::{clip_grad_norm, collect_grads, AdamW, AdamWConfig, Schedule};

/// Gradients exactly `g` for each `var`: the backward of `Σ var ⊙ g`.
fn grads_equal_to(pairs: &[(&Var, &candle_core::Tensor)]) -> Vec<Option<candle_core::Tensor>> {
    let mut loss = candle_core::Tensor::zeros((), candle_core::DType::F32, &Device::Cpu).unwrap();
    for (v, g) in pairs {
        loss = (loss + (v.as_tensor() * *g).unwrap().sum_all().unwrap()).unwrap();
    }
    collect_grads(&loss.backward().unwrap(), pairs.iter().map(|(v, _)| *v))
}

#[test]
fn adamw_with_clipping_and_schedule_equals_pytorch() {
    let fx = candle_core::safetensors::load(common::fixtures().join("losses/adamw.safetensors"), &Device::Cpu).unwrap();
    let w = Var::from_tensor(&fx["w0"]).unwrap();
    let b = Var::from_tensor(&fx["b0"]).unwrap();
    let cfg = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new([("w", &w), ("b", &b)], cfg).unwrap();
    let sched = Schedule::Cosine { warmup: 2, total: Some(5), min_lr: 0.01 };
    for k in 0..5 {
        let mut grads = grads_equal_to(&[(&w, &fx[&format!("gw{k}")]), (&b, &fx[&format!("gb{k}")])]);
        let norm = clip_grad_norm(&mut grads, 1.5).unwrap();
        let want_norm = fx[&format!("norm{k}")].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((norm - want_norm).abs() < 1e-5, "step {k}: norm {norm} vs {want_norm}");
        opt.step(&grads, sched.lr(0.1, k, 5)).unwrap();
        for (var, key) in [(&w, "w"), (&b, "b")] {
            let got = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = fx[&format!("{key}{}", k + 1)].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let d = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(d < 1e-6, "step {k} {key}: max |Δ| = {d}");
        }
    }
    // The first step of a warm-up uses lr 0 (transformers' schedulers), so w1 = w0 up to decay 0.
    assert_eq!(fx["w1"].to_vec2::<f32>().unwrap(), fx["w0"].to_vec2::<f32>().unwrap());
}

#[test]
fn schedules_follow_their_definitions() {
    let c = Schedule::Constant { warmup: 4 };
    assert_eq!(c.lr(1.0, 0, 1), 0.0);
    assert_eq!(c.lr(1.0, 2, 1), 0.5);
    assert_eq!(c.lr(1.0, 4, 1), 1.0);
    assert_eq!(c.lr(1.0, 1000, 1), 1.0);
    let s = Schedule::Cosine { warmup: 0, total: Some(10), min_lr: 0.1 };
    assert!((s.lr(1.0, 0, 1) - 1.0).abs() < 1e-12);
    assert!((s.lr(1.0, 5, 1) - 0.55).abs() < 1e-12);
    assert!((s.lr(1.0, 10, 1) - 0.1).abs() < 1e-12);
    assert!((s.lr(1.0, 20, 1) - 0.1).abs() < 1e-12);
    // Without `total` the cosine spans the run's max_steps (a shorter run decays fully).
    let d = Schedule::Cosine { warmup: 0, total: None, min_lr: 0.1 };
    assert!((d.lr(1.0, 2, 4) - 0.55).abs() < 1e-12);
    assert!((d.lr(1.0, 4, 4) - 0.1).abs() < 1e-12);
    assert_eq!(d.lr(1.0, 5, 10), s.lr(1.0, 5, 1));
    let shipped = minillm::recipe::RunConfig::load(
        Some(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/gpt2-sft.toml")),
        &["train.max_steps=4".into()],
    )
    .unwrap();
    let t = &shipped.train;
    assert_eq!(t.schedule.lr(t.lr, 3, t.max_steps), t.schedule.lr(t.lr, 6, 8), "shipped config follows max_steps");
}

#[test]
fn optimizer_state_round_trips() {
    let w =
        Var::from_tensor(&candle_core::Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap()).unwrap();
    let mut opt = AdamW::new([("w", &w)], AdamWConfig::default()).unwrap();
    let grads =
        grads_equal_to(&[(&w, &candle_core::Tensor::ones((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap())]);
    opt.step(&grads, 0.1).unwrap();
    let (state, step) = opt.state();
    let mut fresh = AdamW::new([("w", &w)], AdamWConfig::default()).unwrap();
    fresh.load_state(&state, step).unwrap();
    assert_eq!(fresh.steps_taken(), 1);
    let mut missing = state.clone();
    missing.remove("m.w");
    assert!(fresh.load_state(&missing, 1).unwrap_err().to_string().contains("m.w"));
}
