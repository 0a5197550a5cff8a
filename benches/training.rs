//! One SFT step and one full MiniLLM iteration on small models, the same work as
//! `scripts/bench_reference.py` does in PyTorch (see BENCHMARKS.md).
//!
//! SFT step: GPT-2 (2 layers, width 128, 4 heads, vocabulary 8192), batch 8 × 128 tokens,
//! forward + backward + AdamW. Distill iteration: student as above, teacher GPT-2 (4 layers,
//! width 256); 32 teacher-mixed rollouts of 32 new tokens from 32-token prompts, then 4 inner
//! epochs of minibatches of 8 (16 updates) with the PG, single-step and PT (8 × 128) terms.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use minillm::data::batch::LmBatch;
use minillm::loss::head::{head_loss, DEFAULT_CHUNK_ROWS};
use minillm::model::Model;
use minillm::train::minillm::{DistillConfig, DistillData, DistillTask};
use minillm::train::optim::{collect_grads, AdamW, AdamWConfig};
use minillm::train::trainer::Task;
use rand::{Rng, SeedableRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VOCAB: usize = 8192;

fn gpt2(layers: usize, width: usize, seed: u64) -> Model {
    let cfg = serde_json::json!({"model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 512, "n_embd": width,
        "n_layer": layers, "n_head": 4, "eos_token_id": 0, "pad_token_id": 0});
    Model::random(cfg, seed, &Device::Cpu, DType::F32).unwrap()
}

fn random_ids(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (0..len).map(|_| rng.random_range(1..VOCAB as u32)).collect()).collect()
}

fn update(model: &Model, opt: &mut AdamW, loss: &Tensor) {
    let store = loss.backward().unwrap();
    let vars: Vec<_> = model.lm.params().iter().map(|(_, v)| v.clone()).collect();
    opt.step(&collect_grads(&store, &vars), 1e-4).unwrap();
}

fn sft_step(c: &mut Criterion) {
    minillm::runtime::configure();
    let model = gpt2(4, 256, 1);
    let mut opt = AdamW::new(model.lm.params().iter(), AdamWConfig::default()).unwrap();
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
            let loss = head_loss(&hidden, head, &batch.targets, &w, 1.0, None, DEFAULT_CHUNK_ROWS).unwrap().loss;
            update(&model, &mut opt, &loss);
        })
    });
    group.finish();
}

fn distill_iteration(c: &mut Criterion) {
    minillm::runtime::configure();
    let student = gpt2(2, 128, 3);
    let cfg = DistillConfig {
        num_rollouts: 32,
        rollout_batch: 32,
        inner_epochs: 4,
        max_new_tokens: 32,
        max_len: 256,
        valid_rollouts: 0,
        ..DistillConfig::default()
    };
    let data = DistillData { prompts: random_ids(64, 32, 4), valid: Vec::new(), corpus: random_ids(64, 128, 5) };
    let mut task = DistillTask::new(cfg, gpt2(4, 256, 6), data, vec![0], 0, Device::Cpu, 8, 1, 7).unwrap();
    let mut opt = AdamW::new(student.lm.params().iter(), AdamWConfig::default()).unwrap();
    let mut group = c.benchmark_group("distill");
    group.sample_size(10);
    group.bench_function("iteration 32 rollouts x 32 tokens, 4 inner epochs (16 updates)", |b| {
        b.iter(|| {
            // Steps 0..16: the first collects the buffer, all 16 update on it.
            for step in 0..16 {
                let norm = task.begin_step(&student, step).unwrap();
                let (loss, _) = task.micro_loss(&student, 0, norm).unwrap();
                update(&student, &mut opt, &loss);
            }
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

criterion_group!(benches, sft_step, distill_iteration, matmul);
criterion_main!(benches);
