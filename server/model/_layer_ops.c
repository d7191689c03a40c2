/*
 * The small per-layer fp32 operations of a decode step, one call each instead of a chain of torch ops:
 *
 *   loraplex_rms_norm: y[t] = w * (x[t] * (1 / sqrt(mean(x[t]^2) + eps)))      (transformers' order)
 *   loraplex_rope:     in place on the first `heads` heads of each row of qkv, rotate-half RoPE:
 *                      x' = x * cos[pos] + rotate_half(x) * sin[pos],  rotate_half(x) = (-x2, x1)
 *
 * Sums of squares run in 16 fp32 lanes folded by the LoRA kernel's fixed tree, so every ISA build
 * gives the same bits; products and sums round separately (built with -ffp-contract=off), as torch's.
 * Returns 0, or 4 on bad sizes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../lora/_lora_vec.h"

int loraplex_rms_norm(float *y, const float *x, int64_t ldx, const float *w, int64_t T, int64_t K, float eps) {
    if (T < 0 || K < 1 || ldx < K) return 4;
    for (int64_t t = 0; t < T; ++t) {
        const float *xr = x + t * ldx;
        float *yr = y + t * K;
        vf acc = vzero();
        for (int64_t k = 0; k < K; k += 32) {
            vf lo, hi;
            ld_pair(xr, k, K - k < 32 ? K - k : 32, &lo, &hi, LD_F32);
            acc = vfma(hi, hi, vfma(lo, lo, acc));
        }
        float sums[4];
        sum4(acc, vzero(), vzero(), vzero(), sums);
        const float inv = 1.0f / sqrtf(sums[0] / (float)K + eps);
        for (int64_t k = 0; k < K; ++k) yr[k] = w[k] * (xr[k] * inv);
    }
    return 0;
}

int loraplex_rope(float *qkv, int64_t ld, const float *cos_table, const float *sin_table, const int64_t *positions,
                  int64_t T, int64_t heads, int64_t head_dim, int64_t max_positions) {
    if (T < 0 || heads < 1 || head_dim < 2 || head_dim % 2 || ld < heads * head_dim) return 4;
    const int64_t half = head_dim / 2;
    float tmp[512];
    if (head_dim > 512) return 4;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t p = positions[t];
        if (p < 0 || p >= max_positions) return 4;
        const float *c = cos_table + p * head_dim, *s = sin_table + p * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            float *v = qkv + t * ld + h * head_dim;
            memcpy(tmp, v, (size_t)head_dim * sizeof(float));
            for (int64_t i = 0; i < half; ++i) v[i] = tmp[i] * c[i] + (-tmp[i + half]) * s[i];
            for (int64_t i = half; i < head_dim; ++i) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
        }
    }
    return 0;
}

int loraplex_layer_ops_isa(void) { return LP_ISA; }
