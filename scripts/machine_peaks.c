// The two ceilings BENCHMARKS.md measures decoding against, on one and on all cores:
// memory read bandwidth (a streaming sum over 512 MiB) and the f32 multiply-add peak (twelve
// independent FMA chains per thread, enough to cover the FMA latency), both in the widest
// vectors the CPU has (AVX-512, else AVX2 with FMA); on a CPU
// with AVX512-BF16 also the bf16 dot-product peak (the same chains of `vdpbf16ps`, each
// instruction 32 bf16 products summed pairwise into 16 f32 lanes: 64 FLOP).
//
//   gcc -O2 -march=native -fopenmp scripts/machine_peaks.c -o /tmp/machine_peaks
//   OMP_NUM_THREADS=1 /tmp/machine_peaks && OMP_NUM_THREADS=2 /tmp/machine_peaks
//
// Needs AVX-512F, or AVX2 and FMA; the figures are the best of four runs.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef __AVX512F__
typedef __m512 vec;
#define LANES 16
#define VEC_NAME "AVX-512"
#define set1 _mm512_set1_ps
#define add _mm512_add_ps
#define load _mm512_load_ps
#define fmadd _mm512_fmadd_ps
#define reduce_add _mm512_reduce_add_ps
#else
typedef __m256 vec;
#define LANES 8
#define VEC_NAME "AVX2"
#define set1 _mm256_set1_ps
#define add _mm256_add_ps
#define load _mm256_load_ps
#define fmadd _mm256_fmadd_ps
static inline float reduce_add(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

static double read_bandwidth(const float *a, size_t n) {
    double best = 0;
    for (int rep = 0; rep < 4; rep++) {
        double t = omp_get_wtime();
        float total = 0;
#pragma omp parallel reduction(+ : total)
        {
            vec s0 = set1(0), s1 = s0, s2 = s0, s3 = s0;
#pragma omp for
            for (size_t i = 0; i < n; i += 4 * LANES) {
                s0 = add(s0, load(a + i));
                s1 = add(s1, load(a + i + LANES));
                s2 = add(s2, load(a + i + 2 * LANES));
                s3 = add(s3, load(a + i + 3 * LANES));
            }
            total += reduce_add(add(add(s0, s1), add(s2, s3)));
        }
        double dt = omp_get_wtime() - t;
        if (total != (float)n) fprintf(stderr, "unexpected sum %g\n", total);
        if (n * 4 / dt / 1e9 > best) best = n * 4 / dt / 1e9;
    }
    return best;
}

// The best of four timings of twelve independent chains `a_i = OP(a_i, x, y)` per thread,
// in GFLOP/s for FLOPS per instruction; ACC is the chains' type, X and Y the operands' type
// and values.
#define CHAINS_PEAK(OP, ACC, SET1, REDUCE, XY_TYPE, X, Y, FLOPS)                                                  \
    double best = 0;                                                                            \
    const long iters = 400000000;                                                               \
    for (int rep = 0; rep < 4; rep++) {                                                         \
        double t = omp_get_wtime();                                                             \
        float total = 0;                                                                        \
        _Pragma("omp parallel reduction(+ : total)") {                                          \
            XY_TYPE x = X, y = Y;                                                               \
            /* Distinct starting values, so that no two chains compute the same thing. */       \
            ACC a[12];                                                                          \
            for (int c = 0; c < 12; c++) a[c] = SET1(0.1f * (c + 1));                           \
            long n = iters / omp_get_num_threads();                                             \
            for (long i = 0; i < n; i++) {                                                      \
                a[0] = OP(a[0], x, y); a[1] = OP(a[1], x, y); a[2] = OP(a[2], x, y);            \
                a[3] = OP(a[3], x, y); a[4] = OP(a[4], x, y); a[5] = OP(a[5], x, y);            \
                a[6] = OP(a[6], x, y); a[7] = OP(a[7], x, y); a[8] = OP(a[8], x, y);            \
                a[9] = OP(a[9], x, y); a[10] = OP(a[10], x, y); a[11] = OP(a[11], x, y);        \
            }                                                                                   \
            float s = 0;                                                                        \
            for (int c = 0; c < 12; c++) s += REDUCE(a[c]);                                     \
            total += s;                                                                         \
        }                                                                                       \
        double dt = omp_get_wtime() - t;                                                        \
        if (total < 0) fprintf(stderr, "unexpected sum %g\n", total);                           \
        double rate = (iters / omp_get_max_threads()) * omp_get_max_threads() * 12.0 * (FLOPS) / dt / 1e9; \
        if (rate > best) best = rate;                                                           \
    }                                                                                           \
    return best;

static inline vec fma_op(vec a, vec x, vec y) { return fmadd(a, x, y); }

static double fma_peak(void) { CHAINS_PEAK(fma_op, vec, set1, reduce_add, vec, set1(0.999f), set1(1e-4f), 2 * LANES) }

#ifdef __AVX512BF16__
static inline __m512 dot_op(__m512 a, __m512bh x, __m512bh y) { return _mm512_dpbf16_ps(a, x, y); }

// x = 1, y = 2^-15 in every bf16 lane; each instruction is 32 multiply-adds.
static double bf16_dot_peak(void) {
    CHAINS_PEAK(dot_op, __m512, _mm512_set1_ps, _mm512_reduce_add_ps, __m512bh, (__m512bh)_mm512_set1_epi16(0x3f80), (__m512bh)_mm512_set1_epi16(0x3800), 64)
}
#endif

int main(void) {
    size_t n = (size_t)512 << 20 >> 2;
    float *a = aligned_alloc(64, n * 4);
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    printf("%d thread(s), %s: read %.1f GB/s, f32 FMA peak %.1f GFLOP/s\n", omp_get_max_threads(), VEC_NAME,
           read_bandwidth(a, n), fma_peak());
#ifdef __AVX512BF16__
    printf("%d thread(s): bf16 dot-product peak %.1f GFLOP/s\n", omp_get_max_threads(), bf16_dot_peak());
#endif
    free(a);
    return 0;
}
