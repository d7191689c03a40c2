/*
 * The small per-layer fp32 operations of a decode step, one call each instead of a chain of torch ops:
 *
 *   loraplex_rms_norm: y[t] = w * (x[t] * (1 / sqrt(mean(x[t]^2) + eps)))      (transformers' order)
 *   loraplex_rope:     in place on the first `heads` heads of each row of qkv, rotate-half RoPE:
 *                      x' = x * cos[pos] + rotate_half(x) * sin[pos],  rotate_half(x) = (-x2, x1)
 *
 * Sums of squares run in 16 fp32 lanes folded by the LoRA kernel's fixed tree, so every ISA build
 * gives the same bits; products and sums round separately (built with -ffp-contract=off), as torch's.
 * The _bf16 entries take bf16 tensors (as uint16) with transformers' bf16 arithmetic: the norm in fp32,
 * rounded to bf16, then times w rounded again; RoPE's products and sum each rounded to bf16, as torch's
 * bf16 ops round every result (fp32 arithmetic on the widened values, then to nearest even).
 * Returns 0, or 4 on bad sizes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../lora/_lora_vec.h"

static inline float widen(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t round_bf16(float f) { /* to nearest even; NaN -> 0x7FC0, as torch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* 1 / sqrt(mean(x^2) + eps) of a row of K fp32 (bf16 == 0) or bf16 values. */
static inline float inv_rms(const void *row, int64_t K, float eps, int bf16) {
    vf acc = vzero();
    for (int64_t k = 0; k < K; k += 32) {
        vf lo, hi;
        ld_pair(row, k, K - k < 32 ? K - k : 32, &lo, &hi, bf16 ? LD_WIDEN : LD_F32);
        acc = vfma(hi, hi, vfma(lo, lo, acc));
    }
    float sums[4];
    sum4(acc, vzero(), vzero(), vzero(), sums);
    return 1.0f / sqrtf(sums[0] / (float)K + eps);
}

int loraplex_rms_norm(float *y, const float *x, int64_t ldx, const float *w, int64_t T, int64_t K, float eps) {
    if (T < 0 || K < 1 || ldx < K) return 4;
    for (int64_t t = 0; t < T; ++t) {
        const float *xr = x + t * ldx;
        float *yr = y + t * K;
        const float inv = inv_rms(xr, K, eps, 0);
        for (int64_t k = 0; k < K; ++k) yr[k] = w[k] * (xr[k] * inv);
    }
    return 0;
}

int loraplex_rms_norm_bf16(uint16_t *y, const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t T, int64_t K,
                           float eps) {
    if (T < 0 || K < 1 || ldx < K) return 4;
    for (int64_t t = 0; t < T; ++t) {
        const uint16_t *xr = x + t * ldx;
        uint16_t *yr = y + t * K;
        const float inv = inv_rms(xr, K, eps, 1);
        for (int64_t k = 0; k < K; ++k) yr[k] = round_bf16(widen(w[k]) * widen(round_bf16(widen(xr[k]) * inv)));
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

int loraplex_rope_bf16(uint16_t *qkv, int64_t ld, const uint16_t *cos_table, const uint16_t *sin_table,
                       const int64_t *positions, int64_t T, int64_t heads, int64_t head_dim, int64_t max_positions) {
    if (T < 0 || heads < 1 || head_dim < 2 || head_dim % 2 || ld < heads * head_dim) return 4;
    const int64_t half = head_dim / 2;
    float tmp[512];
    if (head_dim > 512) return 4;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t p = positions[t];
        if (p < 0 || p >= max_positions) return 4;
        const uint16_t *c = cos_table + p * head_dim, *s = sin_table + p * head_dim;
        for (int64_t h = 0; h < heads; ++h) {
            uint16_t *v = qkv + t * ld + h * head_dim;
            for (int64_t i = 0; i < head_dim; ++i) tmp[i] = widen(v[i]);
            for (int64_t i = 0; i < head_dim; ++i) {
                const float rot = i < half ? -tmp[i + half] : tmp[i - half];
                const float a = widen(round_bf16(tmp[i] * widen(c[i]))), b = widen(round_bf16(rot * widen(s[i])));
                v[i] = round_bf16(a + b);
            }
        }
    }
    return 0;
}

int loraplex_layer_ops_isa(void) { return LP_ISA; }
