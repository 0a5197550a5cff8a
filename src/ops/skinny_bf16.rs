//! `dst = bf16(x)·W` for a few rows of `x` and a bf16 weight `W`: the decoding products of a
//! model stored in bf16 ([`linear_half`](mod@super::linear_half)).
//!
//! The arithmetic is bf16 multiplication with f32 sums: `x` is rounded to bf16 once per call,
//! each product of two bf16 values is exact in f32, and the products are summed in f32. On a
//! CPU with AVX512-BF16 this is what `vdpbf16ps` does — 32 products summed pairwise into 16
//! f32 lanes per instruction (an FMA does 16) from half the bytes — with the same two kernels
//! as [`super::skinny`] (dot-product blocks for `[out, in]` weights; bands of `[in, out]`
//! weight rows, here interleaved in pairs as the instruction wants them). They read each
//! weight once per call, in place, and at 64 rows reach about half of the instruction's peak
//! (~200 of 466 GFLOP/s on the benchmark EPYC), which [`super::gemm_bf16`] nearly reaches at
//! many rows but only by packing the weight first. Elsewhere the rounded `x` goes through
//! [`super::skinny`]'s f32 kernels with the weight widened as it is loaded: the same products,
//! summed in another order.

use half::bf16;

use super::gemm::MatRef;

/// `x` (row-major, unit column stride) rounded to bf16, as f32 rows of `x.shape.1` values.
pub fn round_rows(x: &MatRef) -> Vec<f32> {
    let (rows, k) = x.shape;
    let mut out = Vec::with_capacity(rows * k);
    for r in 0..rows {
        out.extend(x.data[x.offset + r * x.strides.0..][..k].iter().map(|&v| bf16::from_f32(v).to_f32()));
    }
    out
}

/// `dst ← (accumulate ? dst : 0) + bf16(x)·w` (see the module documentation), `dst` row-major
/// `rows × cols`, on all of rayon's threads. `x` must have unit column stride and `w` one unit
/// stride.
pub fn matmul(dst: &mut [f32], x: MatRef, w: MatRef<bf16>, accumulate: bool) {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
    dot_products::matmul(dst, x, w, accumulate);
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")))]
    {
        let rounded = round_rows(&x);
        let x = MatRef { data: &rounded, offset: 0, shape: x.shape, strides: (x.shape.1, 1) };
        super::skinny::matmul(dst, x, w, accumulate);
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
mod dot_products {
    use std::arch::x86_64::*;

    use half::bf16;

    use super::super::gemm::MatRef;
    use super::super::gemm_bf16::round_into;
    use super::super::simd::{block_sums, prefetch, F32x};
    use super::super::skinny::{
        block_after, for_column_tasks, prefetch_share, prepare, with_rows, Place, SharedRows, AXPY_DEPTH, AXPY_ROWS,
        DOT_COLS, DOT_ROWS, STRIP,
    };

    /// bf16 values per register.
    const PER_REGISTER: usize = 32;
    /// Output columns per register (one f32 lane each).
    const LANES: usize = 16;
    const _: () = assert!(STRIP == 2 * LANES && AXPY_DEPTH.is_multiple_of(2));

    pub fn matmul(dst: &mut [f32], x: MatRef, w: MatRef<bf16>, accumulate: bool) {
        let Some(columns_contiguous) = prepare(dst, &x, &w, accumulate) else { return };
        let (rows, k) = x.shape;
        let cols = w.shape.1;
        let x_row = |r: usize| &x.data[x.offset + r * x.strides.0..][..k];
        // The rows rounded to bf16, each padded to an even length with a zero.
        let width = k.next_multiple_of(2);
        let mut xb = vec![bf16::ZERO; rows * width];
        for (r, dst) in xb.chunks_exact_mut(width.max(1)).enumerate().take(rows) {
            round_into(x_row(r), &mut dst[..k]);
        }
        if columns_contiguous {
            let xs: Vec<&[bf16]> = xb.chunks(width.max(1)).map(|row| &row[..k]).collect();
            for_column_tasks(dst, cols, true, |c0, c1, out| dot_columns(&xs, &w, c0, c1, out));
        } else {
            // Each row as pairs of consecutive entries, one 32-bit word each (an odd tail
            // paired with zero), as the band's interleaved weight rows are.
            let pairs = width / 2;
            let xp: Vec<u32> =
                xb.chunks_exact(2).map(|two| two[0].to_bits() as u32 | (two[1].to_bits() as u32) << 16).collect();
            let xs: Vec<&[u32]> = xp.chunks(pairs.max(1)).collect();
            for_column_tasks(dst, cols, false, |c0, c1, out| axpy_strips(&xs, &w, k, c0, c1, out));
        }
    }

    /// The 32 bf16 values at the start of `s`.
    #[inline(always)]
    fn load(s: &[bf16]) -> __m512bh {
        assert!(s.len() >= PER_REGISTER);
        // SAFETY: `s` holds 64 bytes; unaligned load; the build has AVX-512 (cfg above).
        unsafe { std::mem::transmute(_mm512_loadu_si512(s.as_ptr().cast())) }
    }

    /// The 16 pairs at the start of `s`.
    #[inline(always)]
    fn load_pairs(s: &[u32]) -> __m512bh {
        assert!(s.len() >= LANES);
        // SAFETY: as above.
        unsafe { std::mem::transmute(_mm512_loadu_si512(s.as_ptr().cast())) }
    }

    /// `acc + a·b` lane by lane, each lane summing its pair of products.
    #[inline(always)]
    fn dot(acc: __m512, a: __m512bh, b: __m512bh) -> __m512 {
        // SAFETY: the build has AVX512-BF16 (cfg above).
        unsafe { _mm512_dpbf16_ps(acc, a, b) }
    }

    /// `x_lo·w_lo + x_hi·w_hi` for two pairs of bf16 values, in f32.
    fn pair_dot(x: u32, w: u32) -> f32 {
        let (lo, hi) = (|v: u32| f32::from_bits(v << 16), |v: u32| f32::from_bits(v & 0xffff_0000));
        lo(x) * lo(w) + hi(x) * hi(w)
    }

    /// Columns `c0..c1` of `x·w` for `w` with contiguous columns, prefetching the next block's
    /// columns while one is multiplied (as [`super::super::skinny`]'s dot products do).
    fn dot_columns(xs: &[&[bf16]], w: &MatRef<bf16>, c0: usize, c1: usize, out: &SharedRows) {
        let k = xs[0].len();
        let col = |c: usize| &w.data[w.offset + c * w.strides.1..][..k];
        let mut c = c0;
        while c + DOT_COLS <= c1 {
            let ws: [&[bf16]; DOT_COLS] = std::array::from_fn(|j| col(c + j));
            let (next, ahead) = block_after(col, c, c1);
            dot_block_rows(xs, ws, &next[..ahead], c, out);
            c += DOT_COLS;
        }
        while c < c1 {
            dot_block_rows(xs, [col(c)], &[], c, out);
            c += 1;
        }
    }

    #[inline(always)]
    fn dot_block_rows<const C: usize>(xs: &[&[bf16]], ws: [&[bf16]; C], next: &[&[bf16]], c: usize, out: &SharedRows) {
        for (r, rows) in xs.chunks(DOT_ROWS).enumerate() {
            let next = if r == 0 { next } else { &[] };
            with_rows!(rows, |block| dot_block(block, ws, next, r * DOT_ROWS, c, out));
        }
    }

    /// `R × C` dot products over the inner dimension, 16 partial sums each; prefetches the
    /// columns `next` into L2 alongside.
    #[inline(always)]
    fn dot_block<const R: usize, const C: usize>(
        xs: [&[bf16]; R],
        ws: [&[bf16]; C],
        next: &[&[bf16]],
        r0: usize,
        c0: usize,
        out: &SharedRows,
    ) {
        let k = xs[0].len();
        let body = k / PER_REGISTER * PER_REGISTER;
        // SAFETY: the build has AVX-512 (cfg above).
        let mut acc = [[unsafe { _mm512_setzero_ps() }; C]; R];
        for i in (0..body).step_by(PER_REGISTER) {
            for n in next {
                prefetch(n.as_ptr().wrapping_add(i));
            }
            let wv: [__m512bh; C] = std::array::from_fn(|j| load(&ws[j][i..]));
            for r in 0..R {
                let xv = load(&xs[r][i..]);
                for j in 0..C {
                    acc[r][j] = dot(acc[r][j], xv, wv[j]);
                }
            }
        }
        let sums = block_sums(acc.map(|row| row.map(F32x::from_m512)));
        for r in 0..R {
            for j in 0..C {
                let tail: f32 = (body..k).map(|t| xs[r][t].to_f32() * ws[j][t].to_f32()).sum();
                // SAFETY: row r0 + r < rows and column c0 + j is inside this task's range.
                unsafe { out.add(r0 + r, c0 + j, sums[r][j] + tail) };
            }
        }
    }

    /// Columns `c0..c1` of `x·w` for `w` with contiguous rows (`k` of them), in bands of
    /// [`AXPY_DEPTH`] weight rows copied out as interleaved pairs of rows: word `c` of pair `p`
    /// holds column `c` of rows `2p` (low half) and `2p + 1` (high half).
    fn axpy_strips(xs: &[&[u32]], w: &MatRef<bf16>, k: usize, c0: usize, c1: usize, out: &SharedRows) {
        let width = c1 - c0;
        let mut band = vec![0u32; AXPY_DEPTH / 2 * width];
        let strips = width.div_ceil(STRIP);
        let row = |i: usize| &w.data[w.offset + i * w.strides.0 + c0..][..width];
        for d0 in (0..k).step_by(AXPY_DEPTH) {
            let pairs = ((d0 + AXPY_DEPTH).min(k) - d0).div_ceil(2);
            for (p, dst) in band.chunks_exact_mut(width).take(pairs).enumerate() {
                let lo = row(d0 + 2 * p);
                if d0 + 2 * p + 1 < k {
                    let hi = row(d0 + 2 * p + 1);
                    for ((d, a), b) in dst.iter_mut().zip(lo).zip(hi) {
                        *d = a.to_bits() as u32 | (b.to_bits() as u32) << 16;
                    }
                } else {
                    for (d, a) in dst.iter_mut().zip(lo) {
                        *d = a.to_bits() as u32;
                    }
                }
            }
            let band_rows: Vec<&[u32]> = xs.iter().map(|x| &x[d0 / 2..][..pairs]).collect();
            // The next band streams into L2 while this one is multiplied, a share per strip.
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

    /// `R` rows of `x` (pairs of entries) times the matching pairs of a strip of
    /// `width ≤ STRIP` columns, `block[p·stride..]` holding strip pair `p`; added to the output.
    #[inline(always)]
    fn axpy_block<const R: usize>(xs: [&[u32]; R], block: &[u32], stride: usize, place: Place, out: &SharedRows) {
        let pairs = xs[0].len();
        let Place { r0, c0, width } = place;
        let row = |p: usize| &block[p * stride..][..width];
        if width < STRIP {
            // The last, narrower strip of a task.
            for (r, x) in xs.iter().enumerate() {
                for l in 0..width {
                    let v: f32 = (0..pairs).map(|p| pair_dot(x[p], row(p)[l])).sum();
                    // SAFETY: row r0 + r < rows and column c0 + l is inside this task's range.
                    unsafe { out.add(r0 + r, c0 + l, v) };
                }
            }
            return;
        }
        // SAFETY: the build has AVX-512 (cfg above).
        let mut acc = [[unsafe { _mm512_setzero_ps() }; 2]; R];
        for p in 0..pairs {
            let wr = row(p);
            let (w0, w1) = (load_pairs(wr), load_pairs(&wr[LANES..]));
            for (a, x) in acc.iter_mut().zip(xs) {
                // SAFETY: as above.
                let x: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(x[p] as i32)) };
                a[0] = dot(a[0], x, w0);
                a[1] = dot(a[1], x, w1);
            }
        }
        for (r, [a0, a1]) in acc.into_iter().enumerate() {
            // SAFETY: row r0 + r < rows; columns c0..c0 + STRIP are inside this task's range;
            // AVX-512 (cfg above); unaligned loads and stores of 16 values each.
            unsafe {
                let dst = out.row_range(r0 + r, c0, STRIP);
                let p = dst.as_mut_ptr();
                _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), a0));
                _mm512_storeu_ps(p.add(LANES), _mm512_add_ps(_mm512_loadu_ps(p.add(LANES)), a1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 1000.0 - 0.5).collect()
    }

    /// The product equals the exact product of the bf16-rounded `x` and the bf16 weight (to
    /// the rounding of f32 sums), for every block remainder, both weight layouts, inside larger
    /// buffers, fresh and accumulating.
    #[test]
    fn equals_the_exact_product_of_the_rounded_operands() {
        for rows in [1, 3, 4, 5, 8, 9, 17] {
            for (k, cols) in [(1, 7), (5, 33), (37, 70), (64, 129), (200, 531), (97, 4141)] {
                let x_data = values(3 + rows * (k + 2), 1);
                let x = MatRef { data: &x_data, offset: 3, shape: (rows, k), strides: (k + 2, 1) };
                let w_data: Vec<bf16> = values(5 + (k + 1) * (cols + 3), 2).into_iter().map(bf16::from_f32).collect();
                let in_out = MatRef { data: &w_data, offset: 5, shape: (k, cols), strides: (cols + 3, 1) };
                let out_in = MatRef { data: &w_data, offset: 5, shape: (k, cols), strides: (1, k + 1) };
                let rounded = round_rows(&x);
                for w in [in_out, out_in] {
                    let start = values(rows * cols, 3);
                    for accumulate in [false, true] {
                        let mut got = start.clone();
                        matmul(&mut got, x, w, accumulate);
                        for (i, &g) in got.iter().enumerate() {
                            let (r, c) = (i / cols, i % cols);
                            let terms = (0..k).map(|t| {
                                rounded[r * k + t] as f64
                                    * w.data[w.offset + t * w.strides.0 + c * w.strides.1].to_f64()
                            });
                            let (sum, scale) = terms.fold((0.0, 0.0), |(s, a), v| (s + v, a + v.abs()));
                            let want = if accumulate { sum + start[i] as f64 } else { sum };
                            assert!(
                                (g as f64 - want).abs() <= 1e-6 * (scale + 1.0),
                                "{rows}x{k}x{cols} strides {:?} accumulate {accumulate}: entry {i} is {g}, want {want}",
                                w.strides
                            );
                        }
                    }
                }
            }
        }
    }
}
