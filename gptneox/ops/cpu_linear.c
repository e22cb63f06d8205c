/* fp32 y[M, N] = x[M, K] W[N, K]^T + bias[N] for a few rows of x: a decode step, a batched decode step of several
 * requests, a speculative verify. Built and loaded by cpu_linear.py (the compiler on the user's machine, ctypes).
 *
 * A few rows cost what reading W costs, if each weight is loaded once per call and used for every row of x there:
 * the loop keeps MB rows of x against NR = 2 rows of W in registers (MB x NR sums), so per 16 columns it loads
 * 2 weight vectors and MB x vectors for 2 MB FMAs. One or two rows of x get two sums per pair as well, so that
 * enough independent FMAs are in flight to hide their latency. OpenMP splits W's rows; it is the libgomp torch
 * already loaded, so one thread pool. Sums are per lane and added pairwise at the end, as torch's kernels do.
 */
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#ifdef __AVX512VNNI__
#define ISA 3                         /* the avx512vnni build: the same code here */
#else
#define ISA 2
#endif
#define MB 8                          /* 8 x 2 sums (x 2 for short M) + 3 operands fit 32 zmm */
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 1
#define MB 4                          /* 4 x 2 sums + 3 operands fit 16 ymm */
#else
#define ISA 0
#define MB 4
#endif
#if ISA
#include <immintrin.h>
#endif
#define NB 16                         /* W rows per OpenMP work item (even: pairs) */
#define LANES 8

int gptneox_isa(void) { return ISA; }

#if ISA == 1
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* o0[m] = x[m] . w0, o1[m] = x[m] . w1 for mb <= MB rows of x (row stride K); mb is a constant at every call site. */
static inline __attribute__((always_inline))
void dot2(const float *x, int64_t K, const int mb, const float *w0, const float *w1, float *o0, float *o1) {
    int64_t k = 0;
#if ISA >= 2
    const int U = mb <= 2 ? 2 : 1;
    __m512 a[MB][2][2];
    for (int m = 0; m < mb; m++)
        for (int u = 0; u < U; u++) a[m][0][u] = a[m][1][u] = _mm512_setzero_ps();
    for (; k + 16 * U <= K; k += 16 * U)
        for (int u = 0; u < U; u++) {
            const __m512 p = _mm512_loadu_ps(w0 + k + 16 * u), q = _mm512_loadu_ps(w1 + k + 16 * u);
            for (int m = 0; m < mb; m++) {
                const __m512 xv = _mm512_loadu_ps(x + m * K + k + 16 * u);
                a[m][0][u] = _mm512_fmadd_ps(p, xv, a[m][0][u]);
                a[m][1][u] = _mm512_fmadd_ps(q, xv, a[m][1][u]);
            }
        }
    for (; k < K; k += 16) {  /* the last columns, masked (at most one whole vector when U = 2) */
        const __mmask16 t = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 p = _mm512_maskz_loadu_ps(t, w0 + k), q = _mm512_maskz_loadu_ps(t, w1 + k);
        for (int m = 0; m < mb; m++) {
            const __m512 xv = _mm512_maskz_loadu_ps(t, x + m * K + k);
            a[m][0][0] = _mm512_fmadd_ps(p, xv, a[m][0][0]);
            a[m][1][0] = _mm512_fmadd_ps(q, xv, a[m][1][0]);
        }
    }
    for (int m = 0; m < mb; m++) {
        if (U == 2) a[m][0][0] = _mm512_add_ps(a[m][0][0], a[m][0][1]), a[m][1][0] = _mm512_add_ps(a[m][1][0], a[m][1][1]);
        o0[m] = _mm512_reduce_add_ps(a[m][0][0]);
        o1[m] = _mm512_reduce_add_ps(a[m][1][0]);
    }
#else
    float p0[MB][LANES] = {{0}}, p1[MB][LANES] = {{0}};
#if ISA == 1
    __m256 a[MB][2];
    for (int m = 0; m < mb; m++) a[m][0] = a[m][1] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
        const __m256 p = _mm256_loadu_ps(w0 + k), q = _mm256_loadu_ps(w1 + k);
        for (int m = 0; m < mb; m++) {
            const __m256 xv = _mm256_loadu_ps(x + m * K + k);
            a[m][0] = _mm256_fmadd_ps(p, xv, a[m][0]);
            a[m][1] = _mm256_fmadd_ps(q, xv, a[m][1]);
        }
    }
    for (int m = 0; m < mb; m++) _mm256_storeu_ps(p0[m], a[m][0]), _mm256_storeu_ps(p1[m], a[m][1]);
#endif
    for (; k < K; k++)
        for (int m = 0; m < mb; m++) p0[m][k % LANES] += x[m * K + k] * w0[k], p1[m][k % LANES] += x[m * K + k] * w1[k];
    for (int m = 0; m < mb; m++) {
        o0[m] = ((p0[m][0] + p0[m][1]) + (p0[m][2] + p0[m][3])) + ((p0[m][4] + p0[m][5]) + (p0[m][6] + p0[m][7]));
        o1[m] = ((p1[m][0] + p1[m][1]) + (p1[m][2] + p1[m][3])) + ((p1[m][4] + p1[m][5]) + (p1[m][6] + p1[m][7]));
    }
#endif
}

#if ISA >= 2
/* One row of x (a decode step): one weight row at a time in four sums over 64 columns, the plainest stream. Measured
 * on the 2-core machine: about 30 GB/s at one thread where dot2's pairs read 21 (docs/benchmarks.md). */
static float dot1(const float *x, int64_t K, const float *w) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 32), _mm512_loadu_ps(x + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 48), _mm512_loadu_ps(x + k + 48), a3);
    }
    for (; k < K; k += 16) {
        const __mmask16 t = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, w + k), _mm512_maskz_loadu_ps(t, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif

/* y [M, N] = x [M, K] W^T + bias (bias [N] or NULL); x, W, y contiguous fp32. */
void gptneox_f32_linear(const float *x, int64_t M, int64_t K, const float *w, const float *bias, float *y, int64_t N,
                        int nthreads) {
#if ISA >= 2
    if (M == 1) {
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int64_t n = 0; n < N; n++) y[n] = dot1(x, K, w + n * K) + (bias ? bias[n] : 0.0f);
        return;
    }
#endif
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n0 = 0; n0 < N; n0 += NB)
        for (int64_t n = n0; n < n0 + NB && n < N; n += 2) {
            const int two = n + 1 < N;  /* a lone last row is computed twice and stored once */
            const float *w0 = w + n * K, *w1 = two ? w0 + K : w0;
            const float b0 = bias ? bias[n] : 0.0f, b1 = bias && two ? bias[n + 1] : 0.0f;
            for (int64_t m0 = 0; m0 < M; m0 += MB) {
                const int64_t mb = M - m0 < MB ? M - m0 : MB;
                const float *xm = x + m0 * K;
                float o0[MB], o1[MB];
                switch (mb) {  /* constant mb: the m loops unroll and the sums stay in registers */
                    case 1: dot2(xm, K, 1, w0, w1, o0, o1); break;
                    case 2: dot2(xm, K, 2, w0, w1, o0, o1); break;
                    case 3: dot2(xm, K, 3, w0, w1, o0, o1); break;
#if MB == 8
                    case 4: dot2(xm, K, 4, w0, w1, o0, o1); break;
                    case 5: dot2(xm, K, 5, w0, w1, o0, o1); break;
                    case 6: dot2(xm, K, 6, w0, w1, o0, o1); break;
                    case 7: dot2(xm, K, 7, w0, w1, o0, o1); break;
#endif
                    default: dot2(xm, K, MB, w0, w1, o0, o1); break;
                }
                for (int64_t m = 0; m < mb; m++) {
                    y[(m0 + m) * N + n] = o0[m] + b0;
                    if (two) y[(m0 + m) * N + n + 1] = o1[m] + b1;
                }
            }
        }
}
