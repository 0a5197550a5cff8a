//! Frozen models (teachers and inference commands): plain-tensor parameters whose forward
//! passes record no autograd graph, the same outputs as the trainable load, lower-precision
//! weights within a stated distance of f32, and checkpoints read without a memory map.

mod common;

use candle_core::{DType, Device, Tensor};
use minillm::model::{load_model, load_model_as, save_model, AttentionMask, Model, Weights};

fn ids(rows: usize, len: usize) -> Tensor {
    let v: Vec<u32> = (0..rows * len).map(|i| ((i * 37 + 11) % 383 + 1) as u32).collect();
    Tensor::from_vec(v, (rows, len), &Device::Cpu).unwrap()
}

fn logits(m: &Model, input: &Tensor) -> Tensor {
    let (b, t) = input.dims2().unwrap();
    let h = m.lm.forward_hidden(input, &AttentionMask::full(b, t), None).unwrap();
    m.lm.logits(&h).unwrap()
}

#[test]
fn a_frozen_model_computes_the_same_logits_without_a_graph() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2", "llama"] {
        let dir = common::tiny_model_dir(&tmp.path().join(family), family, 64, 2, 3);
        let trainable = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
        let frozen = load_model_as(&dir, &Device::Cpu, DType::F32, Weights::Frozen).unwrap();
        let input = ids(3, 40);
        let (a, b) = (logits(&trainable, &input), logits(&frozen, &input));
        assert!(a.track_op(), "{family}: the trainable model's logits carry a graph");
        assert!(!b.track_op(), "{family}: the frozen model's logits carry a graph");
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{family}: frozen and trainable logits differ");
        assert!(frozen.lm.params().is_frozen() && frozen.lm.params().trainable().next().is_none());
        assert_eq!(frozen.lm.params().num_elements(), trainable.lm.params().num_elements());
        let err = frozen.load_weights(&dir).unwrap_err().to_string();
        assert!(err.contains("frozen"), "{err}");
    }
}

/// A frozen f32 model packs its matrices of 2^18 entries and more for decoding's products
/// (`ops::packed_f32`), lists them in the checkpoint's layout, and computes the trainable
/// model's logits up to the order of the f32 sums: at decoding's few rows (the packed kernel)
/// and at many (`gemm` on the weight unpacked a group of panels at a time).
#[test]
fn a_wide_frozen_f32_model_packs_its_matrices_and_computes_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_dir(&tmp.path().join("gpt2"), "gpt2", 512, 1, 3);
    let trainable = load_model(&dir, &Device::Cpu, DType::F32).unwrap();
    let frozen = load_model_as(&dir, &Device::Cpu, DType::F32, Weights::Frozen).unwrap();
    let c_fc = frozen.lm.params().get("transformer.h.0.mlp.c_fc.weight").unwrap().clone();
    assert_eq!(c_fc.dims(), [512, 2048]);
    assert!(c_fc.is_contiguous(), "a packed weight is listed unpacked in the checkpoint's [in, out]");
    for (rows, len) in [(2, 7), (4, 40)] {
        let input = ids(rows, len);
        let (a, b) = (logits(&trainable, &input), logits(&frozen, &input));
        let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let diff = (a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // Sums of up to 2,048 products in other orders, through one block and the head:
        // measured ~1e-6 of the largest logit.
        assert!(diff <= 1e-4 * scale, "{rows} × {len}: frozen and trainable logits differ by {diff} (largest {scale})");
    }
}

/// A trainable f32 model decodes from a frozen snapshot of its weights with the large
/// matrices packed (on-policy collection, validation samples): the snapshot computes the
/// model's logits up to the order of the f32 sums, has no graph, and keeps the values it was
/// taken with when the model is updated. A model with only small matrices, or a frozen one,
/// decodes from itself.
#[test]
fn a_wide_trainable_model_decodes_from_a_packed_snapshot_of_its_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let wide = common::tiny_model_dir(&tmp.path().join("wide"), "gpt2", 512, 1, 3);
    let student = load_model(&wide, &Device::Cpu, DType::F32).unwrap();
    let snapshot = student.decoding_snapshot().unwrap().expect("a wide f32 model is snapshotted");
    assert!(snapshot.lm.params().is_frozen());
    // A packed weight is listed unpacked in the checkpoint's `[in, out]` (contiguous); a
    // frozen one not packed would be stored `[out, in]` and listed as its transpose.
    let c_fc = snapshot.lm.params().get("transformer.h.0.mlp.c_fc.weight").unwrap();
    assert!(c_fc.dims() == [512, 2048] && c_fc.is_contiguous(), "the snapshot packs its wide matrices");
    assert_eq!(snapshot.lm.params().num_elements(), student.lm.params().num_elements());
    assert_eq!(snapshot.eos_token_ids, student.eos_token_ids);
    let input = ids(4, 9);
    let before = logits(&student, &input);
    let taken = logits(&snapshot, &input);
    assert!(!taken.track_op(), "the snapshot's logits carry a graph");
    let scale = before.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let diff = (&before - &taken).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff <= 1e-4 * scale, "snapshot and model logits differ by {diff} (largest {scale})");
    // Update every parameter of the model in place, as AdamW does: the snapshot stays as taken.
    for (_, var) in student.lm.params().trainable() {
        var.set(&(var.as_tensor() * 0.5).unwrap()).unwrap();
    }
    let moved = (logits(&student, &input) - &before).unwrap().abs().unwrap().max_all().unwrap();
    assert!(moved.to_scalar::<f32>().unwrap() > 1e-3 * scale, "the update did not change the model");
    let again = (logits(&snapshot, &input) - &taken).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(again.to_scalar::<f32>().unwrap(), 0.0, "the model's update reached its snapshot");

    let small = common::tiny_model_dir(&tmp.path().join("small"), "gpt2", 64, 2, 3);
    assert!(load_model(&small, &Device::Cpu, DType::F32).unwrap().decoding_snapshot().unwrap().is_none());
    let frozen = load_model_as(&wide, &Device::Cpu, DType::F32, Weights::Frozen).unwrap();
    assert!(frozen.decoding_snapshot().unwrap().is_none(), "a frozen model is packed already");
}

/// A frozen GPT-2 whose matrices are not packed (f16 ones below the packing size here) stores
/// its `Conv1D` weights with at least as many outputs as inputs `[out, in]` (the decoding
/// kernels read them faster that way), yet its parameter list shows the checkpoint's `[in, out]` values: saving it
/// (`convert`) writes back exactly the tensors it read.
#[test]
fn a_frozen_gpt2_stores_wide_weights_transposed_and_saves_them_as_read() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_dir(&tmp.path().join("gpt2"), "gpt2", 64, 2, 3);
    let frozen = load_model_as(&dir, &Device::Cpu, DType::F16, Weights::Frozen).unwrap();
    let param = |name: &str| frozen.lm.params().get(name).unwrap().clone();
    for layer in ["attn.c_attn", "mlp.c_fc"] {
        let w = param(&format!("transformer.h.0.{layer}.weight"));
        assert!(w.dim(0).unwrap() < w.dim(1).unwrap(), "{layer} is [in, out] with more outputs: {:?}", w.dims());
        assert!(!w.is_contiguous(), "{layer}: stored [out, in], listed as its transpose");
    }
    let narrow = param("transformer.h.0.mlp.c_proj.weight");
    assert!(narrow.dim(0).unwrap() > narrow.dim(1).unwrap() && narrow.is_contiguous(), "c_proj stays [in, out]");
    let out = tmp.path().join("saved");
    save_model(&frozen, &out, DType::F16).unwrap();
    let read = |d: &std::path::Path| candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
    let (original, saved) = (read(&dir), read(&out));
    assert_eq!(saved.len(), frozen.lm.params().len());
    for (name, t) in &saved {
        let want = original.get(name).or_else(|| original.get(name.trim_start_matches("transformer.")));
        let want = want.unwrap_or_else(|| panic!("{name} is not in the checkpoint"));
        assert_eq!(t.dims(), want.dims(), "{name}");
        let (t, want) =
            (t.to_dtype(DType::F32).unwrap(), want.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap());
        let diff = (t - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name} was saved with other values than it was read with");
    }
}

/// A frozen f32 model, and a frozen bf16 one on a CPU with AVX512-BF16, keeps its dense
/// layers' weights packed for the register-blocked products, yet its parameter list shows
/// every tensor in the checkpoint's shape and values, so saving it writes back exactly what it
/// read (rounded to its dtype), in every family.
#[test]
fn a_packed_model_saves_its_weights_as_read() {
    let tmp = tempfile::tempdir().unwrap();
    // The fixtures' matrices are below the size from which f32 ones are packed; a GPT-2 of
    // width 512 has f32 matrices of 2^18 entries and more.
    let wide = common::tiny_model_dir(&tmp.path().join("wide-gpt2"), "gpt2", 512, 1, 3);
    let fixtures = common::FAMILIES.iter().map(|f| (f.to_string(), common::fixtures().join("models").join(f)));
    let models: Vec<_> = fixtures.chain([("wide gpt2".to_string(), wide)]).collect();
    for ((family, dir), dtype) in models.iter().flat_map(|m| [(m, DType::F32), (m, DType::BF16)]) {
        let m = load_model_as(dir, &Device::Cpu, dtype, Weights::Frozen).unwrap();
        let out = tmp.path().join(format!("{family}-{dtype:?}"));
        save_model(&m, &out, dtype).unwrap();
        let read =
            |d: &std::path::Path| candle_core::safetensors::load(d.join("model.safetensors"), &Device::Cpu).unwrap();
        let (original, saved) = (read(dir), read(&out));
        for (name, t) in &saved {
            let want = original.get(name).or_else(|| original.get(name.trim_start_matches("transformer.")));
            let want = want.unwrap_or_else(|| panic!("{family}: {name} is not in the checkpoint"));
            assert_eq!(t.dims(), want.dims(), "{family}: {name}");
            let (got, want) =
                (t.to_dtype(DType::F32).unwrap(), want.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap());
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{family} {dtype:?}: {name} was saved with other values than it was read with");
        }
        assert_eq!(saved.len(), m.lm.params().len(), "{family}: every parameter is saved");
    }
}

/// A frozen model's logits come from its packed copy of the LM head (decoding's products)
/// where it is worth packing, and equal those of the head as read up to the order of the f32
/// sums, in every family.
#[test]
fn a_packed_lm_head_gives_the_logits_of_the_head_as_read() {
    for (family, dtype) in common::FAMILIES.iter().flat_map(|f| [(f, DType::F32), (f, DType::BF16)]) {
        let dir = common::fixtures().join("models").join(family);
        let m = load_model_as(&dir, &Device::Cpu, dtype, Weights::Frozen).unwrap();
        let head_entries = m.lm.lm_head_weight().elem_count();
        let packs = minillm::ops::packed::PackedMatrix::worth_packing(dtype, head_entries);
        assert_eq!(m.lm.lm_head_packed().is_some(), packs, "{family} {dtype:?}");
        let (b, t) = (3, 20);
        let h = m.lm.forward_hidden(&ids(b, t), &AttentionMask::full(b, t), None).unwrap();
        let got = m.lm.logits(&h).unwrap();
        let rows = h.flatten_to(1).unwrap();
        let head = m.lm.lm_head_weight();
        let want = minillm::ops::linear_no_bias(&rows, head, minillm::ops::WeightLayout::OutIn).unwrap();
        // Sums of `hidden` exact products of bf16 values in two orders: each addition rounds
        // by at most 2^-24 of the magnitudes summed so far.
        let rounded = rows.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().abs().unwrap();
        let magnitudes = rounded.matmul(&head.to_dtype(DType::F32).unwrap().abs().unwrap().t().unwrap()).unwrap();
        let bound = (magnitudes * (2.0 * h.dim(2).unwrap() as f64 * f32::EPSILON as f64)).unwrap();
        let excess = ((got.reshape(want.dims()).unwrap() - want).unwrap().abs().unwrap() - bound).unwrap();
        assert!(
            excess.max_all().unwrap().to_scalar::<f32>().unwrap() <= 0.0,
            "{family} {dtype:?}: the logits differ by more than rounding"
        );
    }
}

/// bf16 and f16 weights (a teacher loaded with `--teacher-dtype`) against the f32 model. A
/// frozen model on the CPU keeps its matrices in 16 bits and everything else in f32; bf16
/// multiplies bf16-rounded inputs by its weights, f16 the f32 inputs by its widened weights
/// (a trainable half-precision model computes all in that dtype, as `transformers` does;
/// parity with it is in tests/model_parity.rs). Errors compound over layers: the largest
/// logit difference relative to the largest logit, measured on these peaked 2-layer models, is
/// 1.4% (GPT-2) and 3.6% (Llama) in bf16 (1.7% and 5.4% when every activation was bf16),
/// 0.15% and 0.35% in f16 (0.2% and 0.8% when every activation was f16); the bounds leave
/// about 2×. The losses that read the teacher's logits take them in f32.
#[test]
fn half_precision_teacher_logits_stay_near_f32() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2", "llama"] {
        let dir = common::tiny_model_dir_with_std(&tmp.path().join(family), family, 64, 2, 5, 0.2);
        let f32_logits = logits(&load_model_as(&dir, &Device::Cpu, DType::F32, Weights::Frozen).unwrap(), &ids(2, 48));
        let spread = f32_logits.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        for (dtype, bound) in [(DType::BF16, 0.07), (DType::F16, 0.008)] {
            let m = load_model_as(&dir, &Device::Cpu, dtype, Weights::Frozen).unwrap();
            let got = logits(&m, &ids(2, 48)).to_dtype(DType::F32).unwrap();
            let rel =
                (got - &f32_logits).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / spread;
            if std::env::var("SHOW").is_ok() {
                eprintln!("{family} {dtype:?}: max |Δ logit| / max |logit| = {rel:.2e}");
            }
            assert!(rel < bound, "{family} {dtype:?}: relative logit error {rel}");
        }
    }
}

/// A frozen bf16 or f16 model on the CPU stores its matrices in that dtype (half the memory)
/// and keeps its vectors and activations in f32 (a bf16 one's KV cache in bf16), in every family (the fixture models: OPT
/// with and without its projections, biased Qwen2, Mistral's window).
#[test]
fn a_half_precision_model_stores_16_bit_matrices_and_computes_in_f32() {
    for family in common::FAMILIES {
        let dir = common::fixtures().join("models").join(family);
        let f32_model = load_model_as(&dir, &Device::Cpu, DType::F32, Weights::Frozen).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let m = load_model_as(&dir, &Device::Cpu, dtype, Weights::Frozen).unwrap();
            let bytes = |m: &Model| {
                m.lm.params().iter().map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes()).sum::<usize>()
            };
            assert!(
                bytes(&m) * 2 < bytes(&f32_model) + bytes(&f32_model) / 50,
                "{family} {dtype:?}: {} vs {} bytes",
                bytes(&m),
                bytes(&f32_model)
            );
            for (name, t) in m.lm.params().iter() {
                let stored = if t.rank() >= 2 { dtype } else { DType::F32 };
                assert_eq!(t.dtype(), stored, "{family} {dtype:?}: {name} {:?}", t.dims());
            }
            let (b, t) = (2, 24);
            let h = m.lm.forward_hidden(&ids(b, t), &AttentionMask::full(b, t), None).unwrap();
            assert_eq!(h.dtype(), DType::F32, "{family} {dtype:?}: activations are f32");
            assert_eq!(m.lm.logits(&h).unwrap().dtype(), DType::F32, "{family} {dtype:?}");
            // bf16 keys and values in the cache, as the products see their inputs; f16 keeps
            // them f32, as it keeps the products' inputs.
            let cached = (dtype == DType::BF16).then_some(DType::BF16);
            assert_eq!(m.lm.info().cache_dtype, cached, "{family} {dtype:?}: the cache's dtype");
        }
    }
}

/// Cached decoding with a 16-bit model computes what its full forward does: at a width whose
/// one-row products take the decoding kernels while the 72-row prefill takes the many-row
/// product (bf16 where the CPU has AVX512-BF16: `ops::gemm_bf16` on weights packed at load
/// for both; else, and for f16, the decoding kernels and the widened packing product), both
/// multiply the same values. In f16 that leaves summation order
/// (measured: 1.2e-6 (GPT-2) and 1.6e-6 (Llama) of the largest logit; bound 1e-5). In bf16 the
/// cache also stores keys and values in bf16 (as `transformers`' bf16 models do), which the full
/// forward's attention reads in f32: measured 0.59% (GPT-2) and 0.87% (Llama) of the largest
/// logit (0.30% and 0.33% with an f32 cache), well inside the bf16 model's own distance from
/// the f32 one (1.4% and 3.6%, above); bound 2⁻⁶ = 1.6%.
#[test]
fn half_precision_cached_decoding_equals_the_full_forward() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["gpt2", "llama"] {
        // 512 wide: every projection has at least 2^18 entries.
        let dir = common::tiny_model_dir_with_std(&tmp.path().join(family), family, 512, 2, 13, 0.05);
        for (dtype, bound) in [(DType::BF16, 1.0 / 64.0), (DType::F16, 1e-5)] {
            let m = load_model_as(&dir, &Device::Cpu, dtype, Weights::Frozen).unwrap();
            let (b, t, prefill) = (3, 30, 24);
            let input = ids(b, t);
            let full = m.lm.forward(&input, &AttentionMask::full(b, t), None).unwrap();
            let mut cache = m.lm.new_cache();
            let first = input.narrow(1, 0, prefill).unwrap();
            let mut pieces = vec![m.lm.forward(&first, &AttentionMask::full(b, prefill), Some(&mut cache)).unwrap()];
            for i in prefill..t {
                let step = input.narrow(1, i, 1).unwrap();
                pieces.push(m.lm.forward(&step, &AttentionMask::full(b, i + 1), Some(&mut cache)).unwrap());
            }
            let inc = Tensor::cat(&pieces, 1).unwrap();
            let spread = full.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let d = (inc - &full).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            if std::env::var("SHOW").is_ok() {
                eprintln!("{family} {dtype:?}: cached vs full max |Δ logit| / max |logit| = {:.2e}", d / spread);
            }
            assert!(d < spread * bound, "{family} {dtype:?}: cached vs full max |Δ logit| = {d} (largest {spread})");
        }
    }
}

/// A half-precision teacher decodes a left-padded batch (the rollouts' layout) to finite
/// logits: the mask's minimum must be finite in the model's dtype.
#[test]
fn half_precision_models_decode_padded_batches() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_dir(tmp.path(), "gpt2", 64, 2, 7);
    let prompts: Vec<Vec<u32>> = vec![vec![5, 6, 7, 8, 9, 10], vec![11, 12], vec![13, 14, 15]];
    for dtype in [DType::BF16, DType::F16] {
        let m = load_model_as(&dir, &Device::Cpu, dtype, Weights::Frozen).unwrap();
        let sampling = minillm::generate::SamplingConfig::sampling(6);
        let pairs = minillm::train::responses::sample_pairs(&m, &sampling, 1, &prompts, 0, 3)
            .unwrap_or_else(|e| panic!("{dtype:?}: {e:#}"));
        assert_eq!(pairs.len(), 3);
    }
}

/// Checkpoints are read tensor by tensor; a damaged file is refused with its name and what
/// is wrong, never a panic.
#[test]
fn damaged_safetensors_files_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::tiny_model_dir(&tmp.path().join("m"), "gpt2", 64, 1, 1);
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    for (what, data) in [
        ("truncated", bytes[..bytes.len() - 100].to_vec()),
        ("no header", bytes[..4].to_vec()),
        ("header length past the end", [&u64::MAX.to_le_bytes()[..], &bytes[8..]].concat()),
    ] {
        std::fs::write(&st, &data).unwrap();
        let err = format!("{:#}", load_model_as(&dir, &Device::Cpu, DType::F32, Weights::Frozen).err().unwrap());
        assert!(err.contains("model.safetensors"), "{what}: {err}");
    }
}

/// `--teacher-dtype bf16|f16` reaches the run: `kd` trains with the 16-bit teacher (its
/// resolved config says so) and lands close to the f32-teacher run; a run without the flag records no
/// teacher dtype (so runs made before the setting existed keep their identity).
#[test]
fn teacher_dtype_flag_trains_with_a_half_precision_teacher() {
    let tmp = tempfile::tempdir().unwrap();
    let student = common::tiny_model_dir(&tmp.path().join("student"), "gpt2", 32, 1, 81);
    let teacher = common::tiny_model_dir_with_std(&tmp.path().join("teacher"), "gpt2", 64, 2, 82, 0.2);
    std::fs::write(tmp.path().join("data.jsonl"), common::letters_jsonl(16, 83)).unwrap();
    let kd = |out: &str, extra: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_minillm"))
            .current_dir(tmp.path())
            .args(["kd", "--student", student.to_str().unwrap(), "--teacher", teacher.to_str().unwrap()])
            .args(["--train", "data.jsonl", "--valid", "data.jsonl", "--out", out, "--max-steps", "2"])
            .args(["--batch-size", "4", "--set", "train.eval_interval=2", "--set", "data.max_len=128"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let config = std::fs::read_to_string(tmp.path().join(out).join("config.toml")).unwrap();
        let last = std::fs::read_to_string(tmp.path().join(out).join("metrics.jsonl")).unwrap();
        let row: serde_json::Value = serde_json::from_str(last.lines().last().unwrap()).unwrap();
        (config, row["eval"]["val_kd"].as_f64().unwrap())
    };
    let (plain, kd_f32) = kd("f32", &[]);
    assert!(!plain.contains("teacher_dtype"), "{plain}");
    // Measured: bf16 9.8e-5 of the f32 teacher's val_kd, f16 (11-bit significands, inputs not
    // rounded) 7.0e-6; the bounds leave 10× and 7× (an f16 path that rounded like bf16 fails).
    for (dtype, bound) in [("bf16", 1e-3), ("f16", 5e-5)] {
        let (half, kd_half) = kd(dtype, &["--teacher-dtype", dtype]);
        assert!(half.contains(&format!("teacher_dtype = \"{dtype}\"")), "{half}");
        let close = (kd_half - kd_f32).abs() < bound * kd_f32.abs();
        assert!(kd_half != kd_f32 && close, "{dtype}: val_kd {kd_half} vs {kd_f32}");
    }
}
