/*
 * The small per-layer fp32 operations of a decode step, one call each instead of a chain of torch ops:
 *
 *   loraplex_rms_norm: y[t] = w * (x[t] * (1 / sqrt(mean(x[t]^2) + eps)))      (transformers' order)
 *   loraplex_rope:     in place on the first `heads` heads of each row of qkv, rotate-half RoPE on the first
 *                      rot_dim values of each head (the rest pass through: partial rotary):
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
#include "_bf16.h"

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
        for (int64_t k = 0; k < K; ++k) yr[k] = bf16_round(bf16_widen(w[k]) * bf16_widen(bf16_round(bf16_widen(xr[k]) * inv)));
    }
    return 0;
}

/* v as the serving dtype would hold it: rounded to bf16 (and widened back), or fp32 as it is. */
static inline float to_dtype(float v, int bf16) { return bf16 ? bf16_widen(bf16_round(v)) : v; }

/* Both RoPE entries, inlined with bf16 a literal: fp32 rounds the products and their sum as fp32 ops do
 * (no contraction); bf16 rounds each of them to bf16, as torch's bf16 ops do. */
static inline __attribute__((always_inline)) int rope(void *qkv, int64_t ld, const void *cos_table,
                                                      const void *sin_table, const int64_t *positions, int64_t T,
                                                      int64_t heads, int64_t head_dim, int64_t rot_dim,
                                                      int64_t max_positions, const int bf16) {
    if (T < 0 || heads < 1 || rot_dim < 2 || rot_dim % 2 || rot_dim > head_dim || ld < heads * head_dim) return 4;
    const int64_t half = rot_dim / 2, es = bf16 ? 2 : 4;
    float tmp[512];
    if (rot_dim > 512) return 4;
    for (int64_t t = 0; t < T; ++t) {
        const int64_t p = positions[t];
        if (p < 0 || p >= max_positions) return 4;
        const char *c = (const char *)cos_table + p * rot_dim * es, *s = (const char *)sin_table + p * rot_dim * es;
        for (int64_t h = 0; h < heads; ++h) {
            char *v = (char *)qkv + (t * ld + h * head_dim) * es;
            for (int64_t i = 0; i < rot_dim; ++i) tmp[i] = f32_or_bf16_at(v, i, bf16);
            for (int64_t i = 0; i < rot_dim; ++i) {
                const float rot = i < half ? -tmp[i + half] : tmp[i - half];
                const float sum = to_dtype(tmp[i] * f32_or_bf16_at(c, i, bf16), bf16) + to_dtype(rot * f32_or_bf16_at(s, i, bf16), bf16);
                if (bf16) ((uint16_t *)v)[i] = bf16_round(sum);
                else ((float *)v)[i] = sum;
            }
        }
    }
    return 0;
}

int loraplex_rope(float *qkv, int64_t ld, const float *cos_table, const float *sin_table, const int64_t *positions,
                  int64_t T, int64_t heads, int64_t head_dim, int64_t rot_dim, int64_t max_positions) {
    return rope(qkv, ld, cos_table, sin_table, positions, T, heads, head_dim, rot_dim, max_positions, 0);
}

int loraplex_rope_bf16(uint16_t *qkv, int64_t ld, const uint16_t *cos_table, const uint16_t *sin_table,
                       const int64_t *positions, int64_t T, int64_t heads, int64_t head_dim, int64_t rot_dim,
                       int64_t max_positions) {
    return rope(qkv, ld, cos_table, sin_table, positions, T, heads, head_dim, rot_dim, max_positions, 1);
}

int loraplex_layer_ops_isa(void) { return LP_ISA; }
