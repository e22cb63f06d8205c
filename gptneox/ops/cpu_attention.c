/* A decode step's attention half of a layer on the CPU, in fp32: what ops/dispatch.py otherwise does in about 40
 * small torch operations per layer (views, rotate-half, concatenations, two cache writes, a mask, SDPA), each of a
 * few microseconds, for a few tokens. Built and loaded by cpu_attention.py. Compiled with -ffp-contract=off, so
 * that every product and sum rounds as torch's separate operations round them.
 *
 * qkv_rotary_cache: qkv [B, T, nh * 3 * hs] holds each head's [q | k | v] (HF's layout). q and k get NeoX's
 *   rotate-half on their first rot dims, x * cos + rotate_half(x) * sin with cos, sin [B or 1, T, rot] (the
 *   reference's tables); q goes to q_out [B, nh, T, hs], k and v to the cache [B, nh, L, hs] at slots pos [T].
 * attention: y [B, nh, T, hs] = softmax(q k^T / sqrt(hs), over the keys the bool mask [B or 1, T, S] keeps) v, the
 *   scores, their maximum, the exponentials and the sums in fp32 (k, v: the cache, row stride hs, head stride L hs).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#ifdef __AVX512VNNI__
#define ISA 3                         /* the avx512vnni build: the same code here */
#else
#define ISA 2
#endif
#elif defined(__AVX2__) && defined(__FMA__)
#define ISA 1
#else
#define ISA 0
#endif

int gptneox_isa(void) { return ISA; }

#define LANES 16  /* partial sums of a dot product: the compiler turns them into vector lanes */

static inline float dot(const float *a, const float *b, int64_t n) {
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) acc[i % LANES] += a[i] * b[i];
    for (int w = LANES / 2; w; w /= 2)  /* pairwise */
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

void gptneox_qkv_rotary_cache(const float *qkv, int64_t B, int64_t T, int64_t nh, int64_t hs, int64_t rot,
                              const float *cos, const float *sin, int64_t cs_batch, const int64_t *pos,
                              float *q_out, float *k_cache, float *v_cache, int64_t L, int nthreads) {
    const int64_t half = rot / 2;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < nh; h++)
            for (int64_t t = 0; t < T; t++) {
                const float *src = qkv + ((b * T + t) * nh + h) * 3 * hs;  /* this head's [q | k | v] */
                const float *c = cos + b * cs_batch + t * rot, *s = sin + b * cs_batch + t * rot;
                float *dst[2] = {q_out + ((b * nh + h) * T + t) * hs, k_cache + ((b * nh + h) * L + pos[t]) * hs};
                for (int w = 0; w < 2; w++) {  /* q, then k */
                    const float *x = src + w * hs;
                    float *o = dst[w];
                    for (int64_t i = 0; i < half; i++) {
                        o[i] = x[i] * c[i] + (-x[i + half]) * s[i];
                        o[i + half] = x[i + half] * c[i + half] + x[i] * s[i + half];
                    }
                    for (int64_t i = rot; i < hs; i++) o[i] = x[i];
                }
                float *vo = v_cache + ((b * nh + h) * L + pos[t]) * hs;
                for (int64_t i = 0; i < hs; i++) vo[i] = src[2 * hs + i];
            }
}

/* Returns 0, or -1 when the scores' scratch (S floats per thread) could not be allocated. */
int gptneox_attention(const float *q, const float *k, const float *v, int64_t B, int64_t nh, int64_t T, int64_t S,
                      int64_t L, int64_t hs, const uint8_t *mask, int64_t mask_batch, float *y, int nthreads) {
    const float scale = 1.0f / sqrtf((float)hs);
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        float *p = malloc(sizeof(float) * (S > 0 ? S : 1));
        if (!p) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for collapse(3) schedule(static)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < nh; h++)
                for (int64_t t = 0; t < T; t++) {
                    if (!p) continue;
                    const float *qi = q + ((b * nh + h) * T + t) * hs;
                    const float *kh = k + (b * nh + h) * L * hs, *vh = v + (b * nh + h) * L * hs;
                    const uint8_t *keep = mask + b * mask_batch + t * S;
                    float *yi = y + ((b * nh + h) * T + t) * hs;
                    float top = -INFINITY;
                    for (int64_t j = 0; j < S; j++) {
                        if (!keep[j]) continue;
                        p[j] = dot(qi, kh + j * hs, hs) * scale;
                        top = p[j] > top ? p[j] : top;
                    }
                    float total = 0.0f;
                    for (int64_t i = 0; i < hs; i++) yi[i] = 0.0f;
                    for (int64_t j = 0; j < S; j++) {
                        if (!keep[j]) continue;
                        const float e = expf(p[j] - top);
                        total += e;
                        for (int64_t i = 0; i < hs; i++) yi[i] += e * vh[j * hs + i];
                    }
                    const float inv = total > 0.0f ? 1.0f / total : 0.0f;  /* a row that keeps no key: zeros */
                    for (int64_t i = 0; i < hs; i++) yi[i] *= inv;
                }
        free(p);
    }
    return failed ? -1 : 0;
}
