//! `dst += bf16(x)·W` for many rows of `x` and a bf16 weight `W`: the products of a bf16
//! model's prefill and of a bf16 teacher's forward passes over whole batches
//! ([`linear_half`](mod@super::linear_half)), on CPUs with AVX512-BF16.
//!
//! The arithmetic is [`super::skinny_bf16`]'s: `x` rounded to bf16, exact products of two
//! bf16 values, f32 sums. `vdpbf16ps` does 32 such products per instruction where an f32 FMA
//! does 16, at the same issue rate on the benchmark EPYC (`scripts/machine_peaks.c`: 466
//! against 233 GFLOP/s on two cores), so a product that keeps it busy runs up to twice as
//! fast as the f32 `gemm` on the widened weight, which is what this replaces.
//!
//! The layout is the classic register-blocked one (Goto's): `x` is rounded and packed once per
//! call into blocks of [`MR`] rows, each holding, for each pair of consecutive inner indices,
//! the [`MR`] rows' pairs as 32-bit words (`vdpbf16ps` sums one pair per lane); the weight is
//! packed per thread, a block of up to [`KC`] inner pairs × [`NC`] columns at a time, into
//! panels of [`NR`] columns whose entries are the same pairs. The kernel keeps an `MR × NR`
//! block of sums in 24 registers and, for each inner pair, broadcasts a row's pair against two
//! registers of the panel. Threads split the output columns. On the benchmark EPYC this
//! reaches ~390–430 GFLOP/s on GPT-2 XL's shapes at 4,096 rows and 330–377 on GPT-2's at
//! 1,024 rows, against 185–210 and ~200 for the f32 `gemm` on the widened weight
//! (BENCHMARKS.md). At 64 rows and fewer the decoding kernels, which read the weight in
//! place, are as fast or faster when the weight must be packed on each call: the packing
//! costs what the faster arithmetic saves. A frozen model's weights are therefore packed once,
//! at load ([`PackedWeight`], [`matmul_packed`]), and then take this kernel at every row count:
//! at 16–64 rows 1.4–1.9× the decoding kernel on GPT-2's products.

use half::bf16;

use super::gemm::MatRef;

/// Whether this build has the kernel (AVX512-BF16); without it callers widen the weight to f32.
pub const AVAILABLE: bool =
    cfg!(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"));

/// Rows of `x` per kernel block.
pub const MR: usize = 12;
/// Output columns per kernel block: two registers of 16 f32 sums.
pub const NR: usize = 32;
/// Most inner pairs per packed weight block. Each kernel call adds its block of sums to the
/// output once, so the fewer blocks the inner dimension is cut into, the less the output is
/// re-read and re-written: on GPT-2 XL's 4,096 × 1,600 × 6,400 product, blocks of 128 pairs
/// reached ~310 GFLOP/s, 384 pairs ~355 and the whole 800 ~400 (the panels then stream
/// from L2 rather than sit in L1, which costs less).
pub const KC: usize = 1024;
/// Columns per packed weight block.
pub const NC: usize = 1024;
/// Rows per pass over one packed weight block.
pub const MC: usize = 8 * MR;

/// The pair of bf16 values `lo`, `hi` as one 32-bit word, `lo` in the low half (the order in
/// which `vdpbf16ps` takes them).
#[inline(always)]
fn pair(lo: bf16, hi: bf16) -> u32 {
    lo.to_bits() as u32 | (hi.to_bits() as u32) << 16
}

/// The 32 values rounded to bf16 (to nearest, ties to even), as 16 pairs. With AVX512-BF16
/// one instruction converts them (`half`'s scalar conversion took a tenth of a bf16 prefill);
/// it reads subnormal inputs as zero, as `vdpbf16ps` does the bf16 subnormals the scalar
/// conversion would make of them, so the products are the same either way.
#[inline(always)]
fn round_pairs(v: &[f32; 32]) -> [u32; 16] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
    // SAFETY: the build has AVX512-BF16 (cfg); unaligned loads and store of 64 bytes each.
    unsafe {
        use std::arch::x86_64::*;
        let (lo, hi) = (_mm512_loadu_ps(v.as_ptr()), _mm512_loadu_ps(v.as_ptr().add(16)));
        // The second operand's values fill the lower half.
        let rounded: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        let mut out = [0u32; 16];
        _mm512_storeu_si512(out.as_mut_ptr().cast(), rounded);
        out
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")))]
    std::array::from_fn(|p| pair(bf16::from_f32(v[2 * p]), bf16::from_f32(v[2 * p + 1])))
}

/// `src` rounded to bf16 (to nearest, ties to even) into `dst` (as long), 32 values at a time
/// with one instruction where the CPU has AVX512-BF16.
pub fn round_into(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "gemm-bf16: rounding into a buffer of another length");
    let mut chunks = src.chunks_exact(32);
    let mut out = dst.chunks_exact_mut(32);
    for (chunk, out) in chunks.by_ref().zip(out.by_ref()) {
        for (two, word) in out.chunks_exact_mut(2).zip(round_pairs(chunk.try_into().unwrap())) {
            two[0] = bf16::from_bits(word as u16);
            two[1] = bf16::from_bits((word >> 16) as u16);
        }
    }
    for (v, out) in chunks.remainder().iter().zip(out.into_remainder()) {
        *out = bf16::from_f32(*v);
    }
}

/// What an operand holds: bf16 values as they are, or f32 values rounded to bf16 (to nearest,
/// ties to even) as they are packed, 16 at a time with one instruction where the CPU has
/// AVX512-BF16.
pub trait Element: Copy + Send + Sync {
    /// The value as bf16.
    fn bf16(self) -> bf16;

    /// The 16 words pairing `lo[j]` (low half) with `hi[j]`; both hold 16 values.
    #[inline(always)]
    fn zip_pairs(lo: &[Self], hi: &[Self]) -> [u32; 16] {
        std::array::from_fn(|j| pair(lo[j].bf16(), hi[j].bf16()))
    }

    /// The 32 consecutive values as 16 pairs.
    #[inline(always)]
    fn consecutive_pairs(v: &[Self]) -> [u32; 16] {
        std::array::from_fn(|j| pair(v[2 * j].bf16(), v[2 * j + 1].bf16()))
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn bf16(self) -> bf16 {
        self
    }
}

impl Element for f32 {
    #[inline(always)]
    fn bf16(self) -> bf16 {
        bf16::from_f32(self)
    }

    #[inline(always)]
    fn zip_pairs(lo: &[f32], hi: &[f32]) -> [u32; 16] {
        #[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
        // SAFETY: the build has AVX512-BF16 (cfg); 16-value unaligned loads (the slices hold
        // 16, asserted) and a 64-byte store.
        unsafe {
            use std::arch::x86_64::*;
            assert!(lo.len() >= 16 && hi.len() >= 16);
            let round = |v: &[f32]| -> __m512i {
                let halves: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(_mm512_loadu_ps(v.as_ptr())));
                _mm512_cvtepu16_epi32(halves)
            };
            let words = _mm512_or_si512(round(lo), _mm512_slli_epi32::<16>(round(hi)));
            let mut out = [0u32; 16];
            _mm512_storeu_si512(out.as_mut_ptr().cast(), words);
            out
        }
        #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")))]
        std::array::from_fn(|j| pair(bf16::from_f32(lo[j]), bf16::from_f32(hi[j])))
    }

    #[inline(always)]
    fn consecutive_pairs(v: &[f32]) -> [u32; 16] {
        round_pairs(v[..32].try_into().expect("32 values"))
    }
}

/// `x` rounded to bf16 and packed in blocks of [`MR`] rows: word `(block·pairs + p)·MR + i`
/// is row `block·MR + i`'s entries `2p` and `2p + 1` (zero past the last row or an odd inner
/// dimension). `x` needs a unit stride along its rows or its columns.
pub fn pack_rows(x: &MatRef) -> Vec<u32> {
    use rayon::prelude::*;
    let (rows, k) = x.shape;
    assert!(x.strides.1 == 1 || x.strides.0 == 1, "gemm-bf16: x needs a unit stride");
    x.check(x.data.len());
    let pairs = k.div_ceil(2);
    let mut packed = vec![0u32; rows.div_ceil(MR) * MR * pairs];
    packed.par_chunks_mut((MR * pairs).max(1)).enumerate().for_each(|(block, out)| {
        let height = MR.min(rows.saturating_sub(block * MR));
        if x.strides.1 == 1 {
            for i in 0..height {
                pack_row(&x.data[x.offset + (block * MR + i) * x.strides.0..][..k], i, out);
            }
        } else {
            pack_columns(x, block * MR, height, out);
        }
    });
    packed
}

/// Row `i` of a block of [`pack_rows`]: `row`'s consecutive entries rounded in pairs.
fn pack_row(row: &[f32], i: usize, out: &mut [u32]) {
    let k = row.len();
    let mut chunks = row.chunks_exact(32);
    for (c, chunk) in chunks.by_ref().enumerate() {
        for (j, word) in round_pairs(chunk.try_into().unwrap()).into_iter().enumerate() {
            out[(16 * c + j) * MR + i] = word;
        }
    }
    let rest = chunks.remainder();
    let p0 = (k - rest.len()) / 2;
    let mut pairs = rest.chunks_exact(2);
    for (p, two) in pairs.by_ref().enumerate() {
        out[(p0 + p) * MR + i] = pair(bf16::from_f32(two[0]), bf16::from_f32(two[1]));
    }
    if let [last] = pairs.remainder() {
        out[(k / 2) * MR + i] = pair(bf16::from_f32(*last), bf16::ZERO);
    }
}

/// The block of [`pack_rows`] holding rows `r0..r0 + height` of an `x` whose columns are
/// contiguous (a transposed activation, as in `xᵀ·dy`): the block's entries of one inner index
/// lie side by side, so each pair of inner indices is rounded and paired in one step.
fn pack_columns(x: &MatRef, r0: usize, height: usize, out: &mut [u32]) {
    let (k, cs) = (x.shape.1, x.strides.1);
    let mut lo = [0f32; 16];
    let mut hi = [0f32; 16];
    for p in 0..k.div_ceil(2) {
        let at = |kk: usize| &x.data[x.offset + r0 + kk * cs..][..height];
        lo[..height].copy_from_slice(at(2 * p));
        if 2 * p + 1 < k {
            hi[..height].copy_from_slice(at(2 * p + 1));
        } else {
            hi.fill(0.0);
        }
        out[p * MR..][..height].copy_from_slice(&f32::zip_pairs(&lo, &hi)[..height]);
    }
}

/// Packs inner pairs `p0..p0 + kc` of weight columns `c0..c0 + nc` into `out`: panel `j`
/// (columns `c0 + j·NR..`) at `j·kc·NR`, word `p·NR + c` holding column `c`'s entries `2p`
/// and `2p + 1`, zero past the last column or an odd inner dimension. f32 entries are rounded
/// to bf16 as they are packed.
pub fn pack_weight_block<T: Element>(
    w: &MatRef<T>,
    (p0, kc): (usize, usize),
    (c0, nc): (usize, usize),
    out: &mut [u32],
) {
    let (k, _) = w.shape;
    let panels = nc.div_ceil(NR);
    let out = &mut out[..panels * kc * NR];
    if !nc.is_multiple_of(NR) {
        // The last panel's columns past the weight's.
        out[(panels - 1) * kc * NR..].fill(0);
    }
    if w.strides.1 == 1 {
        // Rows of the weight are contiguous: interleave each pair of rows along the columns,
        // 16 at a time where they are all there.
        for p in 0..kc {
            let kk = 2 * (p0 + p);
            let row = |kk: usize| &w.data[w.offset + kk * w.strides.0 + c0..][..nc];
            let (lo, hi) = (row(kk), (kk + 1 < k).then(|| row(kk + 1)));
            for c in (0..nc).step_by(16) {
                let words = &mut out[(c / NR * kc + p) * NR + c % NR..][..16.min(nc - c)];
                match hi {
                    Some(hi) if words.len() == 16 => {
                        words.copy_from_slice(&T::zip_pairs(&lo[c..c + 16], &hi[c..c + 16]))
                    }
                    _ => {
                        for (j, word) in words.iter_mut().enumerate() {
                            *word = pair(lo[c + j].bf16(), hi.map_or(bf16::ZERO, |hi| hi[c + j].bf16()));
                        }
                    }
                }
            }
        }
    } else {
        // Columns are contiguous: each column's pairs are consecutive entries. Sixteen columns
        // × sixteen pairs are rounded a column at a time and transposed into the panel's rows
        // (a word at a time, the stores went to sixteen lines per column and the packing cost
        // as much as the product at 83 rows).
        let column = |c: usize| &w.data[w.offset + (c0 + c) * w.strides.1..];
        // The block's pairs whose both entries exist, in whole groups of sixteen.
        let full = if w.strides.0 == 1 { kc.min((k / 2).saturating_sub(p0)) / 16 * 16 } else { 0 };
        let groups = if full > 0 { nc / 16 } else { 0 };
        for g in 0..groups {
            let c = 16 * g;
            for p in (0..full).step_by(16) {
                let words: [[u32; 16]; 16] =
                    std::array::from_fn(|i| T::consecutive_pairs(&column(c + i)[2 * (p0 + p)..][..32]));
                for (j, run) in transpose16(&words).iter().enumerate() {
                    out[((c / NR) * kc + p + j) * NR + c % NR..][..16].copy_from_slice(run);
                }
            }
        }
        for c in 0..nc {
            let panel = &mut out[c / NR * kc * NR..][..kc * NR];
            let start = if c < 16 * groups { full } else { 0 };
            for p in start..kc {
                let kk = 2 * (p0 + p);
                let hi = if kk + 1 < k { column(c)[(kk + 1) * w.strides.0].bf16() } else { bf16::ZERO };
                panel[p * NR + c % NR] = pair(column(c)[kk * w.strides.0].bf16(), hi);
            }
        }
    }
}

/// The 16 × 16 words transposed: `out[j][i] = rows[i][j]`. With AVX-512, in registers (two
/// rounds of lane interleaves and two of 128-bit block shuffles).
#[inline(always)]
fn transpose16(rows: &[[u32; 16]; 16]) -> [[u32; 16]; 16] {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
    // SAFETY: the build has AVX-512 (cfg); unaligned 64-byte loads and stores of whole rows.
    unsafe {
        use std::arch::x86_64::*;
        let r: [__m512i; 16] = std::array::from_fn(|i| _mm512_loadu_si512(rows[i].as_ptr().cast()));
        // Within each 128-bit block: pairs of rows interleaved by words, then by double words,
        // so that block `b` of `u[4q + m]` holds entry `4b + m` of rows `4q..4q + 4`.
        let t: [__m512i; 16] = std::array::from_fn(|i| {
            let (a, b) = (r[i & !1], r[i | 1]);
            if i % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (q, m) = (i / 4, i % 4);
            let (a, b) = (t[4 * q + m / 2], t[4 * q + 2 + m / 2]);
            if m % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        // Then the blocks: entry `4b + m` of all sixteen rows is block `b` of `u[m]`,
        // `u[4 + m]`, `u[8 + m]` and `u[12 + m]`.
        let mut out = [[0u32; 16]; 16];
        for m in 0..4 {
            let even_ab = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[m], u[4 + m]);
            let odd_ab = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[m], u[4 + m]);
            let even_cd = _mm512_shuffle_i32x4::<0b10_00_10_00>(u[8 + m], u[12 + m]);
            let odd_cd = _mm512_shuffle_i32x4::<0b11_01_11_01>(u[8 + m], u[12 + m]);
            let blocks = [
                _mm512_shuffle_i32x4::<0b10_00_10_00>(even_ab, even_cd),
                _mm512_shuffle_i32x4::<0b10_00_10_00>(odd_ab, odd_cd),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(even_ab, even_cd),
                _mm512_shuffle_i32x4::<0b11_01_11_01>(odd_ab, odd_cd),
            ];
            for (b, v) in blocks.into_iter().enumerate() {
                _mm512_storeu_si512(out[4 * b + m].as_mut_ptr().cast(), v);
            }
        }
        out
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512f")))]
    std::array::from_fn(|j| std::array::from_fn(|i| rows[i][j]))
}

/// `dst += bf16(x)·w` for `dst` row-major `rows × cols` (`x` `rows × k` with unit column
/// stride, `w` `k × cols` with either unit stride), on all of rayon's threads. Panics in a
/// build without [`AVAILABLE`].
pub fn matmul(dst: &mut [f32], x: MatRef, w: MatRef<bf16>) {
    let (rows, k) = x.shape;
    let cols = w.shape.1;
    assert!(w.shape.0 == k && dst.len() >= rows * cols, "gemm-bf16: bad shapes");
    assert!(w.strides.0 == 1 || w.strides.1 == 1, "gemm-bf16: w needs one unit stride");
    w.check(w.data.len());
    if rows == 0 || cols == 0 || k == 0 {
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
    kernel::product(dst, cols, &pack_rows(&x), rows, k.div_ceil(2), cols, kernel::Weight::Unpacked(&w));
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")))]
    panic!("gemm-bf16: this build has no AVX512-BF16");
}

/// `dst ← (accumulate ? dst : 0) + bf16(a)·bf16(b)` for two f32 matrices (each with a unit
/// stride along its rows or its columns), `dst` an `a.rows × b.cols` matrix at `dst_offset`
/// with row stride `dst_rs`, on all of rayon's threads: both operands rounded to bf16 as they
/// are packed, exact products, f32 sums. This is what `train.matmul_precision = "bf16"` makes
/// of training's large products ([`super::matmul_precision`]). Panics in a build without
/// [`AVAILABLE`].
pub fn matmul_f32(dst: &mut [f32], dst_offset: usize, dst_rs: usize, a: MatRef, b: MatRef, accumulate: bool) {
    let Some(dst) = super::gemm::product_output(dst, dst_offset, dst_rs, &a, &b, accumulate, "gemm-bf16") else {
        return;
    };
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
    kernel::product(
        dst,
        dst_rs,
        &pack_rows(&a),
        a.shape.0,
        a.shape.1.div_ceil(2),
        b.shape.1,
        kernel::Weight::Unpacked(&b),
    );
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")))]
    {
        let _ = dst;
        panic!("gemm-bf16: this build has no AVX512-BF16");
    }
}

/// A `k × cols` bf16 weight packed once, whole, in the kernel's panel layout: panel `j`
/// (columns `j·NR..`) holds, for each inner pair `p`, the [`NR`] columns' entries `2p` and
/// `2p + 1` as words `(j·pairs + p)·NR + c` (zero past the last column or an odd inner
/// dimension). A frozen weight packed at load spares every product the packing, which is what
/// lets the kernel serve decoding's few rows: there, packing per call cost what the faster
/// arithmetic saved. It takes the bytes the weight took (plus the padding of the last panel).
#[derive(Clone)]
pub struct PackedWeight {
    words: Vec<u32>,
    k: usize,
    cols: usize,
}

impl PackedWeight {
    /// Packs `w` (`k × cols`, either unit stride), panels in parallel.
    pub fn new(w: &MatRef<bf16>) -> Self {
        use rayon::prelude::*;
        let (k, cols) = w.shape;
        assert!(w.strides.0 == 1 || w.strides.1 == 1, "gemm-bf16: w needs one unit stride");
        w.check(w.data.len());
        let pairs = k.div_ceil(2);
        let mut words = vec![0u32; cols.div_ceil(NR) * pairs * NR];
        // Several panels per task: `pack_weight_block` walks a row-major weight along rows.
        let per_task = (256 / NR).max(1);
        words.par_chunks_mut((per_task * pairs * NR).max(1)).enumerate().for_each(|(t, out)| {
            let c0 = t * per_task * NR;
            pack_weight_block(w, (0, pairs), (c0, (per_task * NR).min(cols - c0)), out);
        });
        Self { words, k, cols }
    }

    /// The inner dimension (`in`) and the columns (`out`).
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.cols)
    }

    /// The weight back in its `[k, cols]` row-major layout.
    pub fn unpack(&self) -> Vec<bf16> {
        let pairs = self.k.div_ceil(2);
        let mut out = vec![bf16::ZERO; self.k * self.cols];
        for (i, row) in out.chunks_exact_mut(self.cols.max(1)).enumerate().take(self.k) {
            for (c, v) in row.iter_mut().enumerate() {
                let word = self.words[((c / NR) * pairs + i / 2) * NR + c % NR];
                *v = bf16::from_bits((word >> (16 * (i % 2))) as u16);
            }
        }
        out
    }
}

/// `dst += bf16(x)·w` for a [`PackedWeight`] `w` (`x` `rows × k` with unit column stride,
/// `dst` row-major `rows × cols`), on all of rayon's threads. Panics in a build without
/// [`AVAILABLE`].
pub fn matmul_packed(dst: &mut [f32], x: MatRef, w: &PackedWeight) {
    let (rows, k) = x.shape;
    assert!(w.k == k && dst.len() >= rows * w.cols, "gemm-bf16: bad shapes");
    if rows == 0 || w.cols == 0 || k == 0 {
        return;
    }
    #[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
    kernel::product(dst, w.cols, &pack_rows(&x), rows, k.div_ceil(2), w.cols, kernel::Weight::<bf16>::Packed(&w.words));
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f")))]
    panic!("gemm-bf16: this build has no AVX512-BF16");
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512bf16", target_feature = "avx512f"))]
mod kernel {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::super::gemm::MatRef;
    use super::super::packed_f32::prefetch_output;
    use super::super::skinny::{Place, SharedRows};
    use super::{pack_weight_block, Element, KC, MC, MR, NC, NR};

    /// The weight as the kernel gets it.
    pub(super) enum Weight<'a, T> {
        /// In its own layout (bf16, or f32 rounded as packed): packed a block at a time by
        /// each thread.
        Unpacked(&'a MatRef<'a, T>),
        /// Already packed whole ([`super::PackedWeight`]'s words).
        Packed(&'a [u32]),
    }

    /// The product on packed rows `xp` (see [`super::pack_rows`]) added to `dst` (rows of
    /// stride `dst_rs`), threads splitting the columns into ranges of whole panels.
    pub(super) fn product<T: Element>(
        dst: &mut [f32],
        dst_rs: usize,
        xp: &[u32],
        rows: usize,
        pairs: usize,
        cols: usize,
        w: Weight<T>,
    ) {
        let threads = rayon::current_num_threads();
        let per_task = cols.div_ceil(threads).next_multiple_of(NR);
        let out = SharedRows::new(dst, dst_rs);
        (0..cols.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let c1 = ((task + 1) * per_task).min(cols);
            columns(&out, xp, rows, pairs, &w, task * per_task, c1);
        });
    }

    /// Columns `c0..c1` of the product, a weight block at a time (packed here unless it
    /// already is): the inner pairs in as few blocks of equal depth as [`KC`] allows.
    fn columns<T: Element>(
        out: &SharedRows,
        xp: &[u32],
        rows: usize,
        pairs: usize,
        w: &Weight<T>,
        c0: usize,
        c1: usize,
    ) {
        let depth = pairs.div_ceil(pairs.div_ceil(KC));
        let mut wp = match w {
            Weight::Unpacked(_) => vec![0u32; depth * NC.min(c1 - c0).next_multiple_of(NR)],
            Weight::Packed(_) => Vec::new(),
        };
        let blocks = rows.div_ceil(MR);
        for jc in (c0..c1).step_by(NC) {
            let nc = NC.min(c1 - jc);
            for pc in (0..pairs).step_by(depth) {
                let kc = depth.min(pairs - pc);
                if let Weight::Unpacked(w) = w {
                    pack_weight_block(w, (pc, kc), (jc, nc), &mut wp);
                }
                for ic in (0..blocks).step_by(MC / MR) {
                    for j in 0..nc.div_ceil(NR) {
                        let panel = match w {
                            Weight::Unpacked(_) => &wp[j * kc * NR..][..kc * NR],
                            Weight::Packed(words) => &words[((jc / NR + j) * pairs + pc) * NR..][..kc * NR],
                        };
                        let (col, width) = (jc + j * NR, NR.min(nc - j * NR));
                        for block in ic..(ic + MC / MR).min(blocks) {
                            let xs = &xp[(block * pairs + pc) * MR..][..kc * MR];
                            let place = Place { r0: block * MR, c0: col, width };
                            prefetch_output(out, block * MR, MR.min(rows - block * MR), col, width);
                            // SAFETY: this task alone writes columns `c0..c1`; the block
                            // `height × width` at (`block·MR`, `col`) lies inside `dst`.
                            unsafe {
                                match rows - block * MR {
                                    1 => block_product::<1>(xs, panel, kc, out, place),
                                    2 => block_product::<2>(xs, panel, kc, out, place),
                                    3 => block_product::<3>(xs, panel, kc, out, place),
                                    4 => block_product::<4>(xs, panel, kc, out, place),
                                    5 => block_product::<5>(xs, panel, kc, out, place),
                                    6 => block_product::<6>(xs, panel, kc, out, place),
                                    7 => block_product::<7>(xs, panel, kc, out, place),
                                    8 => block_product::<8>(xs, panel, kc, out, place),
                                    9 => block_product::<9>(xs, panel, kc, out, place),
                                    10 => block_product::<10>(xs, panel, kc, out, place),
                                    11 => block_product::<11>(xs, panel, kc, out, place),
                                    _ => block_product::<MR>(xs, panel, kc, out, place),
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// Adds the `R × NR` block of sums over `kc` inner pairs of the first `R` of the packed
    /// rows `xs` (blocks of [`MR`]) and the packed panel `ws` to the `R × width` block of the
    /// output at `place` (`R` is the block's real height: the last block's is often less than
    /// [`MR`]).
    ///
    /// # Safety
    /// The output block is in bounds and no other thread touches it.
    #[inline(always)]
    unsafe fn block_product<const R: usize>(xs: &[u32], ws: &[u32], kc: usize, out: &SharedRows, place: Place) {
        assert!(R <= MR && xs.len() >= kc * MR && ws.len() >= kc * NR);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (xs, ws) = (xs.as_ptr(), ws.as_ptr());
        for p in 0..kc {
            // SAFETY: p < kc; the slices hold kc·MR and kc·NR words (asserted above).
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(ws.add(p * NR).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(ws.add(p * NR + 16).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*xs.add(p * MR + i) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
        let masks = [lane_mask(place.width), lane_mask(place.width.saturating_sub(16))];
        for (i, acc) in acc.iter().enumerate() {
            let row = out.row_range(place.r0 + i, place.c0, place.width).as_mut_ptr();
            for (h, (&sum, &mask)) in acc.iter().zip(&masks).enumerate().filter(|(_, (_, &m))| m != 0) {
                // SAFETY: the mask keeps the lanes inside the row's `width` columns.
                let now = _mm512_maskz_loadu_ps(mask, row.add(16 * h));
                _mm512_mask_storeu_ps(row.add(16 * h), mask, _mm512_add_ps(now, sum));
            }
        }
    }

    /// The lanes `0..n.min(16)`.
    fn lane_mask(n: usize) -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) of varied magnitude (so that rounding to bf16 matters);
    /// [`super::super::packed_f32`]'s tests use them too.
    pub(in crate::ops) fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * if s & 1 == 0 { 1.0 } else { 0.01 }
            })
            .collect()
    }

    /// `dst + bf16(x)·w` in f64 from the definition, and the sum of the terms' magnitudes.
    fn reference(dst: &[f32], x: &MatRef, w: &MatRef<bf16>) -> (Vec<f64>, Vec<f64>) {
        let ((rows, k), cols) = (x.shape, w.shape.1);
        let xe = |r: usize, i: usize| bf16::from_f32(x.data[x.offset + r * x.strides.0 + i]).to_f64();
        let we = |i: usize, c: usize| w.data[w.offset + i * w.strides.0 + c * w.strides.1].to_f64();
        let mut want = vec![0f64; rows * cols];
        let mut size = vec![0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let terms = (0..k).map(|i| xe(r, i) * we(i, c));
                want[r * cols + c] = dst[r * cols + c] as f64 + terms.clone().sum::<f64>();
                size[r * cols + c] = dst[r * cols + c].abs() as f64 + terms.map(f64::abs).sum::<f64>();
            }
        }
        (want, size)
    }

    /// The product equals its definition (bf16-rounded `x`, exact products, f32 sums) up to the
    /// sums' rounding, added to what `dst` held: rows not a multiple of [`MR`], odd inner
    /// dimensions, columns not a multiple of [`NR`], both weight layouts, `x` inside a larger
    /// buffer, more rows than one pass takes ([`MC`]), and products deep and wide enough to
    /// take several weight blocks in both directions ([`KC`] pairs, [`NC`] columns per thread
    /// on up to four threads); on the weight as it is and packed whole ([`PackedWeight`]).
    #[test]
    fn equals_the_definition_on_rounded_inputs() {
        if !AVAILABLE {
            eprintln!("skipped: this build has no AVX512-BF16");
            return;
        }
        let shapes = [
            (1, 1, 1),
            (13, 7, 45),
            (12, 64, 32),
            (25, 301, 97),
            (MC + 4, 2 * KC + 53, 70),
            (29, 4 * KC + 3, 4 * NC + 33),
        ];
        for (rows, k, cols) in shapes {
            for (in_out, packed) in [(true, false), (false, false), (true, true), (false, true)] {
                let stride = k + 5;
                let xs = values(rows * stride + 3, rows as u64);
                let x = MatRef { data: &xs, offset: 3, shape: (rows, k), strides: (stride, 1) };
                let ws: Vec<bf16> = values(k * cols, k as u64).into_iter().map(bf16::from_f32).collect();
                let strides = if in_out { (cols, 1) } else { (1, k) };
                let w = MatRef { data: &ws, offset: 0, shape: (k, cols), strides };
                let mut dst = values(rows * cols, 7);
                let (want, size) = reference(&dst, &x, &w);
                if packed {
                    matmul_packed(&mut dst, x, &PackedWeight::new(&w));
                } else {
                    matmul(&mut dst, x, w);
                }
                for (i, ((&got, &want), &size)) in dst.iter().zip(&want).zip(&size).enumerate() {
                    // f32 sums of k + 1 terms: each addition rounds by at most 2^-24 of the
                    // running magnitude.
                    let bound = (k + 1) as f64 * size * f32::EPSILON as f64;
                    assert!(
                        (got as f64 - want).abs() <= bound,
                        "{rows} × {k} × {cols}, in_out {in_out}, packed {packed}, entry {i}: {got} against {want} (bound {bound:e})"
                    );
                }
            }
        }
    }

    /// `dst ← (accumulate ? dst : 0) + bf16(a)·bf16(b)` equals its definition (both operands
    /// rounded, exact products, f32 sums) up to the sums' rounding: `a` by rows and transposed
    /// (contiguous columns, as `xᵀ·dy`), `b` in both layouts, `dst` a block inside a larger
    /// buffer, with and without accumulating, at shapes that take several weight blocks and
    /// 16 × 16 transposed groups with ragged edges.
    #[test]
    fn f32_product_equals_the_definition_on_rounded_operands() {
        if !AVAILABLE {
            eprintln!("skipped: this build has no AVX512-BF16");
            return;
        }
        let round = |v: f32| bf16::from_f32(v).to_f64();
        for (rows, k, cols) in [(1, 1, 1), (13, 7, 45), (29, 70, 83), (MC + 4, 2 * KC + 53, 70), (5, 99, NC + 47)] {
            for (a_rows, b_rows, accumulate) in
                [(true, true, false), (false, false, true), (false, true, false), (true, false, true)]
            {
                let av = values(rows * k + 2, 11);
                let bv = values(k * cols + 1, 12);
                let a = if a_rows {
                    MatRef { data: &av, offset: 2, shape: (rows, k), strides: (k, 1) }
                } else {
                    MatRef { data: &av, offset: 2, shape: (rows, k), strides: (1, rows) }
                };
                let b = if b_rows {
                    MatRef { data: &bv, offset: 1, shape: (k, cols), strides: (cols, 1) }
                } else {
                    MatRef { data: &bv, offset: 1, shape: (k, cols), strides: (1, k) }
                };
                let (dst_rs, dst_offset) = (cols + 3, 5);
                let mut dst = values(dst_offset + rows * dst_rs, 13);
                let before = dst.clone();
                matmul_f32(&mut dst, dst_offset, dst_rs, a, b, accumulate);
                let at = |m: &MatRef, i: usize, j: usize| m.data[m.offset + i * m.strides.0 + j * m.strides.1];
                for r in 0..rows {
                    for c in 0..cols {
                        let idx = dst_offset + r * dst_rs + c;
                        let start = if accumulate { before[idx] as f64 } else { 0.0 };
                        let terms = (0..k).map(|i| round(at(&a, r, i)) * round(at(&b, i, c)));
                        let want = start + terms.clone().sum::<f64>();
                        let size = start.abs() + terms.map(f64::abs).sum::<f64>();
                        let bound = (k + 1) as f64 * size * f32::EPSILON as f64;
                        assert!(
                            (dst[idx] as f64 - want).abs() <= bound,
                            "{rows} × {k} × {cols} (a by rows {a_rows}, b by rows {b_rows}, accumulate {accumulate}) at ({r}, {c}): {} against {want}",
                            dst[idx]
                        );
                    }
                }
                // Outside the block, nothing changed.
                for (i, (&got, &was)) in dst.iter().zip(&before).enumerate() {
                    let inside =
                        i >= dst_offset && (i - dst_offset) / dst_rs < rows && (i - dst_offset) % dst_rs < cols;
                    assert!(inside || got.to_bits() == was.to_bits(), "entry {i} outside the block changed");
                }
            }
        }
    }

    /// The register transpose is the transpose.
    #[test]
    fn transposes_sixteen_by_sixteen_words() {
        let rows: [[u32; 16]; 16] = std::array::from_fn(|i| std::array::from_fn(|j| (i * 100 + j) as u32));
        let t = transpose16(&rows);
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(t[j][i], rows[i][j], "({j}, {i})");
            }
        }
    }

    /// Packing f32 entries rounds them as packing their bf16 roundings does, from either layout
    /// (the transposed groups of sixteen columns and the ragged edges alike).
    #[test]
    fn packing_f32_rounds_as_packing_bf16() {
        let (k, cols) = (75, 53);
        let vf = values(k * cols, 21);
        let vb: Vec<bf16> = vf.iter().map(|&v| bf16::from_f32(v)).collect();
        for (p0, kc) in [(0, 38), (3, 30), (16, 16)] {
            for strides in [(cols, 1), (1, k)] {
                let f = MatRef { data: &vf, offset: 0, shape: (k, cols), strides };
                let b = MatRef { data: &vb, offset: 0, shape: (k, cols), strides };
                let (mut from_f32, mut from_bf16) = (vec![7u32; 2 * kc * NR], vec![9u32; 2 * kc * NR]);
                pack_weight_block(&f, (p0, kc), (2, 50), &mut from_f32);
                pack_weight_block(&b, (p0, kc), (2, 50), &mut from_bf16);
                assert_eq!(from_f32, from_bf16, "pairs {p0}+{kc}, strides {strides:?}");
            }
        }
    }

    /// A packed weight unpacks to the values it was packed from, in `[k, cols]` order, from
    /// either layout, with odd inner dimensions and a last panel part full.
    #[test]
    fn a_packed_weight_unpacks_to_its_values() {
        for (k, cols) in [(1, 1), (3, 2), (7, 45), (64, 100), (33, 2 * NR + 1)] {
            let ws: Vec<bf16> = values(k * cols, 5).into_iter().map(bf16::from_f32).collect();
            let in_out = MatRef { data: &ws, offset: 0, shape: (k, cols), strides: (cols, 1) };
            assert_eq!(PackedWeight::new(&in_out).unpack(), ws, "{k} × {cols} [in, out]");
            let transposed: Vec<bf16> = (0..cols * k).map(|i| ws[(i % k) * cols + i / k]).collect();
            let out_in = MatRef { data: &transposed, offset: 0, shape: (k, cols), strides: (1, k) };
            assert_eq!(PackedWeight::new(&out_in).unpack(), ws, "{k} × {cols} [out, in]");
            assert_eq!(PackedWeight::new(&in_out).shape(), (k, cols));
        }
    }

    /// The vector rounding agrees with `half`'s scalar one, ties to even included, on normal
    /// values of every size and sign and on infinities.
    #[test]
    fn rounds_pairs_as_the_scalar_conversion_does() {
        let tie = 1.0 + 2f32.powi(-8); // halfway between two bf16 values: rounds down to even
        let odd_tie = 1.0 + 3.0 * 2f32.powi(-8); // halfway: rounds up to even
        let mut v: [f32; 32] = std::array::from_fn(|i| (i as f32 - 15.3) * 10f32.powi(i as i32 % 9 - 4));
        v[..6].copy_from_slice(&[tie, odd_tie, -tie, f32::INFINITY, f32::NEG_INFINITY, 3.0e38]);
        let want: [u32; 16] = std::array::from_fn(|p| pair(bf16::from_f32(v[2 * p]), bf16::from_f32(v[2 * p + 1])));
        assert_eq!(round_pairs(&v), want);
        assert_eq!(want[0] & 0xffff, bf16::ONE.to_bits() as u32, "the tie rounds to even");
    }

    /// Rounding a row rounds every value, the vector chunks and the scalar tail alike.
    #[test]
    fn rounds_rows_of_any_length() {
        let src = values(70, 3);
        let mut got = vec![bf16::ZERO; 70];
        round_into(&src, &mut got);
        assert_eq!(got, src.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>());
    }

    /// Packing puts each column's pair of consecutive inner entries in one word, low half
    /// first, and zeros past the weight's columns and its odd last row.
    #[test]
    fn packs_weight_pairs_low_half_first() {
        let (k, cols) = (3, 2);
        let ws: Vec<bf16> = (1..=6).map(|v| bf16::from_f32(v as f32)).collect();
        let w = MatRef { data: &ws, offset: 0, shape: (k, cols), strides: (cols, 1) };
        let mut out = vec![u32::MAX; 2 * NR];
        pack_weight_block(&w, (0, 2), (0, cols), &mut out);
        let b = |v: f32| bf16::from_f32(v).to_bits() as u32;
        // Column 0 holds 1, 3, 5; column 1 holds 2, 4, 6.
        assert_eq!(&out[..2], &[b(1.0) | b(3.0) << 16, b(2.0) | b(4.0) << 16]);
        assert_eq!(&out[NR..NR + 2], &[b(5.0), b(6.0)]);
        assert!(out[2..NR].iter().chain(&out[NR + 2..]).all(|&v| v == 0));
    }
}
