//! Every fused CPU op against the differentiable candle composition it replaces: values and
//! gradients (of a random linear functional of the output, so every output element matters),
//! at odd sizes (one row, length one, widths that are not multiples of the SIMD lanes), with
//! padded (fully masked) rows in attention.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use minillm::model::AttentionMask;
use minillm::ops::{attention, gelu, layer_norm, softmax};

fn var(shape: &[usize], seed: u64, std: f32) -> Var {
    common::spread_var(shape, seed, std)
}

/// Largest absolute difference, relative to the largest magnitude of `b` (at least 1).
fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let (a, b) =
        (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

/// Output of both paths and the gradients of `Σ out ⊙ probe` with respect to `inputs`.
fn compare(inputs: &[&Var], fused: impl Fn() -> Tensor, composite: impl Fn() -> Tensor, tol: f32, what: &str) {
    let (yf, yc) = (fused(), composite());
    assert!(rel_diff(&yf, &yc) < tol, "{what}: values differ by {}", rel_diff(&yf, &yc));
    let probe = var(yf.dims(), 99, 1.0);
    let gf = (yf * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let gc = (yc * probe.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, v) in inputs.iter().enumerate() {
        let (a, b) =
            (gf.get(v.as_tensor()).expect("fused gradient"), gc.get(v.as_tensor()).expect("composite gradient"));
        assert!(rel_diff(a, b) < tol, "{what}: gradient of input {i} differs by {}", rel_diff(a, b));
    }
}

#[test]
fn gelu_matches_composite() {
    for shape in [vec![1], vec![3, 7], vec![2, 5, 67]] {
        let x = var(&shape, 1, 6.0);
        compare(&[&x], || gelu::gelu_tanh(x.as_tensor()).unwrap(), || x.as_tensor().gelu().unwrap(), 1e-5, "gelu");
    }
}

#[test]
fn layer_norm_matches_composite() {
    for (rows, h) in [(1, 1), (1, 5), (7, 67), (2 * 33, 256)] {
        let x = var(&[rows, h], 2, 3.0);
        let (w, b) = (var(&[h], 3, 1.0), var(&[h], 4, 1.0));
        let fused = || layer_norm::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let composite = || layer_norm::layer_norm_composite(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        compare(&[&x, &w, &b], fused, composite, 2e-5, &format!("layer norm {rows}×{h}"));
    }
}

/// A padded mask: row `i` has `i` leading padding positions (all-padding rows included).
fn padded_bias(b: usize, t: usize) -> Tensor {
    let rows: Vec<Vec<u8>> = (0..b).map(|i| (0..t).map(|j| (j >= i.min(t)) as u8).collect()).collect();
    AttentionMask::from_rows(&rows).unwrap().bias(t, None, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn masked_softmax_matches_composite() {
    for (b, heads, t) in [(1, 1, 1), (2, 3, 5), (3, 2, 19)] {
        let scores = var(&[b, heads, t, t], 5, 4.0);
        let bias = padded_bias(b, t);
        let fused = || softmax::masked_softmax(scores.as_tensor(), &bias, 0.3).unwrap();
        let composite = || softmax::masked_softmax_composite(scores.as_tensor(), &bias, 0.3).unwrap();
        compare(&[&scores], fused, composite, 1e-5, &format!("softmax b{b} h{heads} t{t}"));
    }
}

#[test]
fn packed_attention_matches_composite() {
    for (b, t, heads, d) in [(1, 1, 1, 1), (1, 7, 3, 5), (3, 20, 2, 8), (2, 64, 4, 16)] {
        let qkv = var(&[b, t, 3 * heads * d], 6, 2.0);
        let bias = padded_bias(b, t);
        let fused = || attention::attention_packed(qkv.as_tensor(), &bias, heads, 0.25).unwrap();
        let composite = || attention::attention_packed_composite(qkv.as_tensor(), &bias, heads, 0.25).unwrap();
        compare(&[&qkv], fused, composite, 2e-5, &format!("attention b{b} t{t} h{heads} d{d}"));
    }
}

/// The decoding kernel against the composition, on the layouts decoding gives it: queries
/// as a transposed view, keys and values as the filled part of a larger cache buffer,
/// grouped-query heads, a prefill (t > 1 with padded rows) and single steps, head widths
/// that are and are not a whole number of SIMD registers (16, 32, 64, 128 vs 1, 7, 8); keys
/// and values cached in f32 and in bf16 (a frozen bf16 model's cache), the latter against the
/// composition on the same values widened to f32.
#[test]
fn inference_attention_matches_composite() {
    for (b, heads, kv_heads, t, s, d) in [
        (1, 1, 1, 1, 1, 1),
        (2, 4, 4, 1, 9, 8),
        (3, 6, 2, 5, 5, 7),
        (2, 4, 1, 1, 33, 16),
        (2, 3, 3, 1, 40, 64),
        (3, 2, 2, 6, 6, 32),
        (2, 2, 1, 4, 4, 128),
    ] {
        // q: [b, t, heads, d] transposed to [b, heads, t, d] without a copy.
        let q = var(&[b, t, heads, d], 8, 2.0).as_tensor().transpose(1, 2).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            // k, v: the first s positions of a cache with room for s + 3.
            let cache = |seed| {
                let buffer = var(&[b, kv_heads, s + 3, d], seed, 2.0).as_tensor().to_dtype(dtype).unwrap();
                buffer.narrow(2, 0, s).unwrap()
            };
            let (k, v) = (cache(9), cache(10));
            assert!(t == 1 || heads == 1 || !q.is_contiguous());
            assert!(b * kv_heads == 1 || !k.is_contiguous());
            let bias =
                if t == s { padded_bias(b, t) } else { Tensor::zeros((b, 1, t, s), DType::F32, &Device::Cpu).unwrap() };
            let fused = minillm::ops::attention_inference(&q, &k, &v, &bias, 0.3).unwrap();
            assert_eq!(fused.dtype(), DType::F32);
            let widened = |x: &Tensor| x.to_dtype(DType::F32).unwrap();
            let composite = minillm::model::layers::attention(&q, &widened(&k), &widened(&v), &bias, 0.3).unwrap();
            let what = format!("inference attention {dtype:?} b{b} h{heads}/{kv_heads} t{t} s{s} d{d}");
            assert!(rel_diff(&fused, &composite) < 2e-6, "{what}: differs by {}", rel_diff(&fused, &composite));
        }
    }
    // It has no backward pass: asking for one is an error, never a silent zero gradient.
    let q = var(&[1, 2, 1, 4], 11, 1.0);
    let kv = var(&[1, 2, 3, 4], 12, 1.0);
    let bias = Tensor::zeros((1, 1, 1, 3), DType::F32, &Device::Cpu).unwrap();
    let out = minillm::ops::attention_inference(q.as_tensor(), kv.as_tensor(), kv.as_tensor(), &bias, 1.0).unwrap();
    assert!(out.sum_all().unwrap().backward().is_err());
}

#[test]
fn packed_attention_refuses_bad_shapes() {
    let qkv = var(&[1, 4, 10], 7, 1.0);
    let err = attention::attention_packed(qkv.as_tensor(), &padded_bias(1, 4), 3, 1.0).unwrap_err();
    assert!(err.to_string().contains("not 3 × 3 heads"), "{err}");
    let qkv = var(&[1, 4, 12], 7, 1.0);
    let err = attention::attention_packed(qkv.as_tensor(), &padded_bias(1, 5), 2, 1.0).unwrap_err();
    assert!(err.to_string().contains("attention bias has shape"), "{err}");
}

#[test]
fn linear_matches_composite() {
    use minillm::ops::linear::{linear, linear_composite, WeightLayout};
    for (rows, din, dout) in [(1, 1, 1), (3, 5, 7), (33, 64, 130)] {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let x = var(&[rows, din], 8, 2.0);
            let w = match layout {
                WeightLayout::InOut => var(&[din, dout], 9, 1.0),
                WeightLayout::OutIn => var(&[dout, din], 9, 1.0),
            };
            let b = var(&[dout], 10, 1.0);
            let fused = || linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), layout).unwrap();
            let composite = || linear_composite(x.as_tensor(), w.as_tensor(), b.as_tensor(), layout).unwrap();
            compare(&[&x, &w, &b], fused, composite, 1e-5, &format!("linear {rows}×{din}→{dout} {layout:?}"));
        }
    }
}

#[test]
fn linear_without_bias_matches_matmul() {
    use minillm::ops::linear::{linear_no_bias, WeightLayout};
    for (rows, din, dout) in [(1, 1, 1), (5, 3, 67)] {
        let x = var(&[rows, din], 11, 2.0);
        let (w_io, w_oi) = (var(&[din, dout], 12, 1.0), var(&[dout, din], 13, 1.0));
        let fused = || linear_no_bias(x.as_tensor(), w_io.as_tensor(), WeightLayout::InOut).unwrap();
        compare(&[&x, &w_io], fused, || x.as_tensor().matmul(w_io.as_tensor()).unwrap(), 1e-5, "matmul [in, out]");
        let fused = || linear_no_bias(x.as_tensor(), w_oi.as_tensor(), WeightLayout::OutIn).unwrap();
        let composite = || x.as_tensor().matmul(&w_oi.as_tensor().t().unwrap()).unwrap();
        compare(&[&x, &w_oi], fused, composite, 1e-5, "matmul [out, in]");
    }
}
