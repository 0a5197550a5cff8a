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
        for (pname, var) in model.lm.params().iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            let norm = g.to_dtype(DType::F64).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient of {pname} has norm {norm}");
        }
    }
}
