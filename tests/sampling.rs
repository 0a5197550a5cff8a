//! Decoding: greedy equals `transformers.generate(do_sample=False)`; sampling is deterministic
//! under a seed, each row with its own stream; teacher-mixed sampling draws from the
//! probability mixture and reports the right log q / log p; logits processors behave as
//! `transformers`' do.

mod common;

use common::*;
use minillm::generate::*;
use minillm::score::{score, ScoreRequest};

fn unpad(ids: &candle_core::Tensor, mask: &candle_core::Tensor) -> Vec<Vec<u32>> {
    let ids = ids.to_dtype(candle_core::DType::I64).unwrap().to_vec2::<i64>().unwrap();
    ids.iter()
        .zip(rows_u8(mask))
        .map(|(r, m)| r.iter().zip(m).filter(|(_, m)| *m == 1).map(|(&t, _)| t as u32).collect())
        .collect()
}

fn prompts_of(name: &str) -> Vec<Vec<u32>> {
    let r = reference(name);
    unpad(&r["greedy.input_ids"], &r["greedy.attention_mask"])
}

#[test]
fn greedy_decoding_matches_transformers_generate() {
    for name in FAMILIES {
        let model = load(name);
        let r = reference(name);
        let prompts = prompts_of(name);
        let want = r["greedy.output"].to_dtype(candle_core::DType::I64).unwrap().to_vec2::<i64>().unwrap();
        let eos = model.eos_token_ids.clone();
        let mut rngs = row_rngs(0, 0..3);
        let got = generate(model.lm.as_ref(), &prompts, &eos, eos[0], &SamplingConfig::greedy(12), &mut rngs).unwrap();
        for (row, (g, w)) in got.responses.iter().zip(&want).enumerate() {
            // transformers pads finished rows with pad (= eos here); compare up to the first EOS.
            let w: Vec<u32> = w.iter().map(|&t| t as u32).collect();
            let end = w.iter().position(|t| eos.contains(t)).map_or(w.len(), |i| i + 1);
            assert_eq!(g, &w[..end].to_vec(), "{name} row {row}");
        }
    }
}

#[test]
fn sampling_is_deterministic_under_a_seed_and_varies_with_it() {
    let model = load("gpt2");
    let prompts = prompts_of("gpt2");
    let cfg = SamplingConfig { top_k: 50, top_p: 0.9, temperature: 0.8, ..SamplingConfig::sampling(16) };
    let run = |seed| generate(model.lm.as_ref(), &prompts, &[0], 0, &cfg, &mut row_rngs(seed, 0..3)).unwrap();
    assert_eq!(run(7), run(7));
    assert_ne!(run(7).responses, run(8).responses);
}

/// Rows choose their tokens in parallel, each with its own stream: every row of a batch of one
/// prompt repeated draws what that row's stream draws alone and records its own values, and
/// the rows differ (plain and teacher-mixed sampling).
#[test]
fn each_row_samples_with_its_own_stream() {
    let (student, teacher) = (load("gpt2"), load("qwen2"));
    let rows = 12u64;
    let batch = vec![prompts_of("gpt2")[0].clone(); rows as usize];
    let cfg = SamplingConfig::sampling(12);
    let plain = |prompts: &[Vec<u32>], streams: std::ops::Range<u64>| {
        generate(student.lm.as_ref(), prompts, &[], 0, &cfg, &mut row_rngs(5, streams)).unwrap().responses
    };
    let mixing = MixedSampling {
        alpha: 0.3,
        max_new_tokens: 12,
        max_length: None,
        keep_teacher_hidden: false,
        record_forward_kl: true,
    };
    let mixed = |prompts: &[Vec<u32>], streams: std::ops::Range<u64>| {
        let r = generate_mixed(
            student.lm.as_ref(),
            teacher.lm.as_ref(),
            prompts,
            &[],
            0,
            &mixing,
            &mut row_rngs(5, streams),
        )
        .unwrap();
        (r.generation.responses, r.logq, r.forward_kl)
    };
    let (together, together_mixed) = (plain(&batch, 0..rows), mixed(&batch, 0..rows));
    for row in 0..rows {
        let i = row as usize;
        assert_eq!(together[i], plain(&batch[..1], row..row + 1)[0], "row {row}");
        let alone = mixed(&batch[..1], row..row + 1);
        assert_eq!(together_mixed.0[i], alone.0[0], "mixed row {row}");
        // The values agree up to the products' rounding at another row count.
        for (what, a, b) in
            [("log q", &together_mixed.1[i], &alone.1[0]), ("forward KL", &together_mixed.2[i], &alone.2[0])]
        {
            assert_eq!(a.len(), b.len(), "mixed row {row}: {what}");
            assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4), "mixed row {row}: {what} {a:?} vs {b:?}");
        }
    }
    let distinct: std::collections::HashSet<_> = together.iter().collect();
    assert!(distinct.len() > rows as usize / 2, "{} distinct responses of {rows}", distinct.len());
}

/// Rows that finish early leave the decoding batch (their cached keys and values dropped, the
/// others' moved down): in a batch of prompts of different lengths whose rows stop at
/// different steps, every row draws what it draws alone, with the same log q, log p, forward
/// KL and teacher hidden states (plain sampling, and teacher-mixed sampling with an f32 and a
/// frozen bf16 teacher, whose cache stores bf16).
#[test]
fn rows_that_finish_early_leave_the_batch_without_changing_the_others() {
    use minillm::model::{load_model_as, Weights};
    let student = load("gpt2");
    let bf16_teacher = load_model_as(
        &fixtures().join("models/qwen2"),
        &candle_core::Device::Cpu,
        candle_core::DType::BF16,
        Weights::Frozen,
    )
    .unwrap();
    let rows = 16u64;
    let prompts: Vec<Vec<u32>> = (0..rows as usize).map(|i| prompts_of("gpt2")[i % 3].clone()).collect();
    // One token in sixteen ends a row: rows stop at many different steps.
    let eos: Vec<u32> = (0..384).step_by(16).collect();
    let cfg = SamplingConfig::sampling(24);
    let plain = |prompts: &[Vec<u32>], streams: std::ops::Range<u64>| {
        generate(student.lm.as_ref(), prompts, &eos, 0, &cfg, &mut row_rngs(9, streams)).unwrap()
    };
    let together = plain(&prompts, 0..rows);
    let early = together.responses.iter().filter(|r| r.len() <= 12).count();
    assert!(early >= 4, "only {early} of {rows} rows ended by step 12: the test needs rows to leave the batch");
    for row in 0..rows {
        let i = row as usize;
        let alone = plain(&prompts[i..i + 1], row..row + 1);
        assert_eq!(together.responses[i], alone.responses[0], "plain row {row}");
        assert_eq!(together.ended_with_eos[i], alone.ended_with_eos[0], "plain row {row}");
    }
    for (teacher, bf16) in [(load("qwen2"), false), (bf16_teacher, true)] {
        let mixing = MixedSampling {
            alpha: 0.3,
            max_new_tokens: 24,
            max_length: None,
            keep_teacher_hidden: true,
            record_forward_kl: true,
        };
        let mixed = |prompts: &[Vec<u32>], streams: std::ops::Range<u64>| {
            let lm = teacher.lm.as_ref();
            generate_mixed(student.lm.as_ref(), lm, prompts, &eos, 0, &mixing, &mut row_rngs(9, streams)).unwrap()
        };
        let together = mixed(&prompts, 0..rows);
        let lens: std::collections::HashSet<usize> = together.generation.responses.iter().map(Vec::len).collect();
        assert!(lens.len() >= 4, "mixed: response lengths {lens:?}: the test needs rows to stop at different steps");
        let hidden = together.teacher_hidden.as_ref().unwrap();
        for row in 0..rows {
            let i = row as usize;
            let alone = mixed(&prompts[i..i + 1], row..row + 1);
            let n = alone.generation.responses[0].len();
            assert_eq!(together.generation.responses[i], alone.generation.responses[0], "mixed row {row}");
            // Within 1e-4 plus `rel` of the value. The bf16 teacher rounds its products' inputs
            // to bf16: the batch's other summation order (one f32 ulp upstream) can flip one
            // such rounding, which moves its outputs by up to a bf16 ulp (2^-8 of the value). A
            // wrong row moved or spread moves them by their own size.
            let within = |a: &[f32], b: &[f32], rel: f32| {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4 + rel * x.abs().max(y.abs()))
            };
            let teacher_rel = if bf16 { 1.0 / 256.0 } else { 0.0 };
            assert!(within(&together.logq[i], &alone.logq[0], 0.0), "mixed row {row}: log q");
            assert!(within(&together.logp[i], &alone.logp[0], teacher_rel), "mixed row {row}: log p");
            assert!(within(&together.forward_kl[i], &alone.forward_kl[0], teacher_rel), "mixed row {row}: forward KL");
            let flat = |t: candle_core::Tensor| t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap();
            let (a, b) = (
                flat(hidden.get(i).unwrap().narrow(0, 0, n).unwrap()).to_vec1::<f32>().unwrap(),
                flat(alone.teacher_hidden.as_ref().unwrap().get(0).unwrap().narrow(0, 0, n).unwrap())
                    .to_vec1::<f32>()
                    .unwrap(),
            );
            assert!(within(&a, &b, teacher_rel), "mixed row {row}: teacher hidden states");
        }
    }
}

#[test]
fn rows_stop_at_their_first_eos_and_the_padded_layout_masks_the_rest() {
    let model = load("qwen2");
    let prompts = prompts_of("qwen2");
    // Make EOS the token the model likes best after each prompt, so rows stop at step 1.
    let first =
        generate(model.lm.as_ref(), &prompts, &[], 0, &SamplingConfig::greedy(1), &mut row_rngs(0, 0..3)).unwrap();
    let eos: Vec<u32> = first.responses.iter().map(|r| r[0]).collect();
    let got = generate(model.lm.as_ref(), &prompts, &eos[..1], 0, &SamplingConfig::greedy(10), &mut row_rngs(0, 0..3))
        .unwrap();
    assert_eq!(got.responses[0], vec![eos[0]]);
    assert!(got.ended_with_eos[0]);
    // Re-scoring layout: prompts left-padded, responses right after them, targets = responses.
    let pairs: Vec<(&[u32], &[u32])> =
        got.prompts.iter().zip(&got.responses).map(|(p, r)| (p.as_slice(), r.as_slice())).collect();
    let batch = minillm::data::batch::LmBatch::from_rollouts(&pairs, 0, &candle_core::Device::Cpu).unwrap();
    assert_eq!(batch.targets, got.responses.concat());
    let ids = batch.input_ids.to_vec2::<u32>().unwrap();
    let p = prompts.iter().map(Vec::len).max().unwrap();
    let t = ids[0].len();
    let mut k = 0;
    for (b, resp) in got.responses.iter().enumerate() {
        assert_eq!(&ids[b][p..p + resp.len()], &resp[..]);
        assert_eq!(&ids[b][p - prompts[b].len()..p], &prompts[b][..]);
        let real: usize = batch.mask.row(b).iter().map(|&m| m as usize).sum();
        assert_eq!(real, prompts[b].len() + resp.len());
        for j in 0..resp.len() {
            assert_eq!(batch.positions[k] as usize, b * t + p + j - 1, "position j − 1 predicts response token j");
            k += 1;
        }
    }
}

/// The log q and log p the sampler reports equal the models' log-probabilities of the chosen
/// tokens, as scored afterwards by a plain forward pass.
#[test]
fn mixed_rollout_log_probs_equal_rescoring_by_each_model() {
    let (student, teacher) = (load("gpt2"), load("llama"));
    let prompts = prompts_of("gpt2");
    let mut rngs = row_rngs(3, 0..3);
    let r = generate_mixed(
        student.lm.as_ref(),
        teacher.lm.as_ref(),
        &prompts,
        &[0],
        0,
        &MixedSampling {
            alpha: 0.2,
            max_new_tokens: 16,
            max_length: None,
            keep_teacher_hidden: false,
            record_forward_kl: false,
        },
        &mut rngs,
    )
    .unwrap();
    let reqs: Vec<ScoreRequest> = prompts
        .iter()
        .zip(&r.generation.responses)
        .map(|(p, y)| ScoreRequest { ids: [p.clone(), y.clone()].concat(), score_from: p.len() })
        .collect();
    // Rescore the student with the scorer, and the teacher with its own full forward pass: its
    // logits at the position before each response token, renormalised over the shared id range
    // (the student's 384 ids; the teacher's padded rows are outside the mixture).
    let sq = score(student.lm.as_ref(), &reqs, 1 << 14).unwrap();
    for (s, lq) in sq.iter().zip(&r.logq) {
        assert_eq!(s.logprobs.len(), lq.len());
        for (a, b) in s.logprobs.iter().zip(lq) {
            assert!((a - b).abs() < 1e-4, "log q {a} vs {b}");
        }
    }
    let shared = student.lm.info().vocab_size.min(teacher.lm.info().vocab_size);
    assert!(teacher.lm.info().vocab_size > shared, "the test needs a teacher with extra rows");
    let mut checked = 0;
    for (row, (req, lp)) in reqs.iter().zip(&r.logp).enumerate() {
        let ids = candle_core::Tensor::new(&req.ids[..], &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let mask = minillm::model::AttentionMask::full(1, req.ids.len());
        let logits = teacher.lm.forward(&ids, &mask, None).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(lp.len(), req.ids.len() - req.score_from, "row {row}");
        for (j, &got) in lp.iter().enumerate() {
            let at = &logits[req.score_from + j - 1][..shared];
            let max = at.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let lse = max + at.iter().map(|&x| (x - max).exp()).sum::<f32>().ln();
            let want = at[req.ids[req.score_from + j] as usize] - lse;
            assert!((got - want).abs() < 1e-4, "row {row} token {j}: log p {got} vs teacher forward {want}");
            checked += 1;
        }
    }
    assert!(checked >= 16, "only {checked} teacher log-probs compared");
    let same = generate_mixed(
        student.lm.as_ref(),
        student.lm.as_ref(),
        &prompts,
        &[0],
        0,
        &MixedSampling {
            alpha: 0.0,
            max_new_tokens: 8,
            max_length: None,
            keep_teacher_hidden: false,
            record_forward_kl: false,
        },
        &mut row_rngs(3, 0..3),
    )
    .unwrap();
    for (lq, lp) in same.logq.iter().zip(&same.logp) {
        assert_eq!(lq, lp, "teacher = student must give log p = log q");
    }
    let again = generate_mixed(
        student.lm.as_ref(),
        teacher.lm.as_ref(),
        &prompts,
        &[0],
        0,
        &MixedSampling {
            alpha: 0.2,
            max_new_tokens: 16,
            max_length: None,
            keep_teacher_hidden: false,
            record_forward_kl: false,
        },
        &mut row_rngs(3, 0..3),
    )
    .unwrap();
    assert_eq!(
        (&r.generation, &r.logq, &r.logp),
        (&again.generation, &again.logq, &again.logp),
        "teacher-mixed sampling is deterministic under a seed"
    );
}

/// The first sampled token follows (1 − α)·q + α·p (probabilities, not logits), drawn by the
/// real sampler at α = 0.2 and 0.8 (where swapping α changes the distribution): 20,000 rows,
/// every frequent token within 5 standard errors, and far from the swapped mixture and from
/// mixing logits.
#[test]
fn mixed_sampling_draws_from_the_probability_mixture() {
    let (student, teacher) = (load("gpt2"), load("qwen2"));
    let n = 20_000;
    let prompt = vec![vec![17u32, 42, 99]; n];
    let ids = candle_core::Tensor::new(&prompt[0][..], &candle_core::Device::Cpu).unwrap().unsqueeze(0).unwrap();
    let mask = minillm::model::AttentionMask::full(1, 3);
    let last = |m: &minillm::model::Model| {
        let l = m.lm.forward_last(&ids, &mask, None).unwrap().to_vec2::<f32>().unwrap().remove(0);
        let mut lp = Vec::new();
        log_softmax_into(&l[..384], &mut lp);
        lp
    };
    let (q, p) = (last(&student), last(&teacher));
    // The mixture in probabilities, written out here rather than through the library's helper.
    let prob_mix = |a: f64| -> Vec<f64> {
        q.iter().zip(&p).map(|(&lq, &lp)| (1.0 - a) * (lq as f64).exp() + a * (lp as f64).exp()).collect()
    };
    let chi = |counts: &[usize], want: &[f64]| -> f64 {
        (0..384).map(|v| (counts[v] as f64 - n as f64 * want[v]).powi(2) / (n as f64 * want[v]).max(1e-9)).sum()
    };
    for alpha in [0.2f32, 0.8] {
        let r = generate_mixed(
            student.lm.as_ref(),
            teacher.lm.as_ref(),
            &prompt,
            &[],
            0,
            &MixedSampling {
                alpha,
                max_new_tokens: 1,
                max_length: None,
                keep_teacher_hidden: false,
                record_forward_kl: false,
            },
            &mut row_rngs(11, 0..n as u64),
        )
        .unwrap();
        let mut counts = vec![0usize; 384];
        for y in &r.generation.responses {
            counts[y[0] as usize] += 1;
        }
        let mix = prob_mix(alpha as f64);
        let swapped = prob_mix(1.0 - alpha as f64);
        let logit_mix: Vec<f64> = {
            let l: Vec<f32> = q.iter().zip(&p).map(|(&a, &b)| (1.0 - alpha) * a + alpha * b).collect();
            let mut lp = Vec::new();
            log_softmax_into(&l, &mut lp);
            lp.iter().map(|&x| (x as f64).exp()).collect()
        };
        for v in 0..384 {
            let f = counts[v] as f64 / n as f64;
            if mix[v] > 0.005 {
                let se = (mix[v] * (1.0 - mix[v]) / n as f64).sqrt();
                assert!((f - mix[v]).abs() < 5.0 * se, "α {alpha} token {v}: frequency {f} vs mixture {}", mix[v]);
            }
        }
        // 383 degrees of freedom: the right mixture scores near 383, the others far above.
        let (c_mix, c_swapped, c_logit) = (chi(&counts, &mix), chi(&counts, &swapped), chi(&counts, &logit_mix));
        assert!(c_mix < 520.0, "α {alpha}: χ² against the probability mixture = {c_mix}");
        assert!(c_swapped > 2.0 * c_mix, "α {alpha}: χ² mixture {c_mix} vs swapped α {c_swapped}");
        assert!(c_logit > 2.0 * c_mix, "α {alpha}: χ² mixture {c_mix} vs logit mix {c_logit}");
    }
}

#[test]
fn top_k_keeps_the_k_largest_and_ties() {
    let mut l = vec![1.0, 5.0, 3.0, 3.0, 0.5];
    top_k_filter(&mut l, 2);
    let ninf = f32::NEG_INFINITY;
    assert_eq!(l, vec![ninf, 5.0, 3.0, 3.0, ninf]);
}

#[test]
fn top_p_keeps_the_token_that_crosses_p() {
    // probabilities 0.5, 0.3, 0.15, 0.05
    let probs = [0.5f32, 0.3, 0.15, 0.05];
    let base: Vec<f32> = probs.iter().map(|p| p.ln()).collect();
    let kept = |p: f32| {
        let mut l = base.clone();
        top_p_filter(&mut l, p);
        l.iter().filter(|x| x.is_finite()).count()
    };
    assert_eq!(kept(0.5), 1);
    assert_eq!(kept(0.6), 2);
    assert_eq!(kept(0.8), 2);
    assert_eq!(kept(0.81), 3);
    assert_eq!(kept(0.01), 1);
    assert_eq!(kept(1.0), 4);
}

#[test]
fn no_repeat_ngram_bans_completions_of_seen_ngrams() {
    // history ... 1 2 3 ... 1 2 → 3 is banned for n = 3; for n = 2 every successor of 2.
    let h = [1, 2, 3, 4, 2, 5, 1, 2];
    assert_eq!(banned_ngram_tokens(&h, 3), vec![3]);
    let mut b2 = banned_ngram_tokens(&h, 2);
    b2.sort();
    assert_eq!(b2, vec![3, 5]);
    assert!(banned_ngram_tokens(&h, 0).is_empty());
    assert!(banned_ngram_tokens(&[1], 3).is_empty());
}

#[test]
fn generation_never_repeats_an_ngram_when_blocked() {
    let model = load("opt");
    let prompts = prompts_of("opt");
    let cfg = SamplingConfig { no_repeat_ngram_size: 2, ..SamplingConfig::greedy(30) };
    let out = generate(model.lm.as_ref(), &prompts, &[], 0, &cfg, &mut row_rngs(0, 0..3)).unwrap();
    for (p, y) in prompts.iter().zip(&out.responses) {
        let all = [p.clone(), y.clone()].concat();
        let mut seen = std::collections::HashSet::new();
        for w in all.windows(2) {
            assert!(seen.insert(w.to_vec()), "bigram {w:?} repeated");
        }
    }
}

#[test]
fn prompts_beyond_the_position_limit_are_refused() {
    let model = load("gpt2"); // 64 learned positions
    let long = vec![vec![5u32; 64]];
    let e =
        generate(model.lm.as_ref(), &long, &[0], 0, &SamplingConfig::greedy(4), &mut row_rngs(0, 0..1)).unwrap_err();
    assert!(e.to_string().contains("64"), "{e}");
    let near = vec![vec![5u32; 60]];
    let out = generate(model.lm.as_ref(), &near, &[], 0, &SamplingConfig::greedy(10), &mut row_rngs(0, 0..1)).unwrap();
    assert_eq!(out.responses[0].len(), 4, "decoding stops at the position limit");
}

/// transformers' own processors (scripts/make_fixtures.py processors) on random logits with
/// histories that repeat n-grams: temperature, top-k, top-p, no-repeat-n-gram and the four
/// chained in `generate`'s order give the same kept tokens and values.
#[test]
fn logits_processors_equal_transformers() {
    let fx =
        candle_core::safetensors::load(fixtures().join("logits/processors.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let logits = fx["logits"].to_vec2::<f32>().unwrap();
    let history: Vec<Vec<u32>> =
        fx["history"].to_vec2::<i32>().unwrap().iter().map(|h| h.iter().map(|&t| t as u32).collect()).collect();
    let base = SamplingConfig::sampling(1);
    let cases = [
        ("temperature", SamplingConfig { temperature: 0.7, ..base.clone() }),
        ("top_k", SamplingConfig { top_k: 5, ..base.clone() }),
        ("top_p", SamplingConfig { top_p: 0.9, ..base.clone() }),
        ("no_repeat", SamplingConfig { no_repeat_ngram_size: 3, ..base.clone() }),
        ("all", SamplingConfig { no_repeat_ngram_size: 2, temperature: 0.7, top_k: 20, top_p: 0.8, ..base.clone() }),
    ];
    for (name, cfg) in cases {
        let want = fx[&format!("{name}.out")].to_vec2::<f32>().unwrap();
        let mut banned = 0;
        for (r, (row, h)) in logits.iter().zip(&history).enumerate() {
            let mut got = row.clone();
            process_logits(&mut got, h, &cfg);
            for (v, (a, b)) in got.iter().zip(&want[r]).enumerate() {
                let same = if b.is_finite() { (a - b).abs() <= 1e-5 * b.abs().max(1.0) } else { *a == *b };
                assert!(same, "{name} row {r} token {v}: {a} vs transformers {b}");
            }
            banned += want[r].iter().filter(|x| !x.is_finite()).count();
        }
        assert!(name == "temperature" || banned > 0, "{name}: the case removes nothing");
    }
}

/// `generate(do_sample=False, no_repeat_ngram_size=2)` of transformers, token for token.
#[test]
fn greedy_generation_with_ngram_blocking_equals_transformers() {
    let fx =
        candle_core::safetensors::load(fixtures().join("logits/processors.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let flat = fx["generate.prompts"].to_vec1::<i32>().unwrap();
    let mut at = 0;
    let prompts: Vec<Vec<u32>> = fx["generate.prompt_lens"]
        .to_vec1::<i32>()
        .unwrap()
        .iter()
        .map(|&n| {
            let p = flat[at..at + n as usize].iter().map(|&t| t as u32).collect();
            at += n as usize;
            p
        })
        .collect();
    let want = fx["generate.output"].to_vec2::<i32>().unwrap();
    let model = load("opt");
    let cfg = SamplingConfig { no_repeat_ngram_size: 2, ..SamplingConfig::greedy(30) };
    let got = generate(model.lm.as_ref(), &prompts, &[], 0, &cfg, &mut row_rngs(0, 0..3)).unwrap();
    for (row, (g, w)) in got.responses.iter().zip(&want).enumerate() {
        let w: Vec<u32> = w.iter().map(|&t| t as u32).collect();
        assert_eq!(g, &w, "row {row}");
    }
    let plain =
        generate(model.lm.as_ref(), &prompts, &[], 0, &SamplingConfig::greedy(30), &mut row_rngs(0, 0..3)).unwrap();
    assert_ne!(plain.responses, got.responses, "the blocking must change the output for the test to mean anything");
}
