//! The speed targets' work on small models, the same work as `scripts/bench_reference.py`
//! does in PyTorch (see BENCHMARKS.md).
//!
//! SFT step: GPT-2 (4 layers, width 256, 4 heads, vocabulary 8192), batch 8 × 128 tokens,
//! forward + backward + AdamW. Distill iteration: student GPT-2 (2 layers, width 128), teacher
//! GPT-2 (4 layers, width 256); 256 teacher-mixed rollouts of 32 new tokens from 32-token
//! prompts, then 4 inner epochs of minibatches of 8 (128 updates) with the PG, single-step and
//! PT (8 × 128) terms. Decoding: the same two models sampling 32 rows × 128 new tokens.
//! Matmul: the SFT step's shapes, for the machine's matmul rate.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use minillm::data::batch::LmBatch;
use minillm::generate::{generate_mixed, row_rngs, MixedSampling};
use minillm::loss::{head_loss, TargetTerm};
use minillm::train::minillm::{DistillConfig, DistillData, DistillTask};
use minillm::train::optim::{AdamW, AdamWConfig};
use minillm::train::trainer::{Task, Window};
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;
use common::{gpt2, random_ids, update};

/// Rollouts per MiniLLM iteration (the released default).
const ROLLOUTS: usize = 256;

fn sft_step(c: &mut Criterion) {
    minillm::runtime::configure();
    let model = gpt2(4, 256, 1);
    let mut opt = AdamW::new(model.lm.params().trainable(), AdamWConfig::default()).unwrap();
    let seqs = random_ids(8, 128, 2);
    let batch = LmBatch::new(&seqs, &[1; 8], 0, &Device::Cpu).unwrap();
    let w = vec![1.0 / batch.num_targets() as f32; batch.num_targets()];
    let mut group = c.benchmark_group("train");
    group.sample_size(20);
    group.bench_function("sft_step gpt2-4x256 v8192 b8x128", |b| {
        b.iter(|| {
            // As the trainer does it: the LM head and cross-entropy fused, chunked.
            let hidden = batch.gather(&model.lm.forward_hidden(&batch.input_ids, &batch.mask, None).unwrap()).unwrap();
            let head = model.lm.lm_head_weight();
            let ce = TargetTerm::CrossEntropy { weights: &w, coef: 1.0 };
            let loss = head_loss(&hidden, head, &batch.targets, ce, None, None).unwrap().loss;
            update(&model, &mut opt, &loss);
        })
    });
    group.finish();
}

fn distill_iteration(c: &mut Criterion) {
    minillm::runtime::configure();
    let student = gpt2(2, 128, 3);
    let cfg = DistillConfig {
        num_rollouts: ROLLOUTS,
        rollout_batch: 32,
        inner_epochs: 4,
        max_new_tokens: 32,
        max_len: 256,
        valid_rollouts: 0,
        ..DistillConfig::default()
    };
    let data = DistillData { prompts: random_ids(512, 32, 4), valid: Vec::new(), corpus: random_ids(512, 128, 5) };
    let mut task = DistillTask::new(cfg, gpt2(4, 256, 6), data, 7).unwrap();
    let window = Window { batch_size: 8, grad_accum: 1 };
    let mut opt = AdamW::new(student.lm.params().trainable(), AdamWConfig::default()).unwrap();
    let updates = ROLLOUTS / 8 * 4;
    let mut group = c.benchmark_group("distill");
    group.sample_size(10).measurement_time(Duration::from_secs(150));
    group.bench_function(
        format!("iteration {ROLLOUTS} rollouts x 32 tokens, 4 inner epochs ({updates} updates)"),
        |b| {
            b.iter(|| {
                // The first step collects the buffer; all of them update on it.
                for step in 0..updates {
                    task.begin_step(&student, step, window).unwrap();
                    let (loss, _) = task.micro_loss(&student, 0).unwrap();
                    update(&student, &mut opt, &loss);
                }
            })
        },
    );
    group.finish();
}

/// Teacher-mixed sampling as the rollouts run it: student and teacher decode 32 rows in
/// lockstep from 32-token prompts, 128 new tokens (no EOS stop, so both sides do the same
/// work), the teacher's final hidden states kept.
fn mixed_decoding(c: &mut Criterion) {
    minillm::runtime::configure();
    let (student, teacher) = (gpt2(2, 128, 3), gpt2(4, 256, 6));
    let prompts = random_ids(32, 32, 4);
    let cfg = MixedSampling {
        alpha: 0.2,
        max_new_tokens: 128,
        max_length: None,
        keep_teacher_hidden: true,
        record_forward_kl: false,
    };
    let mut group = c.benchmark_group("decode");
    group.sample_size(10).throughput(criterion::Throughput::Elements(32 * 128));
    group.bench_function("teacher-mixed b32 x 128 new tokens", |b| {
        b.iter(|| {
            let mut rngs = row_rngs(1, 0..32);
            let r = generate_mixed(student.lm.as_ref(), teacher.lm.as_ref(), &prompts, &[], 0, &cfg, &mut rngs);
            assert_eq!(r.unwrap().logq[0].len(), 128);
        })
    });
    group.finish();
}

/// The matmul shapes of the SFT step (tokens × width × out), for its FLOP/s against the
/// machine's matmul rate.
fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    for (m, k, n) in MATMUL_SHAPES {
        let a = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, (k, n), &Device::Cpu).unwrap();
        group.throughput(criterion::Throughput::Elements((2 * m * k * n) as u64));
        group.bench_function(format!("{m}x{k}x{n}"), |bench| bench.iter(|| a.matmul(&b).unwrap()));
    }
    group.finish();
}

/// (rows, inner, columns): the LM head, an MLP up and down projection, the fused q/k/v.
const MATMUL_SHAPES: [(usize, usize, usize); 4] =
    [(1024, 256, 8192), (1024, 256, 1024), (1024, 1024, 256), (1024, 256, 768)];

criterion_group!(benches, sft_step, distill_iteration, mixed_decoding, matmul);
criterion_main!(benches);
