//! The real-size speed targets (BENCHMARKS.md "Real sizes"), the same work as
//! `scripts/bench_reference.py --real DIR` does in PyTorch:
//!
//! - SFT step of GPT-2 124M (vocabulary 50,257) at batch 4 × 298 and 8 × 512 tokens: forward,
//!   the fused LM head + cross-entropy, backward, AdamW; in f32 and with
//!   `train.matmul_precision = "bf16"` (PyTorch's side: `torch.autocast` to bf16).
//! - Decoding as evaluation runs it: GPT-2 124M samples 64 new tokens for 16 and 64 rows from
//!   64-token prompts (no EOS stop, so both sides do the same work); and up to 128 tokens for
//!   64 rows that stop at random steps (1,000 stop ids), in generated tokens per second.
//! - Teacher-mixed rollouts: the 124M student and a 355M teacher decode 16 rows in lockstep,
//!   32 new tokens, the teacher's final hidden state kept.
//! - The matrix products of one decoding step alone, 1 to 64 rows (random weights of GPT-2
//!   124M's shapes), in weight bytes per second.
//! - The matrix products of one GPT-2 XL layer over 1,024 rows (a 1.5B teacher's forward over
//!   a batch: prefill, the PT term), in FLOP per second: bf16 weights by the bf16 product
//!   (`ops::gemm_bf16`) and f32 weights by `gemm`; `bench_reference.py --matmul-real` times
//!   `torch.mm` on the same shapes in both dtypes.
//!
//! Decoding and rollouts also run with bf16 weights (`eval --dtype bf16`, `--teacher-dtype
//! bf16`: bf16 matrices, f32 activations), beside PyTorch's bf16 models, and decoding with f16
//! weights (no PyTorch side: its CPU f16 products are not a fair baseline).
//!
//! The SFT steps, decoding and rollouts run on a pool worker, as the commands do
//! (`runtime::on_workers`).
//!
//! The models come from `scripts/make_real_size_models.sh DIR 124m 355m`; set
//! `MINILLM_REAL_SIZES=DIR` (default `/tmp/realsize`). Benches whose models are missing are
//! skipped with a message (the decoding products need none).

use candle_core::{DType, Device};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use minillm::data::batch::LmBatch;
use minillm::generate::{generate, generate_mixed, row_rngs, MixedSampling, SamplingConfig};
use minillm::loss::{head_loss, TargetTerm};
use minillm::model::{load_model_as, Model, Weights};
use minillm::ops::matmul_precision::{scoped, MatmulPrecision};
use minillm::runtime::on_workers;
use minillm::train::optim::{AdamW, AdamWConfig};
use std::path::PathBuf;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod common;

/// GPT-2's vocabulary.
const VOCAB: u32 = 50_257;

fn model(size: &str, weights: Weights) -> Option<Model> {
    model_in(size, weights, DType::F32)
}

/// The model loaded in `dtype` (bf16 or f16 and frozen: 16-bit matrices, f32 activations).
fn model_in(size: &str, weights: Weights, dtype: DType) -> Option<Model> {
    let root = std::env::var_os("MINILLM_REAL_SIZES").map_or_else(|| PathBuf::from("/tmp/realsize"), PathBuf::from);
    let dir = root.join(format!("gpt2-{size}"));
    if !dir.join("model.safetensors").is_file() {
        eprintln!("{} missing: skipped (scripts/make_real_size_models.sh {} {size})", dir.display(), root.display());
        return None;
    }
    Some(load_model_as(&dir, &Device::Cpu, dtype, weights).unwrap())
}

/// `n` sequences of `len` random tokens other than GPT-2's EOS (50,256).
fn random_ids(n: usize, len: usize, seed: u64) -> Vec<Vec<u32>> {
    common::random_ids_in(n, len, seed, 0..VOCAB - 1)
}

fn sft_step(c: &mut Criterion) {
    minillm::runtime::configure();
    let Some(model) = model("124m", Weights::Trainable) else { return };
    let mut opt = AdamW::new(model.lm.params().trainable(), AdamWConfig::default()).unwrap();
    let mut group = c.benchmark_group("real");
    group.sample_size(10).measurement_time(Duration::from_secs(60));
    // `train.matmul_precision`: f32, and bf16 products (the same as f32 without AVX512-BF16).
    let precisions = [(MatmulPrecision::F32, ""), (MatmulPrecision::Bf16, " bf16-products")];
    for ((rows, len), (precision, suffix)) in [(4, 298), (8, 512)].into_iter().flat_map(|s| precisions.map(|p| (s, p)))
    {
        let seqs = random_ids(rows, len, 2);
        let batch = LmBatch::new(&seqs, &vec![1; rows], 0, &Device::Cpu).unwrap();
        let w = vec![1.0 / batch.num_targets() as f32; batch.num_targets()];
        let _precision = scoped(precision);
        group.bench_function(format!("sft_step gpt2-124m b{rows}x{len}{suffix}"), |b| {
            b.iter(|| {
                on_workers(|| {
                    let hidden = model.lm.forward_hidden(&batch.input_ids, &batch.mask, None).unwrap();
                    let hidden = batch.gather(&hidden).unwrap();
                    let ce = TargetTerm::CrossEntropy { weights: &w, coef: 1.0 };
                    let loss =
                        head_loss(&hidden, model.lm.lm_head_weight(), &batch.targets, ce, None, None).unwrap().loss;
                    common::update(&model, &mut opt, &loss);
                })
            })
        });
    }
    group.finish();
}

fn decoding(c: &mut Criterion) {
    minillm::runtime::configure();
    let (Some(model), Some(model_bf16), Some(model_f16)) = (
        model("124m", Weights::Frozen),
        model_in("124m", Weights::Frozen, DType::BF16),
        model_in("124m", Weights::Frozen, DType::F16),
    ) else {
        return;
    };
    let cfg = SamplingConfig {
        max_new_tokens: 64,
        max_length: None,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        no_repeat_ngram_size: 0,
    };
    let mut group = c.benchmark_group("real");
    group.sample_size(10).measurement_time(Duration::from_secs(30));
    for (rows, model, dtype) in [
        (16, &model, ""),
        (64, &model, ""),
        (16, &model_bf16, "-bf16"),
        (64, &model_bf16, "-bf16"),
        (16, &model_f16, "-f16"),
    ] {
        let prompts = random_ids(rows, 64, 3);
        group.throughput(Throughput::Elements((rows * 64) as u64));
        group.bench_function(format!("decode gpt2-124m{dtype} b{rows} 64+64"), |b| {
            b.iter(|| {
                let mut rngs = row_rngs(1, 0..rows as u64);
                let out = on_workers(|| generate(model.lm.as_ref(), &prompts, &[], 0, &cfg, &mut rngs)).unwrap();
                assert_eq!(out.responses[0].len(), 64);
            })
        });
    }
    // Rows that stop: one token id in fifty (1,000 ids) ends a row, so with random weights (near
    // uniform next-token distributions) about 2% of the rows stop at each step and 7% reach
    // 128 tokens, as real responses end at many lengths. Finished rows leave the batch; the
    // throughput counts the tokens generated (the same each iteration: the streams are fixed).
    let stops: Vec<u32> = (0..VOCAB - 257).step_by(50).collect();
    let stopping = SamplingConfig { max_new_tokens: 128, ..cfg.clone() };
    let prompts = random_ids(64, 64, 3);
    let run = || {
        let mut rngs = row_rngs(1, 0..64);
        on_workers(|| generate(model.lm.as_ref(), &prompts, &stops, 0, &stopping, &mut rngs)).unwrap()
    };
    let tokens: usize = run().responses.iter().map(Vec::len).sum();
    group.throughput(Throughput::Elements(tokens as u64));
    group.bench_function("decode gpt2-124m b64 64+128 stopping", |b| b.iter(run));
    // A trainable student (on-policy collection, validation samples) decodes from a packed
    // snapshot of its weights, taken per call as training takes one per collection; without
    // the snapshot it would read its weights in place (the second row).
    if let Some(student) = self::model("124m", Weights::Trainable) {
        let prompts = random_ids(16, 64, 3);
        group.throughput(Throughput::Elements(16 * 64));
        group.bench_function("decode gpt2-124m-trainable-snapshot b16 64+64", |b| {
            b.iter(|| {
                let mut rngs = row_rngs(1, 0..16);
                let out = on_workers(|| {
                    let snapshot = student.decoding_snapshot()?.expect("a 124M model is snapshotted");
                    generate(snapshot.lm.as_ref(), &prompts, &[], 0, &cfg, &mut rngs)
                })
                .unwrap();
                assert_eq!(out.responses[0].len(), 64);
            })
        });
        group.bench_function("decode gpt2-124m-trainable-in-place b16 64+64", |b| {
            b.iter(|| {
                let mut rngs = row_rngs(1, 0..16);
                let out = on_workers(|| generate(student.lm.as_ref(), &prompts, &[], 0, &cfg, &mut rngs)).unwrap();
                assert_eq!(out.responses[0].len(), 64);
            })
        });
    }
    group.finish();
}

fn mixed_rollouts(c: &mut Criterion) {
    minillm::runtime::configure();
    let (Some(student), Some(teacher), Some(teacher_bf16)) = (
        model("124m", Weights::Frozen),
        model("355m", Weights::Frozen),
        model_in("355m", Weights::Frozen, DType::BF16),
    ) else {
        return;
    };
    let cfg = MixedSampling {
        alpha: 0.2,
        max_new_tokens: 32,
        max_length: None,
        keep_teacher_hidden: true,
        record_forward_kl: false,
    };
    let prompts = random_ids(16, 64, 4);
    let mut group = c.benchmark_group("real");
    group.sample_size(10).measurement_time(Duration::from_secs(30)).throughput(Throughput::Elements(16 * 32));
    for (teacher, dtype) in [(&teacher, ""), (&teacher_bf16, "-bf16")] {
        group.bench_function(format!("teacher-mixed gpt2-124m + gpt2-355m{dtype} b16 64+32"), |b| {
            b.iter(|| {
                let mut rngs = row_rngs(1, 0..16);
                let r = on_workers(|| {
                    generate_mixed(student.lm.as_ref(), teacher.lm.as_ref(), &prompts, &[], 0, &cfg, &mut rngs)
                });
                assert_eq!(r.unwrap().logq[0].len(), 32);
            })
        });
    }
    group.finish();
}

/// The matrix products of one GPT-2 124M decoding step (12 layers of `[in, out]` qkv, proj,
/// fc and fc-proj weights, then the `[out, in]` LM head: 497 MB of f32, from memory every
/// step) for 1 to 64 rows, in weight bytes per second: where the products turn from bound by
/// memory (few rows) to bound by arithmetic (BENCHMARKS.md, "Decoding's ceilings"): read in
/// place by the decoding kernel, and packed at load (`packed_f32`, a frozen f32 model's). Random
/// weights of GPT-2's shapes; needs no model directory.
fn decoding_products(c: &mut Criterion) {
    use minillm::ops::gemm::MatRef;
    use minillm::ops::packed_f32::{self, PackedF32};
    use minillm::ops::skinny;
    minillm::runtime::configure();
    const HIDDEN: usize = 768;
    let shapes = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 4 * HIDDEN), (4 * HIDDEN, HIDDEN)];
    let values = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * 7 + seed) % 13) as f32 * 0.01).collect() };
    let layers: Vec<Vec<Vec<f32>>> =
        (0..12).map(|l| shapes.iter().enumerate().map(|(s, &(k, n))| values(k * n, l * 4 + s)).collect()).collect();
    let head = values(VOCAB as usize * HIDDEN, 99);
    let pack = |w: &[f32], (k, n): (usize, usize), strides| {
        PackedF32::new(&MatRef { data: w, offset: 0, shape: (k, n), strides })
    };
    let packed: Vec<Vec<PackedF32>> =
        layers.iter().map(|l| l.iter().zip(&shapes).map(|(w, &(k, n))| pack(w, (k, n), (n, 1))).collect()).collect();
    let head_packed = pack(&head, (HIDDEN, VOCAB as usize), (1, HIDDEN));
    let bytes = 4 * (layers.iter().flatten().map(Vec::len).sum::<usize>() + head.len());
    let mut group = c.benchmark_group("real");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Bytes(bytes as u64));
    for rows in [1, 4, 8, 16, 32, 64] {
        let x = values(rows * 4 * HIDDEN, 7);
        let mut dst = vec![0f32; rows * VOCAB as usize];
        group.bench_function(format!("decoding products gpt2-124m {rows} rows"), |b| {
            b.iter(|| {
                for layer in &layers {
                    for (w, &(k, n)) in layer.iter().zip(&shapes) {
                        let x = MatRef { data: &x, offset: 0, shape: (rows, k), strides: (k, 1) };
                        let w = MatRef { data: w, offset: 0, shape: (k, n), strides: (n, 1) };
                        skinny::matmul(&mut dst, x, w, false);
                    }
                }
                let x = MatRef { data: &x, offset: 0, shape: (rows, HIDDEN), strides: (HIDDEN, 1) };
                let w = MatRef { data: &head, offset: 0, shape: (HIDDEN, VOCAB as usize), strides: (1, HIDDEN) };
                skinny::matmul(&mut dst, x, w, false);
            })
        });
        // The same products with the weights packed at load (a frozen f32 model).
        group.bench_function(format!("decoding products gpt2-124m {rows} rows packed"), |b| {
            b.iter(|| {
                for (layer, &(k, _)) in packed.iter().flatten().zip(shapes.iter().cycle()) {
                    let x = MatRef { data: &x, offset: 0, shape: (rows, k), strides: (k, 1) };
                    packed_f32::matmul_packed(&mut dst, x, layer);
                }
                let x = MatRef { data: &x, offset: 0, shape: (rows, HIDDEN), strides: (HIDDEN, 1) };
                packed_f32::matmul_packed(&mut dst, x, &head_packed);
            })
        });
    }
    group.finish();
}

/// The four products of one GPT-2 XL layer (qkv 1,600 → 4,800, attention projection 1,600 →
/// 1,600, MLP 1,600 → 6,400 → 1,600, `[in, out]` as GPT-2 stores them) over 1,024 rows, with
/// bf16 weights (`gemm_bf16`, where the build has AVX512-BF16) and with f32 weights (`gemm`).
/// Random weights; needs no model directory.
fn many_row_products(c: &mut Criterion) {
    use half::bf16;
    use minillm::ops::gemm::{matmul_parallel, MatRef};
    use minillm::ops::gemm_bf16;
    minillm::runtime::configure();
    const ROWS: usize = 1024;
    const HIDDEN: usize = 1600;
    let shapes = [(HIDDEN, 3 * HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 4 * HIDDEN), (4 * HIDDEN, HIDDEN)];
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed) % 1000) as f32 * 1e-3 - 0.5).collect()
    };
    let weights: Vec<Vec<f32>> = shapes.iter().enumerate().map(|(s, &(k, n))| values(k * n, s)).collect();
    let weights_bf16: Vec<Vec<bf16>> = weights.iter().map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect()).collect();
    let flops: usize = shapes.iter().map(|&(k, n)| 2 * ROWS * k * n).sum();
    let x = values(ROWS * 4 * HIDDEN, 7);
    let mut dst = vec![0f32; ROWS * 4 * HIDDEN];
    let mut group = c.benchmark_group("real");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).throughput(Throughput::Elements(flops as u64));
    let view = |k: usize| MatRef { data: &x, offset: 0, shape: (ROWS, k), strides: (k, 1) };
    if gemm_bf16::AVAILABLE {
        group.bench_function(format!("gpt2-xl layer products {ROWS} rows bf16"), |b| {
            b.iter(|| {
                on_workers(|| {
                    for (w, &(k, n)) in weights_bf16.iter().zip(&shapes) {
                        let w = MatRef { data: &w[..], offset: 0, shape: (k, n), strides: (n, 1) };
                        gemm_bf16::matmul(&mut dst, view(k), w);
                    }
                })
            })
        });
    }
    group.bench_function(format!("gpt2-xl layer products {ROWS} rows f32"), |b| {
        b.iter(|| {
            on_workers(|| {
                for (w, &(k, n)) in weights.iter().zip(&shapes) {
                    let w = MatRef { data: &w[..], offset: 0, shape: (k, n), strides: (n, 1) };
                    matmul_parallel(&mut dst, view(k), w, false);
                }
            })
        })
    });
    group.finish();
}

criterion_group!(benches, sft_step, decoding, mixed_rollouts, decoding_products, many_row_products);
criterion_main!(benches);
