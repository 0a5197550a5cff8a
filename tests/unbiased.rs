//! The MiniLLM gradient estimator is unbiased where the paper says so (Eq. 3 and App. A.3), and
//! its bias under teacher mixing is a computed property: on a problem small enough to enumerate
//! every response, the estimator's exact expectation (every response weighted by its mixture
//! probability) equals the exact gradient of the sequence-level KL[q‖p] at α = 0, and
//! Monte-Carlo means match that expectation within their standard errors at every α.
//!
//! Vocabulary {EOS, a, b}; responses stop at EOS or after 3 tokens; the student is a table of
//! logits per prefix (7 prefixes), the teacher a fixed table. The estimator is built from the
//! library's own pieces: `rewards`, `advantages` (paper returns: rewards after t, undiscounted,
//! without length normalisation or whitening), `pg_loss` without clipping, and the exact
//! single-step reverse KL (`divergence`).

use candle_core::{DType, Device, Tensor, Var, D};
use minillm::generate::{log_softmax_into, mix_log_prob, sample_from_logits};
use minillm::loss::policy::{advantages, pg_loss, rewards, PolicyConfig, Returns};
use minillm::loss::{divergence, Divergence};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const V: usize = 3;
const EOS: usize = 0;
const MAX_T: usize = 3;

/// Index of the logits row for a prefix of non-EOS tokens (length ≤ 2).
fn ctx(prefix: &[usize]) -> usize {
    match prefix {
        [] => 0,
        [a] => *a,
        [a, b] => 3 + (a - 1) * 2 + (b - 1),
        _ => unreachable!(),
    }
}

/// Every response with its context rows.
fn all_responses() -> Vec<Vec<usize>> {
    fn rec(prefix: Vec<usize>, out: &mut Vec<Vec<usize>>) {
        for v in 0..V {
            let mut y = prefix.clone();
            y.push(v);
            if v == EOS || y.len() == MAX_T {
                out.push(y);
            } else {
                rec(y, out);
            }
        }
    }
    let mut out = Vec::new();
    rec(Vec::new(), &mut out);
    out
}

fn contexts(y: &[usize]) -> Vec<u32> {
    (0..y.len()).map(|t| ctx(&y[..t]) as u32).collect()
}

/// Exact ∇θ KL[q‖p] by enumeration.
fn exact_gradient(theta: &Var, phi: &Tensor) -> Vec<f32> {
    let lq = candle_nn::ops::log_softmax(theta.as_tensor(), D::Minus1).unwrap();
    let lp = candle_nn::ops::log_softmax(phi, D::Minus1).unwrap();
    let mut kl = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    for y in all_responses() {
        let c = Tensor::new(contexts(&y), &Device::Cpu).unwrap();
        let t =
            Tensor::new(y.iter().map(|&v| v as u32).collect::<Vec<_>>(), &Device::Cpu).unwrap().unsqueeze(1).unwrap();
        let seq_lq = lq.index_select(&c, 0).unwrap().gather(&t, 1).unwrap().sum_all().unwrap();
        let seq_lp = lp.index_select(&c, 0).unwrap().gather(&t, 1).unwrap().sum_all().unwrap();
        let term = (seq_lq.exp().unwrap() * (&seq_lq - seq_lp).unwrap()).unwrap();
        kl = (kl + term).unwrap();
    }
    kl.backward().unwrap().get(theta.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Log-probability rows of a logits table.
fn log_rows(table: &Tensor) -> Vec<Vec<f32>> {
    table
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| {
            let mut x = Vec::new();
            log_softmax_into(r, &mut x);
            x
        })
        .collect()
}

/// The estimated gradient over weighted rollouts: Σ_y weight(y) · ∇(pg(y) + single(y)), with the
/// importance weights of the mixture (1 − α)q + αp when `weighted`. Sampled rollouts with
/// weight 1/m give the Monte-Carlo estimate; every response with its mixture probability gives
/// the estimator's exact expectation.
fn estimator_gradient(
    theta: &Var,
    phi: &Tensor,
    alpha: f32,
    weighted: bool,
    rollouts: &[(Vec<usize>, f32)],
) -> Vec<f32> {
    let cfg = PolicyConfig {
        returns: Returns::Future,
        gamma: 1.0,
        reward_scaling: 1.0,
        reward_clip: None,
        length_norm: false,
        whiten: false,
        clip_ratio: None,
    };
    policy_gradient(theta, phi, alpha, weighted, rollouts, &cfg, true)
}

/// The gradient of the policy-gradient surrogate with advantages per `cfg` (plus the exact
/// single-step reverse KL when `single`) over weighted rollouts.
fn policy_gradient(
    theta: &Var,
    phi: &Tensor,
    alpha: f32,
    weighted: bool,
    rollouts: &[(Vec<usize>, f32)],
    cfg: &PolicyConfig,
    single: bool,
) -> Vec<f32> {
    let (lq_rows, lp_rows) = (log_rows(theta.as_tensor()), log_rows(phi));
    let (mut ctxs, mut targets, mut old, mut imp, mut adv, mut weights) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for (y, weight) in rollouts {
        let (mut lq, mut lp) = (Vec::new(), Vec::new());
        for (t, &v) in y.iter().enumerate() {
            let c = ctx(&y[..t]);
            let mixed = mix_log_prob(lq_rows[c][v], lp_rows[c][v], alpha);
            ctxs.push(c as u32);
            targets.push(v as u32);
            lq.push(lq_rows[c][v]);
            lp.push(lp_rows[c][v]);
            imp.push(if weighted { (lq_rows[c][v] - mixed).exp() } else { 1.0 });
            weights.push(*weight);
        }
        adv.extend(advantages(&[rewards(&lp, &lq, cfg)], cfg).remove(0));
        old.extend(lq);
    }
    let n = ctxs.len();
    let c = Tensor::from_slice(&ctxs, n, &Device::Cpu).unwrap();
    let z = theta.as_tensor().index_select(&c, 0).unwrap();
    let zt = phi.index_select(&c, 0).unwrap();
    let t = Tensor::from_slice(&targets, (n, 1), &Device::Cpu).unwrap();
    let logq = candle_nn::ops::log_softmax(&z, D::Minus1).unwrap().gather(&t, 1).unwrap().squeeze(1).unwrap();
    let mut loss = pg_loss(&logq, &old, &imp, &adv, &weights, None).unwrap();
    if single {
        let single_w: Vec<f32> = imp.iter().zip(&weights).map(|(w, r)| w * r).collect();
        loss = (loss + divergence(&z, &zt, &single_w, Divergence::ReverseKl).unwrap()).unwrap();
    }
    let g = loss.backward().unwrap();
    g.get(theta.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// `m` responses drawn token by token from (1 − α)q + αp, each with weight 1/m.
fn sampled(theta: &Var, phi: &Tensor, alpha: f32, m: usize, seed: u64) -> Vec<(Vec<usize>, f32)> {
    let (lq_rows, lp_rows) = (log_rows(theta.as_tensor()), log_rows(phi));
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..m)
        .map(|_| {
            let mut y = Vec::new();
            loop {
                let c = ctx(&y);
                let mixed: Vec<f32> = (0..V).map(|v| mix_log_prob(lq_rows[c][v], lp_rows[c][v], alpha)).collect();
                let v = sample_from_logits(&mixed, rng.random()) as usize;
                y.push(v);
                if v == EOS || y.len() == MAX_T {
                    break (y, 1.0 / m as f32);
                }
            }
        })
        .collect()
}

/// Every response with its probability under the mixture, computed in f64.
fn enumerated(theta: &Var, phi: &Tensor, alpha: f32) -> Vec<(Vec<usize>, f32)> {
    let (lq_rows, lp_rows) = (log_rows(theta.as_tensor()), log_rows(phi));
    let a = alpha as f64;
    let out: Vec<(Vec<usize>, f32)> = all_responses()
        .into_iter()
        .map(|y| {
            let prob: f64 = (0..y.len())
                .map(|t| {
                    let (c, v) = (ctx(&y[..t]), y[t]);
                    (1.0 - a) * (lq_rows[c][v] as f64).exp() + a * (lp_rows[c][v] as f64).exp()
                })
                .product();
            (y, prob as f32)
        })
        .collect();
    let total: f64 = out.iter().map(|(_, p)| *p as f64).sum();
    assert!((total - 1.0).abs() < 1e-5, "response probabilities sum to {total}");
    out
}

fn tables() -> (Var, Tensor) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut table = |scale: f32| -> Vec<f32> { (0..7 * V).map(|_| (rng.random::<f32>() - 0.5) * scale).collect() };
    let theta = Var::from_vec(table(3.0), (7, V), &Device::Cpu).unwrap();
    let phi = Tensor::from_vec(table(4.0), (7, V), &Device::Cpu).unwrap();
    (theta, phi)
}

/// Mean and standard error per component over shards.
fn shard_stats(theta: &Var, phi: &Tensor, alpha: f32, weighted: bool) -> (Vec<f64>, Vec<f64>) {
    let shards: Vec<Vec<f32>> = (0..8)
        .map(|s| estimator_gradient(theta, phi, alpha, weighted, &sampled(theta, phi, alpha, 20_000, 100 + s)))
        .collect();
    let k = shards.len() as f64;
    let mean: Vec<f64> = (0..shards[0].len()).map(|i| shards.iter().map(|g| g[i] as f64).sum::<f64>() / k).collect();
    let se: Vec<f64> = (0..mean.len())
        .map(|i| (shards.iter().map(|g| (g[i] as f64 - mean[i]).powi(2)).sum::<f64>() / (k - 1.0) / k).sqrt())
        .collect();
    (mean, se)
}

fn rel_err(a: &[f64], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, &y)| (x - y as f64).powi(2)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum::<f64>().sqrt();
    num / den
}

/// The Monte-Carlo mean lies within 4 standard errors of the estimator's exact expectation
/// (every component), so the enumerated expectation is the estimator's.
fn assert_mean_matches_expectation(mean: &[f64], se: &[f64], expected: &[f32], what: &str) {
    for (i, ((m, s), e)) in mean.iter().zip(se).zip(expected).enumerate() {
        assert!(
            (m - *e as f64).abs() < 4.0 * s + 1e-5,
            "{what} component {i}: estimate {m:.5} ± {s:.5} vs expectation {e:.5}"
        );
    }
}

/// At α = 0 the estimator's exact expectation is the exact gradient (to float precision), and
/// sampled estimates average to it.
#[test]
fn the_estimator_is_unbiased_without_teacher_mixing() {
    let (theta, phi) = tables();
    let exact = exact_gradient(&theta, &phi);
    let expected = estimator_gradient(&theta, &phi, 0.0, true, &enumerated(&theta, &phi, 0.0));
    let bias = rel_err(&expected.iter().map(|&x| x as f64).collect::<Vec<_>>(), &exact);
    assert!(bias < 1e-5, "α = 0: the expectation differs from the gradient by {bias} (relative)");
    let (mean, se) = shard_stats(&theta, &phi, 0.0, true);
    assert_mean_matches_expectation(&mean, &se, &exact, "α = 0");
}

/// With α > 0 the per-token importance weights (no product over time, as in the paper) make
/// the estimator approximate: they correct each token's sampling distribution but not the
/// shift of the prefixes towards the teacher. The bias is computed exactly, by enumerating the
/// estimator's expectation under the mixture (and checked against Monte-Carlo means within
/// their standard errors): relative to the exact gradient it grows with α and the weights
/// reduce it. The figures are printed (`cargo test -- --nocapture`).
#[test]
fn importance_weights_keep_the_mixed_estimator_close() {
    let (theta, phi) = tables();
    let exact = exact_gradient(&theta, &phi);
    let mut last = 0.0;
    for alpha in [0.1, 0.2, 0.4] {
        let rollouts = enumerated(&theta, &phi, alpha);
        let expected = estimator_gradient(&theta, &phi, alpha, true, &rollouts);
        let expected_plain = estimator_gradient(&theta, &phi, alpha, false, &rollouts);
        let as_f64 = |g: &[f32]| g.iter().map(|&x| x as f64).collect::<Vec<_>>();
        let (r, r_plain) = (rel_err(&as_f64(&expected), &exact), rel_err(&as_f64(&expected_plain), &exact));
        eprintln!("α = {alpha}: exact relative bias {r:.4} with importance weights, {r_plain:.4} without");
        let (mean, se) = shard_stats(&theta, &phi, alpha, true);
        assert_mean_matches_expectation(&mean, &se, &expected, &format!("α = {alpha}"));
        assert!(r < r_plain, "α = {alpha}: the weights should reduce the bias ({r} vs {r_plain})");
        assert!(r > last, "the bias should grow with α");
        last = r;
    }
}

/// OPD's estimator (`DistillConfig::opd`: student samples, per-token rewards log p − log q,
/// importance-sampled loss, no single-step term) with discount γ = 1 has the exact gradient of
/// the sequence-level reverse KL as its expectation (enumerated, relative 1e-5), and sampled
/// estimates average to it; with the recipe's default γ = 0 (each token's own reward) the
/// expectation is a different, computed vector: the per-token objective is not the
/// sequence-level KL's gradient.
#[test]
fn opd_estimator_is_unbiased_at_discount_one() {
    let (theta, phi) = tables();
    let exact = exact_gradient(&theta, &phi);
    let as_f64 = |g: &[f32]| g.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let mut policy = minillm::train::minillm::DistillConfig::opd().policy;
    policy.gamma = 1.0;
    let rollouts = enumerated(&theta, &phi, 0.0);
    let expected = policy_gradient(&theta, &phi, 0.0, false, &rollouts, &policy, false);
    let bias = rel_err(&as_f64(&expected), &exact);
    assert!(bias < 1e-5, "γ = 1: the expectation differs from the gradient by {bias} (relative)");
    let shards: Vec<Vec<f32>> = (0..8)
        .map(|s| {
            policy_gradient(&theta, &phi, 0.0, false, &sampled(&theta, &phi, 0.0, 20_000, 300 + s), &policy, false)
        })
        .collect();
    let k = shards.len() as f64;
    let mean: Vec<f64> = (0..exact.len()).map(|i| shards.iter().map(|g| g[i] as f64).sum::<f64>() / k).collect();
    let se: Vec<f64> = (0..mean.len())
        .map(|i| (shards.iter().map(|g| (g[i] as f64 - mean[i]).powi(2)).sum::<f64>() / (k - 1.0) / k).sqrt())
        .collect();
    assert_mean_matches_expectation(&mean, &se, &exact, "OPD γ = 1");
    policy.gamma = 0.0;
    let per_token = policy_gradient(&theta, &phi, 0.0, false, &rollouts, &policy, false);
    let r0 = rel_err(&as_f64(&per_token), &exact);
    eprintln!("OPD: relative distance of the γ = 0 expectation from the sequence-level gradient: {r0:.4}");
    assert!(r0 > 0.05, "γ = 0 should differ from the sequence-level gradient ({r0})");
}
