/* Paged decode attention for CPU (fp32): one query token per sequence, keys and
 * values read in place from the paged KV cache, no gathered copies.
 *
 *   for b in range(B):                       # one sequence each
 *     for h in range(H):                     # query heads; kv head = h / (H / KV)
 *       s[j] = scale * q[b, h] . K[index[b, j], h / G]      for j < length[b]
 *       p = softmax(s)
 *       out[b, h] = sum_j p[j] * V[index[b, j], h / G]
 *
 * q, out: [B, H, D] contiguous; k_cache, v_cache: [N, KV, D] contiguous;
 * index: [B, Lmax] int64; length: [B] int32 with 1 <= length[b] <= Lmax.
 * Work is split over (sequence, kv head) pairs; each pair handles its G query
 * heads together so every K and V row is loaded once.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* K and V rows come from memory (the step's weights have passed through the caches since they were
 * written) at scattered block addresses: each is asked for PF positions ahead of its use. */
enum { PF = 16 };
static inline void prefetch_row(const float *p, int64_t D) {
    for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(p + d, 0, 3);
}

int loraplex_decode_attention_f32(
    float *out, const float *q, const float *k_cache, const float *v_cache,
    const int64_t *index, const int32_t *length,
    int64_t B, int64_t H, int64_t KV, int64_t D, int64_t Lmax, int64_t N,
    float scale, int threads)
{
    if (B <= 0 || H <= 0 || KV <= 0 || D <= 0 || H % KV != 0) return 4;
    const int64_t G = H / KV;
    int err = 0;
    #pragma omp parallel num_threads(threads > 0 ? threads : 1)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(G * Lmax));
        float *acc = (float *)malloc(sizeof(float) * (size_t)(G * D));
        if (!scores || !acc) {
            #pragma omp atomic write
            err = 3;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t pair = 0; pair < B * KV; ++pair) {
            if (!scores || !acc) continue;
            const int64_t b = pair / KV, kvh = pair % KV;
            const int64_t L = length[b];
            if (L < 1 || L > Lmax) {
                #pragma omp atomic write
                err = 2;
                continue;
            }
            const int64_t *idx = index + b * Lmax;
            const float *qb = q + (b * H + kvh * G) * D;
            for (int64_t j = 0; j < L; ++j) {
                const int64_t pos = idx[j];
                if (pos < 0 || pos >= N) {
                    #pragma omp atomic write
                    err = 1;
                    break;
                }
                const float *k = k_cache + (pos * KV + kvh) * D;
                if (j + PF < L) prefetch_row(k_cache + (idx[j + PF] * KV + kvh) * D, D);
                for (int64_t g = 0; g < G; ++g) {
                    const float *qg = qb + g * D;
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
                    scores[g * Lmax + j] = dot * scale;
                }
            }
            for (int64_t g = 0; g < G; ++g) {
                float *s = scores + g * Lmax;
                float m = -INFINITY;
                for (int64_t j = 0; j < L; ++j) m = s[j] > m ? s[j] : m;
                float total = 0.f;
                for (int64_t j = 0; j < L; ++j) { s[j] = expf(s[j] - m); total += s[j]; }
                const float inv = 1.f / total;
                for (int64_t j = 0; j < L; ++j) s[j] *= inv;
            }
            memset(acc, 0, sizeof(float) * (size_t)(G * D));
            for (int64_t j = 0; j < L; ++j) {
                const int64_t pos = idx[j];
                if (pos < 0 || pos >= N) break;
                const float *v = v_cache + (pos * KV + kvh) * D;
                if (j + PF < L) prefetch_row(v_cache + (idx[j + PF] * KV + kvh) * D, D);
                for (int64_t g = 0; g < G; ++g) {
                    const float p = scores[g * Lmax + j];
                    float *a = acc + g * D;
                    #pragma omp simd
                    for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
                }
            }
            memcpy(out + (b * H + kvh * G) * D, acc, sizeof(float) * (size_t)(G * D));
        }
        free(scores);
        free(acc);
    }
    return err;
}
