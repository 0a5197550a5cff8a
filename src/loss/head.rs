//! The LM head and the token loss fused and chunked: `Σ_r w_r · (a·CE(z_r, y_r) + b·D(p_r, q_r))`
//! with the student's logits `z = h·Wᵀ` (and the teacher's, from its hidden states and head)
//! computed `chunk_rows` rows at a time, never as a whole `[rows × vocab]` tensor.
//!
//! The forward pass also computes the gradients (`∂h = ∂z·W`, `∂W = Σ ∂zᵀ·h`, chunk by
//! chunk) and keeps them for the backward pass, which only scales them: the logits are used
//! once and dropped. Peak memory is three `[chunk_rows × vocab]` buffers instead of the
//! materialised path's student logits, teacher logits and logit gradient. Other devices take
//! the materialised composition ([`head_loss_reference`]).

use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{cross_entropy, divergence, Divergence};
use crate::ops::gemm::{matmul_parallel, MatRef};
use crate::ops::math;

/// Rows per chunk by default: 128 × 50,257 × 4 bytes ≈ 26 MB per buffer.
pub const DEFAULT_CHUNK_ROWS: usize = 128;

/// A teacher's side of the loss: its final hidden states at the same rows and its LM head.
pub struct TeacherHead<'a> {
    /// `[rows, teacher width]`.
    pub hidden: &'a Tensor,
    /// `[teacher vocab, teacher width]`.
    pub head: &'a Tensor,
    /// The divergence, over the vocabulary both models share.
    pub kind: Divergence,
    /// Its coefficient `b`.
    pub coef: f64,
}

/// The loss and its parts (`ce`, `kd`: weighted sums before the coefficients).
pub struct HeadLoss {
    /// The differentiable total.
    pub loss: Tensor,
    /// `Σ w·CE`.
    pub ce: f64,
    /// `Σ w·D` (0 without a teacher).
    pub kd: f64,
}

/// `Σ_r w_r (ce_coef·CE(h_r·Wᵀ, y_r) + b·D)` for student `hidden` `[rows, width]` and `head`
/// `[vocab, width]`, differentiable in both.
pub fn head_loss(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    weights: &[f32],
    ce_coef: f64,
    teacher: Option<TeacherHead>,
    chunk_rows: usize,
) -> Result<HeadLoss> {
    let (rows, width) = hidden.dims2()?;
    let (vocab, hw) = head.dims2()?;
    if hw != width {
        bail!("LM head has shape {:?} for hidden states of width {width}", head.dims());
    }
    if targets.len() != rows || weights.len() != rows {
        bail!("head loss: {rows} rows but {} targets and {} weights", targets.len(), weights.len());
    }
    if let Some(&t) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("head loss: target {t} is outside the vocabulary of {vocab}");
    }
    if let Some(t) = &teacher {
        let (tr, tw) = t.hidden.dims2()?;
        if tr != rows || t.head.dim(1)? != tw {
            bail!("teacher hidden {:?} and head {:?} for {rows} student rows", t.hidden.dims(), t.head.dims());
        }
    }
    let cpu = [Some(hidden), Some(head), teacher.as_ref().map(|t| t.hidden), teacher.as_ref().map(|t| t.head)]
        .into_iter()
        .flatten()
        .all(|t| t.device().is_cpu());
    if !cpu {
        return head_loss_reference(hidden, head, targets, weights, ce_coef, teacher);
    }
    // The teacher's tensors are read in place by the op (no copy of its LM head per call).
    let as_f32 = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.contiguous()?) };
    let teacher = match teacher {
        Some(t) => {
            Some(Teacher { hidden: as_f32(t.hidden)?, head: as_f32(t.head)?, kind: t.kind, coef: t.coef as f32 })
        }
        None => None,
    };
    let parts = Arc::new(Mutex::new(Parts::default()));
    let op = FusedHeadLoss {
        targets: targets.to_vec(),
        weights: weights.to_vec(),
        ce_coef: ce_coef as f32,
        teacher,
        chunk_rows: chunk_rows.max(1),
        parts: parts.clone(),
    };
    let h = hidden.to_dtype(DType::F32)?.contiguous()?;
    let w = head.to_dtype(DType::F32)?.contiguous()?;
    let loss = h.apply_op2(&w, op)?;
    let p = parts.lock().map_err(|_| anyhow::anyhow!("head loss state poisoned"))?;
    Ok(HeadLoss { loss, ce: p.ce, kd: p.kd })
}

/// The materialised composition: whole logits, then [`cross_entropy`] and [`divergence`].
pub fn head_loss_reference(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    weights: &[f32],
    ce_coef: f64,
    teacher: Option<TeacherHead>,
) -> Result<HeadLoss> {
    let logits = hidden.matmul(&head.t()?)?;
    let ce = cross_entropy(&logits, targets, weights)?;
    let ce_value = ce.to_scalar::<f32>()? as f64;
    let mut loss = (ce * ce_coef)?;
    let mut kd = 0.0;
    if let Some(t) = teacher {
        let t_logits = t.hidden.matmul(&t.head.t()?)?.detach();
        let v = logits.dim(1)?.min(t_logits.dim(1)?);
        let d = divergence(&logits.narrow(1, 0, v)?, &t_logits.narrow(1, 0, v)?, weights, t.kind)?;
        kd = d.to_scalar::<f32>()? as f64;
        loss = (loss + (d * t.coef)?)?;
    }
    Ok(HeadLoss { loss, ce: ce_value, kd })
}

/// The teacher's side as contiguous f32 CPU tensors.
struct Teacher {
    /// `[rows, width]`.
    hidden: Tensor,
    /// `[vocab, width]`.
    head: Tensor,
    kind: Divergence,
    coef: f32,
}

impl Teacher {
    fn vocab(&self) -> usize {
        self.head.dims()[0]
    }
}

/// The f32 values of a contiguous CPU tensor, read under its storage lock.
fn read_f32<'a>(storage: &'a candle_core::Storage, layout: &Layout) -> candle_core::Result<&'a [f32]> {
    match storage {
        candle_core::Storage::Cpu(s) => crate::ops::contiguous_f32(s, layout, "fused-head-loss (teacher)"),
        _ => candle_core::bail!("fused-head-loss: the teacher's tensors must be on the CPU"),
    }
}

/// Loss parts and the gradients the forward pass computed.
#[derive(Default)]
struct Parts {
    ce: f64,
    kd: f64,
    grads: Option<(Vec<f32>, Vec<f32>)>,
}

struct FusedHeadLoss {
    targets: Vec<u32>,
    weights: Vec<f32>,
    ce_coef: f32,
    teacher: Option<Teacher>,
    chunk_rows: usize,
    parts: Arc<Mutex<Parts>>,
}

impl FusedHeadLoss {
    /// The loss parts of one row, with `w·∂/∂z` of the weighted total written to `dz`.
    fn row(&self, r: usize, z: &[f32], zt: Option<&[f32]>, dz: &mut [f32]) -> (f64, f64) {
        let w = self.weights[r];
        if w == 0.0 {
            dz.fill(0.0);
            return (0.0, 0.0);
        }
        let mut kd = 0.0;
        dz.fill(0.0);
        if let (Some(t), Some(zt)) = (&self.teacher, zt) {
            let v = z.len().min(t.vocab());
            kd = divergence::row(t.kind, &z[..v], &zt[..v], Some(&mut dz[..v]));
            dz[..v].iter_mut().for_each(|g| *g *= t.coef);
        }
        let max = math::max(z);
        let lse = max + math::sum_map(z, |v| math::exp(v - max)).ln();
        let y = self.targets[r] as usize;
        let ce = (lse - z[y]) as f64;
        let c = self.ce_coef;
        if c != 0.0 {
            dz.iter_mut().zip(z).for_each(|(g, &v)| *g += c * math::exp(v - lse));
            dz[y] -= c;
        }
        dz.iter_mut().for_each(|g| *g *= w);
        (w as f64 * ce, w as f64 * kd)
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
        let c = self.chunk_rows.min(rows.max(1));
        let (mut z, mut dz) = (vec![0f32; c * vocab], vec![0f32; c * vocab]);
        let mut zt = self.teacher.as_ref().map(|t| vec![0f32; c * t.vocab()]);
        let teacher_locks = self.teacher.as_ref().map(|t| (t.hidden.storage_and_layout(), t.head.storage_and_layout()));
        let teacher_views = match &teacher_locks {
            Some(((hs, hl), (ws, wl))) => {
                let (th, tw) = (read_f32(hs, hl)?, read_f32(ws, wl)?);
                let (tv, twidth) = (wl.dims()[0], wl.dims()[1]);
                Some((th, MatRef { data: tw, offset: 0, shape: (tv, twidth), strides: (twidth, 1) }))
            }
            None => None,
        };
        let (mut dh, mut dw) = (vec![0f32; rows * width], vec![0f32; vocab * width]);
        let head = MatRef { data: w, offset: 0, shape: (vocab, width), strides: (width, 1) };
        let (mut ce, mut kd) = (0f64, 0f64);
        let mut start = 0;
        while start < rows {
            let n = c.min(rows - start);
            let hc = MatRef { data: h, offset: start * width, shape: (n, width), strides: (width, 1) };
            matmul_parallel(&mut z[..n * vocab], hc, head.t(), false);
            if let (Some((th, tw)), Some(zt)) = (&teacher_views, zt.as_mut()) {
                let (tv, twidth) = tw.shape;
                let th = MatRef { data: th, offset: start * twidth, shape: (n, twidth), strides: (twidth, 1) };
                matmul_parallel(&mut zt[..n * tv], th, tw.t(), false);
            }
            let tv = self.teacher.as_ref().map_or(1, Teacher::vocab);
            let (c_sum, k_sum) = dz[..n * vocab]
                .par_chunks_mut(vocab)
                .zip(z[..n * vocab].par_chunks(vocab))
                .enumerate()
                .map(|(i, (dz, z))| {
                    let zt = zt.as_ref().map(|zt| &zt[i * tv..(i + 1) * tv]);
                    self.row(start + i, z, zt, dz)
                })
                .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
            ce += c_sum;
            kd += k_sum;
            let g = MatRef { data: &dz, offset: 0, shape: (n, vocab), strides: (vocab, 1) };
            // ∂h = ∂z·W for these rows; ∂W += ∂zᵀ·h.
            matmul_parallel(&mut dh[start * width..(start + n) * width], g, head, false);
            matmul_parallel(&mut dw, g.t(), hc, true);
            start += n;
        }
        let total = self.ce_coef as f64 * ce + self.teacher.as_ref().map_or(0.0, |t| t.coef as f64 * kd);
        let mut parts = self.parts.lock().map_err(|_| candle_core::Error::Msg("head loss state poisoned".into()))?;
        *parts = Parts { ce, kd, grads: Some((dh, dw)) };
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
