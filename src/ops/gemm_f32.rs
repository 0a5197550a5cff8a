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

use super::gemm::{product_output, MatRef};
use super::packed_f32::{for_panel_ranges, pack_rows, prefetch_output, row_block_product, MC, MR, NC, NR};
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
    let ((rows, k), cols) = (a.shape, b.shape.1);
    let Some(dst) = product_output(dst, dst_offset, dst_rs, &a, &b, accumulate, "gemm-f32") else { return };
    let ap = pack_rows(&a);
    let blocks = rows.div_ceil(MR);
    let depth = k.div_ceil(k.div_ceil(DEPTH));
    let out = SharedRows::new(dst, dst_rs);
    for_panel_ranges(cols, |c0, c1| {
        let mut panels = vec![0f32; depth * NC];
        for jc in (c0..c1).step_by(NC) {
            let jc1 = (jc + NC).min(c1);
            for i0 in (0..k).step_by(depth) {
                let kc = depth.min(k - i0);
                pack_block(&b, i0, kc, jc, jc1, &mut panels);
                for group in (0..blocks).step_by(MC / MR) {
                    for col in (jc..jc1).step_by(NR) {
                        let ws = &panels[(col - jc) / NR * kc * NR..][..kc * NR];
                        for block in group..(group + MC / MR).min(blocks) {
                            let xs = &ap[(block * k + i0) * MR..][..kc * MR];
                            let (height, width) = (MR.min(rows - block * MR), NR.min(jc1 - col));
                            prefetch_output(&out, block * MR, height, col, width);
                            // SAFETY: this task alone writes columns `c0..c1`; the block at
                            // (`block·MR`, `col`) lies inside the checked `dst` view.
                            unsafe { row_block_product::<_, false>(xs, ws, &out, block * MR, height, col, width, 0) }
                        }
                    }
                }
            }
        }
    });
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
    /// operands' layouts (row-major, or transposed views as the backward passes take them).
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
