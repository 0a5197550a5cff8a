//! `dst += x·W` for a weight packed once, at load, into the register-blocked kernel's
//! panels: the products of a frozen model (a teacher, `eval`'s decoding, a student's decoding
//! snapshot) at every row count. The panels hold f32, or bf16 / f16 entries widened exactly to
//! f32 in registers as they are read ([`PanelEntry`]): 16-bit weights take half the memory
//! and half of decoding's weight traffic, with the f32 kernel's arithmetic, on any CPU with
//! AVX2 (a CPU with AVX512-BF16 multiplies bf16 weights by its dot products instead,
//! [`super::gemm_bf16`]).
//!
//! [`super::gemm_bf16`]'s layout with f32 entries: the weight `k × cols` is stored as panels
//! of [`NR`] columns ([`NV`] vector registers), each holding for every inner index the panel's
//! [`NR`] entries side by side; `x` is copied per call into blocks of [`MR`] rows, each holding
//! for every inner index the block's entries side by side. The kernel keeps an `MR × NR`
//! block of sums in registers and, for each inner index, broadcasts one entry of each row
//! against the panel's registers. What this replaces at decoding's few rows is
//! [`super::skinny`], which reads the weight where it lies and so needs horizontal sums (for
//! `[out, in]` weights) or a band copy (for `[in, out]`): on GPT-2's products at 16–64 rows
//! it reached about half of the multiply-add peak (BENCHMARKS.md); the general `gemm` repacks
//! the weight on every call, which at few rows costs more than the product.
//!
//! The arithmetic is plain f32 multiply-adds: each output is the same sum of the same products
//! as the unpacked product, added in the inner dimension's order within each block of
//! [`KC`] entries.

use rayon::prelude::*;

use super::gemm::{matmul_parallel_at, MatRef};
use super::simd::{F32x, LANES};
use super::skinny::{SharedRows, WeightEntry};

/// Vector registers per row of a kernel block: a 6 × 64 block with AVX-512 (24 registers of
/// sums, four of the panel, one broadcast, of 32), 6 × 16 with AVX2 (12 + 2 + 1 of 16).
const NV: usize = if LANES == 16 { 4 } else { 2 };
/// Output columns per kernel block.
pub const NR: usize = NV * LANES;
/// Rows per kernel block.
pub const MR: usize = 6;
/// Most inner entries per block of the product: a panel's block (`KC × NR` f32, 32 KiB with
/// AVX-512) stays in L1 while every row block passes over it. On the AVX-512 Xeon, 16-, 64-
/// and 1,024-row products of GPT-2's shapes ran 10–20% faster with 128 than with 64, 192,
/// 256 or 384.
pub const KC: usize = 128;
/// Columns per block of the weight that every group of rows passes over.
pub const NC: usize = 512;
/// Most rows the kernel multiplies; more go to `gemm` ([`unpacked_product`]). On an AVX-512
/// Xeon (two FMA units) `gemm` reached ~275 GFLOP/s from 128 rows on, the kernel ~220 at
/// every row count, and `gemm` at 96 rows and fewer ~95 (it packs the weight on each call).
/// Where the kernel outruns `gemm` ([`super::gemm_f32::OUTRUNS_GEMM`]: AVX2) it takes every
/// row count instead.
pub const KERNEL_ROWS: usize = 96;
/// How far ahead of its reads, in bytes of the panel, the first row block over a panel block
/// asks for the weight in [`columns`]' whole-panel order (few rows: decoding). There each
/// task reads its share of the weight as one stream from memory, and the first row block
/// waits on every line of it: the hardware prefetchers do not run far enough ahead to hide
/// memory's latency behind ~6 cycles of multiply-adds per line. 4 KiB ahead (64 lines) cut
/// GPT-2 124M's decoding products, weights from memory, by 13–18% at 8 rows, 9–13% at 16,
/// 4–7% at 32 and 2–6% at 48 on the AVX2 EPYC (one process alternating the two, medians of
/// seven rounds; 1, 2 and 8 KiB ahead did about as well).
const STREAM_AHEAD_BYTES: usize = 4096;
/// Whether the first row block over each panel block that comes from memory asks for the
/// weight ahead of its reads: in the whole-panel order [`STREAM_AHEAD_BYTES`] ahead, in
/// Goto's loops (first group of rows only) one panel ahead, the block the next columns take
/// (64-row products −7%, 256 rows −2%, the same harness). Measured only with AVX2 (no AVX-512
/// host was at hand then), so left off where AVX-512 builds run their own 6 × 64 kernel,
/// whose decoding already met its targets.
pub(super) const STREAM_AHEAD: bool = LANES == 8;
/// Weight entries per group of panels unpacked for `gemm` (4 MiB of f32).
const GROUP_ENTRIES: usize = 1 << 20;
/// Most rows per pass of the panels: their packed rows (`MC × KC` f32) stay in L2.
pub const MC: usize = 8 * MR;

/// A weight entry the kernel reads: f32 as it is, bf16 or f16 widened exactly to f32
/// ([`WeightEntry`], as the decoding kernel reads them), zero past a panel's last column.
pub trait PanelEntry: WeightEntry + Default {}

impl<T: WeightEntry + Default> PanelEntry for T {}

/// A `k × cols` weight packed once, whole: panel `j` (columns `j·NR..`) holds, for each
/// inner index `i`, the [`NR`] columns' entries at `(j·k + i)·NR + c` (zero past the last
/// column). It takes the bytes the weight takes, plus the padding of the last panel.
#[derive(Clone)]
pub struct PackedPanels<E> {
    values: Vec<E>,
    k: usize,
    cols: usize,
}

/// A weight packed in f32.
pub type PackedF32 = PackedPanels<f32>;

impl<E: PanelEntry> PackedPanels<E> {
    /// Packs `w` (`k × cols`, either unit stride), panels in parallel.
    pub fn new(w: &MatRef<E>) -> Self {
        let (k, cols) = w.shape;
        assert!(w.strides.0 == 1 || w.strides.1 == 1, "packed-f32: w needs one unit stride");
        w.check(w.data.len());
        let mut values = vec![E::default(); cols.div_ceil(NR) * k * NR];
        values.par_chunks_mut((k * NR).max(1)).enumerate().for_each(|(j, panel)| {
            let c0 = j * NR;
            let width = NR.min(cols - c0);
            if w.strides.1 == 1 {
                for (i, out) in panel.chunks_exact_mut(NR).enumerate() {
                    out[..width].copy_from_slice(&w.data[w.offset + i * w.strides.0 + c0..][..width]);
                }
            } else {
                for c in 0..width {
                    let column = &w.data[w.offset + (c0 + c) * w.strides.1..][..k];
                    for (i, &v) in column.iter().enumerate() {
                        panel[i * NR + c] = v;
                    }
                }
            }
        });
        Self { values, k, cols }
    }

    /// The inner dimension (`in`) and the columns (`out`).
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.cols)
    }

    /// The panel holding column `col` (a multiple of [`NR`]) over inner indices `i0..i0 + kc`,
    /// as the kernel reads it.
    pub(super) fn panel_block(&self, col: usize, i0: usize, kc: usize) -> &[E] {
        &self.values[((col / NR) * self.k + i0) * NR..][..kc * NR]
    }

    /// The weight back in its `[k, cols]` row-major layout.
    pub fn unpack(&self) -> Vec<E> {
        let mut out = vec![E::default(); self.k * self.cols];
        for (i, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate().take(self.k) {
            for (c, v) in row.iter_mut().enumerate() {
                *v = self.values[((c / NR) * self.k + i) * NR + c % NR];
            }
        }
        out
    }
}

/// `x` copied into blocks of [`MR`] rows: entry `(block·k + i)·MR + r` is row `block·MR + r`'s
/// entry `i` (zero past the last row). `x` has a unit stride along its rows or its columns
/// (a transposed view, as in a weight gradient's `xᵀ·g`).
pub(super) fn pack_rows(x: &MatRef) -> Vec<f32> {
    let (rows, k) = x.shape;
    let (rs, cs) = x.strides;
    assert!(cs == 1 || rs == 1, "packed-f32: x needs a unit stride");
    x.check(x.data.len());
    let mut packed = vec![0f32; rows.div_ceil(MR) * MR * k];
    packed.par_chunks_mut((MR * k).max(1)).enumerate().for_each(|(block, out)| {
        let height = MR.min(rows - block * MR);
        let first = x.offset + block * MR * rs;
        if cs == 1 {
            for r in 0..height {
                for (i, &v) in x.data[first + r * rs..][..k].iter().enumerate() {
                    out[i * MR + r] = v;
                }
            }
        } else {
            // The block's entries of each inner index are side by side in `x` too.
            for (i, out) in out.chunks_exact_mut(MR).enumerate() {
                out[..height].copy_from_slice(&x.data[first + i * cs..][..height]);
            }
        }
    });
    packed
}

/// `dst += x·w` for `dst` row-major `rows × cols` (`x` `rows × k` with unit column stride),
/// on all of rayon's threads: up to [`KERNEL_ROWS`] rows (every row count with AVX2) by the
/// register-blocked kernel, threads splitting the output columns; more by [`unpacked_product`].
pub fn matmul_packed<E: PanelEntry>(dst: &mut [f32], x: MatRef, w: &PackedPanels<E>) {
    let (rows, k) = x.shape;
    assert!(w.k == k && dst.len() >= rows * w.cols, "packed-f32: bad shapes");
    if rows == 0 || w.cols == 0 || k == 0 {
        return;
    }
    if rows > KERNEL_ROWS && !super::gemm_f32::OUTRUNS_GEMM {
        return unpacked_product(dst, x, w);
    }
    let xp = pack_rows(&x);
    let out = SharedRows::new(dst, w.cols);
    for_panel_ranges(w.cols, |c0, c1| columns(&out, &xp, rows, w, c0, c1));
}

/// Runs `task(c0, c1)` on rayon's threads over ranges of whole panels that cover columns
/// `0..cols`: a few ranges per thread, so that a thread slowed by the other work on the
/// machine does not hold the product up.
pub(super) fn for_panel_ranges(cols: usize, task: impl Fn(usize, usize) + Sync) {
    let per_task = cols.div_ceil(4 * rayon::current_num_threads()).next_multiple_of(NR);
    (0..cols.div_ceil(per_task)).into_par_iter().for_each(|t| task(t * per_task, ((t + 1) * per_task).min(cols)));
}

/// `dst += x·w` by the general product (`gemm`, which packs its operands its own way) on the
/// weight unpacked (and widened to f32) a group of panels at a time into one row-major buffer
/// of about [`GROUP_ENTRIES`]: at many rows `gemm` outruns the kernel (BENCHMARKS.md), and
/// unpacking costs a copy of the weight per product, where the product does `2·rows`
/// operations per entry.
fn unpacked_product<E: PanelEntry>(dst: &mut [f32], x: MatRef, w: &PackedPanels<E>) {
    let (k, cols) = (w.k, w.cols);
    let width = (GROUP_ENTRIES / k).next_multiple_of(NR).min(cols.next_multiple_of(NR));
    let mut buffer = vec![0f32; k * width];
    for c0 in (0..cols).step_by(width) {
        let n = width.min(cols - c0);
        let group = &mut buffer[..k * n];
        group.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for (j, run) in row.chunks_mut(NR).enumerate() {
                let panel = c0 / NR + j;
                E::widen(&w.values[(panel * k + i) * NR..][..run.len()], run);
            }
        });
        let group = MatRef { data: &buffer[..k * n], offset: 0, shape: (k, n), strides: (n, 1) };
        matmul_parallel_at(dst, c0, cols, x, group, true);
    }
}

/// Columns `c0..c1` (whole panels from `c0`) of the product.
///
/// Rows that fit one group of [`MC`] (decoding's batches) take each panel whole, in order,
/// its blocks of the inner dimension (of equal depth, no deeper than [`KC`]) one after the
/// other, every row block passing over a block while it is in L1: a task reads its share of
/// the weight as one sequential stream, which the hardware prefetchers follow. Taking the
/// panels a block of [`NC`] columns at a time instead (Goto's order, below) made them 32
/// interleaved streams, and GPT-2's layers (weights from memory, AVX2 EPYC, interleaved
/// runs) took 5–17% longer at 8, 16 and 48 rows (the same within the noise at 32);
/// prefetching the next block into L2 by hand was slower still.
///
/// More rows take Goto's loops: blocks of [`NC`] columns, then of the inner dimension, then
/// groups of [`MC`] rows. A group's packed rows stay in L2 while the block's panels pass over
/// them, and the block's panels stay in L2 or L3 while the groups pass, so the weight comes
/// from memory once per product however many rows there are.
fn columns<E: PanelEntry>(out: &SharedRows, xp: &[f32], rows: usize, w: &PackedPanels<E>, c0: usize, c1: usize) {
    let k = w.k;
    let depth = k.div_ceil(k.div_ceil(KC));
    let blocks = rows.div_ceil(MR);
    // The packed rows of row block `block` over the inner block from `i0`, `kc` deep, against
    // the panel block `ws` at output column `col`.
    // `ahead`: bytes past its reads at which the row block asks for the weight (0: none).
    let product = |block: usize, i0: usize, kc: usize, ws: &[E], col: usize, width: usize, ahead: usize| {
        let xs = &xp[(block * k + i0) * MR..][..kc * MR];
        let (r0, height) = (block * MR, MR.min(rows - block * MR));
        // SAFETY: this task alone writes columns `c0..c1`; the block at (`r0`, `col`) lies
        // inside `dst`.
        unsafe {
            if STREAM_AHEAD && ahead > 0 {
                row_block_product::<E, true>(xs, ws, out, r0, height, col, width, ahead)
            } else {
                row_block_product::<E, false>(xs, ws, out, r0, height, col, width, 0)
            }
        }
    };
    if blocks <= MC / MR {
        for col in (c0..c1).step_by(NR) {
            for i0 in (0..k).step_by(depth) {
                let kc = depth.min(k - i0);
                let ws = w.panel_block(col, i0, kc);
                for block in 0..blocks {
                    // The task's panels lie one after the other, so what lies ahead of this
                    // block is what the first row block reads next.
                    let ahead = if block == 0 { STREAM_AHEAD_BYTES } else { 0 };
                    product(block, i0, kc, ws, col, NR.min(c1 - col), ahead);
                }
            }
        }
        return;
    }
    for jc in (c0..c1).step_by(NC) {
        let jc1 = (jc + NC).min(c1);
        for i0 in (0..k).step_by(depth) {
            let kc = depth.min(k - i0);
            for group in (0..blocks).step_by(MC / MR) {
                for col in (jc..jc1).step_by(NR) {
                    let ws = w.panel_block(col, i0, kc);
                    for block in group..(group + MC / MR).min(blocks) {
                        let (height, width) = (MR.min(rows - block * MR), NR.min(jc1 - col));
                        prefetch_output(out, block * MR, height, col, width);
                        // The first group takes each panel block from memory; the next it
                        // takes is the next panel's at the same depth, one panel ahead.
                        let ahead = if block == 0 { k * NR * std::mem::size_of::<E>() } else { 0 };
                        product(block, i0, kc, ws, col, width, ahead);
                    }
                }
            }
        }
    }
}

/// Asks for the output block of `height` rows × `width` columns at (`r0`, `col`) ahead of
/// [`row_block_product`] on it. In Goto's loops an output block comes back once per block of
/// the inner dimension, after every other group of rows has passed over the same [`NC`]
/// columns (2.4 MB of outputs and 0.6 MB of packed rows at training's 1,192 rows), so it
/// is out of L1 and L2 by then, and the kernel's closing read of it stalled on those misses.
/// Prefetched as the block starts, it arrives while the block's multiply-adds run. AVX2
/// EPYC, GPT-2 124M's training products (1,192 rows; the LM head's chunks of 83; medians of
/// three interleaved rounds): +4 to +35%, the LM head's logits and weight gradient the most;
/// the head's input gradient (50,257 deep, its outputs stay in cache) unchanged. Few rows
/// ([`columns`]' whole-panel order) keep their outputs in L1 and take no prefetch.
#[inline(always)]
pub(super) fn prefetch_output(out: &SharedRows, r0: usize, height: usize, col: usize, width: usize) {
    const LINE: usize = super::skinny::LINE_BYTES / std::mem::size_of::<f32>();
    for r in r0..r0 + height {
        // Every line the row's `width` entries touch: one per `LINE` from the first, and the
        // last entry's (an unaligned run spans one line more).
        for c in (col..col + width).step_by(LINE) {
            super::simd::prefetch(out.address(r, c));
        }
        super::simd::prefetch(out.address(r, col + width - 1));
    }
}

/// [`block_product`] for a block of `height` rows (1 to [`MR`]); with `AHEAD`, asking for the
/// weight `ahead` bytes past each line of the panel it reads ([`STREAM_AHEAD`]).
///
/// # Safety
/// As for [`block_product`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn row_block_product<E: PanelEntry, const AHEAD: bool>(
    xs: &[f32],
    ws: &[E],
    out: &SharedRows,
    r0: usize,
    height: usize,
    col: usize,
    width: usize,
    ahead: usize,
) {
    match height {
        1 => block_product::<1, AHEAD, E>(xs, ws, out, r0, col, width, ahead),
        2 => block_product::<2, AHEAD, E>(xs, ws, out, r0, col, width, ahead),
        3 => block_product::<3, AHEAD, E>(xs, ws, out, r0, col, width, ahead),
        4 => block_product::<4, AHEAD, E>(xs, ws, out, r0, col, width, ahead),
        5 => block_product::<5, AHEAD, E>(xs, ws, out, r0, col, width, ahead),
        _ => block_product::<MR, AHEAD, E>(xs, ws, out, r0, col, width, ahead),
    }
}

/// Adds the `R × NR` block of sums of the first `R` rows of the packed rows `xs` times the
/// packed panel block `ws` (both over the same inner entries) to the `R × width` block of the
/// output at (`r0`, `col`). With `AHEAD`, each inner index also asks for the lines `ahead`
/// bytes past the panel's own.
///
/// # Safety
/// The output block is in bounds and no other thread touches it.
#[inline(always)]
unsafe fn block_product<const R: usize, const AHEAD: bool, E: PanelEntry>(
    xs: &[f32],
    ws: &[E],
    out: &SharedRows,
    r0: usize,
    col: usize,
    width: usize,
    ahead: usize,
) {
    assert!(R <= MR && xs.len() / MR == ws.len() / NR);
    let mut acc = [[F32x::zero(); NV]; R];
    for (x, w) in xs.chunks_exact(MR).zip(ws.chunks_exact(NR)) {
        if AHEAD {
            const LINE: usize = super::skinny::LINE_BYTES;
            let ahead = w.as_ptr().cast::<u8>().wrapping_add(ahead);
            for line in (0..NR * std::mem::size_of::<E>()).step_by(LINE) {
                // Past the weight's end this asks for nothing useful, and a prefetch never
                // faults.
                super::simd::prefetch(ahead.wrapping_add(line));
            }
        }
        let w: [F32x; NV] = std::array::from_fn(|v| E::load(&w[v * LANES..][..LANES]));
        for (acc, &x) in acc.iter_mut().zip(&x[..R]) {
            let x = F32x::splat(x);
            for (a, &w) in acc.iter_mut().zip(&w) {
                *a = a.mul_add(x, w);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let row = out.row_range(r0 + r, col, width);
        if width == NR {
            for (v, a) in acc.iter().enumerate() {
                a.add_to(&mut row[v * LANES..][..LANES]);
            }
        } else {
            let mut sums = [0f32; NR];
            for (v, a) in acc.iter().enumerate() {
                a.add_to(&mut sums[v * LANES..][..LANES]);
            }
            for (o, s) in row.iter_mut().zip(sums) {
                *o += s;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::gemm_bf16::tests::values;
    use super::*;
    use half::{bf16, f16};

    /// The product equals its definition up to the f32 sums' rounding, added to what `dst`
    /// held: rows not a multiple of [`MR`] (every block height), inner dimensions deeper than
    /// [`KC`] and not a multiple of it, columns not a multiple of [`NR`] or of a task's share,
    /// both weight layouts, `x` inside a larger buffer; weights in f32, bf16 and f16 (the
    /// definition on the 16-bit values); by the routing product and by `gemm` on the unpacked
    /// weight, whichever the CPU routes to.
    #[test]
    fn equals_the_definition() {
        equals_the_definition_in(|v| v);
        equals_the_definition_in(bf16::from_f32);
        equals_the_definition_in(f16::from_f32);
    }

    fn equals_the_definition_in<E: PanelEntry>(from_f32: fn(f32) -> E) {
        let name = std::any::type_name::<E>();
        let shapes = [
            (1, 1, 1),
            (13, 7, 45),
            (MR, 64, NR),
            (25, 301, 97),
            (64, 2 * KC + 53, 70),
            (16, 3 * KC, 4 * NR + 9),
            (97, 1025, 1100),
        ];
        // The last shape has more rows than a group ([`MC`]) and, by `gemm` (which takes more
        // than [`KERNEL_ROWS`] rows with AVX-512), two groups of unpacked panels.
        const { assert!(97 > MC && 1025 * 1100 > GROUP_ENTRIES) };
        type Product<E> = fn(&mut [f32], MatRef, &PackedPanels<E>);
        let routes: [(&str, Product<E>); 2] =
            [("matmul_packed", matmul_packed), ("unpacked_product", unpacked_product)];
        for ((rows, k, cols), (route, product)) in shapes.into_iter().flat_map(|s| routes.map(|r| (s, r))) {
            for in_out in [true, false] {
                let stride = k + 5;
                let xs = values(rows * stride + 3, rows as u64);
                let x = MatRef { data: &xs, offset: 3, shape: (rows, k), strides: (stride, 1) };
                let ws: Vec<E> = values(k * cols, k as u64).into_iter().map(from_f32).collect();
                let (data, strides) = if in_out {
                    (ws.clone(), (cols, 1))
                } else {
                    ((0..cols * k).map(|i| ws[(i % k) * cols + i / k]).collect(), (1, k))
                };
                let w = MatRef { data: &data, offset: 0, shape: (k, cols), strides };
                let mut dst = values(rows * cols, 7);
                let before = dst.clone();
                product(&mut dst, x, &PackedPanels::new(&w));
                for r in 0..rows {
                    for c in 0..cols {
                        let terms = (0..k).map(|i| xs[3 + r * stride + i] as f64 * ws[i * cols + c].to_f32() as f64);
                        let want = before[r * cols + c] as f64 + terms.clone().sum::<f64>();
                        let size = before[r * cols + c].abs() as f64 + terms.map(f64::abs).sum::<f64>();
                        let got = dst[r * cols + c] as f64;
                        // f32 sums of k + 1 terms: each addition rounds by at most 2^-24 of the
                        // running magnitude.
                        let bound = (k + 1) as f64 * size * f32::EPSILON as f64;
                        assert!(
                            (got - want).abs() <= bound,
                            "{name} by {route}: {rows} × {k} × {cols}, in_out {in_out}, ({r}, {c}): {got} against {want}"
                        );
                    }
                }
            }
        }
    }

    /// A packed weight unpacks to the values it was packed from, from either layout.
    #[test]
    fn a_packed_weight_unpacks_to_its_values() {
        for (k, cols) in [(1, 1), (3, 2), (7, 45), (33, 2 * NR + 1)] {
            let ws = values(k * cols, 5);
            let in_out = MatRef { data: &ws, offset: 0, shape: (k, cols), strides: (cols, 1) };
            assert_eq!(PackedF32::new(&in_out).unpack(), ws, "{k} × {cols} [in, out]");
            let transposed: Vec<f32> = (0..cols * k).map(|i| ws[(i % k) * cols + i / k]).collect();
            let out_in = MatRef { data: &transposed, offset: 0, shape: (k, cols), strides: (1, k) };
            assert_eq!(PackedF32::new(&out_in).unpack(), ws, "{k} × {cols} [out, in]");
            let halves: Vec<bf16> = ws.iter().map(|&v| bf16::from_f32(v)).collect();
            let in_out = MatRef { data: &halves, offset: 0, shape: (k, cols), strides: (cols, 1) };
            assert_eq!(PackedPanels::new(&in_out).unpack(), halves, "{k} × {cols} bf16");
        }
    }
}
