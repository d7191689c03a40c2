/* Paged decode attention for CPU (fp32, or bf16 tensors computed in fp32): one query token per
 * sequence, keys and values read in place from the paged KV cache, no gathered copies.
 *
 *   for b in range(B):                       # one sequence each
 *     for h in range(H):                     # query heads; kv head = h / (H / KV)
 *       s[j] = scale * q[b, h] . K[index[b, j], h / G]      for j < length[b]
 *       s[j] = softcap * tanh(s[j] / softcap)             if softcap > 0 (Gemma 2)
 *       p = softmax(s)
 *       out[b, h] = sum_j p[j] * V[index[b, j], h / G]
 *
 * q, out: [B, H, D] contiguous; k_cache, v_cache: [N, KV, D] contiguous;
 * index: [B, Lmax] int64; length: [B] int32 with 1 <= length[b] <= Lmax.
 * Work is split over (sequence, kv head) pairs; each pair handles its G query
 * heads together so every K and V row is loaded once. The bf16 entry widens q, K
 * and V to fp32 (exact), computes as the fp32 one does, and rounds out to bf16
 * once (to nearest even), as torch's CPU attention keeps bf16 sums in fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#include "_bf16.h"

/* K and V rows come from memory (the step's weights have passed through the caches since they were
 * written) at scattered block addresses: each is asked for PF positions ahead of its use. */
enum { PF = 16 };
static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* One (sequence, kv head) pair: 0, or the error code. Always inlined with bf16 a literal constant (see
 * attend), so the fp32 and bf16 loops are each compiled, and vectorised, for their own element type. */
static inline __attribute__((always_inline)) int one_pair(
    void *out, const void *q, const void *k_cache, const void *v_cache, const int64_t *index, const int32_t *length,
    int64_t pair, int64_t H, int64_t KV, int64_t D, int64_t Lmax, int64_t N, float scale, float softcap,
    float *scores, float *acc, float *qf, const int bf16)
{
    const int64_t es = bf16 ? 2 : 4; /* bytes per element */
    const int64_t G = H / KV, b = pair / KV, kvh = pair % KV;
    const int64_t L = length[b];
    if (L < 1 || L > Lmax) return 2;
    const int64_t *idx = index + b * Lmax;
    const char *qb = (const char *)q + (b * H + kvh * G) * D * es;
    for (int64_t e = 0; e < G * D; ++e) qf[e] = f32_or_bf16_at(qb, e, bf16);
    for (int64_t j = 0; j < L; ++j) {
        const int64_t pos = idx[j];
        if (pos < 0 || pos >= N) return 1;
        const char *k = (const char *)k_cache + (pos * KV + kvh) * D * es;
        if (j + PF < L) prefetch_row((const char *)k_cache + (idx[j + PF] * KV + kvh) * D * es, D * es);
        for (int64_t g = 0; g < G; ++g) {
            const float *qg = qf + g * D;
            float dot = 0.f;
            #pragma omp simd reduction(+:dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * f32_or_bf16_at(k, d, bf16);
            scores[g * Lmax + j] = dot * scale;
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        float *s = scores + g * Lmax;
        if (softcap > 0.f)
            for (int64_t j = 0; j < L; ++j) s[j] = tanhf(s[j] / softcap) * softcap;
        float m = -INFINITY;
        for (int64_t j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
        float total = 0.f;
        for (int64_t j = 0; j < L; ++j) { s[j] = expf(s[j] - m); total += s[j]; }
        const float inv = 1.f / total;
        for (int64_t j = 0; j < L; ++j) s[j] *= inv;
    }
    memset(acc, 0, sizeof(float) * (size_t)(G * D));
    for (int64_t j = 0; j < L; ++j) {
        const char *v = (const char *)v_cache + (idx[j] * KV + kvh) * D * es;
        if (j + PF < L) prefetch_row((const char *)v_cache + (idx[j + PF] * KV + kvh) * D * es, D * es);
        for (int64_t g = 0; g < G; ++g) {
            const float p = scores[g * Lmax + j];
            float *a = acc + g * D;
            #pragma omp simd
            for (int64_t d = 0; d < D; ++d) a[d] += p * f32_or_bf16_at(v, d, bf16);
        }
    }
    if (bf16) {
        uint16_t *o = (uint16_t *)out + (b * H + kvh * G) * D;
        for (int64_t e = 0; e < G * D; ++e) o[e] = bf16_round(acc[e]);
    } else {
        memcpy((float *)out + (b * H + kvh * G) * D, acc, sizeof(float) * (size_t)(G * D));
    }
    return 0;
}

/* Both entries: pairs split over the threads. OpenMP outlines the parallel region into a function of its
 * own that reads bf16 from memory, so the region branches to calls with a literal, not one_pair(.., bf16). */
static int attend(
    void *out, const void *q, const void *k_cache, const void *v_cache,
    const int64_t *index, const int32_t *length,
    int64_t B, int64_t H, int64_t KV, int64_t D, int64_t Lmax, int64_t N,
    float scale, float softcap, int threads, int bf16)
{
    if (B <= 0 || H <= 0 || KV <= 0 || D <= 0 || H % KV != 0) return 4;
    const int64_t G = H / KV;
    int err = 0;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(G * Lmax));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(G * D));
        float *qf = (float *)malloc(sizeof(float) * (size_t)(G * D)); /* this pair's queries, as fp32 */
        if (!scores || !acc || !qf) {
            #pragma omp atomic write
            err = 3;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t pair = 0; pair < B * KV; ++pair) {
            if (!scores || !acc || !qf) continue;
            const int e = bf16 ? one_pair(out, q, k_cache, v_cache, index, length, pair, H, KV, D, Lmax, N, scale,
                                          softcap, scores, acc, qf, 1)
                               : one_pair(out, q, k_cache, v_cache, index, length, pair, H, KV, D, Lmax, N, scale,
                                          softcap, scores, acc, qf, 0);
            if (e) {
                #pragma omp atomic write
                err = e;
            }
        }
        free(scores);
        free(acc);
        free(qf);
    }
    return err;
}

int loraplex_decode_attention_f32(
    float *out, const float *q, const float *k_cache, const float *v_cache,
    const int64_t *index, const int32_t *length,
    int64_t B, int64_t H, int64_t KV, int64_t D, int64_t Lmax, int64_t N,
    float scale, float softcap, int threads)
{
    return attend(out, q, k_cache, v_cache, index, length, B, H, KV, D, Lmax, N, scale, softcap, threads, 0);
}

/* q, out, k_cache, v_cache: bf16 (as uint16); the rest as above. */
int loraplex_decode_attention_bf16(
    uint16_t *out, const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
    const int64_t *index, const int32_t *length,
    int64_t B, int64_t H, int64_t KV, int64_t D, int64_t Lmax, int64_t N,
    float scale, float softcap, int threads)
{
    return attend(out, q, k_cache, v_cache, index, length, B, H, KV, D, Lmax, N, scale, softcap, threads, 1);
}
