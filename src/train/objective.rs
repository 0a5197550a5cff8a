//! The supervised objective on a batch: cross-entropy on the target tokens, optionally mixed
//! with a divergence to a teacher, through the fused LM-head loss. SFT, KD, SeqKD, the PT term
//! of MiniLLM and validation losses all go through [`batch_head_loss`].

use anyhow::Result;
use candle_core::Tensor;

use crate::data::batch::LmBatch;
use crate::loss::{head_loss, Divergence, HeadLoss, TargetTerm, TeacherHead};
use crate::model::Model;

/// A teacher term: `ratio · D(teacher ‖ student)` beside `(1 − ratio) · CE`.
#[derive(Clone, Copy)]
pub struct TeacherTerm<'a> {
    /// The teacher.
    pub teacher: &'a Model,
    /// Which divergence.
    pub divergence: Divergence,
    /// Weight r of the divergence (1 − r goes to cross-entropy).
    pub ratio: f64,
    /// Both models' logits are divided by τ (GKD; 1 elsewhere). The cross-entropy then uses
    /// the scaled logits too, so τ ≠ 1 is meant for `ratio = 1`.
    pub temperature: f64,
}

/// `(1 − r)·CE + r·D(teacher, student)` at `b`'s target positions (CE alone without a
/// teacher), each weighted by `weights` per target token, through the fused LM-head loss: no
/// `[tokens × vocab]` logits.
pub fn batch_head_loss(
    student: &Model,
    teacher: Option<TeacherTerm>,
    b: &LmBatch,
    weights: &[f32],
) -> Result<HeadLoss> {
    // Logits z/τ = (h/τ)·Wᵀ: the temperature scales the hidden states, so the fused head needs
    // no knowledge of it and the gradient flows through the scaling.
    let tau = teacher.map_or(1.0, |t| t.temperature);
    let scaled = |h: Tensor| -> Result<Tensor> { Ok(if tau == 1.0 { h } else { h.affine(1.0 / tau, 0.0)? }) };
    let hidden = scaled(b.gather(&student.lm.forward_hidden(&b.input_ids, &b.mask, None)?)?)?;
    let t_hidden = match teacher {
        Some(t) => Some(scaled(b.gather(&t.teacher.lm.forward_hidden(&b.input_ids, &b.mask, None)?.detach())?)?),
        None => None,
    };
    let head = teacher.zip(t_hidden.as_ref()).map(|(t, hidden)| TeacherHead {
        hidden,
        head: t.teacher.lm.lm_head_weight(),
        packed_head: t.teacher.lm.lm_head_packed(),
        kind: t.divergence,
        coef: t.ratio,
        weights,
    });
    let ce = TargetTerm::CrossEntropy { weights, coef: 1.0 - teacher.map_or(0.0, |t| t.ratio) };
    head_loss(&hidden, student.lm.lm_head_weight(), &b.targets, ce, head, None)
}
