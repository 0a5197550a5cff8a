// The two ceilings BENCHMARKS.md measures decoding against, on one and on all cores:
// memory read bandwidth (an AVX-512 streaming sum over 512 MiB) and the f32 multiply-add peak
// (twelve independent AVX-512 FMA chains per thread, enough to cover the FMA latency); on a CPU
// with AVX512-BF16 also the bf16 dot-product peak (the same chains of `vdpbf16ps`, each
// instruction 32 bf16 products summed pairwise into 16 f32 lanes: 64 FLOP).
//
//   gcc -O2 -march=native -fopenmp scripts/machine_peaks.c -o /tmp/machine_peaks
//   OMP_NUM_THREADS=1 /tmp/machine_peaks && OMP_NUM_THREADS=2 /tmp/machine_peaks
//
// Needs AVX-512F (the benchmark machine's); the figures are the best of four runs.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

static double read_bandwidth(const float *a, size_t n) {
    double best = 0;
    for (int rep = 0; rep < 4; rep++) {
        double t = omp_get_wtime();
        float total = 0;
#pragma omp parallel reduction(+ : total)
        {
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
#pragma omp for
            for (size_t i = 0; i < n; i += 64) {
                s0 = _mm512_add_ps(s0, _mm512_load_ps(a + i));
                s1 = _mm512_add_ps(s1, _mm512_load_ps(a + i + 16));
                s2 = _mm512_add_ps(s2, _mm512_load_ps(a + i + 32));
                s3 = _mm512_add_ps(s3, _mm512_load_ps(a + i + 48));
            }
            total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
        }
        double dt = omp_get_wtime() - t;
        if (total != (float)n) fprintf(stderr, "unexpected sum %g\n", total);
        if (n * 4 / dt / 1e9 > best) best = n * 4 / dt / 1e9;
    }
    return best;
}

#define CHAIN(i) a##i = _mm512_fmadd_ps(a##i, x, y)

static double fma_peak(void) {
    double best = 0;
    const long iters = 400000000;
    for (int rep = 0; rep < 4; rep++) {
        double t = omp_get_wtime();
        float total = 0;
#pragma omp parallel reduction(+ : total)
        {
            // Distinct starting values, so that no two chains compute the same thing.
            __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-4f);
            __m512 a0 = _mm512_set1_ps(0.1f), a1 = _mm512_set1_ps(0.2f), a2 = _mm512_set1_ps(0.3f),
                   a3 = _mm512_set1_ps(0.4f), a4 = _mm512_set1_ps(0.5f), a5 = _mm512_set1_ps(0.6f),
                   a6 = _mm512_set1_ps(0.7f), a7 = _mm512_set1_ps(0.8f), a8 = _mm512_set1_ps(0.9f),
                   a9 = _mm512_set1_ps(1.1f), a10 = _mm512_set1_ps(1.2f), a11 = _mm512_set1_ps(1.3f);
            long n = iters / omp_get_num_threads();
            for (long i = 0; i < n; i++) {
                CHAIN(0); CHAIN(1); CHAIN(2); CHAIN(3); CHAIN(4); CHAIN(5);
                CHAIN(6); CHAIN(7); CHAIN(8); CHAIN(9); CHAIN(10); CHAIN(11);
            }
            __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                     _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
            s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
            total += _mm512_reduce_add_ps(s);
        }
        double dt = omp_get_wtime() - t;
        if (total < 0) fprintf(stderr, "unexpected sum %g\n", total);
        double rate = (iters / omp_get_max_threads()) * omp_get_max_threads() * 12.0 * 32 / dt / 1e9;
        if (rate > best) best = rate;
    }
    return best;
}

#ifdef __AVX512BF16__
#define DOT_CHAIN(i) a##i = _mm512_dpbf16_ps(a##i, x, y)

static double bf16_dot_peak(void) {
    double best = 0;
    const long iters = 400000000;
    for (int rep = 0; rep < 4; rep++) {
        double t = omp_get_wtime();
        float total = 0;
#pragma omp parallel reduction(+ : total)
        {
            __m512bh x = (__m512bh)_mm512_set1_epi16(0x3f80), y = (__m512bh)_mm512_set1_epi16(0x3800);  // 1, 2^-15
            __m512 a0 = _mm512_set1_ps(0.1f), a1 = _mm512_set1_ps(0.2f), a2 = _mm512_set1_ps(0.3f),
                   a3 = _mm512_set1_ps(0.4f), a4 = _mm512_set1_ps(0.5f), a5 = _mm512_set1_ps(0.6f),
                   a6 = _mm512_set1_ps(0.7f), a7 = _mm512_set1_ps(0.8f), a8 = _mm512_set1_ps(0.9f),
                   a9 = _mm512_set1_ps(1.1f), a10 = _mm512_set1_ps(1.2f), a11 = _mm512_set1_ps(1.3f);
            long n = iters / omp_get_num_threads();
            for (long i = 0; i < n; i++) {
                DOT_CHAIN(0); DOT_CHAIN(1); DOT_CHAIN(2); DOT_CHAIN(3); DOT_CHAIN(4); DOT_CHAIN(5);
                DOT_CHAIN(6); DOT_CHAIN(7); DOT_CHAIN(8); DOT_CHAIN(9); DOT_CHAIN(10); DOT_CHAIN(11);
            }
            __m512 s = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)),
                                     _mm512_add_ps(_mm512_add_ps(a4, a5), _mm512_add_ps(a6, a7)));
            s = _mm512_add_ps(s, _mm512_add_ps(_mm512_add_ps(a8, a9), _mm512_add_ps(a10, a11)));
            total += _mm512_reduce_add_ps(s);
        }
        double dt = omp_get_wtime() - t;
        if (total < 0) fprintf(stderr, "unexpected sum %g\n", total);
        double rate = (iters / omp_get_max_threads()) * omp_get_max_threads() * 12.0 * 64 / dt / 1e9;
        if (rate > best) best = rate;
    }
    return best;
}
#endif

int main(void) {
    size_t n = (size_t)512 << 20 >> 2;
    float *a = aligned_alloc(64, n * 4);
    for (size_t i = 0; i < n; i++) a[i] = 1.0f;
    printf("%d thread(s): read %.1f GB/s, f32 FMA peak %.1f GFLOP/s\n", omp_get_max_threads(), read_bandwidth(a, n),
           fma_peak());
#ifdef __AVX512BF16__
    printf("%d thread(s): bf16 dot-product peak %.1f GFLOP/s\n", omp_get_max_threads(), bf16_dot_peak());
#endif
    free(a);
    return 0;
}
