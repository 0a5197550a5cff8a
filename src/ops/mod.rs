//! Fused CPU kernels with their own backward for the training hot path.
//!
//! candle's autograd builds each of these from several generic ops, and its backward pass from
//! several more (every one a fresh allocation and a full pass over memory). Here each is one
//! pass forward and one pass backward over contiguous f32 rows, parallel over rows. Other
//! devices and dtypes take the differentiable composition, which is also the reference the
//! tests compare against.

pub mod adamw;
pub mod attention;
pub mod gelu;
pub mod gemm;
pub mod gemm_bf16;
pub mod gemm_f32;
pub mod inference_attention;
pub mod layer_norm;
pub mod linear;
pub mod linear_half;
pub mod math;
pub mod matmul_precision;
pub mod packed;
pub mod packed_f32;
pub mod simd;
pub mod skinny;
pub mod skinny_bf16;
pub mod softmax;

use candle_core::{CpuStorage, Layout, Tensor};

pub use attention::attention_packed;
pub use gelu::gelu_tanh;
pub use inference_attention::attention_inference;
pub use layer_norm::layer_norm;
pub use linear::{linear, linear_no_bias, WeightLayout};
pub use linear_half::linear_half;
pub use softmax::masked_softmax;

/// Whether `t` can take a fused CPU kernel (f32 on the CPU).
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// The f32 values of a contiguous CPU tensor.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op}: input must be contiguous") };
    Ok(&s.as_slice::<f32>()?[a..b])
}

/// Rows handed to one rayon task: enough work per task that scheduling stays negligible.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).max(1)
}
