//! `dst ← (accumulate ? dst : 0) + a·b` for two f32 matrices packed per call, on
//! [`super::packed_f32`]'s register-blocked kernel: the large products of training (a
//! trainable layer's forward and backward, the fused LM head's) on CPUs where that kernel
//! outruns the `gemm` crate's ([`OUTRUNS_GEMM`]).
//!
//! Goto's loops: `a` is packed whole into the kernel's blocks of [`MR`] rows (it is an
//! activation or a gradient: megabytes); each task, a range of output columns, packs its share
//! of `b` a block of [`NC`] columns by at most [`DEPTH`] inner entries at a time into a buffer
//! that stays in L2, and passes every group of [`MC`] rows over it (a panel's block stays in
//! L1 while the group's row blocks pass over it). The arithmetic is the kernel's: f32
//! multiply-adds, each output's terms added in the inner dimension's order within each block
//! of the inner dimension.

use super::gemm::{matmul_parallel, output_block, product_output, MatRef};
use super::packed_f32::{
    for_panel_ranges, pack_rows, prefetch_output, row_block_product, PackedF32, MC, MR, NC, NR, STREAM_AHEAD,
};
use super::skinny::SharedRows;

/// Whether the build's kernel outruns `gemm` on large products, and so takes them: with AVX2
/// (an EPYC of the Zen 3 class, 2 threads) the kernel multiplied GPT-2's layer shapes at
/// 128–1,024 rows at 108–123 GFLOP/s against 98–113 for `gemm` on the same weights (medians
/// of interleaved runs; BENCHMARKS.md); with AVX-512
/// (Xeons of the Ice Lake and Sapphire Rapids class) `gemm` was the faster from 128 rows on
/// (~275 against ~220 GFLOP/s).
pub const OUTRUNS_GEMM: bool =
    cfg!(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", not(target_feature = "avx512f")));

/// Most inner entries per block of the product (the frozen weights' products take
/// [`super::packed_f32::KC`], half as many). A panel's block (`DEPTH × NR` f32, 16 KiB with
/// AVX2's 6 × 16 kernel) and one row block's packed rows (6 KiB) share L1 here, since each
/// call takes one row block over a panel block; decoding's whole-panel order keeps every row
/// block over the same panel block, and there 256 outgrew L1 (16-row decoding products 20%
/// slower). Twice the depth halves the calls and the passes over the output: on the AVX2 EPYC,
/// GPT-2 124M's layer products ran 5–10% faster than at 128 at most shapes (−2 to +29% in
/// two runs of interleaved rounds), the LM head's logits 1–20% and its weight gradient
/// (149 deep: one pass over its 154 MB output instead of two) 36–55%; the SFT step 7–10%
/// faster (BENCHMARKS.md, fourth 2026-12-03 session).
const DEPTH: usize = 256;

/// Fewest multiply-adds (`rows · k · cols`) of a product sent here: below, the per-call packing
/// and the tasks cost more than the kernel saves.
const MIN_WORK: usize = 1 << 22;

/// Whether [`super::gemm::matmul_parallel`] hands the product `a·b` to [`matmul`]: on builds
/// whose kernel outruns `gemm`, a large product whose operands each have a unit stride.
pub fn applies(a: &MatRef, b: &MatRef) -> bool {
    OUTRUNS_GEMM && large_with_unit_strides(a, b)
}

/// Whether `a·b` has at least [`MIN_WORK`] multiply-adds and each operand a unit stride: what a
/// product packed per call (this module's, or [`super::gemm_bf16::matmul_f32`]) asks.
pub fn large_with_unit_strides(a: &MatRef, b: &MatRef) -> bool {
    let unit = |m: &MatRef| m.strides.0 == 1 || m.strides.1 == 1;
    a.shape.0 * a.shape.1 * b.shape.1 >= MIN_WORK && unit(a) && unit(b)
}

/// `dst ← (accumulate ? dst : 0) + a·b` for `dst` an `a.rows × b.cols` matrix at `dst_offset`
/// with row stride `dst_rs` (column stride 1), on all of rayon's threads. `a` and `b` each
/// need a unit stride along their rows or their columns.
pub fn matmul(dst: &mut [f32], dst_offset: usize, dst_rs: usize, a: MatRef, b: MatRef, accumulate: bool) {
    let Some(dst) = product_output(dst, dst_offset, dst_rs, &a, &b, accumulate, "gemm-f32") else { return };
    goto_loops(dst, dst_rs, a, Right::Unpacked(b));
}

/// [`matmul`] with `b` packed ahead, whole ([`PackedF32::new`]): for a right operand that
/// several products take, which [`matmul`] would pack again for each (the LM head's weight,
/// once per chunk of rows; [`ReusedRight`]). The arithmetic is [`matmul`]'s, to the bit.
pub fn matmul_prepacked(dst: &mut [f32], dst_offset: usize, dst_rs: usize, a: MatRef, b: &PackedF32, accumulate: bool) {
    let (k, cols) = b.shape();
    assert_eq!(a.shape.1, k, "gemm-f32: inner dimensions differ");
    let Some(dst) = output_block(dst, dst_offset, dst_rs, &a, cols, accumulate) else { return };
    goto_loops(dst, dst_rs, a, Right::Packed(b));
}

/// A product's right operand: packed a block at a time as the loops reach it, or packed
/// ahead.
#[derive(Clone, Copy)]
enum Right<'a> {
    Unpacked(MatRef<'a>),
    Packed(&'a PackedF32),
}

impl Right<'_> {
    fn cols(self) -> usize {
        match self {
            Right::Unpacked(b) => b.shape.1,
            Right::Packed(p) => p.shape().1,
        }
    }
}

/// `dst += a·b` (`dst` from its first entry, rows of stride `dst_rs`) by Goto's loops.
fn goto_loops(dst: &mut [f32], dst_rs: usize, a: MatRef, b: Right) {
    let ((rows, k), cols) = (a.shape, b.cols());
    let ap = pack_rows(&a);
    let depth = k.div_ceil(k.div_ceil(DEPTH));
    let out = SharedRows::new(dst, dst_rs);
    for_panel_ranges(cols, |c0, c1| {
        let mut buffer = match b {
            Right::Unpacked(_) => vec![0f32; depth * NC],
            Right::Packed(_) => Vec::new(),
        };
        for jc in (c0..c1).step_by(NC) {
            let jc1 = (jc + NC).min(c1);
            for i0 in (0..k).step_by(depth) {
                let kc = depth.min(k - i0);
                let block = InnerBlock { out: &out, ap: &ap, rows, k, i0, kc, jc, jc1 };
                match b {
                    Right::Unpacked(b) => {
                        pack_block(&b, i0, kc, jc, jc1, &mut buffer);
                        block.pass::<false>(0, |col| &buffer[(col - jc) / NR * kc * NR..][..kc * NR]);
                    }
                    // A packed operand comes from memory: the first row block asks for the
                    // next panel's block (as a frozen model's products do, `packed_f32::columns`).
                    Right::Packed(p) => block
                        .pass::<STREAM_AHEAD>(k * NR * std::mem::size_of::<f32>(), |col| p.panel_block(col, i0, kc)),
                }
            }
        }
    });
}

/// One block of the inner dimension (`i0..i0 + kc`) over one block of columns (`jc..jc1`) in
/// Goto's loops, for every group of rows.
struct InnerBlock<'a> {
    out: &'a SharedRows,
    ap: &'a [f32],
    rows: usize,
    k: usize,
    i0: usize,
    kc: usize,
    jc: usize,
    jc1: usize,
}

impl InnerBlock<'_> {
    /// Passes every group of [`MC`] rows over the panels `ws_at(col)` (each `kc × NR`); with
    /// `AHEAD`, the first row block asks for the weight `ahead` bytes past its reads.
    #[inline(always)]
    fn pass<'w, const AHEAD: bool>(&self, ahead: usize, ws_at: impl Fn(usize) -> &'w [f32]) {
        let Self { out, ap, rows, k, i0, kc, jc, jc1 } = *self;
        let blocks = rows.div_ceil(MR);
        for group in (0..blocks).step_by(MC / MR) {
            for col in (jc..jc1).step_by(NR) {
                let ws = ws_at(col);
                for block in group..(group + MC / MR).min(blocks) {
                    let xs = &ap[(block * k + i0) * MR..][..kc * MR];
                    let (r0, height, width) = (block * MR, MR.min(rows - block * MR), NR.min(jc1 - col));
                    prefetch_output(out, r0, height, col, width);
                    // SAFETY: this task alone writes columns `jc..jc1`; the block at (`r0`,
                    // `col`) lies inside the checked `dst` view.
                    unsafe {
                        if AHEAD && block == 0 {
                            row_block_product::<_, true>(xs, ws, out, r0, height, col, width, ahead)
                        } else {
                            row_block_product::<_, false>(xs, ws, out, r0, height, col, width, 0)
                        }
                    }
                }
            }
        }
    }
}

/// A right operand that several products take (the LM head's weight, once per chunk of rows):
/// packed once, whole, where those products would come to this module's kernel (the build's
/// kernel [`OUTRUNS_GEMM`], f32 products), saving [`matmul`] a copy of it per product; read
/// where it lies otherwise. The packed copy takes the operand's memory again.
pub enum ReusedRight<'a> {
    /// Packed for [`matmul_prepacked`].
    Packed(PackedF32),
    /// Read in place by [`matmul_parallel`].
    InPlace(MatRef<'a>),
}

impl<'a> ReusedRight<'a> {
    /// `b` (`k × cols`, one unit stride), packed if its products come here.
    pub fn new(b: MatRef<'a>) -> Self {
        let f32_products = super::matmul_precision::current() == super::matmul_precision::MatmulPrecision::F32;
        if OUTRUNS_GEMM && f32_products && (b.strides.0 == 1 || b.strides.1 == 1) {
            Self::Packed(PackedF32::new(&b))
        } else {
            Self::InPlace(b)
        }
    }

    /// `dst ← (accumulate ? dst : 0) + a·b` for `dst` a row-major `a.rows × b.cols` matrix.
    pub fn matmul(&self, dst: &mut [f32], a: MatRef, accumulate: bool) {
        match self {
            Self::Packed(b) => matmul_prepacked(dst, 0, b.shape().1, a, b, accumulate),
            Self::InPlace(b) => matmul_parallel(dst, a, *b, accumulate),
        }
    }
}

/// Packs rows `i0..i0 + kc` of `b`'s columns `c0..c1` into `panels` as the kernel reads them:
/// panel `p` (columns `c0 + p·NR..`) holds, for each of the `kc` inner indices, its [`NR`]
/// columns' entries side by side. Entries past `c1` in the last panel keep whatever the
/// buffer held: the kernel's sums for those columns are never written out.
fn pack_block(b: &MatRef, i0: usize, kc: usize, c0: usize, c1: usize, panels: &mut [f32]) {
    let (rs, cs) = b.strides;
    for (p, col) in (c0..c1).step_by(NR).enumerate() {
        let width = NR.min(c1 - col);
        let panel = &mut panels[p * kc * NR..][..kc * NR];
        if cs == 1 {
            for (i, out) in panel.chunks_exact_mut(NR).enumerate() {
                out[..width].copy_from_slice(&b.data[b.offset + (i0 + i) * rs + col..][..width]);
            }
        } else {
            for c in 0..width {
                let column = &b.data[b.offset + i0 + (col + c) * cs..][..kc];
                for (i, &v) in column.iter().enumerate() {
                    panel[i * NR + c] = v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm_bf16::tests::values;
    use super::*;

    /// The product equals its definition up to the f32 sums' rounding, written over or added
    /// to what `dst` held, into a block of a larger `dst`: rows not a multiple of [`MR`] and
    /// more than a group ([`MC`]), inner dimensions deeper than [`DEPTH`] and not a multiple of
    /// it, columns not a multiple of [`NR`] and wider than [`NC`], every combination of the
    /// operands' layouts (row-major, or transposed views as the backward passes take them);
    /// with `b` packed ahead ([`matmul_prepacked`], to the bit) and as a [`ReusedRight`].
    #[test]
    fn equals_the_definition() {
        for (rows, k, cols) in
            [(1, 1, 1), (7, 5, 3), (53, 2 * DEPTH + 9, 70), (13, DEPTH + 44, NC + NR + 5), (100, 64, 33)]
        {
            for (a_t, b_t, accumulate) in (0..8).map(|i| (i & 1 != 0, i & 2 != 0, i & 4 != 0)) {
                let a_data = values(rows * k + 2, rows as u64);
                let b_data = values(k * cols + 1, k as u64);
                let (a_strides, b_strides) =
                    (if a_t { (1, rows) } else { (k, 1) }, if b_t { (1, k) } else { (cols, 1) });
                let a = MatRef { data: &a_data, offset: 2, shape: (rows, k), strides: a_strides };
                let b = MatRef { data: &b_data, offset: 1, shape: (k, cols), strides: b_strides };
                let at = |r: usize, i: usize| a_data[2 + r * a_strides.0 + i * a_strides.1] as f64;
                let bt = |i: usize, c: usize| b_data[1 + i * b_strides.0 + c * b_strides.1] as f64;
                // `dst` is a `rows × cols` block at offset 3 with row stride `cols + 4`.
                let (offset, stride) = (3, cols + 4);
                let mut dst = values(offset + rows * stride, 9);
                let before = dst.clone();
                matmul(&mut dst, offset, stride, a, b, accumulate);
                let case = format!("{rows} × {k} × {cols}, a_t {a_t}, b_t {b_t}, accumulate {accumulate}");
                // `b` packed ahead gives the same output to the bit.
                let mut prepacked = before.clone();
                matmul_prepacked(&mut prepacked, offset, stride, a, &PackedF32::new(&b), accumulate);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&prepacked), bits(&dst), "{case}: b packed ahead");
                // So does a reused operand (packed or not, as the build routes it) into a
                // contiguous output, up to the rounding of the route it takes.
                let mut reused = values(rows * cols, 10);
                let reused_before = reused.clone();
                ReusedRight::new(b).matmul(&mut reused, a, accumulate);
                for r in 0..rows {
                    for c in 0..cols {
                        let at_dst = offset + r * stride + c;
                        let start = if accumulate { before[at_dst] as f64 } else { 0.0 };
                        let terms = (0..k).map(|i| at(r, i) * bt(i, c));
                        let want = start + terms.clone().sum::<f64>();
                        let size = start.abs() + terms.map(f64::abs).sum::<f64>();
                        let bound = (k + 1) as f64 * size * f32::EPSILON as f64;
                        let got = dst[at_dst] as f64;
                        assert!((got - want).abs() <= bound, "{case}: ({r}, {c}) {got} against {want}");
                        let start = if accumulate { reused_before[r * cols + c] as f64 } else { 0.0 };
                        let want = want - if accumulate { before[at_dst] as f64 } else { 0.0 } + start;
                        let bound = bound + (k + 1) as f64 * start.abs() * f32::EPSILON as f64;
                        let got = reused[r * cols + c] as f64;
                        assert!((got - want).abs() <= bound, "{case}: reused ({r}, {c}) {got} against {want}");
                    }
                    // The row's entries outside the block are untouched.
                    let row = offset + r * stride;
                    assert_eq!(
                        dst[row + cols..row + stride.min(dst.len() - row)],
                        before[row + cols..row + stride.min(dst.len() - row)],
                        "{case}: row {r}'s padding"
                    );
                }
                assert_eq!(dst[..offset], before[..offset], "{case}: before the block");
            }
        }
    }
}
