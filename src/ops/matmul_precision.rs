//! How the large f32 matrix products of training are computed: exactly in f32 (the default),
//! or with both operands rounded to bf16 and the sums kept in f32 (`train.matmul_precision =
//! "bf16"`), which CPUs with AVX512-BF16 multiply twice as fast. It is PyTorch's
//! `set_float32_matmul_precision("medium")`: tensors, activations, gradients, the optimizer and
//! every other op stay f32; only the large products that [`super::gemm::matmul_parallel`] and
//! [`super::gemm::matmul_parallel_at`] take (a trainable layer's forward and backward, the fused
//! LM head's, a frozen teacher's over a batch where its weights are unpacked per product)
//! change.
//!
//! The setting is process-wide, as PyTorch's is, because those products run deep inside
//! autograd's ops on whatever thread the work lands on; [`scoped`] sets it for the extent of
//! a training run and restores what was there.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};

/// The arithmetic of training's large f32 products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MatmulPrecision {
    /// f32 products (exact up to the sums' rounding).
    #[default]
    F32,
    /// Operands rounded to bf16, exact products, f32 sums (AVX512-BF16 CPUs; others keep f32).
    Bf16,
}

impl MatmulPrecision {
    /// Whether this is the default, f32 (run settings leave the default unwritten, so that
    /// runs made before the setting existed keep their identity).
    pub fn is_f32(&self) -> bool {
        *self == Self::F32
    }
}

static BF16: AtomicBool = AtomicBool::new(false);

/// The precision in force: bf16 only where it was asked for and the build has the kernel
/// ([`super::gemm_bf16::AVAILABLE`]).
pub fn current() -> MatmulPrecision {
    if super::gemm_bf16::AVAILABLE && BF16.load(Ordering::Relaxed) {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// Sets the precision until the returned guard drops, then restores the previous setting.
#[must_use = "the setting lasts only as long as the guard"]
pub fn scoped(precision: MatmulPrecision) -> Scoped {
    let previous = BF16.swap(precision == MatmulPrecision::Bf16, Ordering::Relaxed);
    Scoped { previous }
}

/// Restores the previous precision when dropped ([`scoped`]).
pub struct Scoped {
    previous: bool,
}

impl Drop for Scoped {
    fn drop(&mut self) {
        BF16.store(self.previous, Ordering::Relaxed);
    }
}
