//! The fused, chunked LM-head loss against the materialised path (logits, then the loss):
//! identical values and gradients for cross-entropy and for MiniLLM's clipped policy
//! surrogate, alone and with every divergence, at odd sizes; and its peak memory on a
//! GPT-2-sized vocabulary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};
use minillm::loss::{head_loss, head_loss_reference, Divergence, PolicyTokens, TargetTerm, TeacherHead};
use minillm::ops::packed::PackedMatrix;
use minillm::ops::WeightLayout;

/// Counts live heap bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn var(shape: &[usize], seed: u64, std: f32) -> Var {
    common::spread_var(shape, seed, std)
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) =
        (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    let scale = b.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale
}

struct Case {
    rows: usize,
    width: usize,
    vocab: usize,
    teacher_vocab: usize,
    chunk: usize,
}

/// Which target term a case uses.
#[derive(Clone, Copy, Debug)]
enum Term {
    CrossEntropy,
    /// The policy surrogate with this clip.
    Policy(Option<f64>),
}

fn check(case: &Case, term: Term, kind: Option<Divergence>) {
    let Case { rows, width, vocab, teacher_vocab, chunk } = *case;
    let h = var(&[rows, width], 1, 2.0);
    let w = var(&[vocab, width], 2, 1.0);
    let (th, tw) = (var(&[rows, 5], 3, 2.0), var(&[teacher_vocab, 5], 4, 1.0));
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7 % vocab) as u32).collect();
    let weights: Vec<f32> = (0..rows).map(|r| if r % 4 == 3 { 0.0 } else { 0.1 + r as f32 / 10.0 }).collect();
    let kd_weights: Vec<f32> = (0..rows).map(|r| if r % 5 == 2 { 0.0 } else { 0.3 + r as f32 / 7.0 }).collect();
    // Old log-probabilities spread around the current ones (ratios from e^-1.5 to e^1.5, so
    // that both clip edges are crossed), advantages of both signs, importance weights ≠ 1.
    // No ratio lands exactly on 1 ± ε, where candle's max/clamp split the gradient in halves.
    let logq = candle_nn::ops::log_softmax(&h.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap(), 1).unwrap();
    let logq: Vec<f32> = targets
        .iter()
        .enumerate()
        .map(|(r, &y)| logq.get(r).unwrap().get(y as usize).unwrap().to_scalar::<f32>().unwrap())
        .collect();
    let old: Vec<f32> = logq.iter().enumerate().map(|(r, l)| l + ((r * 5 % 7) as f32 - 3.0) / 2.0).collect();
    let importance: Vec<f32> = (0..rows).map(|r| 0.55 + (r % 3) as f32 * 0.35).collect();
    let advantages: Vec<f32> = (0..rows).map(|r| ((r * 3 % 5) as f32 - 2.0) * 0.7).collect();
    let target_term = || match term {
        Term::CrossEntropy => TargetTerm::CrossEntropy { weights: &weights, coef: 0.3 },
        Term::Policy(clip) => TargetTerm::Policy(PolicyTokens {
            logq_old: &old,
            importance: &importance,
            advantages: &advantages,
            weights: &weights,
            clip,
        }),
    };
    let teacher = || {
        kind.map(|kind| TeacherHead {
            hidden: th.as_tensor(),
            head: tw.as_tensor(),
            packed_head: None,
            kind,
            coef: 0.7,
            weights: &kd_weights,
        })
    };
    let what = format!("{rows}×{width}, vocab {vocab}/{teacher_vocab}, chunk {chunk}, {term:?}, {kind:?}");
    let fused = head_loss(h.as_tensor(), w.as_tensor(), &targets, target_term(), teacher(), Some(chunk)).unwrap();
    let reference = head_loss_reference(h.as_tensor(), w.as_tensor(), &targets, target_term(), teacher()).unwrap();
    let (lf, lr) = (fused.loss.to_scalar::<f32>().unwrap(), reference.loss.to_scalar::<f32>().unwrap());
    assert!((lf - lr).abs() <= 1e-5 * lr.abs().max(1.0), "{what}: loss {lf} vs {lr}");
    assert!((fused.target - reference.target).abs() <= 1e-5 * reference.target.abs().max(1.0), "{what}: target term");
    assert!((fused.kd - reference.kd).abs() <= 1e-5 * reference.kd.abs().max(1.0), "{what}: kd");
    let (gf, gr) = (fused.loss.backward().unwrap(), reference.loss.backward().unwrap());
    for (name, v) in [("hidden", &h), ("head", &w)] {
        let d = max_rel_diff(gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
        assert!(d < 2e-5, "{what}: ∂{name} differs by {d}");
    }
}

#[test]
fn fused_head_loss_matches_materialised_path() {
    let cases = [
        Case { rows: 1, width: 1, vocab: 1, teacher_vocab: 1, chunk: 1 },
        Case { rows: 7, width: 3, vocab: 67, teacher_vocab: 67, chunk: 3 },
        Case { rows: 12, width: 8, vocab: 130, teacher_vocab: 120, chunk: 5 },
        Case { rows: 9, width: 16, vocab: 70, teacher_vocab: 70, chunk: 128 },
    ];
    let kinds = [
        None,
        Some(Divergence::ReverseKl),
        Some(Divergence::ForwardKl),
        Some(Divergence::SoftCrossEntropy),
        Some(Divergence::Jsd { beta: 0.3 }),
        Some(Divergence::Tvd),
        Some(Divergence::SkewForwardKl { lambda: 0.1 }),
        Some(Divergence::SkewReverseKl { lambda: 0.1 }),
    ];
    for case in &cases {
        for term in [Term::CrossEntropy, Term::Policy(Some(0.2)), Term::Policy(None)] {
            for kind in kinds {
                check(case, term, kind);
            }
        }
    }
}

/// `t` rounded to bf16 and back to f32.
fn round_bf16(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn a_packed_teacher_head_multiplies_as_the_teacher_does() {
    // A bf16 teacher's packed head computes bf16(hidden)·W with f32 sums (its `logits`); the
    // materialised path on the bf16-rounded hidden states and the widened head is the same
    // arithmetic. An f32 packed head computes the f32 product. Odd widths, ragged chunks.
    let (rows, width, vocab, twidth) = (40, 16, 130, 23);
    let h = var(&[rows, width], 1, 2.0);
    let w = var(&[vocab, width], 2, 1.0);
    let (th, tw) = (var(&[rows, twidth], 3, 2.0), var(&[vocab, twidth], 4, 1.0));
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7 % vocab) as u32).collect();
    let weights: Vec<f32> = (0..rows).map(|r| 0.1 + r as f32 / 10.0).collect();
    let ce = TargetTerm::CrossEntropy { weights: &weights, coef: 0.5 };
    let tw_bf16 = tw.as_tensor().to_dtype(DType::BF16).unwrap();
    let th_rounded = round_bf16(th.as_tensor());
    let tw_widened = tw_bf16.to_dtype(DType::F32).unwrap();
    let packed_bf16 = Arc::new(PackedMatrix::pack(&tw_bf16, WeightLayout::OutIn).unwrap());
    let packed_f32 = Arc::new(PackedMatrix::pack(tw.as_tensor(), WeightLayout::OutIn).unwrap());
    let teacher = |hidden, head, packed_head| {
        Some(TeacherHead { hidden, head, packed_head, kind: Divergence::ReverseKl, coef: 0.5, weights: &weights })
    };
    let cases = [
        ("bf16", teacher(th.as_tensor(), &tw_bf16, Some(&packed_bf16)), teacher(&th_rounded, &tw_widened, None)),
        (
            "f32",
            teacher(th.as_tensor(), tw.as_tensor(), Some(&packed_f32)),
            teacher(th.as_tensor(), tw.as_tensor(), None),
        ),
    ];
    for (what, packed, reference) in cases {
        let fused = head_loss(h.as_tensor(), w.as_tensor(), &targets, ce, packed, Some(16)).unwrap();
        let reference = head_loss_reference(h.as_tensor(), w.as_tensor(), &targets, ce, reference).unwrap();
        let (lf, lr) = (fused.loss.to_scalar::<f32>().unwrap(), reference.loss.to_scalar::<f32>().unwrap());
        assert!((lf - lr).abs() <= 1e-5 * lr.abs().max(1.0), "{what}: loss {lf} vs {lr}");
        assert!((fused.kd - reference.kd).abs() <= 1e-5 * reference.kd.abs().max(1.0), "{what}: kd");
        let (gf, gr) = (fused.loss.backward().unwrap(), reference.loss.backward().unwrap());
        for (name, v) in [("hidden", &h), ("head", &w)] {
            let d = max_rel_diff(gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
            assert!(d < 2e-5, "{what}: ∂{name} differs by {d}");
        }
    }
    // The check can tell: the unrounded hidden states give another divergence.
    let unrounded =
        head_loss_reference(h.as_tensor(), w.as_tensor(), &targets, ce, teacher(th.as_tensor(), &tw_widened, None))
            .unwrap();
    let packed = head_loss(
        h.as_tensor(),
        w.as_tensor(),
        &targets,
        ce,
        teacher(th.as_tensor(), &tw_bf16, Some(&packed_bf16)),
        None,
    )
    .unwrap();
    assert!((packed.kd - unrounded.kd).abs() > 1e-5 * unrounded.kd.abs(), "{} vs {}", packed.kd, unrounded.kd);
}

#[test]
fn fused_head_loss_refuses_mismatched_shapes() {
    let h = var(&[4, 8], 1, 1.0);
    let w = var(&[10, 6], 2, 1.0);
    let ce = TargetTerm::CrossEntropy { weights: &[1.0; 4], coef: 1.0 };
    let err = head_loss(h.as_tensor(), w.as_tensor(), &[0; 4], ce, None, Some(2)).err().unwrap();
    assert!(err.to_string().contains("LM head has shape"), "{err}");
    let w = var(&[10, 8], 2, 1.0);
    let err = head_loss(h.as_tensor(), w.as_tensor(), &[0, 1, 2, 10], ce, None, Some(2)).err().unwrap();
    assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    let short = TargetTerm::Policy(PolicyTokens {
        logq_old: &[0.0; 4],
        importance: &[1.0; 3],
        advantages: &[0.0; 4],
        weights: &[1.0; 4],
        clip: None,
    });
    let err = head_loss(h.as_tensor(), w.as_tensor(), &[0; 4], short, None, Some(2)).err().unwrap();
    assert!(err.to_string().contains("target-term inputs of lengths [4, 3, 4, 4]"), "{err}");
}

/// Peak heap growth of `f` above what was live when it started.
fn peak_growth(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    f();
    PEAK.load(Ordering::Relaxed) - base
}

#[test]
fn fused_head_loss_peak_memory_is_under_a_sixth() {
    // 1,024 rows of a 50,257-token vocabulary with a teacher (reverse KL + CE, as the
    // single-step and PT terms use): the materialised path holds both models' logits and
    // the logit gradient, 3 × 206 MB; the fused path three buffers of at most 32 MB.
    let (rows, width, vocab) = (1024, 64, 50_257);
    let h = var(&[rows, width], 1, 1.0);
    let w = var(&[vocab, width], 2, 0.1);
    let (th, tw) = (var(&[rows, width], 3, 1.0), var(&[vocab, width], 4, 0.1));
    let targets: Vec<u32> = (0..rows).map(|r| (r * 7919 % vocab) as u32).collect();
    let weights = vec![1.0 / rows as f32; rows];
    let teacher = || {
        let (hidden, head) = (th.as_tensor(), tw.as_tensor());
        Some(TeacherHead { hidden, head, packed_head: None, kind: Divergence::ReverseKl, coef: 0.5, weights: &weights })
    };
    let ce = TargetTerm::CrossEntropy { weights: &weights, coef: 0.5 };
    let run = |fused: bool| {
        peak_growth(|| {
            // The fused path at its default chunk size.
            let l = if fused {
                head_loss(h.as_tensor(), w.as_tensor(), &targets, ce, teacher(), None).unwrap()
            } else {
                head_loss_reference(h.as_tensor(), w.as_tensor(), &targets, ce, teacher()).unwrap()
            };
            let g = l.loss.backward().unwrap();
            assert!(g.get(w.as_tensor()).is_some());
        })
    };
    let (materialised, fused) = (run(false), run(true));
    eprintln!("peak heap growth: materialised {} MB, fused {} MB", materialised >> 20, fused >> 20);
    assert!(materialised > 3 * rows * vocab * 4, "the materialised path should hold three logit tensors");
    // Measured at 512 rows with 83-row chunks: 12% on an AVX-512 EPYC (BENCHMARKS.md) and
    // 15.5% (76 of 491 MB) on an AVX2-only Zen 3 EPYC: what else the fused path holds at its
    // peak depends on the host.
    assert!(fused * 6 <= materialised, "fused {fused} bytes vs materialised {materialised}");
}
