/*
 * Widening quantized weight codes to the 16-lane vectors of ../lora/_lora_vec.h, per ISA build.
 *
 * A pair (lo, hi) holds 32 consecutive values of a row, lanes in order (the LD_F32 layout):
 *   ld_i8:  32 signed 8-bit codes                 -> exact floats -128..127
 *   ld_u4:  16 bytes of a GGML 4-bit block: code j in the low nibble of byte j and
 *           code j + 16 in its high nibble         -> exact floats 0..15
 */
#ifndef LP_GEMV_CODES_H
#define LP_GEMV_CODES_H

#include "../lora/_lora_vec.h"

#if LP_ISA == 2
LP_INLINE void ld_i8(const int8_t *p, vf *lo, vf *hi) {
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
}

LP_INLINE void ld_u4(const uint8_t *p, vf *lo, vf *hi) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
    *lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, m)));
    *hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m)));
}

#elif LP_ISA == 1
LP_INLINE __m256 cvt_i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

LP_INLINE __m256 cvt_u8x8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }

LP_INLINE void ld_i8(const int8_t *p, vf *lo, vf *hi) {
    *lo = (vf){cvt_i8x8(p), cvt_i8x8(p + 8)};
    *hi = (vf){cvt_i8x8(p + 16), cvt_i8x8(p + 24)};
}

LP_INLINE void ld_u4(const uint8_t *p, vf *lo, vf *hi) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(0x0F);
    const __m128i l = _mm_and_si128(b, m), h = _mm_and_si128(_mm_srli_epi16(b, 4), m);
    *lo = (vf){cvt_u8x8(l), cvt_u8x8(_mm_srli_si128(l, 8))};
    *hi = (vf){cvt_u8x8(h), cvt_u8x8(_mm_srli_si128(h, 8))};
}

#else
LP_INLINE void ld_i8(const int8_t *p, vf *lo, vf *hi) {
    for (int i = 0; i < 16; ++i) {
        lo->v[i] = (float)p[i];
        hi->v[i] = (float)p[i + 16];
    }
}

LP_INLINE void ld_u4(const uint8_t *p, vf *lo, vf *hi) {
    for (int i = 0; i < 16; ++i) {
        lo->v[i] = (float)(p[i] & 0x0F);
        hi->v[i] = (float)(p[i] >> 4);
    }
}
#endif

#endif /* LP_GEMV_CODES_H */
