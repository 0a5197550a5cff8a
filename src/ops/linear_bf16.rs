//! `bf16(x)·W (+ b)` for a frozen layer whose weight is stored in bf16 and whose activations
//! are f32 (a teacher loaded with `--teacher-dtype bf16` on the CPU, `eval --dtype bf16`).
//!
//! The product multiplies in bf16 and sums in f32: the input is rounded to bf16, each product
//! of two bf16 values is exact, the sums, the bias and everything outside the products stay
//! f32. Storing the weight in bf16 halves the memory a teacher takes and the bytes each
//! decoding step streams, and the rounded input lets the CPU's bf16 dot products
//! (AVX512-BF16) take half the bytes per multiply-add. candle's bf16 matmul instead widens both operands to fresh f32
//! buffers on every call and rounds the product back to bf16, and a bf16 model rounds every
//! activation.
//!
//! Few rows (decoding) go to [`super::skinny_bf16`], which reads the weight in place; more rows
//! widen the weight to f32 once per call (a pass over it, small next to a product of that many
//! rows) and multiply the rounded input by the packing product: the same products, so prefill
//! and cached decoding agree to summation order. Forward only: a frozen weight has no
//! gradient, and an input that needs one is refused.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use half::bf16;
use rayon::prelude::*;

use super::gemm::{matmul_parallel, MatRef};
use super::linear::{seeded_output, weight_view};
use super::skinny::{self, WeightEntry};
use super::skinny_bf16;
use super::{contiguous_f32, WeightLayout};

/// Whether [`linear_bf16`] serves this layer: f32 input, bf16 weight, both on the CPU.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    super::fusable(x) && w.device().is_cpu() && w.dtype() == candle_core::DType::BF16
}

/// `x·W + b` for `x` `[rows, in]` f32, `W` bf16 in `layout`, `b` f32 `[out]` (or none).
pub fn linear_bf16(x: &Tensor, w: &Tensor, b: Option<&Tensor>, layout: WeightLayout) -> candle_core::Result<Tensor> {
    if x.track_op() {
        candle_core::bail!("linear_bf16: a bf16-stored weight is frozen; its input must not need a gradient");
    }
    let op = LinearBf16 { layout };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &op),
        None => x.apply_op2_no_bwd(&w, &op),
    }
}

struct LinearBf16 {
    layout: WeightLayout,
}

impl LinearBf16 {
    /// `x·W (+ bias)` for the contiguous `x` (f32) and `w` (bf16) of `lx` and `lw`.
    fn forward(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, "linear-bf16")?;
        let Some((a, e)) = lw.contiguous_offsets() else {
            candle_core::bail!("linear-bf16: weight must be contiguous")
        };
        let w = &sw.as_slice::<bf16>()?[a..e];
        let (rows, din) = lx.shape().dims2()?;
        let dout = w.len() / din.max(1);
        if din * dout != w.len() || bias.is_some_and(|b| b.len() != dout) {
            candle_core::bail!(
                "linear-bf16: input width {din}, weight {:?}, bias {:?}",
                lw.dims(),
                bias.map(<[f32]>::len)
            );
        }
        let mut y = seeded_output(rows, dout, bias);
        let xm = MatRef { data: x, offset: 0, shape: (rows, din), strides: (din, 1) };
        let wm = weight_view(w, din, dout, self.layout);
        if skinny::applies(&xm, &wm) {
            skinny_bf16::matmul(&mut y, xm, wm, true);
        } else {
            let rounded = skinny_bf16::round_rows(&xm);
            let mut wide = vec![0f32; w.len()];
            wide.par_chunks_mut(1 << 16).zip(w.par_chunks(1 << 16)).for_each(|(d, s)| bf16::widen(s, d));
            let xm = MatRef { data: &rounded, ..xm };
            matmul_parallel(&mut y, xm, weight_view(&wide, din, dout, self.layout), true);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }
}

impl CustomOp2 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(sx, lx, sw, lw, None)
    }
}

impl CustomOp3 for LinearBf16 {
    fn name(&self) -> &'static str {
        "linear-bf16"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(sx, lx, sw, lw, Some(contiguous_f32(sb, lb, "linear-bf16")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
    }

    /// The bf16 layer computes what the f32 layer computes on the bf16-rounded input and
    /// weight: few rows (the in-place kernel) and many (widened, packed), both layouts, with
    /// and without a bias.
    #[test]
    fn equals_the_f32_layer_on_the_rounded_weight() {
        let (din, dout) = (512, 640); // 2^18 + entries: the in-place kernel's size
        for rows in [1, 7, 16, 65, 130] {
            let x = Tensor::from_vec(values(rows * din, rows), (rows, din), &Device::Cpu).unwrap();
            let x_rounded = x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let shape = if layout == WeightLayout::InOut { (din, dout) } else { (dout, din) };
                let w = Tensor::from_vec(values(din * dout, 2), shape, &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let w32 = w.to_dtype(DType::F32).unwrap();
                let b = Tensor::from_vec(values(dout, 3), dout, &Device::Cpu).unwrap();
                let pairs = [
                    (
                        linear_bf16(&x, &w, Some(&b), layout).unwrap(),
                        super::super::linear(&x_rounded, &w32, &b, layout).unwrap(),
                    ),
                    (
                        linear_bf16(&x, &w, None, layout).unwrap(),
                        super::super::linear_no_bias(&x_rounded, &w32, layout).unwrap(),
                    ),
                ];
                for (got, want) in pairs {
                    let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    // Sums of 512 terms of size ≤ 0.25 in different orders.
                    assert!(d < 2e-5, "{rows} rows, {layout:?}: differs from the f32 layer by {d}");
                }
            }
        }
    }

    #[test]
    fn an_input_that_needs_a_gradient_is_refused() {
        let x = candle_core::Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::ones((4, 3), DType::BF16, &Device::Cpu).unwrap();
        let err = linear_bf16(x.as_tensor(), &w, None, WeightLayout::InOut).unwrap_err().to_string();
        assert!(err.contains("frozen"), "{err}");
    }
}
