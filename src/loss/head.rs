//! The LM head and the token loss fused and chunked: `Σ_r f_r(log q_r(y_r)) + b·Σ_r u_r·D(p_r, q_r)`
//! with the student's logits `z = h·Wᵀ` (and the teacher's, from its hidden states and head)
//! computed `chunk_rows` rows at a time, never as a whole `[rows × vocab]` tensor. The target
//! term `f_r` is a weighted cross-entropy (SFT, KD, the PT term) or MiniLLM's clipped policy
//! surrogate of the sampled tokens (with the single-step reverse KL as the divergence).
//!
//! The forward pass also computes the gradients (`∂h = ∂z·W`, `∂W = Σ ∂zᵀ·h`, chunk by
//! chunk) and keeps them for the backward pass, which only scales them: the logits are used
//! once and dropped. Peak memory is three `[chunk_rows × vocab]` buffers instead of the
//! materialised path's student logits, teacher logits and logit gradient. Other devices take
//! the materialised composition ([`head_loss_reference`]).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use super::policy::pg_loss;
use super::{cross_entropy, divergence, Divergence};
use crate::ops::gemm::{matmul_parallel, MatRef};
use crate::ops::gemm_f32::ReusedRight;
use crate::ops::math;
use crate::ops::packed::PackedMatrix;

/// `[chunk × vocab]` floats per buffer at most by default: 32 MB (512 rows of an 8,192-token
/// vocabulary, 166 of GPT-2's 50,257). The chunk is every product's row count (the weight
/// gradient's inner dimension), and where the head is not packed once per call
/// ([`ReusedRight`]) each product packs the 50,257-row head afresh, so small chunks waste the
/// products: GPT-2 124M's SFT step at 4 × 298 with bf16 products took 4.3 s at 83-row chunks
/// and 3.7–3.8 s at 149–298 (f32: 2–4% faster; BENCHMARKS.md). Three
/// such buffers are a tenth of the materialised path's memory at 1,024 rows and a twenty-sixth
/// at the paper's 8 × 512.
const CHUNK_FLOATS: usize = 1 << 23;

/// Rows per chunk for a vocabulary of `vocab` tokens (between 16 and 512).
pub fn default_chunk_rows(vocab: usize) -> usize {
    (CHUNK_FLOATS / vocab.max(1)).clamp(16, 512)
}

/// What the loss asks of each row's target token `y_r`, as a function of `l_r = log q(y_r)`.
#[derive(Clone, Copy)]
pub enum TargetTerm<'a> {
    /// `coef · Σ_r w_r · (−l_r)`, the weighted cross-entropy.
    CrossEntropy {
        /// `w_r`, one per row.
        weights: &'a [f32],
        /// The coefficient of the whole term.
        coef: f64,
    },
    /// MiniLLM's clipped, importance-weighted surrogate of the sampled tokens
    /// ([`pg_loss`]).
    Policy(PolicyTokens<'a>),
}

/// The per-token inputs of the clipped surrogate `Σ_t w_t · max(−A_t ρ_t, −A_t clip(ρ_t, 1 ± ε))`
/// with `ρ_t = exp(l_t − log q_old,t) · importance_t`.
#[derive(Clone, Copy)]
pub struct PolicyTokens<'a> {
    /// The sampling-time log-probabilities.
    pub logq_old: &'a [f32],
    /// The mixture importance weights.
    pub importance: &'a [f32],
    /// The advantages.
    pub advantages: &'a [f32],
    /// Per-token weights (length normalisation over the window).
    pub weights: &'a [f32],
    /// Ratio clip ε (none: no clipping).
    pub clip: Option<f64>,
}

impl TargetTerm<'_> {
    fn check(&self, rows: usize) -> Result<()> {
        let lens = match self {
            Self::CrossEntropy { weights, .. } => vec![weights.len()],
            Self::Policy(p) => vec![p.logq_old.len(), p.importance.len(), p.advantages.len(), p.weights.len()],
        };
        if lens.iter().any(|&l| l != rows) {
            bail!("head loss: {rows} rows but target-term inputs of lengths {lens:?}");
        }
        Ok(())
    }

    fn weight(&self, r: usize) -> f32 {
        match self {
            Self::CrossEntropy { weights, .. } => weights[r],
            Self::Policy(p) => p.weights[r],
        }
    }

    /// Row `r`'s reported value, its contribution to the loss and `∂loss/∂l`, at `l = log q(y_r)`.
    fn at(&self, r: usize, l: f32) -> (f64, f64, f32) {
        match *self {
            Self::CrossEntropy { weights, coef } => {
                let w = weights[r] as f64;
                (-w * l as f64, -coef * w * l as f64, (-coef * w) as f32)
            }
            Self::Policy(p) => {
                let ratio = ((l - p.logq_old[r]) as f64).exp() * p.importance[r] as f64;
                let neg_adv = -(p.advantages[r] as f64);
                let unclipped = neg_adv * ratio;
                // ∂(−A·ρ)/∂l = −A·ρ; the clipped branch is constant outside [1 − ε, 1 + ε].
                let (value, slope) = match p.clip {
                    Some(eps) if ratio < 1.0 - eps || ratio > 1.0 + eps => {
                        let clipped = neg_adv * ratio.clamp(1.0 - eps, 1.0 + eps);
                        if unclipped > clipped {
                            (unclipped, unclipped)
                        } else {
                            (clipped, 0.0)
                        }
                    }
                    _ => (unclipped, unclipped),
                };
                let w = p.weights[r] as f64;
                (w * value, w * value, (w * slope) as f32)
            }
        }
    }
}

/// A teacher's side of the loss: its final hidden states at the same rows and its LM head.
pub struct TeacherHead<'a> {
    /// `[rows, teacher width]`.
    pub hidden: &'a Tensor,
    /// `[teacher vocab, teacher width]`.
    pub head: &'a Tensor,
    /// The same head packed at load, where the teacher keeps such a copy
    /// ([`crate::model::CausalLm::lm_head_packed`]). The fused loss then computes the teacher's
    /// logits as the teacher's own [`crate::model::CausalLm::logits`] does (for a bf16 teacher
    /// on an AVX512-BF16 CPU: bf16 products with f32 sums, twice the f32 product's speed),
    /// so the distribution it fits is the one the teacher samples and scores with; a 16-bit
    /// head is widened a panel group at a time instead of whole. An f32 copy is not used: its
    /// values are `head`'s, read in place.
    pub packed_head: Option<&'a Arc<PackedMatrix>>,
    /// The divergence, over the vocabulary both models share.
    pub kind: Divergence,
    /// Its coefficient `b`.
    pub coef: f64,
    /// Per-row weights `u_r`.
    pub weights: &'a [f32],
}

/// The loss and its parts (before the coefficients).
pub struct HeadLoss {
    /// The differentiable total.
    pub loss: Tensor,
    /// The target term: `Σ w·CE`, or the policy surrogate.
    pub target: f64,
    /// `Σ u·D` (0 without a teacher).
    pub kd: f64,
}

/// `Σ_r f_r(log q(y_r)) + b·Σ_r u_r·D` for student `hidden` `[rows, width]` and `head`
/// `[vocab, width]`, differentiable in both; `chunk_rows` defaults to
/// [`default_chunk_rows`].
pub fn head_loss(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    term: TargetTerm,
    teacher: Option<TeacherHead>,
    chunk_rows: Option<usize>,
) -> Result<HeadLoss> {
    let (rows, width) = hidden.dims2()?;
    let (vocab, hw) = head.dims2()?;
    if hw != width {
        bail!("LM head has shape {:?} for hidden states of width {width}", head.dims());
    }
    if targets.len() != rows {
        bail!("head loss: {rows} rows but {} targets", targets.len());
    }
    term.check(rows)?;
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("head loss: target {t} is outside the vocabulary of {vocab}");
    }
    if let Some(t) = &teacher {
        let (tr, tw) = t.hidden.dims2()?;
        if tr != rows || t.head.dim(1)? != tw {
            bail!("teacher hidden {:?} and head {:?} for {rows} student rows", t.hidden.dims(), t.head.dims());
        }
        if let Some(p) = t.packed_head {
            let (hv, hw) = t.head.dims2()?;
            if p.shape() != (hw, hv) {
                bail!("teacher head {:?} but its packed copy is {:?} (in × out)", t.head.dims(), p.shape());
            }
        }
        if t.weights.len() != rows {
            bail!("head loss: {rows} rows but {} divergence weights", t.weights.len());
        }
    }
    let cpu = [Some(hidden), Some(head), teacher.as_ref().map(|t| t.hidden), teacher.as_ref().map(|t| t.head)]
        .into_iter()
        .flatten()
        .all(|t| t.device().is_cpu());
    if !cpu {
        return head_loss_reference(hidden, head, targets, term, teacher);
    }
    // The teacher's tensors are read in place by the op (no copy of its LM head per call).
    let as_f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let teacher = match teacher {
        Some(t) => Some(Teacher {
            hidden: as_f32(t.hidden)?,
            head: match t.packed_head {
                // An f32 copy holds the head's own values, which `gemm` reads in place at the
                // loss's chunk sizes, where the copy would be unpacked for it first.
                Some(p) if !matches!(**p, PackedMatrix::F32(_)) => TeacherWeight::Packed(p.clone()),
                _ => TeacherWeight::Dense(as_f32(t.head)?),
            },
            kind: t.kind,
            coef: t.coef as f32,
            weights: t.weights.to_vec(),
        }),
        None => None,
    };
    let parts = Arc::new(Mutex::new(Parts::default()));
    let op = FusedHeadLoss {
        targets: targets.to_vec(),
        term: OwnedTerm::from(term),
        teacher,
        chunk_rows: chunk_rows.unwrap_or_else(|| default_chunk_rows(vocab)).max(1),
        parts: parts.clone(),
    };
    let h = hidden.to_dtype(DType::F32)?.contiguous()?;
    let w = head.to_dtype(DType::F32)?.contiguous()?;
    let loss = h.apply_op2(&w, op)?;
    let p = parts.lock().map_err(|_| anyhow::anyhow!("head loss state poisoned"))?;
    Ok(HeadLoss { loss, target: p.target, kd: p.kd })
}

/// The materialised composition: whole logits, then [`cross_entropy()`] or `log_softmax` and
/// [`pg_loss`], and [`divergence()`].
pub fn head_loss_reference(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    term: TargetTerm,
    teacher: Option<TeacherHead>,
) -> Result<HeadLoss> {
    let logits = hidden.matmul(&head.t()?)?;
    let (target, mut loss) = match term {
        TargetTerm::CrossEntropy { weights, coef } => {
            let ce = cross_entropy(&logits, targets, weights)?;
            (ce.to_scalar::<f32>()? as f64, (ce * coef)?)
        }
        TargetTerm::Policy(p) => {
            let n = targets.len();
            let idx = Tensor::from_slice(targets, (n, 1), logits.device())?;
            let logq = candle_nn::ops::log_softmax(&logits, D::Minus1)?.gather(&idx, D::Minus1)?.squeeze(1)?;
            let pg = pg_loss(&logq, p.logq_old, p.importance, p.advantages, p.weights, p.clip)?;
            (pg.to_scalar::<f32>()? as f64, pg)
        }
    };
    let mut kd = 0.0;
    if let Some(t) = teacher {
        let t_logits = t.hidden.matmul(&t.head.t()?)?.detach();
        let v = logits.dim(1)?.min(t_logits.dim(1)?);
        let d = divergence(&logits.narrow(1, 0, v)?, &t_logits.narrow(1, 0, v)?, t.weights, t.kind)?;
        kd = d.to_scalar::<f32>()? as f64;
        loss = (loss + (d * t.coef)?)?;
    }
    Ok(HeadLoss { loss, target, kd })
}

/// [`TargetTerm`] with its slices copied into the op.
enum OwnedTerm {
    CrossEntropy { weights: Vec<f32>, coef: f64 },
    Policy { logq_old: Vec<f32>, importance: Vec<f32>, advantages: Vec<f32>, weights: Vec<f32>, clip: Option<f64> },
}

impl From<TargetTerm<'_>> for OwnedTerm {
    fn from(t: TargetTerm) -> Self {
        match t {
            TargetTerm::CrossEntropy { weights, coef } => Self::CrossEntropy { weights: weights.to_vec(), coef },
            TargetTerm::Policy(p) => Self::Policy {
                logq_old: p.logq_old.to_vec(),
                importance: p.importance.to_vec(),
                advantages: p.advantages.to_vec(),
                weights: p.weights.to_vec(),
                clip: p.clip,
            },
        }
    }
}

impl OwnedTerm {
    fn view(&self) -> TargetTerm<'_> {
        match self {
            Self::CrossEntropy { weights, coef } => TargetTerm::CrossEntropy { weights, coef: *coef },
            Self::Policy { logq_old, importance, advantages, weights, clip } => {
                TargetTerm::Policy(PolicyTokens { logq_old, importance, advantages, weights, clip: *clip })
            }
        }
    }
}

/// The teacher's LM head as the fused loss multiplies by it.
enum TeacherWeight {
    /// `[vocab, width]`, contiguous f32.
    Dense(Tensor),
    /// Packed at load, `width × vocab` ([`PackedMatrix::matmul`]).
    Packed(Arc<PackedMatrix>),
}

/// The teacher's side: contiguous f32 CPU hidden states and its head.
struct Teacher {
    /// `[rows, width]`.
    hidden: Tensor,
    head: TeacherWeight,
    kind: Divergence,
    coef: f32,
    weights: Vec<f32>,
}

impl Teacher {
    fn vocab(&self) -> usize {
        match &self.head {
            TeacherWeight::Dense(w) => w.dims()[0],
            TeacherWeight::Packed(w) => w.shape().1,
        }
    }
}

/// The f32 values of a contiguous CPU tensor, read under its storage lock.
fn read_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => crate::ops::contiguous_f32(s, layout, "fused-head-loss (teacher)"),
        _ => candle_core::bail!("fused-head-loss: the teacher's tensors must be on the CPU"),
    }
}

/// The teacher's head held for the op: a dense head's storage locked, or the packed copy.
enum HeadLock<'a> {
    Dense((candle_core::StorageRef<'a>, &'a Layout)),
    Packed(&'a PackedMatrix),
}

/// The teacher's head as the op reads it.
enum TeacherView<'a> {
    /// `[vocab, width]` f32, read in place.
    Dense(MatRef<'a>),
    /// Packed at load.
    Packed(&'a PackedMatrix),
}

/// Loss parts and the gradients the forward pass computed.
#[derive(Default)]
struct Parts {
    target: f64,
    kd: f64,
    grads: Option<(Vec<f32>, Vec<f32>)>,
}

struct FusedHeadLoss {
    targets: Vec<u32>,
    term: OwnedTerm,
    teacher: Option<Teacher>,
    chunk_rows: usize,
    parts: Arc<Mutex<Parts>>,
}

impl FusedHeadLoss {
    /// Row `r`'s target term (reported, loss) and weighted divergence, with its gradient
    /// `∂loss/∂z` written to `dz`.
    fn row(&self, r: usize, z: &[f32], zt: Option<&[f32]>, dz: &mut [f32]) -> (f64, f64, f64) {
        let term = self.term.view();
        let u = self.teacher.as_ref().map_or(0.0, |t| t.weights[r]);
        if term.weight(r) == 0.0 && u == 0.0 {
            dz.fill(0.0);
            return (0.0, 0.0, 0.0);
        }
        let lse = math::logsumexp(z);
        let y = self.targets[r] as usize;
        let (reported, loss, slope) = term.at(r, z[y] - lse);
        // ∂l/∂z = onehot(y) − q, so the target term contributes a·q − a·onehot(y).
        let a = -slope;
        let mut kd = 0.0;
        match (&self.teacher, zt) {
            // The teacher covers the whole student vocabulary: one pass over it gives
            // b·u·∂D/∂z + a·q.
            (Some(t), Some(zt)) if t.coef * u != 0.0 && t.vocab() >= z.len() => {
                let b = t.coef * u;
                kd = divergence::row_grad_plus_q(t.kind, z, &zt[..z.len()], lse, dz, a / b);
                dz.iter_mut().for_each(|g| *g *= b);
            }
            (teacher, zt) => {
                dz.fill(0.0);
                // A row the divergence does not weigh contributes nothing to it.
                if let (Some(t), Some(zt), true) = (teacher, zt, u != 0.0) {
                    let v = z.len().min(t.vocab());
                    kd = divergence::row(t.kind, &z[..v], &zt[..v], Some(&mut dz[..v]));
                    let b = t.coef * u;
                    dz[..v].iter_mut().for_each(|g| *g *= b);
                }
                if a != 0.0 {
                    dz.iter_mut().zip(z).for_each(|(g, &v)| *g += a * math::exp(v - lse));
                }
            }
        }
        dz[y] -= a;
        (reported, loss, u as f64 * kd)
    }
}

impl CustomOp2 for FusedHeadLoss {
    fn name(&self) -> &'static str {
        "fused-head-loss"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = crate::ops::contiguous_f32(s1, l1, self.name())?;
        let w = crate::ops::contiguous_f32(s2, l2, self.name())?;
        let (rows, width) = l1.shape().dims2()?;
        let vocab = l2.dims()[0];
        // Chunks of equal size (at most `chunk_rows`): a short last chunk would multiply
        // the whole head for a few rows.
        let c = rows.div_ceil(rows.div_ceil(self.chunk_rows).max(1)).max(1);
        let (mut z, mut dz) = (vec![0f32; c * vocab], vec![0f32; c * vocab]);
        let mut zt = self.teacher.as_ref().map(|t| vec![0f32; c * t.vocab()]);
        // The teacher's tensors stay locked while the op reads them.
        let teacher_locks = self.teacher.as_ref().map(|t| {
            let head = match &t.head {
                TeacherWeight::Dense(w) => HeadLock::Dense(w.storage_and_layout()),
                TeacherWeight::Packed(w) => HeadLock::Packed(w),
            };
            (t.hidden.storage_and_layout(), head)
        });
        let teacher_views = match &teacher_locks {
            Some(((hs, hl), head)) => {
                let (th, twidth) = (read_f32(hs, hl)?, hl.dims()[1]);
                let tw = match head {
                    HeadLock::Dense((ws, wl)) => TeacherView::Dense(MatRef {
                        data: read_f32(ws, wl)?,
                        offset: 0,
                        shape: (wl.dims()[0], twidth),
                        strides: (twidth, 1),
                    }),
                    HeadLock::Packed(w) => TeacherView::Packed(w),
                };
                Some((th, twidth, tw))
            }
            None => None,
        };
        let (mut dh, mut dw) = (vec![0f32; rows * width], vec![0f32; vocab * width]);
        let head = MatRef { data: w, offset: 0, shape: (vocab, width), strides: (width, 1) };
        // Every chunk multiplies by the head twice (`h·Wᵀ`, `∂z·W`): where the packed kernel
        // takes these products (AVX2) the head is packed once in each orientation (twice its
        // memory while the op runs: 308 MB for GPT-2's), not once per product. GPT-2 124M's
        // head over 4 × 298 rows (8 chunks): 2.66–2.81 → 2.40–2.43 s (BENCHMARKS.md).
        let (head_t, head_w) = if rows > c {
            (ReusedRight::new(head.t()), ReusedRight::new(head))
        } else {
            (ReusedRight::InPlace(head.t()), ReusedRight::InPlace(head))
        };
        let (mut target, mut loss, mut kd) = (0f64, 0f64, 0f64);
        let mut start = 0;
        while start < rows {
            let n = c.min(rows - start);
            let hc = MatRef { data: h, offset: start * width, shape: (n, width), strides: (width, 1) };
            head_t.matmul(&mut z[..n * vocab], hc, false);
            let tv = self.teacher.as_ref().map_or(1, Teacher::vocab);
            if let (Some((th, twidth, tw)), Some(zt)) = (&teacher_views, zt.as_mut()) {
                let th = MatRef { data: th, offset: start * twidth, shape: (n, *twidth), strides: (*twidth, 1) };
                match tw {
                    TeacherView::Dense(tw) => matmul_parallel(&mut zt[..n * tv], th, tw.t(), false),
                    TeacherView::Packed(w) => {
                        zt[..n * tv].fill(0.0);
                        w.matmul(&mut zt[..n * tv], th);
                    }
                }
            }
            // Per-row values collected in row order and summed in that order: a parallel
            // `reduce` would add them in an order that depends on thread scheduling, and runs
            // would differ in the last bits.
            let per_row: Vec<(f64, f64, f64)> = dz[..n * vocab]
                .par_chunks_mut(vocab)
                .zip(z[..n * vocab].par_chunks(vocab))
                .enumerate()
                .map(|(i, (dz, z))| {
                    let zt = zt.as_ref().map(|zt| &zt[i * tv..(i + 1) * tv]);
                    self.row(start + i, z, zt, dz)
                })
                .collect();
            let (t_sum, l_sum, k_sum) = per_row.iter().fold((0.0, 0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
            target += t_sum;
            loss += l_sum;
            kd += k_sum;
            let g = MatRef { data: &dz, offset: 0, shape: (n, vocab), strides: (vocab, 1) };
            // ∂h = ∂z·W for these rows; ∂W += ∂zᵀ·h.
            head_w.matmul(&mut dh[start * width..(start + n) * width], g, false);
            matmul_parallel(&mut dw, g.t(), hc, true);
            start += n;
        }
        let total = loss + self.teacher.as_ref().map_or(0.0, |t| t.coef as f64 * kd);
        let mut parts = self.parts.lock().map_err(|_| candle_core::Error::Msg("head loss state poisoned".into()))?;
        *parts = Parts { target, kd, grads: Some((dh, dw)) };
        Ok((CpuStorage::F32(vec![total as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        head: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let scale = grad.to_dtype(DType::F32)?.to_scalar::<f32>()? as f64;
        let mut parts = self.parts.lock().map_err(|_| candle_core::Error::Msg("head loss state poisoned".into()))?;
        let Some((dh, dw)) = parts.grads.take() else { candle_core::bail!("head loss: backward pass run twice") };
        let dh = (Tensor::from_vec(dh, hidden.shape(), hidden.device())? * scale)?;
        let dw = (Tensor::from_vec(dw, head.shape(), head.device())? * scale)?;
        Ok((Some(dh), Some(dw)))
    }
}
