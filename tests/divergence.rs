//! Every divergence and its gradient equal PyTorch's (fixtures from
//! scripts/make_loss_fixtures.py) and finite differences; the fused, chunked and reference
//! paths agree.

mod common;

use candle_core::{Device, Tensor, Var};
use minillm::loss::{divergence, divergence_reference, Divergence};

fn cases() -> Vec<(&'static str, Divergence)> {
    vec![
        ("fkl", Divergence::ForwardKl),
        ("sce", Divergence::SoftCrossEntropy),
        ("rkl", Divergence::ReverseKl),
        ("jsd_0.3", Divergence::Jsd { beta: 0.3 }),
        ("tvd", Divergence::Tvd),
        ("sfkl_0.1", Divergence::SkewForwardKl { lambda: 0.1 }),
        ("srkl_0.2", Divergence::SkewReverseKl { lambda: 0.2 }),
    ]
}

fn fixture() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(common::fixtures().join("losses/divergences.safetensors"), &Device::Cpu).unwrap()
}

fn loss_and_grad(
    f: impl Fn(&Tensor, &Tensor, &[f32]) -> anyhow::Result<Tensor>,
    z: &Tensor,
    t: &Tensor,
    w: &[f32],
) -> (f32, Vec<f32>) {
    let var = Var::from_tensor(z).unwrap();
    let loss = f(var.as_tensor(), t, w).unwrap();
    let g = loss.backward().unwrap();
    let grad = g.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    (loss.to_scalar::<f32>().unwrap(), grad)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The largest per-row relative error ‖Δ_r‖₂ / ‖g_r‖₂ over rows of `width` entries; a row
/// whose reference gradient is zero (a masked row) must be exactly zero. Over a 50,257-token
/// vocabulary most entries are below 1e-6, where an absolute tolerance would pass anything.
fn max_row_rel_diff(got: &[f32], want: &[f32], width: usize) -> f64 {
    got.chunks(width)
        .zip(want.chunks(width))
        .map(|(a, b)| {
            let norm = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            let diff = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum::<f64>().sqrt();
            if norm == 0.0 {
                if diff == 0.0 {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                diff / norm
            }
        })
        .fold(0.0, f64::max)
}

#[test]
fn fused_and_reference_paths_equal_pytorch() {
    let fx = fixture();
    for case in ["small", "gpt2vocab"] {
        let z = &fx[&format!("{case}.student")];
        let t = &fx[&format!("{case}.teacher")];
        let w = fx[&format!("{case}.weights")].to_vec1::<f32>().unwrap();
        for (name, kind) in cases() {
            let want_loss =
                fx[&format!("{case}.{name}.loss")].to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
                    [0];
            let want_grad = fx[&format!("{case}.{name}.grad")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let fused = loss_and_grad(|z, t, w| divergence(z, t, w, kind), z, t, &w);
            for chunk in [1, 3, 1000] {
                let reference = loss_and_grad(|z, t, w| divergence_reference(z, t, w, kind, chunk), z, t, &w);
                // The fused path forms each term from its log-ratio (f32 lanes for all but TVD,
                // which is f64): row-relative errors ≤ 2.4e-5 measured (≤ 3.8e-6 for the JSD
                // and skew KLs, whose normalisers and ⟨q, g⟩ are summed in f64). The reference
                // composition works in f32 tensors throughout (50,257 terms per row): up to
                // 1.7e-3 for TVD and the skew reverse KL, so it gets a looser tolerance.
                let width = z.dim(1).unwrap();
                for (path, (loss, grad), grad_tol) in [("fused", &fused, 1e-4), ("reference", &reference, 5e-3)] {
                    let tol = 2e-5 * want_loss.abs().max(1.0);
                    assert!((loss - want_loss).abs() < tol, "{case}/{name}/{path}: loss {loss} vs {want_loss}");
                    let d = max_row_rel_diff(grad, &want_grad, width);
                    if std::env::var("SHOW").is_ok() {
                        eprintln!("{case}/{name}/{path}/chunk {chunk}: row-relative gradient error {d:.2e}");
                    }
                    assert!(d < grad_tol, "{case}/{name}/{path}/chunk {chunk}: row-relative gradient error {d}");
                }
            }
        }
    }
}

/// Central differences in f64 of the fused loss (evaluated in f32, summed in f64 over rows) on a
/// small problem agree with its analytic gradient.
#[test]
fn gradients_match_finite_differences() {
    let fx = fixture();
    let z = &fx["small.student"];
    let t = &fx["small.teacher"];
    let w = fx["small.weights"].to_vec1::<f32>().unwrap();
    let zv = z.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let shape = z.dims().to_vec();
    for (name, kind) in cases() {
        let (_, grad) = loss_and_grad(|z, t, w| divergence(z, t, w, kind), z, t, &w);
        let h = 1e-2f32;
        for i in (0..zv.len()).step_by(5) {
            let eval = |delta: f32| {
                let mut v = zv.clone();
                v[i] += delta;
                let zt = Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap();
                divergence(&zt, t, &w, kind).unwrap().to_scalar::<f32>().unwrap() as f64
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h as f64);
            assert!((fd - grad[i] as f64).abs() < 2e-3, "{name}[{i}]: finite difference {fd} vs analytic {}", grad[i]);
        }
    }
}

#[test]
fn divergences_vanish_when_teacher_equals_student_and_are_positive_otherwise() {
    let fx = fixture();
    let z = &fx["small.student"];
    let t = &fx["small.teacher"];
    let w = vec![1.0f32; z.dim(0).unwrap()];
    for (name, kind) in cases() {
        let same = divergence(z, z, &w, kind).unwrap().to_scalar::<f32>().unwrap();
        let diff = divergence(z, t, &w, kind).unwrap().to_scalar::<f32>().unwrap();
        if kind == Divergence::SoftCrossEntropy {
            assert!(diff > same, "{name}");
        } else {
            assert!(same.abs() < 1e-5, "{name}: D(q, q) = {same}");
            assert!(diff > 0.01, "{name}: D(p, q) = {diff}");
        }
    }
}

/// A vocabulary entry one model rules out (a −∞ logit, as a padded or masked vocabulary gives)
/// contributes its limit to the mixture divergences: the same loss and gradient as a logit
/// of −200, never NaN — for the teacher's entry and the student's alike.
#[test]
fn mixture_divergences_take_minus_infinity_logits_as_their_limit() {
    let fx = fixture();
    let z = fx["small.student"].to_vec2::<f32>().unwrap();
    let t = fx["small.teacher"].to_vec2::<f32>().unwrap();
    let w = vec![1.0f32; z.len()];
    let with = |rows: &[Vec<f32>], col: usize, v: f32| {
        let mut rows = rows.to_vec();
        rows[2][col] = v;
        Tensor::new(rows, &Device::Cpu).unwrap()
    };
    let (z0, t0) = (Tensor::new(z.clone(), &Device::Cpu).unwrap(), Tensor::new(t.clone(), &Device::Cpu).unwrap());
    for (name, kind) in cases().into_iter().filter(|(n, _)| n.starts_with("jsd") || n.starts_with('s') && n != &"sce") {
        for (side, (zi, ti), (zf, tf)) in [
            ("teacher", (z0.clone(), with(&t, 4, f32::NEG_INFINITY)), (z0.clone(), with(&t, 4, -200.0))),
            ("student", (with(&z, 4, f32::NEG_INFINITY), t0.clone()), (with(&z, 4, -200.0), t0.clone())),
        ] {
            let (li, gi) = loss_and_grad(|z, t, w| divergence(z, t, w, kind), &zi, &ti, &w);
            let (lf, gf) = loss_and_grad(|z, t, w| divergence(z, t, w, kind), &zf, &tf, &w);
            assert!(li.is_finite() && gi.iter().all(|g| g.is_finite()), "{name}/{side}: {li}");
            assert!((li - lf).abs() < 1e-5 * lf.abs().max(1.0), "{name}/{side}: loss {li} vs {lf}");
            assert!(max_abs_diff(&gi, &gf) < 1e-6, "{name}/{side}: gradient");
        }
    }
}

#[test]
fn bad_arguments_are_refused() {
    let z = Tensor::zeros((2, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(divergence(&z, &t, &[1.0, 1.0], Divergence::ReverseKl).is_err());
    assert!(divergence(&z, &z, &[1.0], Divergence::ReverseKl).is_err());
    assert!(Divergence::parse("jsd:1.5").is_err());
    assert!(Divergence::parse("bogus").is_err());
    assert_eq!(Divergence::parse("srkl:0.2").unwrap(), Divergence::SkewReverseKl { lambda: 0.2 });
}

#[test]
fn cross_entropy_fused_and_reference_equal_pytorch() {
    let fx = fixture();
    for case in ["small", "gpt2vocab"] {
        let z = &fx[&format!("{case}.student")];
        let w = fx[&format!("{case}.weights")].to_vec1::<f32>().unwrap();
        let y: Vec<u32> = fx[&format!("{case}.labels")].to_vec1::<i32>().unwrap().iter().map(|&v| v as u32).collect();
        let want_loss =
            fx[&format!("{case}.ce.loss")].to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
        let want_grad = fx[&format!("{case}.ce.grad")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let fused = loss_and_grad(|z, _, w| minillm::loss::cross_entropy(z, &y, w), z, z, &w);
        let reference = loss_and_grad(|z, _, w| minillm::loss::cross_entropy_reference(z, &y, w), z, z, &w);
        for (path, (loss, grad), tol) in [("fused", &fused, 2e-6), ("reference", &reference, 1e-5)] {
            assert!((loss - want_loss).abs() < 1e-4 * want_loss.abs().max(1.0), "{case}/{path}: {loss} vs {want_loss}");
            let d = max_abs_diff(grad, &want_grad);
            assert!(d < tol, "{case}/{path}: max |Δgrad| = {d}");
        }
    }
    let z = &fx["small.student"];
    assert!(minillm::loss::cross_entropy(z, &[99; 7], &[1.0; 7]).unwrap_err().to_string().contains("99"));
}
