//! A bounds-checked front to the `gemm` crate (the kernel candle's CPU matmul uses), for fused
//! ops that multiply strided blocks of their buffers in place without copying them out.

/// A read-only `rows × cols` matrix inside a slice: element `(i, j)` is
/// `data[offset + i·rs + j·cs]`. Entries are f32 unless said otherwise (a bf16 weight for
/// [`super::skinny`]).
pub struct MatRef<'a, T = f32> {
    /// The buffer holding the matrix.
    pub data: &'a [T],
    /// Index of element (0, 0).
    pub offset: usize,
    /// Rows and columns.
    pub shape: (usize, usize),
    /// Row and column strides.
    pub strides: (usize, usize),
}

impl<T> Clone for MatRef<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for MatRef<'_, T> {}

impl<T> MatRef<'_, T> {
    /// The same elements read as the transpose.
    pub fn t(self) -> Self {
        Self { shape: (self.shape.1, self.shape.0), strides: (self.strides.1, self.strides.0), ..self }
    }

    pub(crate) fn check(&self, len: usize) {
        let (r, c) = self.shape;
        if r > 0 && c > 0 {
            let last = self.offset + (r - 1) * self.strides.0 + (c - 1) * self.strides.1;
            assert!(last < len, "matrix view reaches index {last} of a buffer of {len}");
        }
    }
}

/// `dst ← (accumulate ? dst : 0) + alpha · a · b` for `dst` an `a.rows × b.cols` matrix at
/// `dst_offset` with row stride `dst_rs` (column stride 1), single-threaded (callers
/// parallelise over independent blocks).
pub fn matmul(dst: &mut [f32], dst_offset: usize, dst_rs: usize, a: MatRef, b: MatRef, alpha: f32, accumulate: bool) {
    matmul_with(dst, dst_offset, dst_rs, a, b, alpha, accumulate, gemm::Parallelism::None)
}

/// [`matmul`] on all of rayon's threads, for one large product; a product of few rows with a
/// large weight (decoding) goes to [`super::skinny`] instead, which does not repack the weight,
/// and where the crate's own kernel outruns `gemm` ([`super::gemm_f32`]) a large one goes there.
pub fn matmul_parallel(dst: &mut [f32], a: MatRef, b: MatRef, accumulate: bool) {
    if super::skinny::applies(&a, &b) {
        return super::skinny::matmul(dst, a, b, accumulate);
    }
    matmul_parallel_at(dst, 0, b.shape.1, a, b, accumulate)
}

/// [`matmul`] on all of rayon's threads, into a block of a larger `dst` (no dispatch to
/// [`super::skinny`]; to [`super::gemm_f32`] as [`matmul_parallel`] does). A large product
/// under `train.matmul_precision = "bf16"` ([`super::matmul_precision`]) takes
/// [`super::gemm_bf16::matmul_f32`].
pub fn matmul_parallel_at(dst: &mut [f32], dst_offset: usize, dst_rs: usize, a: MatRef, b: MatRef, accumulate: bool) {
    if super::matmul_precision::current() == super::matmul_precision::MatmulPrecision::Bf16
        && super::gemm_f32::large_with_unit_strides(&a, &b)
    {
        return super::gemm_bf16::matmul_f32(dst, dst_offset, dst_rs, a, b, accumulate);
    }
    if super::gemm_f32::applies(&a, &b) {
        return super::gemm_f32::matmul(dst, dst_offset, dst_rs, a, b, accumulate);
    }
    let threads = gemm::Parallelism::Rayon(rayon::current_num_threads());
    matmul_with(dst, dst_offset, dst_rs, a, b, 1.0, accumulate, threads)
}

/// The block at `dst[dst_offset..]` (rows of stride `dst_rs`) that a product packed per call
/// ([`super::gemm_f32::matmul`], [`super::gemm_bf16::matmul_f32`]) adds `a·b` to, after checking
/// the shapes and every view's bounds and clearing the block unless `accumulate`; `None` when
/// there is nothing to multiply (an empty output or inner dimension). `op` names the caller in
/// the panics.
pub(super) fn product_output<'d>(
    dst: &'d mut [f32],
    dst_offset: usize,
    dst_rs: usize,
    a: &MatRef,
    b: &MatRef,
    accumulate: bool,
    op: &str,
) -> Option<&'d mut [f32]> {
    assert_eq!(b.shape.0, a.shape.1, "{op}: inner dimensions differ");
    assert!(b.strides.0 == 1 || b.strides.1 == 1, "{op}: b needs a unit stride");
    b.check(b.data.len());
    output_block(dst, dst_offset, dst_rs, a, b.shape.1, accumulate)
}

/// [`product_output`] for a right operand of `cols` columns checked by the caller (one packed
/// ahead, [`super::gemm_f32::matmul_prepacked`]).
pub(super) fn output_block<'d>(
    dst: &'d mut [f32],
    dst_offset: usize,
    dst_rs: usize,
    a: &MatRef,
    cols: usize,
    accumulate: bool,
) -> Option<&'d mut [f32]> {
    use rayon::prelude::*;
    let (rows, k) = a.shape;
    a.check(a.data.len());
    MatRef { data: dst, offset: dst_offset, shape: (rows, cols), strides: (dst_rs, 1) }.check(dst.len());
    if rows == 0 || cols == 0 {
        return None;
    }
    let dst = &mut dst[dst_offset..];
    if !accumulate {
        dst.par_chunks_mut(dst_rs.max(1)).take(rows).for_each(|row| row[..cols].fill(0.0));
    }
    (k > 0).then_some(dst)
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    dst: &mut [f32],
    dst_offset: usize,
    dst_rs: usize,
    a: MatRef,
    b: MatRef,
    alpha: f32,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (m, k) = a.shape;
    let n = b.shape.1;
    assert_eq!(b.shape.0, k, "inner dimensions differ");
    a.check(a.data.len());
    b.check(b.data.len());
    MatRef { data: dst, offset: dst_offset, shape: (m, n), strides: (dst_rs, 1) }.check(dst.len());
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: every element the kernel touches was bounds-checked above, `dst` is borrowed
    // mutably (no aliasing with `a`/`b`), and the kernel reads and writes nothing else.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_offset),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr().add(a.offset),
            a.strides.1 as isize,
            a.strides.0 as isize,
            b.data.as_ptr().add(b.offset),
            b.strides.1 as isize,
            b.strides.0 as isize,
            if accumulate { 1.0 } else { 0.0 },
            alpha,
            false,
            false,
            false,
            parallelism,
        )
    }
}
