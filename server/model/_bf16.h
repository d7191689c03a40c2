/* bf16 <-> fp32 for the C kernels that take bf16 tensors (torch's conversions, bit for bit). */
#ifndef LP_BF16_H
#define LP_BF16_H

#include <stdint.h>
#include <string.h>

/* Exact: a bf16 is the top half of an fp32. */
static inline float bf16_widen(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* To nearest even; NaN -> 0x7FC0, as torch. */
static inline uint16_t bf16_round(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element i of a row of fp32 (bf16 == 0) or bf16 values, as fp32 (kernels taking either dtype inline
 * their bodies with bf16 a literal, so each dtype's loops are compiled for it alone). */
static inline float f32_or_bf16_at(const void *row, int64_t i, int bf16) {
    return bf16 ? bf16_widen(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

#endif /* LP_BF16_H */
