//! Logits of every model family equal `transformers`' (fixtures from scripts/make_fixtures.py)
//! for right-padded, left-padded and unpadded batches; cached decoding equals a full forward.

mod common;

use candle_core::{DType, Tensor};
use common::*;

#[test]
fn logits_match_transformers_for_every_family_and_padding() {
    for name in FAMILIES {
        let model = load(name);
        let reference = reference(name);
        for batch in ["right", "left", "full"] {
            let ids = ids_u32(&reference[&format!("{batch}.input_ids")]);
            let mask = mask_of(&reference[&format!("{batch}.attention_mask")]);
            let want = &reference[&format!("{batch}.logits")];
            let got = model.lm.forward(&ids, &mask, None).unwrap();
            assert_eq!(got.dims(), want.dims(), "{name}/{batch}: logits shape");
            let d = max_diff_masked(&got, want, &mask);
            assert!(d < 1e-4, "{name}/{batch}: max |Δlogit| = {d}");
        }
    }
}

/// Feeding tokens one (or a few) at a time through the KV cache gives the same logits as one
/// forward over the whole left-padded batch.
#[test]
fn cached_decoding_equals_full_forward() {
    for name in FAMILIES {
        let model = load(name);
        let reference = reference(name);
        let ids = ids_u32(&reference["left.input_ids"]);
        let rows = rows_u8(&reference["left.attention_mask"]);
        let mask = mask_of(&reference["left.attention_mask"]);
        let full = model.lm.forward(&ids, &mask, None).unwrap();
        let t = ids.dim(1).unwrap();
        let mut cache = model.lm.new_cache();
        let mut pieces = Vec::new();
        // A prefill of 5 tokens, then single steps.
        let mut start = 0;
        for len in std::iter::once(5).chain(std::iter::repeat(1)) {
            if start >= t {
                break;
            }
            let end = (start + len).min(t);
            let step_ids = ids.narrow(1, start, end - start).unwrap();
            let prefix: Vec<Vec<u8>> = rows.iter().map(|r| r[..end].to_vec()).collect();
            let m = minillm::model::AttentionMask::from_rows(&prefix).unwrap();
            pieces.push(model.lm.forward(&step_ids, &m, Some(&mut cache)).unwrap());
            start = end;
        }
        assert_eq!(cache.seq_len(), t);
        let inc = Tensor::cat(&pieces, 1).unwrap();
        let d = max_diff_masked(&inc, &full, &mask);
        assert!(d < 1e-4, "{name}: cached vs full max |Δlogit| = {d}");
    }
}

/// The last-position forward that decoding's prefill takes ([`CausalLm::forward_last`]: the last
/// block's output at the last position only) gives the full forward's last-position logits,
/// with and without a cache, for every family and padding, trainable, frozen and frozen bf16
/// (whose cache stores bf16); and the cache it fills holds every position's keys and values:
/// the step after it gives what the step after a full prefill gives.
#[test]
fn last_position_forward_equals_full_forward() {
    use minillm::model::{load_model_as, AttentionMask, CausalLm, Weights};
    let max_diff = |a: &Tensor, b: &Tensor| -> f32 {
        let d = (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap()).unwrap();
        d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    };
    let last = |x: &Tensor| x.narrow(1, x.dim(1).unwrap() - 1, 1).unwrap().squeeze(1).unwrap();
    // Prefill all but the last token into a fresh cache (by the full or the last-position
    // forward), then one step with the last token; the prefill's and the step's logits.
    let prefill_then_step = |lm: &dyn CausalLm, ids: &Tensor, rows: &[Vec<u8>], last_only: bool| {
        let t = ids.dim(1).unwrap();
        let mut cache = lm.new_cache();
        let prefix: Vec<Vec<u8>> = rows.iter().map(|r| r[..t - 1].to_vec()).collect();
        let (prefix, all) = (AttentionMask::from_rows(&prefix).unwrap(), AttentionMask::from_rows(rows).unwrap());
        let prompt = ids.narrow(1, 0, t - 1).unwrap();
        let prefill = if last_only {
            lm.forward_last(&prompt, &prefix, Some(&mut cache)).unwrap()
        } else {
            last(&lm.forward(&prompt, &prefix, Some(&mut cache)).unwrap())
        };
        assert_eq!(cache.seq_len(), t - 1, "every prompt position cached");
        (prefill, lm.forward_last(&ids.narrow(1, t - 1, 1).unwrap(), &all, Some(&mut cache)).unwrap())
    };
    for name in FAMILIES {
        let dir = fixtures().join("models").join(name);
        let reference = reference(name);
        for (weights, dtype) in
            [(Weights::Trainable, DType::F32), (Weights::Frozen, DType::F32), (Weights::Frozen, DType::BF16)]
        {
            let model = load_model_as(&dir, &candle_core::Device::Cpu, dtype, weights).unwrap();
            for batch in ["right", "left", "full"] {
                let what = format!("{name}/{weights:?}/{dtype:?}/{batch}");
                let ids = ids_u32(&reference[&format!("{batch}.input_ids")]);
                let rows = rows_u8(&reference[&format!("{batch}.attention_mask")]);
                let mask = mask_of(&reference[&format!("{batch}.attention_mask")]);
                // The two paths multiply at different row counts, which may round differently.
                let tol = 1e-5;
                let got = model.lm.forward_last(&ids, &mask, None).unwrap();
                assert_eq!(got.dims(), [ids.dim(0).unwrap(), model.lm.info().vocab_size], "{what}: shape");
                let d = max_diff(&got, &last(&model.lm.forward(&ids, &mask, None).unwrap()));
                assert!(d <= tol, "{what}: last-position vs full forward max |Δlogit| = {d}");

                let (prefill, step) = prefill_then_step(model.lm.as_ref(), &ids, &rows, true);
                let (want_prefill, want_step) = prefill_then_step(model.lm.as_ref(), &ids, &rows, false);
                let d = max_diff(&prefill, &want_prefill);
                assert!(d <= tol, "{what}: cached last-position vs full prefill max |Δlogit| = {d}");
                let d = max_diff(&step, &want_step);
                assert!(d <= tol, "{what}: step after a last-position vs a full prefill max |Δlogit| = {d}");
            }
        }
    }
}

/// Every trainable parameter of every family receives a non-zero gradient (catches ops
/// without a backward, such as candle's fused norms).
#[test]
fn every_parameter_gets_a_gradient() {
    for name in FAMILIES {
        let model = load(name);
        let reference = reference(name);
        let ids = ids_u32(&reference["right.input_ids"]);
        let mask = mask_of(&reference["right.attention_mask"]);
        let logits = model.lm.forward(&ids, &mask, None).unwrap();
        let lp = minillm::model::log_softmax_last(&logits).unwrap();
        // A loss touching every position and every vocabulary entry.
        let w = Tensor::arange(0f32, lp.dim(2).unwrap() as f32, lp.device()).unwrap();
        let loss = lp.broadcast_mul(&w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (pname, var) in model.lm.params().trainable() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let norm = g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {pname} has norm {norm}");
        }
    }
}

/// The gradient of the mean next-token cross-entropy with respect to every parameter of every
/// family equals `transformers`' (float64 autograd, `make_fixtures.py grads`): the backward
/// pass of every layer, tied embeddings included.
#[test]
fn whole_model_gradients_match_transformers_for_every_family() {
    let fx =
        candle_core::safetensors::load(fixtures().join("logits/grads.safetensors"), &candle_core::Device::Cpu).unwrap();
    for name in FAMILIES {
        let model = load(name);
        let ids = ids_u32(&reference(name)["full.input_ids"]);
        let (b, t) = ids.dims2().unwrap();
        let mask = minillm::model::AttentionMask::full(b, t);
        let logits = model.lm.forward(&ids, &mask, None).unwrap();
        let v = logits.dim(2).unwrap();
        let inputs = logits.narrow(1, 0, t - 1).unwrap().reshape((b * (t - 1), v)).unwrap();
        let targets = ids.narrow(1, 1, t - 1).unwrap().flatten_all().unwrap();
        let loss = candle_nn::loss::cross_entropy(&inputs, &targets).unwrap();
        let want_loss = fx[&format!("{name}.loss")].to_vec1::<f32>().unwrap()[0];
        let got_loss = loss.to_scalar::<f32>().unwrap();
        assert!((got_loss - want_loss).abs() < 1e-5 * want_loss, "{name}: loss {got_loss} vs {want_loss}");
        let grads = loss.backward().unwrap();
        let mut compared = 0;
        for (pname, var) in model.lm.params().trainable() {
            let key = format!("{name}.grad.{pname}");
            let Some(want) = fx.get(&key) else { panic!("{name}: transformers has no parameter {pname}") };
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            assert_eq!(got.dims(), want.dims(), "{name}: {pname} shape");
            let (got, want) = (
                got.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            // Relative to the tensor's largest entry; the floor covers gradients that are zero in
            // exact arithmetic (a key bias shifts every score of a query equally).
            assert!(err <= 1e-4 * scale + 1e-7, "{name}: ∂loss/∂{pname} max |Δ| {err} vs max |g| {scale}");
            compared += 1;
        }
        let prefix = format!("{name}.grad.");
        assert_eq!(compared, fx.keys().filter(|k| k.starts_with(&prefix)).count(), "{name}: every parameter compared");
    }
}

/// Linear rope scaling (the llama fixture's weights under factor 4, θ 10⁴) matches
/// transformers, and differs from the same weights without it; the Llama-3 scaling is covered
/// by the `llama` fixture itself.
#[test]
fn linear_rope_scaling_matches_transformers() {
    let model = load("llama_rope_linear");
    let plain = load("llama");
    let reference = reference("llama_rope_linear");
    for batch in ["right", "left", "full"] {
        let ids = ids_u32(&reference[&format!("{batch}.input_ids")]);
        let mask = mask_of(&reference[&format!("{batch}.attention_mask")]);
        let want = &reference[&format!("{batch}.logits")];
        let d = max_diff_masked(&model.lm.forward(&ids, &mask, None).unwrap(), want, &mask);
        assert!(d < 1e-4, "linear rope/{batch}: max |Δlogit| = {d}");
        let unscaled = max_diff_masked(&plain.lm.forward(&ids, &mask, None).unwrap(), want, &mask);
        assert!(unscaled > 1e-2, "linear rope/{batch}: the scaling changes nothing ({unscaled})");
    }
}

/// Configurations whose attention we do not implement are refused by name, never run wrongly.
#[test]
fn unsupported_attention_variants_are_refused() {
    let base = |family: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(format!("models/{family}/config.json"))).unwrap())
            .unwrap()
    };
    let mut qwen = base("qwen2");
    qwen["use_sliding_window"] = true.into();
    qwen["sliding_window"] = 8.into();
    let mut partial = base("llama");
    partial["partial_rotary_factor"] = 0.5.into();
    let mut rope = base("llama");
    rope["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0});
    for (config, want) in [
        (qwen, "use_sliding_window"),
        (partial, "partial_rotary_factor"),
        (rope, "rope scaling type `yarn` is not supported"),
    ] {
        let e = minillm::model::Model::random(config, 0, &candle_core::Device::Cpu, DType::F32).err().expect("refused");
        assert!(format!("{e:#}").contains(want), "{e:#}");
    }
}

/// Loaded and computed in bf16 (and in f16), every family stays as close to the float32
/// logits as transformers' own computation in that dtype does (`make_fixtures.py bf16`):
/// rounding differs in every implementation, so the two results are compared by their error
/// against float32 (mean absolute, at most 1.5× transformers'; measured 0.97–1.23× in bf16),
/// not with each other; a missing bias or a wrong norm would be off by far more.
#[test]
fn half_precision_models_are_as_accurate_as_transformers() {
    let fx =
        candle_core::safetensors::load(fixtures().join("logits/bf16.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mean_abs = |a: &Tensor, b: &Tensor| -> f32 {
        (a - b).unwrap().abs().unwrap().mean_all().unwrap().to_scalar::<f32>().unwrap()
    };
    for (dtype, key) in [(DType::BF16, "logits"), (DType::F16, "f16_logits")] {
        for name in FAMILIES {
            let dir = fixtures().join(format!("models/{name}"));
            let model = minillm::model::load_model(&dir, &candle_core::Device::Cpu, dtype).unwrap();
            let r = reference(name);
            let ids = ids_u32(&r["full.input_ids"]);
            let mask = mask_of(&r["full.attention_mask"]);
            let got = model.lm.forward(&ids, &mask, None).unwrap();
            assert_eq!(got.dtype(), dtype, "{name}: computed in {dtype:?}");
            let got = got.to_dtype(DType::F32).unwrap();
            let f32_logits = &r["full.logits"];
            let (ours, theirs) = (mean_abs(&got, f32_logits), mean_abs(&fx[&format!("{name}.{key}")], f32_logits));
            assert!(ours > 0.0, "{name}: {dtype:?} logits equal the f32 ones — not computed in {dtype:?}");
            assert!(ours <= 1.5 * theirs, "{name}: mean |{dtype:?} − f32| = {ours}, transformers' {theirs}");
        }
    }
}
