//! DistiLLM's adaptive off-policy schedule: θ follows the released rule on a scripted sequence
//! of validation losses; each step's source (fresh student samples, the replay buffer, the
//! data) has the released probabilities; the buffer keeps its capacity and replays without
//! replacement; the schedule survives a checkpoint; a short run lowers its skew divergence.

mod common;

use candle_core::{DType, Device};
use common::*;
use minillm::train::distillm::{AdaptiveOffPolicy, DistillmConfig, ReplayRatio};
use minillm::train::responses::ResponseSource;
use minillm::train::supervised::{KdTerm, SupervisedTask};
use minillm::train::trainer::Task;

/// Start 3.0; +0.1 needed over the *recorded* loss, which moves only when θ rises.
#[test]
fn threshold_follows_the_released_rule() {
    let mut a = AdaptiveOffPolicy::new(DistillmConfig::default(), 0, 100);
    let script = [
        (3.0, 0.0),  // recorded
        (2.9, 0.0),  // better: no change
        (3.05, 0.0), // up 0.05 from 3.0: below ε
        (3.2, 0.1),  // up 0.2: raise, record 3.2
        (3.25, 0.1), // up 0.05 from 3.2
        (3.31, 0.2), // up 0.11: raise, record 3.31
        (1.0, 0.2),
    ];
    for (k, (loss, want)) in script.iter().enumerate() {
        a.observe_validation(*loss);
        assert!((a.threshold() - want).abs() < 1e-12, "validation {k} ({loss}): θ = {}", a.threshold());
    }
    let mut b = AdaptiveOffPolicy::new(DistillmConfig { init_threshold: 0.95, ..DistillmConfig::default() }, 0, 100);
    for loss in [1.0, 2.0, 3.0] {
        b.observe_validation(loss);
    }
    assert_eq!(b.threshold(), 1.0, "θ is capped at 1");
}

fn shares(a: &AdaptiveOffPolicy, steps: usize) -> (f64, f64, f64) {
    let mut c = [0usize; 3];
    for step in 0..steps {
        match a.source(step) {
            ResponseSource::Student => c[0] += 1,
            ResponseSource::Replay => c[1] += 1,
            ResponseSource::Data => c[2] += 1,
            ResponseSource::Teacher => panic!("DistiLLM never samples the teacher"),
        }
    }
    let n = steps as f64;
    (c[0] as f64 / n, c[1] as f64 / n, c[2] as f64 / n)
}

/// θ = 0: always the data. θ = 0.6, buffer not full: fresh samples with probability θ. Buffer
/// full, decreasing ratio over T steps: fresh samples with mean probability θ/2, replay θ/2,
/// data 1 − θ; constant ratio the same split; each within 4 standard errors of 4,000 steps.
#[test]
fn each_step_draws_its_source_with_the_released_probabilities() {
    let steps = 4000;
    let se = |p: f64| 4.0 * (p * (1.0 - p) / steps as f64).sqrt();
    let zero = AdaptiveOffPolicy::new(DistillmConfig::default(), 1, steps);
    assert_eq!(shares(&zero, 500), (0.0, 0.0, 1.0));
    let cfg = DistillmConfig { init_threshold: 0.6, capacity: 8, ..DistillmConfig::default() };
    let empty = AdaptiveOffPolicy::new(cfg.clone(), 1, steps);
    let (s, r, d) = shares(&empty, steps);
    assert!((s - 0.6).abs() < se(0.6) && r == 0.0 && (d - 0.4).abs() < se(0.4), "not full: {s} {r} {d}");
    for ratio in [ReplayRatio::Decreasing, ReplayRatio::Constant] {
        let mut full = AdaptiveOffPolicy::new(DistillmConfig { replay_ratio: ratio, ..cfg.clone() }, 1, steps);
        full.remember((0..8u32).map(|i| (vec![i], vec![i + 1])));
        let (s, r, d) = shares(&full, steps);
        assert!((s - 0.3).abs() < se(0.3), "{ratio:?}: fresh share {s}");
        assert!((r - 0.3).abs() < se(0.3), "{ratio:?}: replay share {r}");
        assert!((d - 0.4).abs() < se(0.4), "{ratio:?}: data share {d}");
    }
    let early = AdaptiveOffPolicy::new(DistillmConfig { replay_ratio: ReplayRatio::Increasing, ..cfg }, 1, steps);
    assert_eq!(early.sampling_share(0), 0.0);
    assert!((early.sampling_share(steps / 2) - 0.3).abs() < 1e-12);
}

#[test]
fn the_buffer_keeps_its_capacity_and_replays_without_replacement() {
    let mut a = AdaptiveOffPolicy::new(DistillmConfig { capacity: 5, ..DistillmConfig::default() }, 2, 10);
    a.remember((0..7u32).map(|i| (vec![i], vec![100 + i])));
    assert_eq!(a.buffered(), 5);
    let drawn = a.replay(5, 3, 0);
    let mut firsts: Vec<u32> = drawn.iter().map(|(p, _)| p[0]).collect();
    firsts.sort();
    assert_eq!(firsts, vec![2, 3, 4, 5, 6], "the two oldest were dropped; no pair twice");
    assert!(drawn.iter().all(|(p, r)| r[0] == 100 + p[0]));
    assert_eq!(a.replay(3, 3, 0), a.replay(3, 3, 0), "replay is deterministic per (step, micro-batch)");
    assert_ne!(a.replay(3, 3, 0), a.replay(3, 4, 0));
}

/// A short `distillm` run on tiny models with θ starting at 0.5: fresh and replayed student
/// samples both reach the loss, the validation skew KL falls, and the schedule (θ, recorded
/// loss, buffer) is part of the checkpointed task state.
#[test]
fn distillm_trains_on_fresh_and_replayed_samples_and_checkpoints_its_schedule() {
    use minillm::model::load_model;
    use minillm::train::run_dir::RunDir;
    use minillm::train::trainer::{train, TrainConfig};
    let tmp = tempfile::tempdir().unwrap();
    let data = |n: usize, seed: u64| letters_examples(tmp.path(), n, seed);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let teacher_best = letters_teacher(tmp.path(), 42);

    let cfg = DistillmConfig { init_threshold: 0.5, capacity: 16, max_new_tokens: 12, ..DistillmConfig::default() };
    let make = || {
        let teacher = load_model(&teacher_best, &Device::Cpu, DType::F32).unwrap();
        SupervisedTask::new(data(128, 3), data(16, 4), 5, Some(KdTerm::new(teacher, cfg.kd_ratio, cfg.divergence)))
            .with_adaptive(AdaptiveOffPolicy::new(cfg.clone(), 5, 30), cfg.sampling(128))
    };
    let mut task = make();
    let student =
        load_model(&tiny_model_dir(&tmp.path().join("s"), "gpt2", 32, 1, 41), &Device::Cpu, DType::F32).unwrap();
    let before = task.validate(&student, 8).unwrap()["val_kd"];
    let mut task = make();
    let c = TrainConfig {
        lr: 3e-3,
        max_steps: 30,
        batch_size: 8,
        eval_interval: 10,
        save_interval: 30,
        ..TrainConfig::default()
    };
    let run = RunDir::new(&tmp.path().join("distillm")).unwrap();
    let out = train(&student, &mut task, &c, &run, &stop).unwrap();
    let after = out.evals.last().unwrap().1["val_kd"];
    assert!(after < 0.7 * before, "validation skew KL {before} → {after}");
    let rows: Vec<serde_json::Value> =
        std::fs::read_to_string(run.metrics()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let count = |key: &str| rows.iter().filter(|r| r[key].as_f64() == Some(1.0)).count();
    assert!(count("on_policy") > 0 && count("replay") > 0, "fresh {} replayed {}", count("on_policy"), count("replay"));
    assert!(task.adaptive().unwrap().buffered() > 0);
    let mut restored = make();
    restored.load_state(task.state().unwrap()).unwrap();
    assert_eq!(restored.adaptive(), task.adaptive(), "the schedule is restored from the task state");
}
