//! `dst = x·W` for a few rows of `x` (decoding: one new token per sequence), reading each
//! weight once, where it lies.
//!
//! A general matrix product repacks the weight into panels before multiplying; at a few rows
//! that packing costs more than the product: GPT-2's 50,257 × 768 LM head took 24 ms per
//! decoding step of 16 rows through `gemm` (11 ms here). Each block of the weight is brought
//! in once and used for every row while it is in registers or cache. Two kernels, one per
//! weight layout:
//! - columns of `W` contiguous (`nn.Linear`'s `[out, in]`, LM heads): blocks of dot products,
//!   several rows × several columns at once, lane-parallel over the inner dimension, reading
//!   the weight sequentially where it lies;
//! - rows of `W` contiguous (GPT-2's `Conv1D` `[in, out]`): bands of weight rows copied out
//!   contiguously (the next one prefetched meanwhile), then strips of output columns, each
//!   row of `x` broadcast into a multiply-add with one row of the strip.
//!
//! The accumulators are arrays of [`F32x`] registers (16 lanes with AVX-512, 8 with AVX2);
//! block sizes are chosen so they fit the register file of each (32 or 16 registers).
//!
//! The weight may be stored in f16, or in bf16 ([`super::skinny_bf16`] on CPUs without bf16
//! dot products): it is widened to f32 as it is loaded (exact), so the arithmetic is f32 and
//! only half the bytes come from memory.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::MatRef;
use super::simd::{bf16_to_f32, block_sums, prefetch, F32x, LANES};

/// A weight entry the kernels read: f32, or bf16 or f16 widened to f32 as it is loaded.
pub trait WeightEntry: Copy + Send + Sync + 'static {
    /// The first [`LANES`] entries of `s` as f32.
    fn load(s: &[Self]) -> F32x;
    /// One entry as f32.
    fn to_f32(self) -> f32;
    /// `dst[i] = src[i]` as f32, for equal lengths.
    fn widen(src: &[Self], dst: &mut [f32]);
}

impl WeightEntry for f32 {
    #[inline(always)]
    fn load(s: &[Self]) -> F32x {
        F32x::load(s)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl WeightEntry for half::bf16 {
    #[inline(always)]
    fn load(s: &[Self]) -> F32x {
        F32x::load_bf16(s)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16_to_f32(self)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        // A shift per entry: the compiler vectorises this loop.
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = bf16_to_f32(v);
        }
    }
}

impl WeightEntry for half::f16 {
    #[inline(always)]
    fn load(s: &[Self]) -> F32x {
        F32x::load_f16(s)
    }

    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[inline(always)]
    fn widen(src: &[Self], dst: &mut [f32]) {
        // `half`'s slice conversion (F16C where the CPU has it; it checks the lengths).
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
}

/// Rows of `x` per dot-product block (`DOT_ROWS × DOT_COLS` accumulator registers).
pub(super) const DOT_ROWS: usize = if cfg!(target_feature = "avx512f") { 4 } else { 2 };
/// Weight columns per dot-product block.
pub(super) const DOT_COLS: usize = 4;

/// Rows of `x` per strip block (`AXPY_ROWS × 2` accumulator registers).
pub(super) const AXPY_ROWS: usize = if cfg!(target_feature = "avx512f") { 8 } else { 4 };
/// Output columns per strip: two registers.
pub(super) const STRIP: usize = 2 * LANES;
/// Weight rows per band of the strip kernel.
pub(super) const AXPY_DEPTH: usize = 32;
/// Bytes per cache line (the prefetch granularity).
pub(super) const LINE_BYTES: usize = 64;
/// Most columns of one strip-kernel task (its band: 256 KiB).
const MAX_BAND_COLUMNS: usize = 2048;

/// The most rows of `x` for which [`matmul`] is faster than the packing product (GPT-2 124M
/// shapes, BENCHMARKS.md); [`super::gemm::matmul_parallel`] dispatches here up to it.
pub const MAX_ROWS: usize = 64;

/// The fewest weight entries for which [`matmul`] is used: smaller weights stay in cache,
/// where packing them costs little (1 MiB of f32; GPT-2 124M's smallest is 768 × 768).
pub const MIN_WEIGHT: usize = 1 << 18;

/// Whether [`super::gemm::matmul_parallel`] hands this product to [`matmul`]: few rows, a
/// large weight, and layouts [`matmul`] reads.
pub fn applies<T>(x: &MatRef, w: &MatRef<T>) -> bool {
    x.shape.0 <= MAX_ROWS && w.shape.0 * w.shape.1 >= MIN_WEIGHT && readable(x, w)
}

/// Layouts [`matmul`] reads: a row-major `x` and a weight with one unit stride.
fn readable<T>(x: &MatRef, w: &MatRef<T>) -> bool {
    x.strides.1 == 1 && (w.strides.0 == 1 || w.strides.1 == 1)
}

/// `dst ← (accumulate ? dst : 0) + x·w`, `dst` row-major `rows × cols` (row stride `cols`),
/// on all of rayon's threads (split over output columns). `x` must have unit column stride and
/// `w` one unit stride; any number of rows works (fastest up to [`MAX_ROWS`]).
pub fn matmul<T: WeightEntry>(dst: &mut [f32], x: MatRef, w: MatRef<T>, accumulate: bool) {
    let Some(columns_contiguous) = prepare(dst, &x, &w, accumulate) else { return };
    let ((rows, k), cols) = (x.shape, w.shape.1);
    let xs: Vec<&[f32]> = (0..rows).map(|r| &x.data[x.offset + r * x.strides.0..][..k]).collect();
    for_column_tasks(dst, cols, columns_contiguous, |c0, c1, out| {
        if columns_contiguous {
            dot_columns(&xs, &w, c0, c1, out);
        } else {
            axpy_strips(&xs, &w, c0, c1, out);
        }
    });
}

/// Checks a product's operands (a row-major `x`, a weight with one unit stride, matching
/// shapes, views inside their buffers) and zeroes `dst` unless accumulating. `None` when the
/// product is empty, else whether the weight's columns are contiguous (`[out, in]` storage).
pub(super) fn prepare<T>(dst: &mut [f32], x: &MatRef, w: &MatRef<T>, accumulate: bool) -> Option<bool> {
    let (rows, k) = x.shape;
    let cols = w.shape.1;
    assert!(readable(x, w), "skinny matmul: x needs unit column stride, w one unit stride");
    assert!(w.shape.0 == k && dst.len() >= rows * cols, "skinny matmul: bad shapes");
    x.check(x.data.len());
    w.check(w.data.len());
    if rows == 0 || cols == 0 {
        return None;
    }
    if !accumulate {
        dst[..rows * cols].fill(0.0);
    }
    Some(w.strides.0 == 1 && w.strides.1 != 1)
}

/// Runs `kernel(c0, c1, out)` for ranges of the `cols` output columns of `dst` on all of
/// rayon's threads: enough ranges to balance the threads, each wide enough to amortise a task
/// (and, for weights with contiguous rows, narrow enough that a band of [`AXPY_DEPTH`] of its
/// rows stays in L2).
pub(super) fn for_column_tasks(
    dst: &mut [f32],
    cols: usize,
    columns_contiguous: bool,
    kernel: impl Fn(usize, usize, &SharedRows) + Sync,
) {
    let threads = rayon::current_num_threads();
    let per_task = if columns_contiguous {
        (cols.div_ceil(4 * threads)).next_multiple_of(STRIP).max(STRIP * 4)
    } else {
        cols.div_ceil(threads).next_multiple_of(STRIP).clamp(STRIP, MAX_BAND_COLUMNS)
    };
    let out = SharedRows::new(dst, cols);
    (0..cols.div_ceil(per_task)).into_par_iter().for_each(|task| {
        kernel(task * per_task, ((task + 1) * per_task).min(cols), &out);
    });
}

/// Evaluates `$body` with `$xs` bound to the slices `$rows` (at most 8) as an array of their
/// exact count, so that the kernel's row count is a constant (its accumulators registers).
macro_rules! with_rows {
    ($rows:expr, |$xs:ident| $body:expr) => {{
        let rows = &$rows[..];
        match rows.len() {
            1 => with_rows!(@ rows, $xs, $body, 1),
            2 => with_rows!(@ rows, $xs, $body, 2),
            3 => with_rows!(@ rows, $xs, $body, 3),
            4 => with_rows!(@ rows, $xs, $body, 4),
            5 => with_rows!(@ rows, $xs, $body, 5),
            6 => with_rows!(@ rows, $xs, $body, 6),
            7 => with_rows!(@ rows, $xs, $body, 7),
            8 => with_rows!(@ rows, $xs, $body, 8),
            n => unreachable!("a block of {n} rows"),
        }
    }};
    (@ $rows:ident, $xs:ident, $body:expr, $n:literal) => {{
        let $xs: [_; $n] = std::array::from_fn(|i| $rows[i]);
        $body
    }};
}
// Used only by skinny_bf16's dot-product kernels, which exist in AVX512-BF16 builds.
#[cfg_attr(
    not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")),
    allow(unused_imports)
)]
pub(super) use with_rows;

/// The destination shared by the column tasks, each writing only its own columns.
pub(super) struct SharedRows {
    ptr: *mut f32,
    stride: usize,
}

// SAFETY: tasks write disjoint column ranges of rows that `matmul` borrowed mutably.
unsafe impl Sync for SharedRows {}

impl SharedRows {
    /// `dst` as rows of `stride` entries, for tasks that each write their own columns.
    pub(super) fn new(dst: &mut [f32], stride: usize) -> Self {
        Self { ptr: dst.as_mut_ptr(), stride }
    }

    /// Adds `v` to element (`row`, `col`).
    ///
    /// # Safety
    /// In bounds, and no other task touches column `col`.
    #[inline(always)]
    pub(super) unsafe fn add(&self, row: usize, col: usize, v: f32) {
        *self.ptr.add(row * self.stride + col) += v;
    }

    /// Where element (`row`, `col`) lies, for a prefetch (computed, never read here).
    #[inline(always)]
    pub(super) fn address(&self, row: usize, col: usize) -> *const f32 {
        self.ptr.wrapping_add(row * self.stride + col)
    }

    /// Columns `col..col + len` of row `row`.
    ///
    /// # Safety
    /// In bounds, and no other task touches these columns while the slice lives.
    #[inline(always)]
    #[allow(clippy::mut_from_ref)]
    pub(super) unsafe fn row_range(&self, row: usize, col: usize, len: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.ptr.add(row * self.stride + col), len)
    }
}

/// Columns `c0..c1` of `x·w` for `w` with contiguous columns, [`DOT_COLS`] at a time. While
/// one block of columns is multiplied, the next block's are prefetched: left to the hardware,
/// a block's columns arrived only once the block asked for them, so that reading and
/// computing took turns (16-row products of GPT-2 124M's weights alone: 11 GB/s; 15 with it).
fn dot_columns<T: WeightEntry>(xs: &[&[f32]], w: &MatRef<T>, c0: usize, c1: usize, out: &SharedRows) {
    let k = xs[0].len();
    let col = |c: usize| &w.data[w.offset + c * w.strides.1..][..k];
    let mut c = c0;
    while c + DOT_COLS <= c1 {
        let ws: [&[T]; DOT_COLS] = std::array::from_fn(|j| col(c + j));
        let (next, ahead) = block_after(col, c, c1);
        dot_block_rows(xs, ws, &next[..ahead], c, out);
        c += DOT_COLS;
    }
    while c < c1 {
        dot_block_rows(xs, [col(c)], &[], c, out);
        c += 1;
    }
}

/// The columns of the dot-product block after the one at column `c` (up to [`DOT_COLS`] of
/// them before `c1`, for prefetching), and how many there are.
pub(super) fn block_after<'a, T>(col: impl Fn(usize) -> &'a [T], c: usize, c1: usize) -> ([&'a [T]; DOT_COLS], usize) {
    let ahead = (c1 - c - DOT_COLS).min(DOT_COLS);
    (std::array::from_fn(|j| if j < ahead { col(c + DOT_COLS + j) } else { &[] }), ahead)
}

/// Every row of `x` against the `C` weight columns `ws` (starting at column `c`), prefetching
/// the columns `next` during the first block of rows.
#[inline(always)]
fn dot_block_rows<T: WeightEntry, const C: usize>(
    xs: &[&[f32]],
    ws: [&[T]; C],
    next: &[&[T]],
    c: usize,
    out: &SharedRows,
) {
    for (r, rows) in xs.chunks(DOT_ROWS).enumerate() {
        let next = if r == 0 { next } else { &[] };
        with_rows!(rows, |block| dot_block(block, ws, next, r * DOT_ROWS, c, out));
    }
}

/// `R × C` dot products over the inner dimension, `LANES` partial sums each; prefetches the
/// columns `next` (as long as the block's) into L2 alongside.
#[inline(always)]
fn dot_block<T: WeightEntry, const R: usize, const C: usize>(
    xs: [&[f32]; R],
    ws: [&[T]; C],
    next: &[&[T]],
    r0: usize,
    c0: usize,
    out: &SharedRows,
) {
    let k = xs[0].len();
    let body = k / LANES * LANES;
    let mut acc = [[F32x::zero(); C]; R];
    // One prefetch per cache line: every step for f32 weights, every other for 16-bit ones.
    let line_len = LINE_BYTES / std::mem::size_of::<T>();
    for i in (0..body).step_by(LANES) {
        if i % line_len < LANES {
            for n in next {
                prefetch(n.as_ptr().wrapping_add(i));
            }
        }
        let wv: [F32x; C] = std::array::from_fn(|j| T::load(&ws[j][i..]));
        for r in 0..R {
            let xv = F32x::load(&xs[r][i..]);
            for j in 0..C {
                acc[r][j] = acc[r][j].mul_add(xv, wv[j]);
            }
        }
    }
    let sums = block_sums(acc);
    for r in 0..R {
        for j in 0..C {
            let tail: f32 = (body..k).map(|t| xs[r][t] * ws[j][t].to_f32()).sum();
            // SAFETY: row r0 + r < rows and column c0 + j is inside this task's range.
            unsafe { out.add(r0 + r, c0 + j, sums[r][j] + tail) };
        }
    }
}

/// Columns `c0..c1` of `x·w` for `w` with contiguous rows, in bands of [`AXPY_DEPTH`] weight
/// rows: each band's columns are first copied out contiguously (long sequential reads are
/// what streams a weight from memory at full speed; reading the strips where they lie, one
/// 128-byte piece per weight row, reached a third of it), then multiplied strip by strip.
/// A bf16 band is widened to f32 as it is copied.
fn axpy_strips<T: WeightEntry>(xs: &[&[f32]], w: &MatRef<T>, c0: usize, c1: usize, out: &SharedRows) {
    let k = xs[0].len();
    let width = c1 - c0;
    let mut band = vec![0f32; AXPY_DEPTH * width];
    let strips = width.div_ceil(STRIP);
    for d0 in (0..k).step_by(AXPY_DEPTH) {
        let depth = d0..(d0 + AXPY_DEPTH).min(k);
        for (i, dst) in band.chunks_exact_mut(width).take(depth.len()).enumerate() {
            T::widen(&w.data[w.offset + (d0 + i) * w.strides.0 + c0..][..width], dst);
        }
        let band_rows: Vec<&[f32]> = xs.iter().map(|x| &x[depth.clone()]).collect();
        // The next band streams into L2 while this one is multiplied, a share per strip, so
        // that its copy above finds it there.
        let next = (d0 + AXPY_DEPTH)..(d0 + 2 * AXPY_DEPTH).min(k);
        for (s, s0) in (0..width).step_by(STRIP).enumerate() {
            prefetch_share(w, next.clone(), c0..c1, s, strips);
            let place_width = STRIP.min(width - s0);
            for (r, rows) in band_rows.chunks(AXPY_ROWS).enumerate() {
                let place = Place { r0: r * AXPY_ROWS, c0: c0 + s0, width: place_width };
                with_rows!(rows, |xs| axpy_block(xs, &band[s0..], width, place, out));
            }
        }
    }
}

/// Asks for share `s` of `shares` of the cache lines holding rows `rows`, columns `cols`, of
/// `w` (contiguous rows) to be brought into L2.
pub(super) fn prefetch_share<T>(w: &MatRef<T>, rows: Range<usize>, cols: Range<usize>, s: usize, shares: usize) {
    let line_len = LINE_BYTES / std::mem::size_of::<T>();
    let lines_per_row = cols.len().div_ceil(line_len);
    let lines = rows.len() * lines_per_row;
    let per_share = lines.div_ceil(shares.max(1));
    for j in s * per_share..((s + 1) * per_share).min(lines) {
        let at = w.offset + (rows.start + j / lines_per_row) * w.strides.0 + cols.start + j % lines_per_row * line_len;
        prefetch(w.data.as_ptr().wrapping_add(at));
    }
}

/// Where a block's results go: rows `r0..`, columns `c0..c0 + width`.
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub(super) r0: usize,
    pub(super) c0: usize,
    pub(super) width: usize,
}

/// `R` rows of `x` (entries of one pass) times the matching rows of a strip of
/// `width ≤ STRIP` columns, `block[i·stride..]` holding strip row `i`; added to the output.
#[inline(always)]
fn axpy_block<const R: usize>(xs: [&[f32]; R], block: &[f32], stride: usize, place: Place, out: &SharedRows) {
    let k = xs[0].len();
    let Place { r0, c0, width } = place;
    let row = |i: usize| &block[i * stride..][..width];
    if width < STRIP {
        // The last, narrower strip of a task.
        for (r, x) in xs.iter().enumerate() {
            for l in 0..width {
                let v: f32 = (0..k).map(|i| x[i] * row(i)[l]).sum();
                // SAFETY: row r0 + r < rows and column c0 + l is inside this task's range.
                unsafe { out.add(r0 + r, c0 + l, v) };
            }
        }
        return;
    }
    let mut acc = [[F32x::zero(); 2]; R];
    for i in 0..k {
        let wr = row(i);
        let (w0, w1) = (F32x::load(wr), F32x::load(&wr[LANES..]));
        for (a, x) in acc.iter_mut().zip(xs) {
            let x = F32x::splat(x[i]);
            a[0] = a[0].mul_add(x, w0);
            a[1] = a[1].mul_add(x, w1);
        }
    }
    for (r, [a0, a1]) in acc.into_iter().enumerate() {
        // SAFETY: row r0 + r < rows; columns c0..c0 + STRIP are inside this task's range.
        let dst = unsafe { out.row_range(r0 + r, c0, STRIP) };
        a0.add_to(dst);
        a1.add_to(&mut dst[LANES..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm;

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
    }

    /// `x·w` in f64 with the sum of |terms| per entry (the scale of its rounding error).
    fn reference<T: WeightEntry>(x: &MatRef, w: &MatRef<T>) -> Vec<(f64, f64)> {
        let (rows, k) = x.shape;
        let cols = w.shape.1;
        let xat = |i: usize, j: usize| x.data[x.offset + i * x.strides.0 + j * x.strides.1] as f64;
        let wat = |i: usize, j: usize| w.data[w.offset + i * w.strides.0 + j * w.strides.1].to_f32() as f64;
        let mut out = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            for c in 0..cols {
                let terms = (0..k).map(|i| xat(r, i) * wat(i, c));
                out.push(terms.clone().fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs())));
            }
        }
        out
    }

    /// Checks `matmul` for `rows × k` times `k × cols` with the weight stored both ways, inside
    /// larger buffers (offsets and strides beyond the shape), fresh and accumulating; the
    /// weight in f32, bf16 and f16.
    fn check(rows: usize, k: usize, cols: usize) {
        let w_data = values(5 + (k + 1) * (cols + 3), 2);
        check_with(rows, k, cols, &w_data);
        check_with(rows, k, cols, &w_data.iter().map(|&v| half::bf16::from_f32(v)).collect::<Vec<_>>());
        check_with(rows, k, cols, &w_data.iter().map(|&v| half::f16::from_f32(v)).collect::<Vec<_>>());
    }

    fn check_with<T: WeightEntry>(rows: usize, k: usize, cols: usize, w_data: &[T]) {
        let x_data = values(3 + rows * (k + 2), 1);
        let x = MatRef { data: &x_data, offset: 3, shape: (rows, k), strides: (k + 2, 1) };
        let in_out = MatRef { data: w_data, offset: 5, shape: (k, cols), strides: (cols + 3, 1) };
        let out_in = MatRef { data: w_data, offset: 5, shape: (k, cols), strides: (1, k + 1) };
        for w in [in_out, out_in] {
            let want = reference(&x, &w);
            let start = values(rows * cols, 3);
            for accumulate in [false, true] {
                let mut got = start.clone();
                matmul(&mut got, x, w, accumulate);
                for (i, (&g, &(v, scale))) in got.iter().zip(&want).enumerate() {
                    let v = if accumulate { v + start[i] as f64 } else { v };
                    let tol = 1e-6 * (scale + 1.0);
                    assert!(
                        (g as f64 - v).abs() <= tol,
                        "{rows}x{k}x{cols} {} strides {:?} accumulate {accumulate}: entry {i} is {g}, want {v}",
                        std::any::type_name::<T>(),
                        w.strides
                    );
                }
            }
        }
    }

    #[test]
    fn matches_the_exact_product_for_every_block_remainder() {
        // Rows around both kernels' row blocks, inner sizes with and without a lane tail,
        // column counts around the column blocks, strips and task boundaries.
        for rows in [1, 2, 3, 5, 8, 9, 17, 64] {
            for (k, cols) in [(1, 7), (5, 33), (37, 70), (64, 129), (200, 531)] {
                check(rows, k, cols);
            }
        }
        // Several bands of the strip kernel and several tasks.
        check(16, 97, 2 * MAX_BAND_COLUMNS + 45);
        check(3, 768, 200);
    }

    #[test]
    fn agrees_with_the_packing_product_where_dispatched() {
        let (rows, k, cols) = (16, 512, 1024);
        let x_data = values(rows * k, 4);
        let w_data = values(k * cols, 5);
        let x = MatRef { data: &x_data, offset: 0, shape: (rows, k), strides: (k, 1) };
        for w in [
            MatRef { data: &w_data, offset: 0, shape: (k, cols), strides: (cols, 1) },
            MatRef { data: &w_data, offset: 0, shape: (k, cols), strides: (1, k) },
        ] {
            assert!(applies(&x, &w), "a 16-row product with a 512 × 1024 weight takes this kernel");
            let (mut fast, mut packed) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
            gemm::matmul_parallel(&mut fast, x, w, false);
            gemm::matmul(&mut packed, 0, cols, x, w, 1.0, false);
            let worst = fast.iter().zip(&packed).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-4, "dispatched and packed products differ by {worst}");
        }
        let small = MatRef { data: &w_data, offset: 0, shape: (64, 64), strides: (64, 1) };
        let x_small = MatRef { data: &x_data, offset: 0, shape: (rows, 64), strides: (k, 1) };
        assert!(!applies(&x_small, &small), "a small weight stays with the packing product");
        let tall = MatRef { data: &x_data, offset: 0, shape: (MAX_ROWS + 1, 8), strides: (8, 1) };
        assert!(!applies(&tall, &MatRef { data: &w_data, offset: 0, shape: (8, 40_000), strides: (40_000, 1) }));
    }
}
