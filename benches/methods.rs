//! One training step of each on-policy family member on the benches' small models, the same
//! work as `scripts/bench_reference.py --methods` does in PyTorch and TRL (see BENCHMARKS.md).
//!
//! Student GPT-2 (2 layers, width 128), teacher GPT-2 (4 layers, width 256), vocabulary 8192;
//! a batch of 8 prompts of 64 tokens with 64-token responses. A step is what the trainer does
//! per optimizer step: choose the responses (the data's, or 64 tokens sampled from the
//! current student), the teacher's forward, the student's forward and loss, backward, AdamW.
//! - GKD (TRL defaults β = 0.5, τ = 0.9): off-policy (λ = 0) and on-policy (λ = 1) steps.
//! - DistiLLM (skew forward KL, λ = 0.1): a data step and a student-sampled step.
//! - OPD: 8 student samples, the teacher scoring the sampled tokens, the per-token
//!   importance-sampled policy gradient (one update per collection).

use criterion::{criterion_group, criterion_main, Criterion};
use minillm::data::instruct::InstructExample;
use minillm::loss::Divergence;
use minillm::model::Model;
use minillm::train::distillm::{AdaptiveOffPolicy, DistillmConfig, ReplayRatio};
use minillm::train::gkd::{GkdConfig, ResponseSchedule};
use minillm::train::minillm::{DistillConfig, DistillData, DistillTask};
use minillm::train::optim::{AdamW, AdamWConfig};
use minillm::train::supervised::{KdTerm, SupervisedTask};
use minillm::train::trainer::{Task, Window};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{gpt2, random_ids, update};

const BATCH: usize = 8;
const PROMPT: usize = 64;
const RESPONSE: usize = 64;

/// Instruction examples: 64-token prompts, 63-token responses ending in EOS (id 0).
fn examples(n: usize) -> Vec<InstructExample> {
    let (prompts, responses) = (random_ids(n, PROMPT, 11), random_ids(n, RESPONSE - 1, 12));
    prompts
        .into_iter()
        .zip(responses)
        .enumerate()
        .map(|(i, (prompt, mut response))| {
            response.push(0);
            InstructExample { prompt, response, line: i + 1, references: Vec::new() }
        })
        .collect()
}

/// Times `steps` of `task` on a fresh student, one optimizer step per iteration.
fn bench_task(c: &mut Criterion, name: &str, mut task: impl Task) {
    let student = gpt2(2, 128, 3);
    let mut opt = AdamW::new(student.lm.params().trainable(), AdamWConfig::default()).unwrap();
    let window = Window { batch_size: BATCH, grad_accum: 1 };
    let mut step = 0;
    let mut group = c.benchmark_group("method_step");
    group.sample_size(20);
    group.bench_function(name, |b| {
        b.iter(|| {
            task.begin_step(&student, step, window).unwrap();
            let (loss, _) = task.micro_loss(&student, 0).unwrap();
            update(&student, &mut opt, &loss);
            step += 1;
        })
    });
    group.finish();
}

fn teacher() -> Model {
    gpt2(4, 256, 6)
}

fn gkd_task(lmbda: f64) -> SupervisedTask {
    let cfg = GkdConfig { lmbda, max_new_tokens: RESPONSE, ..GkdConfig::default() };
    let kd = KdTerm { temperature: cfg.temperature, ..KdTerm::new(teacher(), 1.0, cfg.divergence()) };
    SupervisedTask::new(examples(256), Vec::new(), 7, Some(kd)).with_responses(ResponseSchedule::new(
        &cfg,
        PROMPT + RESPONSE,
        7,
    ))
}

fn distillm_task(on_policy: bool) -> SupervisedTask {
    // θ = 1 with room in the buffer samples the student at every step; θ = 0 never does.
    let cfg = DistillmConfig {
        divergence: Divergence::SkewForwardKl { lambda: 0.1 },
        init_threshold: if on_policy { 1.0 } else { 0.0 },
        capacity: usize::MAX,
        replay_ratio: ReplayRatio::Constant,
        max_new_tokens: RESPONSE,
        ..DistillmConfig::default()
    };
    let sampling = cfg.sampling(PROMPT + RESPONSE);
    let kd = KdTerm::new(teacher(), cfg.kd_ratio, cfg.divergence);
    SupervisedTask::new(examples(256), Vec::new(), 7, Some(kd))
        .with_adaptive(AdaptiveOffPolicy::new(cfg, 7, 1_000_000), sampling)
}

fn opd_task() -> DistillTask {
    let cfg = DistillConfig {
        num_rollouts: BATCH,
        rollout_batch: BATCH,
        max_new_tokens: RESPONSE,
        max_len: PROMPT + RESPONSE,
        valid_rollouts: 0,
        ..DistillConfig::opd()
    };
    let data = DistillData { prompts: random_ids(256, PROMPT, 11), valid: Vec::new(), corpus: Vec::new() };
    DistillTask::new(cfg, teacher(), data, 7).unwrap()
}

fn method_steps(c: &mut Criterion) {
    minillm::runtime::configure();
    bench_task(c, "gkd off-policy (lambda 0)", gkd_task(0.0));
    bench_task(c, "gkd on-policy (lambda 1)", gkd_task(1.0));
    bench_task(c, "distillm data step", distillm_task(false));
    bench_task(c, "distillm student-sampled step", distillm_task(true));
    bench_task(c, "opd step (8 rollouts, 1 update)", opd_task());
}

criterion_group!(benches, method_steps);
criterion_main!(benches);
