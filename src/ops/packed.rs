//! Dense layers of a frozen model whose weights are packed once, at load, into a
//! register-blocked kernel's layout: every product then skips the packing a general product
//! does per call, which at decoding's few rows costs as much as the product itself.
//!
//! - **bf16** weights on CPUs with AVX512-BF16 ([`gemm_bf16::PackedWeight`]): bf16 products
//!   with f32 sums at every row count.
//! - **f32** weights ([`PackedF32`]): the f32 kernel up to [`packed_f32::KERNEL_ROWS`] rows
//!   (every row count with AVX2), the general product on the weight unpacked a group of
//!   panels at a time beyond.
//! - **bf16** weights on other CPUs, and **f16** weights ([`PackedPanels`]): the f32 kernel on
//!   16-bit panels widened in registers, with [`super::linear_half`]'s arithmetic (bf16: the
//!   input rounded to bf16 first; f16: the f32 input).
//!
//! Forward only: a frozen weight has no gradient, and an input that needs one is refused.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};

use super::gemm::MatRef;
use super::gemm_bf16::{self, PackedWeight};
use super::linear::{seeded_output, weight_view};
use super::packed_f32::{self, PackedF32, PackedPanels};
use super::{contiguous_f32, WeightLayout};
use super::{skinny, skinny_bf16};

/// A frozen `in × out` weight in a kernel's packed layout.
#[derive(Clone)]
pub enum PackedMatrix {
    /// bf16 entries in pairs for `vdpbf16ps` ([`gemm_bf16`]).
    Bf16(PackedWeight),
    /// f32 entries ([`packed_f32`]).
    F32(PackedF32),
    /// bf16 entries widened by the f32 kernel (CPUs without AVX512-BF16).
    Bf16Panels(PackedPanels<half::bf16>),
    /// f16 entries widened by the f32 kernel.
    F16Panels(PackedPanels<half::f16>),
}

impl PackedMatrix {
    /// Whether a frozen model on the CPU packs matrices stored in `dtype`: f32, bf16 and f16.
    pub fn packs(dtype: DType) -> bool {
        matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
    }

    /// Whether a frozen model packs a matrix of `entries` stored in `dtype`: bf16 at every
    /// size where the build has the bf16 product; otherwise from [`skinny::MIN_WEIGHT`]
    /// entries, so that small models (the tests', the demo's), whose weights live in cache,
    /// compute exactly as before.
    pub fn worth_packing(dtype: DType, entries: usize) -> bool {
        Self::packs(dtype) && ((dtype == DType::BF16 && gemm_bf16::AVAILABLE) || entries >= skinny::MIN_WEIGHT)
    }

    /// The weight `w` (f32, bf16 or f16), stored `[in, out]` or `[out, in]` as `layout` says,
    /// packed `in × out`.
    pub fn pack(w: &Tensor, layout: WeightLayout) -> candle_core::Result<Self> {
        let (din, dout) = match (w.dims2()?, layout) {
            ((i, o), WeightLayout::InOut) | ((o, i), WeightLayout::OutIn) => (i, o),
        };
        if !Self::packs(w.dtype()) {
            candle_core::bail!("packed: weights stored in {:?} are not packed on this CPU", w.dtype());
        }
        Ok(match w.dtype() {
            DType::BF16 => {
                let values = w.flatten_all()?.to_vec1::<half::bf16>()?;
                let view = weight_view(&values, din, dout, layout);
                if gemm_bf16::AVAILABLE {
                    Self::Bf16(PackedWeight::new(&view))
                } else {
                    Self::Bf16Panels(PackedPanels::new(&view))
                }
            }
            DType::F16 => {
                let values = w.flatten_all()?.to_vec1::<half::f16>()?;
                Self::F16Panels(PackedPanels::new(&weight_view(&values, din, dout, layout)))
            }
            _ => {
                let values = w.flatten_all()?.to_vec1::<f32>()?;
                Self::F32(PackedF32::new(&weight_view(&values, din, dout, layout)))
            }
        })
    }

    /// The inner dimension (`in`) and the columns (`out`).
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Self::Bf16(w) => w.shape(),
            Self::F32(w) => w.shape(),
            Self::Bf16Panels(w) => w.shape(),
            Self::F16Panels(w) => w.shape(),
        }
    }

    /// The weight as a new `[in, out]` tensor in its own dtype.
    pub fn unpack(&self) -> candle_core::Result<Tensor> {
        let shape = self.shape();
        match self {
            Self::Bf16(w) => Tensor::from_vec(w.unpack(), shape, &Device::Cpu),
            Self::F32(w) => Tensor::from_vec(w.unpack(), shape, &Device::Cpu),
            Self::Bf16Panels(w) => Tensor::from_vec(w.unpack(), shape, &Device::Cpu),
            Self::F16Panels(w) => Tensor::from_vec(w.unpack(), shape, &Device::Cpu),
        }
    }

    /// `dst += x·W` (`x` `rows × in` with unit column stride, `dst` row-major `rows × out`).
    pub(crate) fn matmul(&self, dst: &mut [f32], x: MatRef) {
        match self {
            Self::Bf16(w) => gemm_bf16::matmul_packed(dst, x, w),
            Self::F32(w) => packed_f32::matmul_packed(dst, x, w),
            Self::Bf16Panels(w) => {
                // bf16 products, as the AVX512-BF16 product and `linear_half` compute them.
                let rounded = skinny_bf16::round_rows(&x);
                let (rows, k) = x.shape;
                packed_f32::matmul_packed(
                    dst,
                    MatRef { data: &rounded, offset: 0, shape: (rows, k), strides: (k, 1) },
                    w,
                )
            }
            Self::F16Panels(w) => packed_f32::matmul_packed(dst, x, w),
        }
    }
}

/// `x·W + b` for `x` `[rows, in]` f32 and a weight packed at load ([`PackedMatrix`],
/// `in × out`), `b` f32 `[out]` (or none). The same products as the unpacked layer, summed in
/// another order.
pub fn linear_packed(x: &Tensor, w: &Arc<PackedMatrix>, b: Option<&Tensor>) -> candle_core::Result<Tensor> {
    if x.track_op() {
        candle_core::bail!("linear-packed: a packed weight is frozen; its input must not need a gradient");
    }
    let op = LinearPacked { weight: w.clone() };
    let x = x.contiguous()?;
    match b {
        Some(b) => x.apply_op2_no_bwd(&b.contiguous()?, &op),
        None => x.apply_op1_no_bwd(&op),
    }
}

/// [`linear_packed`]'s op: the weight is held by the op, as candle has no packed tensors.
struct LinearPacked {
    weight: Arc<PackedMatrix>,
}

impl LinearPacked {
    fn forward(&self, sx: &CpuStorage, lx: &Layout, bias: Option<&[f32]>) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, "linear-packed")?;
        let (rows, din) = lx.shape().dims2()?;
        let (k, dout) = self.weight.shape();
        if din != k || bias.is_some_and(|b| b.len() != dout) {
            candle_core::bail!(
                "linear-packed: input width {din}, weight {k} × {dout}, bias {:?}",
                bias.map(<[f32]>::len)
            );
        }
        let mut y = seeded_output(rows, dout, bias);
        let xm = MatRef { data: x, offset: 0, shape: (rows, din), strides: (din, 1) };
        self.weight.matmul(&mut y, xm);
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }
}

impl CustomOp1 for LinearPacked {
    fn name(&self) -> &'static str {
        "linear-packed"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(sx, lx, None)
    }
}

impl CustomOp2 for LinearPacked {
    fn name(&self) -> &'static str {
        "linear-packed"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(sx, lx, Some(contiguous_f32(sb, lb, "linear-packed")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
    }

    /// A layer with its weight packed at load computes what the layer computes on the weight
    /// as read (the same products, summed in another order): bf16 weights against
    /// [`super::super::linear_half`], f32 ones against the f32 layer; at decoding's row counts
    /// and prefill's (past [`packed_f32::KERNEL_ROWS`] with AVX-512), from either layout, with and without
    /// a bias; and it unpacks to the weight it was packed from.
    #[test]
    fn a_packed_weight_equals_the_weight_as_read() {
        let (din, dout) = (300, 200);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for rows in [1, 5, 16, 64, 130] {
                let x = Tensor::from_vec(values(rows * din, rows), (rows, din), &Device::Cpu).unwrap();
                let b = Tensor::from_vec(values(dout, 3), dout, &Device::Cpu).unwrap();
                for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                    let shape = if layout == WeightLayout::InOut { (din, dout) } else { (dout, din) };
                    let w =
                        Tensor::from_vec(values(din * dout, 2), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let packed = Arc::new(PackedMatrix::pack(&w, layout).unwrap());
                    let in_out = if layout == WeightLayout::InOut { w.clone() } else { w.t().unwrap() };
                    let unpacked = packed.unpack().unwrap();
                    assert_eq!(unpacked.dtype(), dtype);
                    let diff = (unpacked.to_dtype(DType::F32).unwrap() - in_out.to_dtype(DType::F32).unwrap())
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert_eq!(diff, 0.0, "{dtype:?} {layout:?}: unpacks to other values");
                    for bias in [Some(&b), None] {
                        let got = linear_packed(&x, &packed, bias).unwrap();
                        let want = match (dtype, bias) {
                            (DType::BF16 | DType::F16, _) => super::super::linear_half(&x, &w, bias, layout).unwrap(),
                            (_, Some(b)) => super::super::linear(&x, &w, b, layout).unwrap(),
                            (_, None) => super::super::linear_no_bias(&x, &w, layout).unwrap(),
                        };
                        assert_eq!(got.dims(), [rows, dout]);
                        // Both sum the same din + 1 terms (each at most 0.25, the bias 0.5) in
                        // f32, in different orders: each addition rounds by at most 2^-24 of
                        // the magnitudes summed so far.
                        let bound = (din + 1) as f32 * f32::EPSILON * (din as f32 * 0.25 + 0.5);
                        let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                        assert!(
                            diff <= bound,
                            "{dtype:?}, {rows} rows, {layout:?}, bias {}: differs by {diff}",
                            bias.is_some()
                        );
                    }
                }
                let small = Tensor::zeros((2, 3), dtype, &Device::Cpu).unwrap();
                let small = Arc::new(PackedMatrix::pack(&small, WeightLayout::InOut).unwrap());
                let err = linear_packed(&x.narrow(1, 0, din - 1).unwrap(), &small, None).unwrap_err().to_string();
                assert!(err.contains("input width"), "{err}");
            }
        }
    }

    #[test]
    fn an_input_that_needs_a_gradient_is_refused() {
        let x = candle_core::Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let w = Arc::new(
            PackedMatrix::pack(&Tensor::ones((4, 3), DType::F32, &Device::Cpu).unwrap(), WeightLayout::InOut).unwrap(),
        );
        let err = linear_packed(x.as_tensor(), &w, None).unwrap_err().to_string();
        assert!(err.contains("frozen"), "{err}");
    }

    /// f32, bf16 and f16 weights are packed, bf16 for the bf16 dot products where the CPU has
    /// them; other dtypes are refused. Small matrices are packed only in bf16 with the dot
    /// products.
    #[test]
    fn which_weights_are_packed() {
        let w = Tensor::ones((4, 3), DType::F64, &Device::Cpu).unwrap();
        assert!(PackedMatrix::pack(&w, WeightLayout::InOut).is_err());
        let bf16 = Tensor::ones((4, 3), DType::BF16, &Device::Cpu).unwrap();
        let packed = PackedMatrix::pack(&bf16, WeightLayout::InOut).unwrap();
        assert_eq!(matches!(packed, PackedMatrix::Bf16(_)), gemm_bf16::AVAILABLE);
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            assert!(PackedMatrix::worth_packing(dtype, skinny::MIN_WEIGHT));
            let small = dtype == DType::BF16 && gemm_bf16::AVAILABLE;
            assert_eq!(PackedMatrix::worth_packing(dtype, skinny::MIN_WEIGHT - 1), small, "{dtype:?}");
        }
    }
}
