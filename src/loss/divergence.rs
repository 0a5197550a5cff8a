//! Token-level divergences between a teacher distribution `p` and the student `q = softmax(z)`
//! over the whole vocabulary, weighted per row (position) and summed:
//! `L = Σ_r w_r · D(p_r, q_r)`. Masks and normalisation are the weights (0 for padding,
//! `1 / tokens in the accumulation window` for real tokens).
//!
//! On CPU this is one fused op: each row is processed by one thread with O(vocab) scratch, so
//! no `[rows × vocab]` probability tensor is ever materialised; the backward pass is a second
//! fused op producing `∂L/∂z` analytically. Other devices use the differentiable composition
//! [`divergence_reference`], processed in chunks of rows.
//!
//! Gradients use `∂L/∂z = q ⊙ (g − ⟨q, g⟩)` with `g = ∂L/∂q`, in closed form for the KL-type
//! divergences (forward KL and soft cross-entropy: `q − p`; reverse KL:
//! `q ⊙ (log q − log p − D)`), which run in vectorised f32 like the mixture divergences (JSD,
//! skew KLs); total variation in f64.

use crate::ops::math::{self, log_mix};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

/// A token-level divergence `D(p, q)` between teacher `p` and student `q`.
///
/// Written and read as its short name (`fkl`, `jsd:0.3`, …; see [`Divergence::parse`]), in
/// configs and on the command line alike.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Divergence {
    /// `KL(p ‖ q) = Σ p (log p − log q)`.
    ForwardKl,
    /// `H(p, q) = −Σ p log q` (forward KL plus the teacher's entropy; the released KD loss).
    SoftCrossEntropy,
    /// `KL(q ‖ p) = Σ q (log q − log p)`.
    ReverseKl,
    /// Generalised Jensen–Shannon: `β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`, `m = β p + (1 − β) q`,
    /// `0 < β < 1` (GKD's definition).
    Jsd {
        /// Teacher weight β.
        beta: f64,
    },
    /// Total variation `½ Σ |p − q|`.
    Tvd,
    /// Skew forward KL `KL(p ‖ λ p + (1 − λ) q)` (DistiLLM).
    SkewForwardKl {
        /// Skew λ.
        lambda: f64,
    },
    /// Skew reverse KL `KL(q ‖ λ q + (1 − λ) p)` (DistiLLM).
    SkewReverseKl {
        /// Skew λ.
        lambda: f64,
    },
}

impl Divergence {
    /// Parses `fkl`, `sce`, `rkl`, `jsd[:β]`, `tvd`, `sfkl[:λ]`, `srkl[:λ]`.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, arg) = match s.split_once(':') {
            Some((n, a)) => (n, Some(a.parse::<f64>().map_err(|_| anyhow::anyhow!("bad parameter in `{s}`"))?)),
            None => (s, None),
        };
        let d = match name {
            "fkl" | "forward_kl" => Self::ForwardKl,
            "sce" | "soft_ce" => Self::SoftCrossEntropy,
            "rkl" | "reverse_kl" => Self::ReverseKl,
            "jsd" => Self::Jsd { beta: arg.unwrap_or(0.5) },
            "tvd" => Self::Tvd,
            "sfkl" => Self::SkewForwardKl { lambda: arg.unwrap_or(0.1) },
            "srkl" => Self::SkewReverseKl { lambda: arg.unwrap_or(0.1) },
            other => bail!("unknown divergence `{other}` (fkl, sce, rkl, jsd[:β], tvd, sfkl[:λ], srkl[:λ])"),
        };
        d.validate()?;
        Ok(d)
    }

    /// Checks the parameter (β or λ) of a parametrised divergence.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Self::Jsd { beta } if !(beta > 0.0 && beta < 1.0) => bail!("JSD needs 0 < β < 1, got {beta}"),
            Self::SkewForwardKl { lambda } | Self::SkewReverseKl { lambda } if !(0.0..1.0).contains(&lambda) => {
                bail!("skew KL needs 0 ≤ λ < 1, got {lambda}")
            }
            _ => Ok(()),
        }
    }
}

impl std::fmt::Display for Divergence {
    /// The short name [`Divergence::parse`] reads back.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Self::ForwardKl => write!(f, "fkl"),
            Self::SoftCrossEntropy => write!(f, "sce"),
            Self::ReverseKl => write!(f, "rkl"),
            Self::Jsd { beta } => write!(f, "jsd:{beta}"),
            Self::Tvd => write!(f, "tvd"),
            Self::SkewForwardKl { lambda } => write!(f, "sfkl:{lambda}"),
            Self::SkewReverseKl { lambda } => write!(f, "srkl:{lambda}"),
        }
    }
}

impl std::str::FromStr for Divergence {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

impl TryFrom<String> for Divergence {
    type Error = anyhow::Error;

    fn try_from(s: String) -> Result<Self> {
        Self::parse(&s)
    }
}

impl From<Divergence> for String {
    fn from(d: Divergence) -> String {
        d.to_string()
    }
}

/// `Σ_r weights[r] · D(softmax(teacher_r), softmax(student_r))` for logits `[rows, vocab]`.
/// Differentiable with respect to `student`; `teacher` is treated as a constant.
pub fn divergence(student: &Tensor, teacher: &Tensor, weights: &[f32], kind: Divergence) -> Result<Tensor> {
    kind.validate()?;
    check_shapes(student, teacher, weights)?;
    if !student.device().is_cpu() {
        return divergence_reference(student, teacher, weights, kind, 256);
    }
    let s = student.to_dtype(DType::F32)?.contiguous()?;
    let t = teacher.to_dtype(DType::F32)?.detach().contiguous()?;
    Ok(s.apply_op2(&t, FusedDivergence { kind, weights: weights.to_vec() })?)
}

fn check_shapes(student: &Tensor, teacher: &Tensor, weights: &[f32]) -> Result<()> {
    let (rows, vocab) = student.dims2()?;
    if teacher.dims() != [rows, vocab] {
        bail!("teacher logits have shape {:?}, student logits {:?}", teacher.dims(), student.dims());
    }
    if weights.len() != rows {
        bail!("{} weights for {rows} rows", weights.len());
    }
    Ok(())
}

struct FusedDivergence {
    kind: Divergence,
    weights: Vec<f32>,
}

/// The input slices of a contiguous f32 CPU op.
fn slices<'a>(
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> candle_core::Result<(&'a [f32], &'a [f32])> {
    let (a, b) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
    let (Some((a0, a1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
        candle_core::bail!("divergence: inputs must be contiguous")
    };
    Ok((&a[a0..a1], &b[b0..b1]))
}

impl CustomOp2 for FusedDivergence {
    fn name(&self) -> &'static str {
        "fused-divergence"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, t) = slices(s1, l1, s2, l2)?;
        let vocab = l1.dims()[1];
        let total: f64 = z
            .par_chunks(vocab)
            .zip(t.par_chunks(vocab))
            .zip(self.weights.par_iter())
            .filter(|(_, &w)| w != 0.0)
            .map(|((zr, tr), &w)| w as f64 * row(self.kind, zr, tr, None))
            .collect::<Vec<f64>>()
            .iter()
            .sum(); // in row order: a parallel sum's order would depend on scheduling
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let weights: Vec<f32> = self.weights.iter().map(|w| w * scale).collect();
        let g = student.apply_op2_no_bwd(teacher, &FusedDivergenceGrad { kind: self.kind, weights })?;
        Ok((Some(g), None))
    }
}

struct FusedDivergenceGrad {
    kind: Divergence,
    weights: Vec<f32>,
}

impl CustomOp2 for FusedDivergenceGrad {
    fn name(&self) -> &'static str {
        "fused-divergence-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, t) = slices(s1, l1, s2, l2)?;
        let vocab = l1.dims()[1];
        let mut out = vec![0f32; z.len()];
        out.par_chunks_mut(vocab)
            .zip(z.par_chunks(vocab))
            .zip(t.par_chunks(vocab))
            .zip(self.weights.par_iter())
            .for_each(|(((gr, zr), tr), &w)| {
                if w != 0.0 {
                    row(self.kind, zr, tr, Some(gr));
                    gr.iter_mut().for_each(|g| *g *= w);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `log Σ exp(x)` in f64.
fn logsumexp(x: &[f32]) -> f64 {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

/// The divergence of one row (student logits `z`, teacher logits `t`); with `grad`, also
/// writes `∂D/∂z` into it.
pub(crate) fn row(kind: Divergence, z: &[f32], t: &[f32], grad: Option<&mut [f32]>) -> f64 {
    match (kind, grad) {
        (Divergence::ForwardKl | Divergence::SoftCrossEntropy | Divergence::ReverseKl, Some(g)) => {
            row_grad_plus_q(kind, z, t, math::logsumexp(z), g, 0.0)
        }
        (Divergence::ForwardKl | Divergence::SoftCrossEntropy | Divergence::ReverseKl, None) => {
            kl_value(kind, z, t, math::logsumexp(z), math::logsumexp(t))
        }
        (_, grad) => match Mixture::of(kind) {
            Some(mix) => mix.row(z, t, grad),
            None => row_general(kind, z, t, grad),
        },
    }
}

/// The divergence of one row with `∂D/∂z + extra·q` written to `grad`, given the student's
/// log-normaliser `lz` (`q = softmax(z)`). A caller adding `extra` times a cross-entropy to
/// the divergence gets the whole gradient less its one-hot part without another pass over
/// the vocabulary.
///
/// The KL-type divergences run in vectorised f32 (their gradients are closed forms in `q` and
/// `p`): three or four `exp` per vocabulary entry instead of the general path's f64 libm
/// calls, which were a third of a MiniLLM iteration. Each term is formed from the log-ratio
/// before it is summed, so equal distributions give zero rather than a cancellation residue.
pub(crate) fn row_grad_plus_q(kind: Divergence, z: &[f32], t: &[f32], lz: f32, grad: &mut [f32], extra: f32) -> f64 {
    let lt = || math::logsumexp(t);
    match kind {
        Divergence::ReverseKl => {
            // log q_v − log p_v = (z_v − t_v) − c.
            let c = lz - lt();
            // ∂D/∂z = q ⊙ (log q − log p − D): the terms first, then the shift once D is known.
            for ((g, &a), &b) in grad.iter_mut().zip(z).zip(t) {
                *g = math::exp(a - lz) * ((a - b) - c);
            }
            let value = math::sum_map(grad, |x| x);
            let shift = value - extra;
            for (g, &a) in grad.iter_mut().zip(z) {
                *g -= math::exp(a - lz) * shift;
            }
            value as f64
        }
        Divergence::ForwardKl | Divergence::SoftCrossEntropy => {
            // ∂D/∂z = q − p for both.
            let lt = lt();
            let value = kl_value(kind, z, t, lz, lt);
            for ((g, &a), &b) in grad.iter_mut().zip(z).zip(t) {
                *g = (1.0 + extra) * math::exp(a - lz) - math::exp(b - lt);
            }
            value
        }
        _ => {
            // Not a KL kind: `row` takes it to the mixture or the general path.
            let value = row(kind, z, t, Some(&mut *grad));
            for (g, &a) in grad.iter_mut().zip(z) {
                *g += extra * math::exp(a - lz);
            }
            value
        }
    }
}

/// The divergences against a two-component mixture `m` of `p` and `q` (JSD, skew forward
/// and reverse KL) with both weights positive, in vectorised f32: per entry two `exp`, the
/// mixture's log-ratios (an `exp_m1` and an `ln_1p`) and for the skew KLs one more `exp`. The
/// f64 libm path they took before was 40% of a GKD or DistiLLM step (`perf`).
#[derive(Clone, Copy)]
enum Mixture {
    /// `β·KL(p ‖ m) + (1 − β)·KL(q ‖ m)`, `m = β p + (1 − β) q`.
    Jsd(f32),
    /// `KL(p ‖ m)`, `m = λ p + (1 − λ) q`.
    SkewForward(f32),
    /// `KL(q ‖ m)`, `m = λ q + (1 − λ) p`.
    SkewReverse(f32),
}

impl Mixture {
    /// The fast form of `kind`, when it is a mixture divergence with both weights positive
    /// (λ = 0 makes a skew KL a plain KL whose mixture log can underflow; the f64 path keeps it).
    fn of(kind: Divergence) -> Option<Self> {
        match kind {
            Divergence::Jsd { beta } if beta > 0.0 && beta < 1.0 => Some(Self::Jsd(beta as f32)),
            Divergence::SkewForwardKl { lambda } if lambda > 0.0 => Some(Self::SkewForward(lambda as f32)),
            Divergence::SkewReverseKl { lambda } if lambda > 0.0 => Some(Self::SkewReverse(lambda as f32)),
            _ => None,
        }
    }

    /// One row's divergence, with `∂D/∂z` written to `grad` when given.
    fn row(self, z: &[f32], t: &[f32], grad: Option<&mut [f32]>) -> f64 {
        // Dispatch once per row, to a loop compiled for that divergence alone.
        match self {
            Self::Jsd(w) => mixture_row::<JSD>(w, z, t, grad),
            Self::SkewForward(w) => mixture_row::<SKEW_FORWARD>(w, z, t, grad),
            Self::SkewReverse(w) => mixture_row::<SKEW_REVERSE>(w, z, t, grad),
        }
    }
}

/// [`Mixture`]'s kinds as constants, so that each has its own straight-line loop body.
const JSD: u8 = 0;
const SKEW_FORWARD: u8 = 1;
const SKEW_REVERSE: u8 = 2;

/// One vocabulary entry of mixture divergence `KIND` with weight `w` (β or λ), from `q_v`,
/// `p_v` and `r = log q_v − log p_v`: `(D_v, ∂D/∂q_v)`.
#[inline(always)]
fn mixture_entry<const KIND: u8>(w: f32, q: f32, p: f32, r: f32) -> (f32, f32) {
    match KIND {
        JSD => {
            let (lq_m, lp_m) = mixture_log_ratios(w, 1.0 - w, r);
            (w * times(p, lp_m) + (1.0 - w) * times(q, lq_m), (1.0 - w) * lq_m)
        }
        SKEW_FORWARD => {
            let (_, lp_m) = mixture_log_ratios(w, 1.0 - w, r);
            (times(p, lp_m), -(1.0 - w) * math::exp(lp_m))
        }
        _ => {
            let (lq_m, _) = mixture_log_ratios(1.0 - w, w, r);
            (times(q, lq_m), lq_m - w * math::exp(lq_m))
        }
    }
}

/// `(log q − log m, log p − log m)` for `m = w_p·p + w_q·q` (`w_p + w_q = 1`) from the
/// log-ratio `r = log q − log p` alone: `log m` is the larger of the two logs plus
/// `s = ln(1 − w_other·(1 − e^{−|r|}))`, formed with `exp_m1` and `ln_1p` so that it keeps its
/// relative accuracy when `p ≈ q` (where the ratios, and the gradient, are small); nothing
/// over- or underflows (an infinite `r`, from a −∞ logit, is infinite on that side only).
#[inline(always)]
fn mixture_log_ratios(w_p: f32, w_q: f32, r: f32) -> (f32, f32) {
    let p_larger = r < 0.0;
    let w_other = if p_larger { w_q } else { w_p };
    let abs = if p_larger { -r } else { r };
    let s = math::ln_1p(w_other * math::exp_m1(-abs));
    if p_larger {
        (r - s, -s)
    } else {
        (-s, -r - s)
    }
}

/// `a·b`, or 0 where `a` is 0 (a probability that underflowed or a −∞ logit, whose log-ratio
/// may be infinite).
#[inline(always)]
fn times(a: f32, b: f32) -> f32 {
    if a > 0.0 {
        a * b
    } else {
        0.0
    }
}

/// A row of mixture divergence `KIND` (weight `w`): `D = Σ D_v`, and with `grad`,
/// `∂D/∂z = q ⊙ (g − ⟨q, g⟩)` for `g = ∂D/∂q`.
///
/// Where the student's mass sits on entries the teacher gives little, `g` is nearly the same
/// on all of them and `g − ⟨q, g⟩` cancels to a hundredth of either: an error of a few f32
/// ulp in the log-normaliser (a sum of 50,257 terms) or in `⟨q, g⟩` then becomes a 10⁻³
/// error in the gradient. So the normalisers are kept as `max + ln Σ` with the sums, and
/// `⟨q, g⟩`, accumulated in f64; the log-ratio is formed from the logits' difference.
fn mixture_row<const KIND: u8>(w: f32, z: &[f32], t: &[f32], grad: Option<&mut [f32]>) -> f64 {
    let n = z.len().min(t.len());
    let (z, t) = (&z[..n], &t[..n]);
    let ((mz, sz), (mt, st)) = (log_normaliser(z), log_normaliser(t));
    // log q_v − log p_v = (z_v − t_v) − c.
    let c = (mz - mt) + (sz - st);
    // A function rather than a closure called twice: a closure the compiler declines to
    // inline leaves the loops scalar (a third of a GKD step, `perf`).
    #[inline(always)]
    fn at<const KIND: u8>(w: f32, [mz, sz, mt, st, c]: [f32; 5], a: f32, b: f32) -> (f32, f32) {
        mixture_entry::<KIND>(w, math::exp((a - mz) - sz), math::exp((b - mt) - st), (a - b) - c)
    }
    let norms = [mz, sz, mt, st, c];
    let Some(grad) = grad else {
        return math::sum_map2_f64(z, t, |a, b| at::<KIND>(w, norms, a, b).0);
    };
    let grad = &mut grad[..n];
    let mut values = vec![0f32; n];
    // Indexed over slices of one length: a loop the compiler vectorises.
    for i in 0..n {
        (values[i], grad[i]) = at::<KIND>(w, norms, z[i], t[i]);
    }
    let mean = math::sum_map2_f64(grad, z, |g, a| times(math::exp((a - mz) - sz), g)) as f32;
    for i in 0..n {
        grad[i] = times(math::exp((z[i] - mz) - sz), grad[i] - mean);
    }
    math::sum_map_f64(&values, |v| v)
}

/// `(m, ln Σ exp(x − m))` with `m = max x`, the sum in f64: `logsumexp(x)` as two parts, so
/// that `(x_v − m) − ln Σ` keeps the precision a single f32 near `m` would lose.
fn log_normaliser(x: &[f32]) -> (f32, f32) {
    let m = math::max(x);
    (m, math::sum_map_f64(x, |v| math::exp(v - m)).ln() as f32)
}

/// The value of a KL-type divergence (forward KL, soft cross-entropy, reverse KL) of one row
/// from the two log-normalisers `lz = logsumexp(z)`, `lt = logsumexp(t)`.
pub(crate) fn kl_value(kind: Divergence, z: &[f32], t: &[f32], lz: f32, lt: f32) -> f64 {
    let c = lz - lt;
    let value = match kind {
        Divergence::ReverseKl => math::sum_map2(z, t, |a, b| math::exp(a - lz) * ((a - b) - c)),
        Divergence::ForwardKl => math::sum_map2(z, t, |a, b| {
            let p = math::exp(b - lt);
            // p = 0 entries (a teacher logit of −∞) contribute nothing.
            if p > 0.0 {
                p * ((b - a) + c)
            } else {
                0.0
            }
        }),
        _ => -math::sum_map2(z, t, |a, b| math::exp(b - lt) * (a - lz)),
    };
    value as f64
}

/// Any divergence, in f64 through its per-entry [`term`].
fn row_general(kind: Divergence, z: &[f32], t: &[f32], grad: Option<&mut [f32]>) -> f64 {
    let (lz, lt) = (logsumexp(z), logsumexp(t));
    let lq: Vec<f64> = z.iter().map(|&v| v as f64 - lz).collect();
    let lp: Vec<f64> = t.iter().map(|&v| v as f64 - lt).collect();
    let mut value = 0.0;
    let mut mean = 0.0;
    match grad {
        None => value = lq.iter().zip(&lp).map(|(&a, &b)| term(kind, a, b).0).sum(),
        Some(gr) => {
            // ∂D/∂z = q ⊙ (g − ⟨q, g⟩) with g = ∂D/∂q.
            let mut g = vec![0f64; lq.len()];
            for ((gi, &a), &b) in g.iter_mut().zip(&lq).zip(&lp) {
                let (c, d) = term(kind, a, b);
                value += c;
                *gi = d;
                mean += a.exp() * d;
            }
            for ((slot, &gi), &a) in gr.iter_mut().zip(&g).zip(&lq) {
                *slot = (a.exp() * (gi - mean)) as f32;
            }
        }
    }
    value
}

/// One vocabulary entry's contribution to `D` and `∂D/∂q_v`, from `log q_v` and `log p_v`.
fn term(kind: Divergence, lq: f64, lp: f64) -> (f64, f64) {
    let (q, p) = (lq.exp(), lp.exp());
    match kind {
        Divergence::ForwardKl => (if p > 0.0 { p * (lp - lq) } else { 0.0 }, 0.0),
        Divergence::SoftCrossEntropy => (-p * lq, 0.0),
        Divergence::ReverseKl => (q * (lq - lp), lq - lp),
        Divergence::Jsd { beta } => {
            let lm = log_mix(beta, lp, 1.0 - beta, lq);
            (beta * p * (lp - lm) + (1.0 - beta) * q * (lq - lm), (1.0 - beta) * (lq - lm))
        }
        Divergence::Tvd => (0.5 * (q - p).abs(), 0.5 * sign(q - p)),
        Divergence::SkewForwardKl { lambda } => {
            let lm = log_mix(lambda, lp, 1.0 - lambda, lq);
            (p * (lp - lm), -(1.0 - lambda) * (lp - lm).exp())
        }
        Divergence::SkewReverseKl { lambda } => {
            let lm = log_mix(lambda, lq, 1.0 - lambda, lp);
            (q * (lq - lm), lq - lm - lambda * (lq - lm).exp())
        }
    }
}

fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The same loss as a composition of differentiable tensor ops, computed `chunk_rows` rows at
/// a time (used on GPUs and as the unfused reference in tests).
pub fn divergence_reference(
    student: &Tensor,
    teacher: &Tensor,
    weights: &[f32],
    kind: Divergence,
    chunk_rows: usize,
) -> Result<Tensor> {
    kind.validate()?;
    check_shapes(student, teacher, weights)?;
    let rows = student.dim(0)?;
    let dev = student.device();
    let mut total = Tensor::zeros((), DType::F32, dev)?;
    let mut start = 0;
    while start < rows {
        let n = chunk_rows.max(1).min(rows - start);
        let z = student.narrow(0, start, n)?.to_dtype(DType::F32)?;
        let t = teacher.narrow(0, start, n)?.to_dtype(DType::F32)?.detach();
        let w = Tensor::from_slice(&weights[start..start + n], n, dev)?;
        let lq = candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let lp = candle_nn::ops::log_softmax(&t, D::Minus1)?;
        let (q, p) = (lq.exp()?, lp.exp()?);
        let log_mix = |a: f64, la: &Tensor, b: f64, lb: &Tensor| -> Result<Tensor> {
            Ok(((la.exp()? * a)? + (lb.exp()? * b)?)?.log()?)
        };
        let per_row = match kind {
            Divergence::ForwardKl => (&p * (&lp - &lq)?)?.sum(D::Minus1)?,
            Divergence::SoftCrossEntropy => (&p * &lq)?.sum(D::Minus1)?.neg()?,
            Divergence::ReverseKl => (&q * (&lq - &lp)?)?.sum(D::Minus1)?,
            Divergence::Jsd { beta } => {
                let lm = log_mix(beta, &lp, 1.0 - beta, &lq)?;
                let a = (&p * (&lp - &lm)?)?.sum(D::Minus1)?;
                let b = (&q * (&lq - &lm)?)?.sum(D::Minus1)?;
                ((a * beta)? + (b * (1.0 - beta))?)?
            }
            Divergence::Tvd => ((&q - &p)?.abs()?.sum(D::Minus1)? * 0.5)?,
            Divergence::SkewForwardKl { lambda } => {
                let lm = log_mix(lambda, &lp, 1.0 - lambda, &lq)?;
                (&p * (&lp - &lm)?)?.sum(D::Minus1)?
            }
            Divergence::SkewReverseKl { lambda } => {
                let lm = log_mix(lambda, &lq, 1.0 - lambda, &lp)?;
                (&q * (&lq - &lm)?)?.sum(D::Minus1)?
            }
        };
        total = (total + (per_row * w)?.sum_all()?)?;
        start += n;
    }
    Ok(total)
}
