//! The MiniLLM loss terms on a fixed rollout batch equal an independent PyTorch implementation
//! written from REFERENCE.md (scripts/make_loss_fixtures.py): importance weights, rewards,
//! returns + length normalisation + whitening, the clipped policy-gradient loss, the
//! single-step reverse KL and the pre-training term, values and gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use minillm::generate::mix_log_prob;
use minillm::loss::policy::{advantages, pg_loss, rewards, PolicyConfig};
use minillm::loss::{cross_entropy, divergence, Divergence};

fn close(a: f32, b: f32, tol: f32, what: &str) {
    assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}: {a} vs {b}");
}

#[test]
fn policy_single_step_and_pt_terms_equal_pytorch() {
    let fx = candle_core::safetensors::load(common::fixtures().join("losses/minillm_terms.safetensors"), &Device::Cpu)
        .unwrap();
    let mask = fx["mask"].to_vec2::<f32>().unwrap();
    let lens: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m == 1.0).count()).collect();
    let (b, r, v) = fx["logits"].dims3().unwrap();
    let logq_old = fx["logq_old"].to_vec2::<f32>().unwrap();
    let logp = fx["logp"].to_vec2::<f32>().unwrap();
    let ids = fx["ids"].to_vec2::<i32>().unwrap();
    let want_adv = fx["advantages"].to_vec2::<f32>().unwrap();
    let want_w = fx["importance"].to_vec2::<f32>().unwrap();
    let cfg = PolicyConfig::default();

    // Importance weights and advantages, row by row over the valid tokens.
    let rw: Vec<Vec<f32>> = (0..b).map(|i| rewards(&logp[i][..lens[i]], &logq_old[i][..lens[i]], &cfg)).collect();
    let adv = advantages(&rw, &cfg);
    let (mut old, mut imp, mut flat_adv, mut rows, mut targets) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..b {
        for t in 0..r {
            // Whitening covers the padding too: compare every position.
            close(adv[i][t], want_adv[i][t], 1e-5, &format!("advantage [{i}][{t}]"));
            if t < lens[i] {
                let w = (logq_old[i][t] - mix_log_prob(logq_old[i][t], logp[i][t], 0.2)).exp();
                close(w, want_w[i][t], 1e-5, &format!("importance [{i}][{t}]"));
                old.push(logq_old[i][t]);
                imp.push(w);
                flat_adv.push(adv[i][t]);
                rows.push((i * r + t) as u32);
                targets.push(ids[i][t] as u32);
            }
        }
    }
    let n = rows.len();
    let logits = Var::from_tensor(&fx["logits"]).unwrap();
    let idx = Tensor::from_slice(&rows, n, &Device::Cpu).unwrap();
    let z = logits.as_tensor().reshape((b * r, v)).unwrap().index_select(&idx, 0).unwrap();
    let tz = fx["t_logits"].reshape((b * r, v)).unwrap().index_select(&idx, 0).unwrap();
    let lq = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap();
    let lq =
        lq.gather(&Tensor::from_slice(&targets, (n, 1), &Device::Cpu).unwrap(), D::Minus1).unwrap().squeeze(1).unwrap();
    let weights = vec![1.0 / n as f32; n];
    let pg = pg_loss(&lq, &old, &imp, &flat_adv, &weights, Some(0.2)).unwrap();
    let single = divergence(&z, &tz, &weights, Divergence::ReverseKl).unwrap();
    close(
        pg.to_scalar::<f32>().unwrap(),
        fx["pg"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0],
        1e-5,
        "pg",
    );
    close(
        single.to_scalar::<f32>().unwrap(),
        fx["single"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0],
        1e-5,
        "single",
    );
    let grads = (pg + single).unwrap().backward().unwrap();
    let got = grads.get(logits.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = fx["grad"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-6, "gradient of pg + single: max |Δ| = {d}");
    // The clip must be active somewhere in this batch, or the test would not cover it.
    let lq_now = lq.to_vec1::<f32>().unwrap();
    let ratios: Vec<f32> = (0..n).map(|k| (lq_now[k] - old[k]).exp() * imp[k]).collect();
    assert!(ratios.iter().any(|&x| !(0.8..=1.2).contains(&x)), "no ratio outside the clip range");

    // Pre-training term.
    let z = Var::from_tensor(&fx["pt.logits"]).unwrap();
    let y: Vec<u32> = fx["pt.labels"].to_vec1::<i32>().unwrap().iter().map(|&x| x as u32).collect();
    let w = vec![1.0 / y.len() as f32; y.len()];
    let ce = cross_entropy(z.as_tensor(), &y, &w).unwrap();
    let sce = divergence(z.as_tensor(), &fx["pt.t_logits"], &w, Divergence::SoftCrossEntropy).unwrap();
    let pt = ((ce * 0.5).unwrap() + (sce * 0.5).unwrap()).unwrap();
    close(
        pt.to_scalar::<f32>().unwrap(),
        fx["pt.loss"].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0],
        1e-5,
        "pt",
    );
    let g = pt.backward().unwrap().get(z.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = fx["pt.grad"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let d = g.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(d < 1e-6, "gradient of pt: max |Δ| = {d}");
}

#[test]
fn paper_returns_are_the_mean_of_future_rewards() {
    let cfg = PolicyConfig { whiten: false, ..PolicyConfig::paper() };
    let adv = advantages(&[vec![1.0, 2.0, 3.0, 6.0], vec![5.0]], &cfg);
    assert_eq!(adv[0], vec![11.0 / 3.0, 4.5, 6.0, 0.0]);
    assert_eq!(adv[1], vec![0.0, 0.0, 0.0, 0.0]);
    let unnormalised = PolicyConfig { length_norm: false, ..cfg };
    assert_eq!(advantages(&[vec![1.0, 2.0, 3.0]], &unnormalised)[0], vec![5.0, 3.0, 0.0]);
    let released = PolicyConfig { whiten: false, ..PolicyConfig::default() };
    let a = advantages(&[vec![1.0, 1.0]], &released);
    assert!((a[0][0] - (1.0 + 0.95) / 2.0).abs() < 1e-6 && (a[0][1] - 1.0).abs() < 1e-6);
}
