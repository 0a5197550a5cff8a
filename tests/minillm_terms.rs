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

/// One `distill` update on real tiny models (gpt2 student, llama teacher with 64 rows beyond
/// the shared vocabulary) equals PyTorch (scripts/make_distill_fixture.py), under the released
/// defaults, the `paper` preset (weighted single-step term, plain LM loss as PT term) and the
/// `opd` preset (α = 0, per-token advantages discounted by γ = 0.5, importance-sampled loss): the
/// re-scored buffer (log q_old, log p, importance weights, rewards), the trainer's micro-batch
/// loss — pg + single + pt with the window weights, the advantage slicing, the response
/// positions and the kept teacher hidden states — and its gradient for every student
/// parameter.
#[test]
fn one_distill_update_equals_pytorch_on_real_models() {
    use minillm::train::minillm::rollout::{rescore_rollouts, Rollout};
    use minillm::train::minillm::{DistillConfig, DistillData, DistillTask};
    use minillm::train::trainer::{Task, Window};
    let fx = candle_core::safetensors::load(common::fixtures().join("losses/distill_step.safetensors"), &Device::Cpu)
        .unwrap();
    let prompts = common::split(&fx["prompts"], &fx["prompt_lens"]);
    let responses = common::split(&fx["responses"], &fx["response_lens"]);
    let chunks: Vec<Vec<u32>> =
        fx["chunks"].to_vec2::<i32>().unwrap().iter().map(|c| c.iter().map(|&x| x as u32).collect()).collect();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = prompts.iter().cloned().zip(responses.iter().cloned()).collect();
    let opd = {
        let mut c = DistillConfig::opd();
        c.policy.gamma = 0.5;
        c
    };
    for (prefix, preset) in [("", DistillConfig::default()), ("paper.", DistillConfig::paper()), ("opd.", opd)] {
        let key = |k: &str| format!("{prefix}{k}");
        let scalar = |k: &str| fx[&key(k)].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
        let (student, teacher) = (common::load("gpt2"), common::load("llama"));
        let cfg = DistillConfig { num_rollouts: 8, rollout_batch: 8, inner_epochs: 1, max_len: 64, ..preset };
        let buffer = rescore_rollouts(&student, &teacher, &pairs, &cfg).unwrap();
        let flat = |f: &dyn Fn(&Rollout) -> &Vec<f32>| -> Vec<f32> {
            buffer.iter().flat_map(|r| f(r).iter().copied()).collect()
        };
        for (name, got) in [
            ("logq_old", flat(&|r| &r.logq_old)),
            ("logp", flat(&|r| &r.logp)),
            ("importance", flat(&|r| &r.importance)),
            ("rewards", flat(&|r| &r.rewards)),
        ] {
            let want = fx[&key(name)].to_vec1::<f32>().unwrap();
            assert_eq!(got.len(), want.len(), "{prefix}{name}");
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                close(*a, *b, 1e-4, &format!("{prefix}{name}[{k}]"));
            }
        }
        let data = DistillData { prompts: prompts.clone(), valid: Vec::new(), corpus: chunks.clone() };
        let mut task = DistillTask::new(cfg, teacher, data, 0).unwrap();
        task.replace_buffer(buffer, 8);
        task.begin_step(&student, 0, Window { batch_size: 8, grad_accum: 1 }).unwrap();
        let (loss, stats) = task.micro_loss(&student, 0).unwrap();
        for name in ["pg", "single", "pt"] {
            // A term that is off is absent from the statistics and 0 in the fixture.
            close(stats.get(name).copied().unwrap_or(0.0) as f32, scalar(name), 1e-4, &key(name));
        }
        close(loss.to_scalar::<f32>().unwrap(), scalar("loss"), 1e-4, &key("loss"));
        let grads = loss.backward().unwrap();
        let params = student.lm.params();
        let mut compared = 0;
        for (name, var) in params.trainable() {
            let got = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let want = fx[&key(&format!("grad.{name}"))].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Per tensor: the largest error against the tensor's largest gradient entry.
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(scale > 0.0 && err <= 1e-4 * scale, "{prefix}∂loss/∂{name}: max |Δ| {err} vs max |g| {scale}");
            compared += 1;
        }
        let expected = fx.keys().filter(|k| k.starts_with(&key("grad."))).count();
        assert_eq!(compared, expected, "every parameter compared");
    }
}

/// What teacher-mixed sampling keeps (log q, log p, the teacher's final hidden states at each
/// response position) equals a fresh full forward pass of each model over the finished
/// rollouts (`rescore_rollouts`): the KV-cached decoding, the kept states and the training
/// layout agree.
#[test]
fn kept_teacher_states_equal_a_fresh_teacher_forward() {
    use minillm::generate::{generate_mixed, row_rngs, MixedSampling};
    use minillm::train::minillm::rollout::rescore_rollouts;
    use minillm::train::minillm::DistillConfig;
    let (student, teacher) = (common::load("gpt2"), common::load("llama"));
    let prompts: Vec<Vec<u32>> = vec![vec![17, 42, 99], vec![5, 6], vec![200, 201, 202, 203, 204]];
    let sampling = MixedSampling {
        alpha: 0.2,
        max_new_tokens: 10,
        max_length: None,
        keep_teacher_hidden: true,
        record_forward_kl: false,
    };
    let r =
        generate_mixed(student.lm.as_ref(), teacher.lm.as_ref(), &prompts, &[0], 0, &sampling, &mut row_rngs(8, 0..3))
            .unwrap();
    let kept = r.teacher_hidden.expect("teacher states kept");
    let pairs: Vec<(Vec<u32>, Vec<u32>)> =
        prompts.iter().cloned().zip(r.generation.responses.iter().cloned()).collect();
    let cfg = DistillConfig { rollout_batch: 2, ..DistillConfig::default() };
    let fresh = rescore_rollouts(&student, &teacher, &pairs, &cfg).unwrap();
    for (row, f) in fresh.iter().enumerate() {
        let n = f.response.len();
        assert!(n > 1, "row {row}: a longer response is needed");
        let want = f.teacher_hidden.as_ref().unwrap().to_vec2::<f32>().unwrap();
        let got = kept.get(row).unwrap().narrow(0, 0, n).unwrap().to_vec2::<f32>().unwrap();
        for (t, (a, b)) in got.iter().zip(&want).enumerate() {
            let d = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(d < 1e-4, "row {row} position {t}: kept teacher state differs by {d}");
        }
        for (t, ((q, p), (fq, fp))) in
            r.logq[row].iter().zip(&r.logp[row]).zip(f.logq_old.iter().zip(&f.logp)).enumerate()
        {
            close(*q, *fq, 1e-4, &format!("row {row} log q[{t}]"));
            close(*p, *fp, 1e-4, &format!("row {row} log p[{t}]"));
        }
    }
}

/// The released `Loss.ppo_loss`, called as released on a minibatch collated by the released
/// storage (scripts/make_released_loss_fixture.py): four rollouts from two generation batches
/// stored at widths 7 and 6, whitened over the padded [4, 7] table. `distill.released_padding`
/// reproduces its pg and single-step terms and gradient; the default (whitening over the
/// minibatch's longest response, 3 tokens here) differs from it.
#[test]
fn released_padding_reproduces_the_released_loss() {
    use minillm::train::minillm::rollout::rescore_rollouts;
    use minillm::train::minillm::{DistillConfig, DistillData, DistillTask};
    use minillm::train::trainer::{Task, Window};
    let fx = candle_core::safetensors::load(common::fixtures().join("losses/released_loss.safetensors"), &Device::Cpu)
        .unwrap();
    let scalar = |k: &str| fx[k].to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
    let prompts = common::split(&fx["prompts"], &fx["prompt_lens"]);
    let responses = common::split(&fx["responses"], &fx["response_lens"]);
    let widths = fx["generation_widths"].to_vec1::<i32>().unwrap();
    let pairs: Vec<(Vec<u32>, Vec<u32>)> = prompts.iter().cloned().zip(responses.iter().cloned()).collect();
    let step = |released_padding: bool| {
        let (student, teacher) = (common::load("gpt2"), common::load("llama"));
        let cfg = DistillConfig {
            num_rollouts: 4,
            rollout_batch: 4,
            inner_epochs: 1,
            max_len: 64,
            pt: false,
            released_padding,
            ..DistillConfig::default()
        };
        let mut buffer = rescore_rollouts(&student, &teacher, &pairs, &cfg).unwrap();
        for (r, &w) in buffer.iter_mut().zip(&widths) {
            r.generation_width = w as usize;
        }
        let data = DistillData { prompts: prompts.clone(), valid: Vec::new(), corpus: Vec::new() };
        let mut task = DistillTask::new(cfg, teacher, data, 0).unwrap();
        task.replace_buffer(buffer, 4);
        task.begin_step(&student, 0, Window { batch_size: 4, grad_accum: 1 }).unwrap();
        let (loss, stats) = task.micro_loss(&student, 0).unwrap();
        let grads = loss.backward().unwrap();
        let g: Vec<(String, Vec<f32>)> = student
            .lm
            .params()
            .trainable()
            .map(|(n, v)| (n.to_string(), grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap()))
            .collect();
        (stats, loss.to_scalar::<f32>().unwrap(), g)
    };
    let (stats, loss, grads) = step(true);
    close(stats["pg"] as f32, scalar("pg"), 1e-4, "released pg");
    close(stats["single"] as f32, scalar("single"), 1e-4, "released single");
    close(loss, scalar("loss"), 1e-4, "released loss");
    for (name, got) in &grads {
        let want = fx[&format!("grad.{name}")].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        let err = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(scale > 0.0 && err <= 1e-4 * scale, "∂loss/∂{name}: max |Δ| {err} vs max |g| {scale}");
    }
    let (default, _, _) = step(false);
    assert!(
        (default["pg"] - stats["pg"]).abs() > 1e-2 * stats["pg"].abs(),
        "the padding width should change the whitened pg term ({} vs {})",
        default["pg"],
        stats["pg"]
    );
}
