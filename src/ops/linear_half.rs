//! `x·W (+ b)` for a frozen layer whose weight is stored in bf16 or f16 and whose activations
//! are f32 (a teacher loaded with `--teacher-dtype bf16|f16` on the CPU, `eval --dtype
//! bf16|f16`). Storing the weight in 16 bits halves the memory a teacher takes and the bytes
//! each decoding step streams; everything outside the products (sums, biases, norms,
//! attention, activations) stays f32. candle's half-precision matmul instead widens both
//! operands to fresh f32 buffers on every call and rounds the product back, and a half-precision
//! model rounds every activation.
//!
//! - **bf16** multiplies in bf16 and sums in f32: the input is rounded to bf16, each product of
//!   two bf16 values is exact, and the rounded input lets the CPU's bf16 dot products
//!   (AVX512-BF16) take half the bytes per multiply-add.
//! - **f16** multiplies the f32 input by the exactly widened weight: x86 CPUs short of
//!   AVX512-FP16 have no f16 products, so rounding the input would lose accuracy for nothing.
//!
//! Few rows (decoding) go to the kernels that read the weight in place
//! ([`super::skinny_bf16`], [`super::skinny`] for f16). More rows of a bf16 weight go to
//! [`super::gemm_bf16`]'s register-blocked bf16 product (CPUs with AVX512-BF16; 1.7–2× the f32
//! `gemm` on the widened weight); an f16 weight, or a bf16 one on other CPUs, is widened to
//! f32 a panel at a time and multiplied by the packing product. All compute the same
//! products, so prefill and cached decoding agree to summation order. A frozen model's large
//! dense layers (every bf16 one on CPUs with AVX512-BF16) hold their weights packed at load
//! instead ([`super::packed::linear_packed`]), which takes a register-blocked product at every
//! row count with the same arithmetic. Forward only: a frozen weight has no gradient, and an
//! input that needs one is refused.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{matmul_parallel_at, MatRef};
use super::gemm_bf16;
use super::linear::{seeded_output, weight_view};
use super::skinny::{self, WeightEntry};
use super::skinny_bf16;
use super::{contiguous_f32, WeightLayout};

/// Whether [`linear_half`] serves this layer: f32 input, bf16 or f16 weight, both on the CPU.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    super::fusable(x) && w.device().is_cpu() && matches!(w.dtype(), DType::BF16 | DType::F16)
}

/// `x·W + b` for `x` `[rows, in]` f32, `W` bf16 or f16 in `layout`, `b` f32 `[out]` (or none).
pub fn linear_half(x: &Tensor, w: &Tensor, b: Option<&Tensor>, layout: WeightLayout) -> candle_core::Result<Tensor> {
    if x.track_op() {
        candle_core::bail!("linear_half: a weight stored in 16 bits is frozen; its input must not need a gradient");
    }
    let op = LinearHalf { layout };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        Some(b) => x.apply_op3_no_bwd(&w, &b.contiguous()?, &op),
        None => x.apply_op2_no_bwd(&w, &op),
    }
}

struct LinearHalf {
    layout: WeightLayout,
}

/// Weight entries per widened panel of the many-row product (2 MiB of f32: half of what the
/// two cores' L2 hold, so the panel is still there when the product packs it).
const PANEL_ENTRIES: usize = 1 << 19;

impl LinearHalf {
    /// `x·W (+ bias)` for the contiguous `x` (f32) and `w` (bf16 or f16) of `lx` and `lw`.
    fn forward(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        bias: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, "linear-half")?;
        let Some((a, e)) = lw.contiguous_offsets() else {
            candle_core::bail!("linear-half: weight must be contiguous")
        };
        let (rows, din) = lx.shape().dims2()?;
        let len = e - a;
        let dout = len / din.max(1);
        if din * dout != len || bias.is_some_and(|b| b.len() != dout) {
            candle_core::bail!(
                "linear-half: input width {din}, weight {:?}, bias {:?}",
                lw.dims(),
                bias.map(<[f32]>::len)
            );
        }
        let mut y = seeded_output(rows, dout, bias);
        let xm = MatRef { data: x, offset: 0, shape: (rows, din), strides: (din, 1) };
        match sw {
            CpuStorage::BF16(w) => {
                let w = &w[a..e];
                let wm = weight_view(w, din, dout, self.layout);
                if skinny::applies(&xm, &wm) {
                    skinny_bf16::matmul(&mut y, xm, wm, true);
                } else if gemm_bf16::AVAILABLE {
                    gemm_bf16::matmul(&mut y, xm, wm);
                } else {
                    let rounded = skinny_bf16::round_rows(&xm);
                    self.widened_product(&mut y, MatRef { data: &rounded, ..xm }, w, (din, dout));
                }
            }
            CpuStorage::F16(w) => {
                let w = &w[a..e];
                let wm = weight_view(w, din, dout, self.layout);
                if skinny::applies(&xm, &wm) {
                    skinny::matmul(&mut y, xm, wm, true);
                } else {
                    self.widened_product(&mut y, xm, w, (din, dout));
                }
            }
            _ => candle_core::bail!("linear-half: the weight must be stored in bf16 or f16"),
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }

    /// `y += x·W` by the packing product on `w` widened to f32 a panel of output columns at a
    /// time, into one buffer of about [`PANEL_ENTRIES`]: widening the whole weight at once
    /// took a transient f32 copy as large as it on every call (an LM head: 154 MB for GPT-2,
    /// 322 MB for GPT-2 XL). The speed measured the same either way (BENCHMARKS.md).
    fn widened_product<T: WeightEntry>(&self, y: &mut [f32], x: MatRef, w: &[T], (din, dout): (usize, usize)) {
        let width = (PANEL_ENTRIES / din.max(1)).next_multiple_of(16).min(dout.max(1));
        let mut panel = vec![0f32; din * width];
        for c0 in (0..dout).step_by(width) {
            let n = width.min(dout - c0);
            let panel = &mut panel[..din * n];
            // The panel holds columns c0..c0 + n in the weight's own layout, `din × n`.
            match self.layout {
                // Weight rows c0..: one contiguous run.
                WeightLayout::OutIn => {
                    let src = &w[c0 * din..(c0 + n) * din];
                    panel.par_chunks_mut(1 << 14).zip(src.par_chunks(1 << 14)).for_each(|(d, s)| T::widen(s, d));
                }
                // Columns c0.. of every weight row.
                WeightLayout::InOut => {
                    panel.par_chunks_mut(n).enumerate().for_each(|(i, d)| T::widen(&w[i * dout + c0..][..n], d));
                }
            }
            matmul_parallel_at(y, c0, dout, x, weight_view(panel, din, n, self.layout), true);
        }
    }
}

impl CustomOp2 for LinearHalf {
    fn name(&self) -> &'static str {
        "linear-half"
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

impl CustomOp3 for LinearHalf {
    fn name(&self) -> &'static str {
        "linear-half"
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
        self.forward(sx, lx, sw, lw, Some(contiguous_f32(sb, lb, "linear-half")?))
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

    /// A 16-bit layer computes what the f32 layer computes on the widened weight and on the
    /// input as its products see it (rounded to bf16 for a bf16 weight, as is for f16): few
    /// rows (the in-place kernels) and many (widened, packed), both layouts, with and without
    /// a bias; a weight of one panel and one of three (the last narrower).
    #[test]
    fn equals_the_f32_layer_on_the_widened_weight() {
        // 2^18 + entries (the in-place kernels' size); 512 × 2100 is three panels.
        let shapes: [(usize, usize, &[usize]); 2] = [(512, 640, &[1, 7, 16, 65, 130]), (512, 2100, &[65])];
        const { assert!(512 * 2100 > 2 * PANEL_ENTRIES, "the wide weight spans three panels") };
        for (dtype, (din, dout, row_counts)) in
            [DType::BF16, DType::F16].into_iter().flat_map(|d| shapes.map(|s| (d, s)))
        {
            for &rows in row_counts {
                let x = Tensor::from_vec(values(rows * din, rows), (rows, din), &Device::Cpu).unwrap();
                let x_seen = if dtype == DType::BF16 {
                    x.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap()
                } else {
                    x.clone()
                };
                for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                    let shape = if layout == WeightLayout::InOut { (din, dout) } else { (dout, din) };
                    let w =
                        Tensor::from_vec(values(din * dout, 2), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let w32 = w.to_dtype(DType::F32).unwrap();
                    let b = Tensor::from_vec(values(dout, 3), dout, &Device::Cpu).unwrap();
                    let pairs = [
                        (
                            linear_half(&x, &w, Some(&b), layout).unwrap(),
                            super::super::linear(&x_seen, &w32, &b, layout).unwrap(),
                        ),
                        (
                            linear_half(&x, &w, None, layout).unwrap(),
                            super::super::linear_no_bias(&x_seen, &w32, layout).unwrap(),
                        ),
                    ];
                    // Both sides sum the same din + 1 terms in different orders, each addition
                    // rounding by at most 2^-24 of the terms' magnitudes summed so far.
                    let magnitudes =
                        super::super::linear(&x_seen.abs().unwrap(), &w32.abs().unwrap(), &b.abs().unwrap(), layout)
                            .unwrap();
                    let bound = (magnitudes * (2.0 * (din + 1) as f64 * f32::EPSILON as f64)).unwrap();
                    for (got, want) in pairs {
                        let excess = ((got - want).unwrap().abs().unwrap() - &bound).unwrap();
                        let worst = excess.max_all().unwrap().to_scalar::<f32>().unwrap();
                        assert!(worst <= 0.0, "{dtype:?}, {rows} rows, {layout:?}: differs from the f32 layer by {worst} more than rounding allows");
                    }
                }
            }
        }
    }

    #[test]
    fn an_input_that_needs_a_gradient_is_refused() {
        let x = candle_core::Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::ones((4, 3), DType::BF16, &Device::Cpu).unwrap();
        let err = linear_half(x.as_tensor(), &w, None, WeightLayout::InOut).unwrap_err().to_string();
        assert!(err.contains("frozen"), "{err}");
    }
}
