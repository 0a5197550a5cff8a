//! One f32 vector register, for kernels whose accumulators must stay in registers (the
//! compiler does not keep arrays of scalar fused multiply-adds there on its own).
//!
//! The width is the build's: AVX-512 (16 lanes) or AVX2 with FMA (8 lanes) when the crate is
//! compiled for a CPU that has them (`.cargo/config.toml` builds for the host), otherwise a
//! plain 8-lane array the compiler vectorises as it can.

/// f32 lanes per vector.
pub const LANES: usize = imp::LANES;

/// A vector of [`LANES`] f32.
pub use imp::F32x;

/// Asks for the cache line holding `p` to be brought into L2 ahead of its use (a hint:
/// never faults).
pub use imp::prefetch;

/// The lane sums of sixteen vectors, `[v[0].sum(), …, v[15].sum()]` (in another order of
/// additions): with AVX-512 one transposing reduction of 45 instructions where sixteen
/// separate reductions take ~140, which the dot-product kernels' 4 × 4 blocks pay once per
/// block of outputs.
pub use imp::lane_sums16;

/// The lane sums of an `R × C` block of accumulators, by one [`lane_sums16`] when the block
/// has sixteen of them.
#[inline(always)]
pub fn block_sums<const R: usize, const C: usize>(acc: [[F32x; C]; R]) -> [[f32; C]; R] {
    if R * C == 16 {
        let sums = lane_sums16(std::array::from_fn(|i| acc[i / C][i % C]));
        std::array::from_fn(|r| std::array::from_fn(|j| sums[r * C + j]))
    } else {
        acc.map(|row| row.map(F32x::sum))
    }
}

/// A bf16 value's f32: its 16 bits are the f32's upper half.
#[inline(always)]
pub fn bf16_to_f32(x: half::bf16) -> f32 {
    f32::from_bits((x.to_bits() as u32) << 16)
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx512f"))]
mod imp {
    use std::arch::x86_64::*;

    pub const LANES: usize = 16;

    /// Sixteen f32 in one AVX-512 register.
    #[derive(Clone, Copy)]
    pub struct F32x(__m512);

    impl F32x {
        /// All lanes zero.
        #[inline(always)]
        pub fn zero() -> Self {
            // SAFETY: the build targets AVX-512 (cfg above).
            Self(unsafe { _mm512_setzero_ps() })
        }

        /// Every lane `x`.
        #[inline(always)]
        pub fn splat(x: f32) -> Self {
            // SAFETY: as above.
            Self(unsafe { _mm512_set1_ps(x) })
        }

        /// The register's sixteen lanes (for kernels that compute with AVX-512 intrinsics
        /// directly, such as the bf16 dot products).
        #[inline(always)]
        pub fn from_m512(v: __m512) -> Self {
            Self(v)
        }

        /// The first [`LANES`] values of `s` (which must hold that many).
        #[inline(always)]
        pub fn load(s: &[f32]) -> Self {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES values; unaligned load.
            Self(unsafe { _mm512_loadu_ps(s.as_ptr()) })
        }

        /// The first [`LANES`] bf16 values of `s` widened to f32 (exact).
        #[inline(always)]
        pub fn load_bf16(s: &[half::bf16]) -> Self {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES 2-byte values (32 bytes); unaligned load. Widening puts
            // each value's bits in the upper half of a lane.
            Self(unsafe {
                let h = _mm256_loadu_si256(s.as_ptr().cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            })
        }

        /// The first [`LANES`] f16 values of `s` widened to f32 (exact; AVX-512F converts).
        #[inline(always)]
        pub fn load_f16(s: &[half::f16]) -> Self {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES 2-byte values (32 bytes); unaligned load.
            Self(unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().cast())) })
        }

        /// `self + a·b`, one rounding.
        #[inline(always)]
        pub fn mul_add(self, a: Self, b: Self) -> Self {
            // SAFETY: as above.
            Self(unsafe { _mm512_fmadd_ps(a.0, b.0, self.0) })
        }

        /// The sum of the lanes.
        #[inline(always)]
        pub fn sum(self) -> f32 {
            // SAFETY: as above.
            unsafe { _mm512_reduce_add_ps(self.0) }
        }

        /// Adds the lanes to the first [`LANES`] values of `s`.
        #[inline(always)]
        pub fn add_to(self, s: &mut [f32]) {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES values; unaligned load and store.
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), _mm512_add_ps(_mm512_loadu_ps(s.as_ptr()), self.0)) }
        }
    }

    /// Asks for the cache line holding `p` (never faults, whatever `p` is).
    #[inline(always)]
    pub fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch is a hint; it neither faults nor reads architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }

    /// See [`super::lane_sums16`]. Four rounds each halve the vectors and their lanes: each
    /// adds the two halves of a pair of vectors side by side (128-bit blocks, then pairs and
    /// single lanes within blocks). Taken in the order `a[m] = v[(m % 4)·4 + m / 4]`, the
    /// last round leaves lane `i` holding `v[i]`'s sum.
    #[inline(always)]
    pub fn lane_sums16(v: [F32x; 16]) -> [f32; 16] {
        let a: [__m512; 16] = std::array::from_fn(|m| v[(m % 4) * 4 + m / 4].0);
        // SAFETY: the build targets AVX-512 (cfg above).
        unsafe {
            // Blocks 0, 1 of x and y + blocks 2, 3 of x and y: x's lanes folded to 8, then y's.
            let c: [__m512; 8] = std::array::from_fn(|i| {
                let (x, y) = (a[2 * i], a[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xee>(x, y))
            });
            // Blocks 0, 2 + blocks 1, 3: each block now holds 4 partial sums of one vector.
            let e: [__m512; 4] = std::array::from_fn(|i| {
                let (x, y) = (c[2 * i], c[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xdd>(x, y))
            });
            // Within each block, lanes 0, 1 + lanes 2, 3: 2 partial sums of x's, then y's.
            let g: [__m512; 2] = std::array::from_fn(|i| {
                let (x, y) = (e[2 * i], e[2 * i + 1]);
                _mm512_add_ps(_mm512_shuffle_ps::<0x44>(x, y), _mm512_shuffle_ps::<0xee>(x, y))
            });
            // Even + odd lanes: block b's lane t is a[4t + b]'s sum, which is v[4b + t]'s.
            let sums = _mm512_add_ps(_mm512_shuffle_ps::<0x88>(g[0], g[1]), _mm512_shuffle_ps::<0xdd>(g[0], g[1]));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), sums);
            out
        }
    }
}

#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma", not(target_feature = "avx512f")))]
mod imp {
    use std::arch::x86_64::*;

    pub const LANES: usize = 8;

    /// Eight f32 in one AVX register.
    #[derive(Clone, Copy)]
    pub struct F32x(__m256);

    impl F32x {
        /// All lanes zero.
        #[inline(always)]
        pub fn zero() -> Self {
            // SAFETY: the build targets AVX2 and FMA (cfg above).
            Self(unsafe { _mm256_setzero_ps() })
        }

        /// Every lane `x`.
        #[inline(always)]
        pub fn splat(x: f32) -> Self {
            // SAFETY: as above.
            Self(unsafe { _mm256_set1_ps(x) })
        }

        /// The first [`LANES`] values of `s` (which must hold that many).
        #[inline(always)]
        pub fn load(s: &[f32]) -> Self {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES values; unaligned load.
            Self(unsafe { _mm256_loadu_ps(s.as_ptr()) })
        }

        /// The first [`LANES`] bf16 values of `s` widened to f32 (exact).
        #[inline(always)]
        pub fn load_bf16(s: &[half::bf16]) -> Self {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES 2-byte values (16 bytes); unaligned load. Widening puts
            // each value's bits in the upper half of a lane.
            Self(unsafe {
                let h = _mm_loadu_si128(s.as_ptr().cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            })
        }

        /// The first [`LANES`] f16 values of `s` widened to f32 (exact).
        #[inline(always)]
        pub fn load_f16(s: &[half::f16]) -> Self {
            assert!(s.len() >= LANES);
            #[cfg(target_feature = "f16c")]
            // SAFETY: `s` holds LANES 2-byte values (16 bytes); unaligned load; F16C converts.
            return Self(unsafe { _mm256_cvtph_ps(_mm_loadu_si128(s.as_ptr().cast())) });
            #[cfg(not(target_feature = "f16c"))]
            Self::load(&std::array::from_fn::<f32, LANES, _>(|i| s[i].to_f32()))
        }

        /// `self + a·b`, one rounding.
        #[inline(always)]
        pub fn mul_add(self, a: Self, b: Self) -> Self {
            // SAFETY: as above.
            Self(unsafe { _mm256_fmadd_ps(a.0, b.0, self.0) })
        }

        /// The sum of the lanes.
        #[inline(always)]
        pub fn sum(self) -> f32 {
            // SAFETY: as above.
            unsafe {
                let h = _mm_add_ps(_mm256_castps256_ps128(self.0), _mm256_extractf128_ps(self.0, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
            }
        }

        /// Adds the lanes to the first [`LANES`] values of `s`.
        #[inline(always)]
        pub fn add_to(self, s: &mut [f32]) {
            assert!(s.len() >= LANES);
            // SAFETY: `s` holds LANES values; unaligned load and store.
            unsafe { _mm256_storeu_ps(s.as_mut_ptr(), _mm256_add_ps(_mm256_loadu_ps(s.as_ptr()), self.0)) }
        }
    }

    /// Asks for the cache line holding `p` (never faults, whatever `p` is).
    #[inline(always)]
    pub fn prefetch<T>(p: *const T) {
        // SAFETY: a prefetch is a hint; it neither faults nor reads architecturally.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }

    /// See [`super::lane_sums16`].
    #[inline(always)]
    pub fn lane_sums16(v: [F32x; 16]) -> [f32; 16] {
        v.map(F32x::sum)
    }
}

#[cfg(not(any(
    all(target_arch = "x86_64", target_feature = "avx512f"),
    all(target_arch = "x86_64", target_feature = "avx2", target_feature = "fma")
)))]
mod imp {
    pub const LANES: usize = 8;

    /// Eight f32 (no vector extension assumed).
    #[derive(Clone, Copy)]
    pub struct F32x([f32; LANES]);

    impl F32x {
        /// All lanes zero.
        #[inline(always)]
        pub fn zero() -> Self {
            Self([0.0; LANES])
        }

        /// Every lane `x`.
        #[inline(always)]
        pub fn splat(x: f32) -> Self {
            Self([x; LANES])
        }

        /// The first `LANES` values of `s` (which must hold that many).
        #[inline(always)]
        pub fn load(s: &[f32]) -> Self {
            Self(s[..LANES].try_into().expect("LANES values"))
        }

        /// The first `LANES` bf16 values of `s` widened to f32 (exact).
        #[inline(always)]
        pub fn load_bf16(s: &[half::bf16]) -> Self {
            Self(std::array::from_fn(|i| super::bf16_to_f32(s[i])))
        }

        /// The first `LANES` f16 values of `s` widened to f32 (exact).
        #[inline(always)]
        pub fn load_f16(s: &[half::f16]) -> Self {
            Self(std::array::from_fn(|i| s[i].to_f32()))
        }

        /// `self + a·b` (two roundings: `mul_add` without the instruction is a library call).
        #[inline(always)]
        pub fn mul_add(self, a: Self, b: Self) -> Self {
            Self(std::array::from_fn(|i| self.0[i] + a.0[i] * b.0[i]))
        }

        /// The sum of the lanes.
        #[inline(always)]
        pub fn sum(self) -> f32 {
            self.0.iter().sum()
        }

        /// Adds the lanes to the first `LANES` values of `s`.
        #[inline(always)]
        pub fn add_to(self, s: &mut [f32]) {
            for (d, v) in s[..LANES].iter_mut().zip(self.0) {
                *d += v;
            }
        }
    }

    /// A cache hint where the build has none: nothing.
    #[inline(always)]
    pub fn prefetch<T>(_: *const T) {}

    /// See [`super::lane_sums16`].
    #[inline(always)]
    pub fn lane_sums16(v: [F32x; 16]) -> [f32; 16] {
        v.map(F32x::sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_operations_match_scalar_arithmetic() {
        let a: Vec<f32> = (0..LANES).map(|i| i as f32 * 0.5 - 1.0).collect();
        let b: Vec<f32> = (0..LANES).map(|i| 3.0 - i as f32).collect();
        let v = F32x::splat(2.0).mul_add(F32x::load(&a), F32x::load(&b));
        let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| 2.0 + x * y).collect();
        let mut got = vec![0.0; LANES];
        v.add_to(&mut got);
        assert_eq!(got, want);
        assert_eq!(v.sum(), want.iter().sum::<f32>());
        assert_eq!(F32x::zero().sum(), 0.0);
    }

    /// Lane sums of sixteen vectors come back in their order, whatever the lane count;
    /// integer values, so that any order of additions is exact.
    #[test]
    fn sixteen_lane_sums_come_back_in_order() {
        let vectors: Vec<Vec<f32>> = (0..16)
            .map(|v| (0..LANES).map(|l| ((v * 37 + l * 11) % 29) as f32 - 14.0 + v as f32 * 64.0).collect())
            .collect();
        let got = lane_sums16(std::array::from_fn(|v| F32x::load(&vectors[v])));
        let want: Vec<f32> = vectors.iter().map(|v| v.iter().sum()).collect();
        assert_eq!(got.to_vec(), want);
        // And through the block form, for a 4 × 4 block and one that is not sixteen.
        let block: [[F32x; 4]; 4] = std::array::from_fn(|r| std::array::from_fn(|j| F32x::load(&vectors[r * 4 + j])));
        let sums = block_sums(block);
        assert_eq!(sums.iter().flatten().copied().collect::<Vec<_>>(), want);
        let block: [[F32x; 3]; 2] = std::array::from_fn(|r| std::array::from_fn(|j| F32x::load(&vectors[r * 3 + j])));
        assert_eq!(block_sums(block).iter().flatten().copied().collect::<Vec<_>>(), want[..6].to_vec());
    }

    #[test]
    fn bf16_loads_widen_exactly() {
        let v: Vec<half::bf16> = (0..LANES).map(|i| half::bf16::from_f32(i as f32 * -1.375 + 0.0078125)).collect();
        let mut got = vec![0.0; LANES];
        F32x::load_bf16(&v).add_to(&mut got);
        let want: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got, want);
        assert_eq!(bf16_to_f32(half::bf16::from_f32(-3.5)), -3.5);
    }

    #[test]
    fn f16_loads_widen_exactly() {
        // Normal, subnormal (6e-8 is below f16's smallest normal) and large values.
        let v: Vec<half::f16> =
            (0..LANES).map(|i| half::f16::from_f32(i as f32 * -1.375 + 6e-8 + (i % 3) as f32 * 4000.0)).collect();
        let mut got = vec![0.0; LANES];
        F32x::load_f16(&v).add_to(&mut got);
        let want: Vec<f32> = v.iter().map(|x| x.to_f32()).collect();
        assert_eq!(got, want);
    }
}
