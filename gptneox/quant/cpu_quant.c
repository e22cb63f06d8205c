/* Weight-only int8 / int4 matrix products on CPU: y[M, N] = x[M, K] W^T, with W in the layout of schemes.py.
 *
 * Decoding reads every weight once per token, so on a CPU it runs at memory bandwidth: this reads the quantized
 * bytes once per call and converts them in registers (never a float copy of W). Built and loaded by
 * cpu.py (the compiler on the user's machine, ctypes), in the variant ops/native.py picks: AVX-512 (with VNNI for
 * the a8 kernels at the end), AVX2 + FMA, or plain C. OpenMP splits the output rows; it is the libgomp torch
 * already loaded, so one thread pool.
 *
 *   int8  w[n, k] = q[n, k] * s[n]                                   q int8 [N, K], s [N]
 *   int4  w[n, k] = (q[n, k] - 8) * s[n, j] + z[n, j],  j = k / g     q two per byte [N, ceil(K/2)], even k low nibble
 *
 * int4 as sums per group j:  y[n] = sum_j s[n, j] * sum_{k in j} (q - 8) x[k]  +  sum_j z[n, j] * xsum[j]. Keeping
 * q - 8 (not q, with z - 8 s folded into the second sum) costs one subtraction per 8 weights (about 6% here) and
 * keeps the error within 2x of torch's own fp32 matmul: summing q x first cancels terms of 8 s xsum against it.
 * Widening 8 bytes (AVX-512: 16) to 32-bit lanes gives the even columns of a 16-column (32-column) block (low
 * nibbles: & 15) and its odd ones (high nibbles: >> 4); instead of interleaving the weights, x is permuted once per
 * call into that order (xp).
 * Scales and zeros are read in their stored dtype (fp32, bf16, fp16); x and y are fp32, rows contiguous.
 * Every loop over m handles up to MB rows of x at once, so each weight is converted once per MB rows.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ISA 3                         /* AVX-512 and VNNI's byte dot products (the a8 kernels below) */
#elif defined(__AVX512F__) && defined(__AVX512BW__)
#define ISA 2                         /* AVX-512: 16 fp32 lanes, 32 registers */
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 1                         /* AVX2 + FMA: 8 fp32 lanes, 16 registers */
#else
#define ISA 0                         /* plain C */
#endif
#if ISA
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2 };  /* codes of the scales' dtype, as cpu.py passes them */
#define MB 8                          /* rows of x per weight pass: 8 accumulators + 4 weights fit 16 ymm */
#define NB 8                          /* output rows per OpenMP work item */
#if ISA >= 2
#define BLK 32                        /* int4: columns per nibble block (16 bytes widen to one zmm of 16 lanes) */
#else
#define BLK 16                        /* int4: 8 bytes widen to one ymm of 8 lanes */
#endif

/* Which instruction set this build was compiled for (cpu.py checks it against the variant it asked for). */
int gptneox_isa(void) { return ISA; }

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0x1f) {
        u = sign | 0x7f800000u | (man << 13);                       /* inf, nan */
    } else if (exp) {
        u = sign | ((exp + 112) << 23) | (man << 13);               /* normal: rebias 15 -> 127 */
    } else if (man) {                                               /* subnormal: normalise */
        int e = -1;
        do { man <<= 1; e++; } while (!(man & 0x400));
        u = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ff) << 13);
    } else {
        u = sign;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float load_scalar(const void *p, int64_t i, int dtype) {
    if (dtype == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == F16) return half_to_float(h);
    uint32_t u = (uint32_t)h << 16;                                 /* bf16 is fp32's top half */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Plain C sums go into LANES partial sums, added pairwise at the end, as a vector register's lanes are: a single
 * running sum over thousands of columns would be an order of magnitude less exact than torch's matmul. */
#define LANES 8
static inline float lanes_sum(const float *p) {
    return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

#if ISA == 1
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* sum_j a[j] b[j] over n floats, in vector lanes (int4's zeros against x's group sums: K / 32 of them per row at
 * g = 32, as many multiply-adds as a fifth of the row's own work if done one at a time). */
static inline float dotf(const float *a, const float *b, int64_t n) {
    int64_t j = 0;
    float out = 0.0f;
#if ISA >= 2
    __m512 acc = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
    if (j < n) {
        const __mmask16 t = (__mmask16)((1u << (n - j)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(t, a + j), _mm512_maskz_loadu_ps(t, b + j), acc);
        j = n;
    }
    out = _mm512_reduce_add_ps(acc);
#endif
    float part[LANES] = {0};
    for (; j < n; j++) part[j % LANES] += a[j] * b[j];
    return out + lanes_sum(part);
}

/* Accumulators per row of x: an FMA's result waits ~4 cycles, so one or two rows need four independent sums to
 * keep the FMA units busy; more rows need fewer each (MB x 4 would not fit the 16 registers of AVX2). */
#define NACC(mb) ((mb) <= 2 ? 4 : (mb) <= 4 ? 2 : 1)  /* and five to eight rows one each */

/* out[m] = sum_k x[m, k] q[k] for mb <= MB rows of x (row stride K); mb is a constant at every call site. */
static inline __attribute__((always_inline))
void int8_dot(const float *x, int64_t K, const int mb, const int8_t *q, float *out) {
    int64_t k = 0;
    for (int m = 0; m < mb; m++) out[m] = 0.0f;
#if ISA >= 2
    __m512 acc[MB][4];
    for (int m = 0; m < mb; m++)
        for (int i = 0; i < NACC(mb); i++) acc[m][i] = _mm512_setzero_ps();
    for (; k + 64 <= K; k += 64) {
        __m512 w[4];                                                               /* 64 int8 weights */
        for (int i = 0; i < 4; i++)  /* a widening load each (vpmovsxbd from memory) */
            w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k + 16 * i))));
        for (int m = 0; m < mb; m++)
            for (int i = 0; i < 4; i++)
                acc[m][i % NACC(mb)] = _mm512_fmadd_ps(w[i], _mm512_loadu_ps(x + m * K + k + 16 * i),
                                                       acc[m][i % NACC(mb)]);
    }
    for (; k + 16 <= K; k += 16) {
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + k))));
        for (int m = 0; m < mb; m++) acc[m][0] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < mb; m++) {
        for (int i = 1; i < NACC(mb); i++) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][i]);
        out[m] = _mm512_reduce_add_ps(acc[m][0]);
    }
#elif ISA == 1
    __m256 acc[MB][4];
    for (int m = 0; m < mb; m++)
        for (int i = 0; i < NACC(mb); i++) acc[m][i] = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m256 w[4];                                                               /* 32 int8 weights */
        for (int i = 0; i < 4; i++)  /* a widening load each (vpmovsxbd from memory): no shuffles */
            w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k + 8 * i))));
        for (int m = 0; m < mb; m++)
            for (int i = 0; i < 4; i++)
                acc[m][i % NACC(mb)] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + m * K + k + 8 * i),
                                                       acc[m][i % NACC(mb)]);
    }
    for (; k + 8 <= K; k += 8) {
        __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k))));
        for (int m = 0; m < mb; m++) acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
    }
    for (int m = 0; m < mb; m++) {
        for (int i = 1; i < NACC(mb); i++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][i]);
        out[m] = hsum(acc[m][0]);
    }
#endif
    if (k == K) return;  /* no tail: skip zeroing its partial sums (a row of 768 int8 weights takes ~40 ns) */
    float part[MB][LANES] = {{0}};
    for (; k < K; k++)
        for (int m = 0; m < mb; m++) part[m][k % LANES] += x[m * K + k] * (float)q[k];
    for (int m = 0; m < mb; m++) out[m] += lanes_sum(part[m]);
}

static void int8_rows(const float *x, int64_t M, int64_t K, const int8_t *q, const void *scales, const void *bias,
                      int sdtype, int64_t n, float *y, int64_t N) {
    float s = load_scalar(scales, n, sdtype), b = bias ? load_scalar(bias, n, sdtype) : 0.0f, out[MB];
    const int8_t *row = q + n * K;
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int64_t mb = M - m0 < MB ? M - m0 : MB;
        const float *xm = x + m0 * K;
        switch (mb) {  /* constant mb: the m loops unroll and the accumulators stay in registers */
            case 1: int8_dot(xm, K, 1, row, out); break;
            case 2: int8_dot(xm, K, 2, row, out); break;
            case 3: int8_dot(xm, K, 3, row, out); break;
            case 4: int8_dot(xm, K, 4, row, out); break;
            case 5: int8_dot(xm, K, 5, row, out); break;
            case 6: int8_dot(xm, K, 6, row, out); break;
            case 7: int8_dot(xm, K, 7, row, out); break;
            default: int8_dot(xm, K, 8, row, out); break;
        }
        for (int64_t m = 0; m < mb; m++) y[(m0 + m) * N + n] = out[m] * s + b;
    }
}

/* y [M, N] = x [M, K] (q [N, K] * scales [N])^T + bias [N] (bias may be NULL; it has the scales' dtype) */
void gptneox_int8_matmul(const float *x, int64_t M, int64_t K, const int8_t *q, const void *scales,
                         const void *bias, int sdtype, float *y, int64_t N, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n0 = 0; n0 < N; n0 += NB)
        for (int64_t n = n0; n < n0 + NB && n < N; n++) int8_rows(x, M, K, q, scales, bias, sdtype, n, y, N);
}

#define GMAX 1024  /* groups per row handled (K <= 32768 at g = 32); cpu.py checks it */

/* int4, whole groups: out[m] = sum_j s[j] * sum_{k in group j} (q[k] - 8) xp[m, k] over groups 0 .. ngroups - 1,
 * each of g columns (a multiple of 32). The hot loop: two widening loads, four masks / shifts, four subtractions,
 * four converts, four FMAs per 32 weights; one scale FMA per group. */
static inline __attribute__((always_inline))
void int4_groups(const float *xp, int64_t K, const int mb, const uint8_t *q, int64_t ngroups, int64_t g,
                 const float *s, float *out) {
#if ISA >= 2
    /* 16 bytes widen to 16 lanes: their low nibbles are a 32-column block's 16 even columns, their high ones its odd
     * columns. Each group's 16 possible weights (q - 8) s[j] form a table, and vpermps looks every nibble up in it
     * (it reads an index's low 4 bits, so the low nibble needs no mask): the weight arrives scaled, rounded as
     * dequantize_weight rounds it, and the sums run on across groups with no reduction per group (which cost as
     * much as the products at g = 32). Per 32 weights: a widening load, a shift, two lookups, two FMAs per row of x;
     * blocks go in pairs (two groups of 32, or two blocks of one larger group), so that one or two rows of x keep
     * four sums in flight. */
    const __m512 iota = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    __m512 acc[MB][4];
    for (int m = 0; m < mb; m++)
        for (int i = 0; i < NACC(mb); i++) acc[m][i] = _mm512_setzero_ps();
#define INT4_BLOCK(k, table, i0, i1) do {                                                                         \
        const __m512i b_ = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + (k) / 2)));                   \
        const __m512 w0_ = _mm512_permutexvar_ps(b_, table);                                                        \
        const __m512 w1_ = _mm512_permutexvar_ps(_mm512_srli_epi32(b_, 4), table);                                 \
        for (int m = 0; m < mb; m++) {                                                                              \
            acc[m][(i0) % NACC(mb)] = _mm512_fmadd_ps(w0_, _mm512_loadu_ps(xp + m * K + (k)),                        \
                                                      acc[m][(i0) % NACC(mb)]);                                    \
            acc[m][(i1) % NACC(mb)] = _mm512_fmadd_ps(w1_, _mm512_loadu_ps(xp + m * K + (k) + 16),                   \
                                                      acc[m][(i1) % NACC(mb)]);                                    \
        }                                                                                                           \
    } while (0)
    int64_t j = 0;
    if (g == 32) {  /* a block per group: two groups at a time */
        for (; j + 2 <= ngroups; j += 2) {
            const __m512 t0 = _mm512_mul_ps(iota, _mm512_set1_ps(s[j]));
            const __m512 t1 = _mm512_mul_ps(iota, _mm512_set1_ps(s[j + 1]));
            INT4_BLOCK(j * 32, t0, 0, 1);
            INT4_BLOCK(j * 32 + 32, t1, 2, 3);
        }
    }
    for (; j < ngroups; j++) {  /* g a multiple of 64 (or the last group of 32): two blocks at a time */
        const __m512 t = _mm512_mul_ps(iota, _mm512_set1_ps(s[j]));
        int64_t k = j * g;
        for (; k + 64 <= (j + 1) * g; k += 64) {
            INT4_BLOCK(k, t, 0, 1);
            INT4_BLOCK(k + 32, t, 2, 3);
        }
        if (k < (j + 1) * g) INT4_BLOCK(k, t, 0, 1);
    }
#undef INT4_BLOCK
    for (int m = 0; m < mb; m++) {
        for (int i = 1; i < NACC(mb); i++) acc[m][0] = _mm512_add_ps(acc[m][0], acc[m][i]);
        out[m] = _mm512_reduce_add_ps(acc[m][0]);
    }
#elif ISA == 1
    const __m256i low = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    __m256 tot[MB];
    for (int m = 0; m < mb; m++) tot[m] = _mm256_setzero_ps();
    for (int64_t j = 0; j < ngroups; j++) {
        __m256 acc[MB][4];
        for (int m = 0; m < mb; m++)
            for (int i = 0; i < NACC(mb); i++) acc[m][i] = _mm256_setzero_ps();
        for (int64_t k = j * g; k < (j + 1) * g; k += 32) {
            __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k / 2)));      /* k .. k+15 */
            __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + k / 2 + 8)));  /* .. k+31 */
            __m256 w[4] = {_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b0, low), eight)),  /* q - 8 of k, k+2, .. */
                           _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b0, 4), eight)),   /* of k+1, k+3, .. */
                           _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(b1, low), eight)),
                           _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(b1, 4), eight))};
            for (int m = 0; m < mb; m++)
                for (int i = 0; i < 4; i++)
                    acc[m][i % NACC(mb)] = _mm256_fmadd_ps(w[i], _mm256_loadu_ps(xp + m * K + k + 8 * i),
                                                           acc[m][i % NACC(mb)]);
        }
        const __m256 sj = _mm256_set1_ps(s[j]);
        for (int m = 0; m < mb; m++) {
            for (int i = 1; i < NACC(mb); i++) acc[m][0] = _mm256_add_ps(acc[m][0], acc[m][i]);
            tot[m] = _mm256_fmadd_ps(acc[m][0], sj, tot[m]);
        }
    }
    for (int m = 0; m < mb; m++) out[m] = hsum(tot[m]);
#else
    (void)xp, (void)K, (void)q, (void)ngroups, (void)g, (void)s;
    for (int m = 0; m < mb; m++) out[m] = 0.0f;
#endif
}

/* The columns from k0 on, in plain C on x's own order, each weight dequantized as dequantize_weight does it: a
 * short last group (K % g), or all of them without AVX2. */
static void int4_rest(const float *x, int64_t K, int64_t mb, const uint8_t *q, int64_t k0, int64_t g,
                      const float *s, const float *z, float *out) {
    float part[MB][LANES] = {{0}};
    for (int64_t k = k0; k < K; k++) {
        float w = (float)(((q[k / 2] >> ((k & 1) * 4)) & 15) - 8) * s[k / g] + z[k / g];
        for (int64_t m = 0; m < mb; m++) part[m][k % LANES] += w * x[m * K + k];
    }
    for (int64_t m = 0; m < mb; m++) out[m] += lanes_sum(part[m]);
}

static void int4_rows(const float *x, const float *xp, const float *xsum, int64_t M, int64_t K, int64_t G,
                      int64_t g, const uint8_t *q, const void *scales, const void *zeros, const void *bias, int sdtype,
                      int64_t n, float *y, int64_t N) {
    float s16[GMAX], z16[GMAX], out[MB], b = bias ? load_scalar(bias, n, sdtype) : 0.0f;
    const float *s = (const float *)scales + n * G, *z = (const float *)zeros + n * G;  /* this row's, in fp32 */
    if (sdtype != F32) {
        for (int64_t j = 0; j < G; j++) s16[j] = load_scalar(scales, n * G + j, sdtype);
        for (int64_t j = 0; j < G; j++) z16[j] = load_scalar(zeros, n * G + j, sdtype);
        s = s16, z = z16;
    }
#if ISA
    const int64_t whole = K / g;  /* groups of g columns: the vector loop */
#else
    const int64_t whole = 0;
#endif
    const uint8_t *row = q + n * ((K + 1) / 2);
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
        int64_t mb = M - m0 < MB ? M - m0 : MB;
        const float *xm = xp + m0 * K;
        switch (mb) {  /* constant mb: the m loops unroll and the accumulators stay in registers */
            case 1: int4_groups(xm, K, 1, row, whole, g, s, out); break;
            case 2: int4_groups(xm, K, 2, row, whole, g, s, out); break;
            case 3: int4_groups(xm, K, 3, row, whole, g, s, out); break;
            case 4: int4_groups(xm, K, 4, row, whole, g, s, out); break;
            case 5: int4_groups(xm, K, 5, row, whole, g, s, out); break;
            case 6: int4_groups(xm, K, 6, row, whole, g, s, out); break;
            case 7: int4_groups(xm, K, 7, row, whole, g, s, out); break;
            default: int4_groups(xm, K, 8, row, whole, g, s, out); break;
        }
        if (whole * g < K) int4_rest(x + m0 * K, K, mb, row, whole * g, g, s, z, out);  /* a short last group */
        for (int64_t m = 0; m < mb; m++) {  /* the vector loop's groups: sum_j z[j] xsum[j] */
            const float *sm = xsum + (m0 + m) * G;
            y[(m0 + m) * N + n] = out[m] + dotf(z, sm, whole) + b;
        }
    }
}

/* xp [M, K]: each whole block of BLK columns of x reordered to its even columns, then its odd ones (k, k+2, ..., k+1,
 * k+3, ...), the order of its unpacked nibbles; the tail copied as is. xsum [M, G]: x summed over each group. */
static void int4_prepare(const float *x, int64_t M, int64_t K, int64_t G, int64_t g, float *xp, float *xsum) {
    int64_t kfull = K & ~(int64_t)(BLK - 1);
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        float *pm = xp + m * K;
        for (int64_t k = 0; k < kfull; k += BLK)
            for (int i = 0; i < BLK / 2; i++) pm[k + i] = xm[k + 2 * i], pm[k + BLK / 2 + i] = xm[k + 2 * i + 1];
        for (int64_t k = kfull; k < K; k++) pm[k] = xm[k];
        for (int64_t j = 0; j < G; j++) {
            float part[LANES] = {0};
            for (int64_t k = j * g; k < K && k < (j + 1) * g; k++) part[k % LANES] += xm[k];
            xsum[m * G + j] = lanes_sum(part);
        }
    }
}

/* y [M, N] = x [M, K] W^T + bias, W the int4 tensors (q [N, ceil(K/2)], scales and zeros [N, G], groups of g
 * columns), bias [N] or NULL.
 * Returns 0, -1 if its scratch (M * (K + G) floats) could not be allocated, -2 if G > GMAX. */
int gptneox_int4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *q, const void *scales,
                        const void *zeros, const void *bias, int sdtype, int64_t G, int64_t g, float *y, int64_t N,
                        int nthreads) {
    if (G > GMAX) return -2;
    float *xp = malloc(sizeof(float) * M * (K + G));
    if (!xp) return -1;
    float *xsum = xp + M * K;
    int4_prepare(x, M, K, G, g, xp, xsum);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n0 = 0; n0 < N; n0 += NB)
        for (int64_t n = n0; n < n0 + NB && n < N; n++)
            int4_rows(x, xp, xsum, M, K, G, g, q, scales, zeros, bias, sdtype, n, y, N);
    free(xp);
    return 0;
}


/* Long prompts: out [n1 - n0, K] = the fp32 weight rows n0 .. n1 - 1, for torch's GEMM (cpu.py, PROMPT_ROWS).
 * As dequantize_weight computes them; loops simple enough for the compiler to vectorise. */
void gptneox_int8_dequant(const int8_t *q, int64_t K, const void *scales, int sdtype, int64_t n0, int64_t n1,
                          float *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; n++) {
        const float s = load_scalar(scales, n, sdtype);
        const int8_t *row = q + n * K;
        float *o = out + (n - n0) * K;
        for (int64_t k = 0; k < K; k++) o[k] = (float)row[k] * s;
    }
}

void gptneox_int4_dequant(const uint8_t *q, int64_t K, const void *scales, const void *zeros, int sdtype, int64_t G,
                          int64_t g, int64_t n0, int64_t n1, float *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = q + n * ((K + 1) / 2);
        float *o = out + (n - n0) * K;
        for (int64_t j = 0; j < G; j++) {
            const float s = load_scalar(scales, n * G + j, sdtype), z = load_scalar(zeros, n * G + j, sdtype);
            const int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
            if ((k1 - k0) % 2 == 0) {  /* pairs of columns: a byte each */
                for (int64_t i = k0 / 2; i < k1 / 2; i++) {
                    o[2 * i] = (float)((row[i] & 15) - 8) * s + z;
                    o[2 * i + 1] = (float)((row[i] >> 4) - 8) * s + z;
                }
            } else {
                for (int64_t k = k0; k < k1; k++) o[k] = (float)(((row[k / 2] >> ((k & 1) * 4)) & 15) - 8) * s + z;
            }
        }
    }
}


/* ---------------------------------------------------------------------------------------------- a8: opt-in
 * Activations quantized too, as llama.cpp's Q8_0 / Q4_0 products do: x in blocks of 32 columns, xq = round(x / d),
 * d = max |x| / 127 per block, so each block's sum of q xq is an exact integer, scaled in fp32 afterwards:
 *   int8  y[n] = s[n] sum_b d_b sum_{k in b} q[n, k] xq[k]
 *   int4  y[n] = sum_b d_b s[n, j(b)] sum_{k in b} (q[n, k] - 8) xq[k]  +  sum_j z[n, j] xsum[j]  (xsum: exact x)
 * With AVX-512 VNNI one vpdpbusd multiplies 64 unsigned bytes by 64 signed ones into 16 sums of 4: per 128 int4
 * weights an and, a shift, an and, two vpdpbusd, a convert and an FMA per row of x. The unsigned operand is the int4
 * nibble q (its - 8 enters as the accumulator's start, -8 xq summed per lane) or the int8 weight + 128 (its - 128 xq
 * likewise). Without VNNI the same integer sums run in plain C. */
#define QB 32                         /* columns per activation block */

typedef struct {                      /* the per-call activations, M rows */
    int64_t nb, nch;                  /* blocks of QB columns; whole vector chunks (128 columns int4, 64 int8) */
    float *d;                         /* [M, nb] block scales */
    int8_t *xq;                       /* [M, nb * QB] quantized x, zero past K */
    int8_t *xv;                       /* [M, nch * chunk] the vector loop's order (int4: even then odd columns) */
    int32_t *corr;                    /* [M, nch, 16] the accumulators' start: -8 (int4) / -128 (int8) x lane sums */
    float *dl;                        /* [M, nch, 16] each lane's block scale */
    float *xsum;                      /* [M, G] exact x summed per group (int4's zeros) */
} A8;

static void a8_free(A8 *a) { free(a->d); free(a->xq); free(a->xv); free(a->corr); free(a->dl); free(a->xsum); }

/* Quantize x [M, K] per block; int4 (G groups of g) or int8 (G = 0). Returns 0, or -1 when out of memory. */
static int a8_prepare(const float *x, int64_t M, int64_t K, int int4, int64_t G, int64_t g, A8 *a) {
    const int64_t chunk = int4 ? 128 : 64;
    a->nb = (K + QB - 1) / QB;
    a->nch = ISA == 3 ? K / chunk : 0;
    a->d = malloc(sizeof(float) * M * a->nb);
    a->xq = calloc((size_t)(M * a->nb * QB), 1);
    a->xv = malloc((size_t)(M * a->nch * chunk) + 1);
    a->corr = malloc(sizeof(int32_t) * (M * a->nch * 16 + 1));
    a->dl = malloc(sizeof(float) * (M * a->nch * 16 + 1));
    a->xsum = malloc(sizeof(float) * (M * G + 1));
    if (!a->d || !a->xq || !a->xv || !a->corr || !a->dl || !a->xsum) return -1;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        int8_t *qm = a->xq + m * a->nb * QB;
        for (int64_t b = 0; b < a->nb; b++) {
            const int64_t k0 = b * QB, k1 = k0 + QB < K ? k0 + QB : K;
#if ISA >= 2  /* 32 floats in two vectors: max |x|, then x / d rounded to nearest even (lrintf's rounding) */
            const int64_t n = k1 - k0;
            const __mmask16 t0 = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
            const __mmask16 t1 = n >= 32 ? (__mmask16)0xffff : n > 16 ? (__mmask16)((1u << (n - 16)) - 1) : 0;
            const __m512 v0 = _mm512_maskz_loadu_ps(t0, xm + k0), v1 = _mm512_maskz_loadu_ps(t1, xm + k0 + 16);
            const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            const float d = top / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            a->d[m * a->nb + b] = d;
            const __m512 iv = _mm512_set1_ps(inv);
            _mm_storeu_si128((__m128i *)(qm + k0), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, iv))));
            _mm_storeu_si128((__m128i *)(qm + k0 + 16),
                             _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, iv))));
#else
            float top = 0.0f;
            for (int64_t k = k0; k < k1; k++) top = fabsf(xm[k]) > top ? fabsf(xm[k]) : top;
            const float d = top / 127.0f, inv = d > 0.0f ? 1.0f / d : 0.0f;
            a->d[m * a->nb + b] = d;
            for (int64_t k = k0; k < k1; k++) qm[k] = (int8_t)lrintf(xm[k] * inv);
#endif
        }
#if ISA == 3  /* the vector loop's operands: lanes of 4 bytes, their sums by vpdpbusd against ones */
        int8_t *vm = a->xv + m * a->nch * chunk;
        int32_t *cm = a->corr + m * a->nch * 16;
        float *dm = a->dl + m * a->nch * 16;
        const __m512i ones = _mm512_set1_epi8(1), zero = _mm512_setzero_si512();
        const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i block = _mm512_srli_epi32(lane, int4 ? 2 : 3);  /* lane l's block in its chunk: l / 4, l / 8 */
        const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
        for (int64_t c = 0; c < a->nch; c++) {
            __m512i sum;
            if (int4) {  /* even columns' bytes, then odd ones': the two nibbles' partners */
                const __m512i w0 = _mm512_loadu_si512((const void *)(qm + c * 128));
                const __m512i w1 = _mm512_loadu_si512((const void *)(qm + c * 128 + 64));
                const __m512i ev = _mm512_permutexvar_epi64(order, _mm512_packs_epi16(
                    _mm512_srai_epi16(_mm512_slli_epi16(w0, 8), 8), _mm512_srai_epi16(_mm512_slli_epi16(w1, 8), 8)));
                const __m512i od = _mm512_permutexvar_epi64(order, _mm512_packs_epi16(_mm512_srai_epi16(w0, 8),
                                                                                    _mm512_srai_epi16(w1, 8)));
                _mm512_storeu_si512((void *)(vm + c * 128), ev);
                _mm512_storeu_si512((void *)(vm + c * 128 + 64), od);
                sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, ones, ev), ones, od);
                _mm512_storeu_si512((void *)(cm + c * 16), _mm512_sub_epi32(zero, _mm512_slli_epi32(sum, 3)));
            } else {
                const __m512i w = _mm512_loadu_si512((const void *)(qm + c * 64));
                _mm512_storeu_si512((void *)(vm + c * 64), w);
                sum = _mm512_dpbusd_epi32(zero, ones, w);
                _mm512_storeu_si512((void *)(cm + c * 16), _mm512_sub_epi32(zero, _mm512_slli_epi32(sum, 7)));
            }
            const int64_t b0 = c * chunk / QB;
            _mm512_storeu_ps(dm + c * 16, _mm512_permutexvar_ps(block, _mm512_maskz_loadu_ps(
                (__mmask16)(int4 ? 0xF : 0x3), a->d + m * a->nb + b0)));
        }
#endif
        for (int64_t j = 0; j < G; j++) {  /* int4's zeros meet the exact x: its sum over each group */
            const int64_t k0 = j * g, k1 = k0 + g < K ? k0 + g : K;
            float part[LANES] = {0};
            int64_t k = k0;
#if ISA >= 2
            __m512 acc = _mm512_setzero_ps();
            for (; k + 16 <= k1; k += 16) acc = _mm512_add_ps(acc, _mm512_loadu_ps(xm + k));
            part[0] = _mm512_reduce_add_ps(acc);
#endif
            for (; k < k1; k++) part[k % LANES] += xm[k];
            a->xsum[m * G + j] = lanes_sum(part);
        }
    }
    return 0;
}

/* The blocks from b0 on, in plain C: sum_b d_b scale(b) sum_k w(q_k) xq_k for one weight row and one x row. */
static float a8_rest(const A8 *a, int64_t m, int64_t K, int int4, const void *q, int64_t b0, const float *s,
                     int64_t g) {
    const int8_t *qm = a->xq + m * a->nb * QB;
    float part[LANES] = {0};
    for (int64_t b = b0; b < a->nb; b++) {
        int32_t sum = 0;
        for (int64_t k = b * QB; k < K && k < (b + 1) * QB; k++) {
            const int w = int4 ? (int)((((const uint8_t *)q)[k / 2] >> ((k & 1) * 4)) & 15) - 8
                               : ((const int8_t *)q)[k];
            sum += w * qm[k];
        }
        part[b % LANES] += (float)sum * (a->d[m * a->nb + b] * (int4 ? s[b * QB / g] : 1.0f));
    }
    return lanes_sum(part);
}

#if ISA == 3
static inline float a8_int4_chunks(const A8 *a, int64_t m, const uint8_t *row, const float *s, int64_t g) {
    const __m512i low = _mm512_set1_epi8(15);
    const int8_t *xv = a->xv + m * a->nch * 128;
    const int32_t *corr = a->corr + m * a->nch * 16;
    const float *dl = a->dl + m * a->nch * 16;
    __m512 tot = _mm512_setzero_ps();
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i idx = g < 128 ? _mm512_srli_epi32(_mm512_slli_epi32(lane, 3), __builtin_ctzll((unsigned long long)g))
                                : _mm512_setzero_si512();  /* lane l's group within its chunk: 8 l / g */
    const int64_t per = g < 128 ? 128 / g : 1;  /* groups a chunk spans */
    const int lg = __builtin_ctzll((unsigned long long)g);
    for (int64_t c = 0; c < a->nch; c++) {
        const __m512i w = _mm512_loadu_si512((const void *)(row + c * 64));
        const __m512i lo = _mm512_and_si512(w, low), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), low);
        __m512i acc = _mm512_loadu_si512((const void *)(corr + c * 16));
        acc = _mm512_dpbusd_epi32(acc, lo, _mm512_loadu_si512((const void *)(xv + c * 128)));
        acc = _mm512_dpbusd_epi32(acc, hi, _mm512_loadu_si512((const void *)(xv + c * 128 + 64)));
        const int64_t j0 = (c * 128) >> lg;  /* c * 128 / g, g a power of 2 (no division per chunk) */
        const __mmask16 have = (__mmask16)((1u << per) - 1);
        const __m512 sw = g < 128 ? _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(have, s + j0))
                                  : _mm512_set1_ps(s[j0]);
        tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_mul_ps(sw, _mm512_loadu_ps(dl + c * 16)), tot);
    }
    return _mm512_reduce_add_ps(tot);
}

static inline float a8_int8_chunks(const A8 *a, int64_t m, const int8_t *row) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    const int8_t *xv = a->xv + m * a->nch * 64;
    const int32_t *corr = a->corr + m * a->nch * 16;
    const float *dl = a->dl + m * a->nch * 16;
    __m512 tot = _mm512_setzero_ps();
    for (int64_t c = 0; c < a->nch; c++) {
        const __m512i w = _mm512_xor_si512(_mm512_loadu_si512((const void *)(row + c * 64)), flip);  /* q + 128 */
        __m512i acc = _mm512_loadu_si512((const void *)(corr + c * 16));
        acc = _mm512_dpbusd_epi32(acc, w, _mm512_loadu_si512((const void *)(xv + c * 64)));
        tot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(dl + c * 16), tot);
    }
    return _mm512_reduce_add_ps(tot);
}
#endif

/* y [M, N] = the a8 products above + bias; int8: q [N, K], scales [N]; int4: q [N, ceil(K/2)], scales and zeros [N, G]
 * in groups of g (a multiple of 32). Returns 0, -1 when out of memory, -2 if G > GMAX. */
int gptneox_a8_matmul(const float *x, int64_t M, int64_t K, const void *q, const void *scales, const void *zeros,
                      const void *bias, int sdtype, int int4, int64_t G, int64_t g, float *y, int64_t N,
                      int nthreads) {
    if (int4 && G > GMAX) return -2;
    A8 a = {0};
    if (a8_prepare(x, M, K, int4, int4 ? G : 0, g, &a)) {
        a8_free(&a);
        return -1;
    }
    const int64_t chunk = int4 ? 128 : 64, row_bytes = int4 ? (K + 1) / 2 : K;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        float s16[GMAX], z16[GMAX];
        const float *s = int4 ? (const float *)scales + n * G : NULL, *z = int4 ? (const float *)zeros + n * G : NULL;
        if (int4 && sdtype != F32) {
            for (int64_t j = 0; j < G; j++) s16[j] = load_scalar(scales, n * G + j, sdtype);
            for (int64_t j = 0; j < G; j++) z16[j] = load_scalar(zeros, n * G + j, sdtype);
            s = s16, z = z16;
        }
        const uint8_t *row = (const uint8_t *)q + n * row_bytes;
        const float b = bias ? load_scalar(bias, n, sdtype) : 0.0f, sn = int4 ? 1.0f : load_scalar(scales, n, sdtype);
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
#if ISA == 3
            acc = int4 ? a8_int4_chunks(&a, m, row, s, g) : a8_int8_chunks(&a, m, (const int8_t *)row);
#endif
            if (a.nch * chunk < K) acc += a8_rest(&a, m, K, int4, row, a.nch * chunk / QB, s, g);  /* a tail */
            if (int4) {
                acc += dotf(z, a.xsum + m * G, G);
            } else {
                acc *= sn;
            }
            y[m * N + n] = acc + b;
        }
    }
    a8_free(&a);
    return 0;
}
