/*
 * The 16-lane float vector the LoRA kernel computes with, in three builds chosen by the compiler
 * flags (server/native.py builds each): AVX-512 (one __m512), AVX2 + FMA (two __m256 holding
 * lanes 0-7 and 8-15) and portable C (an array of 16 floats).
 *
 * Every build does the same arithmetic on the same lanes: multiply-adds are fused (one rounding,
 * fmaf in the portable build), products and sums are separate roundings everywhere (the kernel is
 * built with -ffp-contract=off), and a horizontal sum adds the lanes in one fixed tree
 *     s8[i] = v[i] + v[i + 8];  s4[i] = s8[i] + s8[i + 4];  sum = (s4[0] + s4[1]) + (s4[2] + s4[3])
 * so the three builds give bit-identical results: the portable build reproduces the AVX-512
 * arithmetic on any CPU.
 *
 * Rows move 32 elements at a time as a pair of vectors (lo, hi), in one of three layouts:
 *   LD_F32:   fp32 elements [0, 16) in lo and [16, 32) in hi;
 *   LD_SPLIT: bf16 elements, the even ones in lo and the odd ones in hi (one shift or mask per
 *             32-bit word, no shuffles);
 *   LD_WIDEN: bf16 elements widened exactly to fp32, in the LD_F32 order.
 * A row's tail (n < 32 elements) reads zeros past n and writes only its n elements.
 */
#ifndef LP_LORA_VEC_H
#define LP_LORA_VEC_H

#include <math.h>
#include <stdint.h>
#include <string.h>


#define LP_INLINE static inline __attribute__((always_inline))

enum { LD_F32 = 0, LD_SPLIT = 1, LD_WIDEN = 2 };

/* Mask of the first n (0..32) of 32 elements. */
LP_INLINE uint32_t first_n(int64_t n) { return n >= 32 ? 0xFFFFFFFFu : (uint32_t)((1u << n) - 1u); }

LP_INLINE void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define LP_ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#define LP_ISA 1
#else
#define LP_ISA 0
#endif

/* The kernel's tiles: each (tokens, rows) shape is its own fully unrolled instance in the vector
 * builds; the portable build keeps one out-of-line instance each, to compile in seconds. */
#if LP_ISA >= 1
#define LP_TILE LP_INLINE
#else
#define LP_TILE static __attribute__((noinline))
#endif

/* ------------------------------------------------------------------ shared by the x86 builds */
#if LP_ISA >= 1
#include <immintrin.h>

/* The horizontal sums of four 8-lane half-sums s8, from s4 on, in the tree above. */
LP_INLINE void sum4_m256(__m256 a, __m256 b, __m256 c, __m256 d, float out[4]) {
    const __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    const __m128 c4 = _mm_add_ps(_mm256_castps256_ps128(c), _mm256_extractf128_ps(c, 1));
    const __m128 d4 = _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
    /* hadd(x, y) = (x0 + x1, x2 + x3, y0 + y1, y2 + y3) */
    _mm_storeu_ps(out, _mm_hadd_ps(_mm_hadd_ps(a4, b4), _mm_hadd_ps(c4, d4)));
}

/* fp32 -> bf16 round to nearest even (NaN -> 0x7FC0, as torch), result in the high 16 bits. */
LP_INLINE __m256i round_bf16_high_256(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    r = _mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), nan));
}
#endif

/* ------------------------------------------------------------------------------- AVX-512 */
#if LP_ISA == 2
typedef __m512 vf;

LP_INLINE vf vzero(void) { return _mm512_setzero_ps(); }
LP_INLINE vf vset1(float v) { return _mm512_set1_ps(v); }
LP_INLINE vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
LP_INLINE vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
LP_INLINE __m256 half_sum(vf v) { return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1)); }

LP_INLINE void sum4(vf a, vf b, vf c, vf d, float out[4]) {
    sum4_m256(half_sum(a), half_sum(b), half_sum(c), half_sum(d), out);
}

/* Elements [k, k + n) of a row (n <= 32) as a pair in layout `mode`. */
LP_INLINE void ld_pair(const void *base, int64_t k, int64_t n, vf *lo, vf *hi, int mode) {
    const uint32_t m = first_n(n);
    if (mode == LD_WIDEN) {
        /* One 64-byte load; each half widens with a single zero-masked word permute that puts
         * element i in the high word of dword i (the low word zeroed): exact, and in order. */
        const uint16_t *p = (const uint16_t *)base + k;
        const __m512i v = n < 32 ? _mm512_maskz_loadu_epi16(m, p) : _mm512_loadu_si512(p);
        const __m512i idx_lo = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5,
                                                0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
        const __m512i idx_hi = _mm512_add_epi16(idx_lo, _mm512_set1_epi16(16));
        *lo = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16((__mmask32)0xAAAAAAAAu, idx_lo, v));
        *hi = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16((__mmask32)0xAAAAAAAAu, idx_hi, v));
    } else if (mode == LD_SPLIT) {
        const uint16_t *p = (const uint16_t *)base + k;
        const __m512i v = n < 32 ? _mm512_maskz_loadu_epi16(m, p) : _mm512_loadu_si512(p);
        *lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        *hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else {
        const float *p = (const float *)base + k;
        *lo = n < 32 ? _mm512_maskz_loadu_ps((__mmask16)m, p) : _mm512_loadu_ps(p);
        *hi = n < 32 ? _mm512_maskz_loadu_ps((__mmask16)(m >> 16), p + 16) : _mm512_loadu_ps(p + 16);
    }
}

LP_INLINE __m512i round_bf16_high(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u));
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

/* y[c : c + n] += the pair (lo, hi): LD_SPLIT layout for bf16 y, LD_F32 for fp32 y. */
LP_INLINE void add_pair(void *base, int64_t c, int64_t n, vf lo, vf hi, int bf16) {
    const uint32_t m = first_n(n);
    if (bf16) {
        uint16_t *p = (uint16_t *)base + c;
        const __m512i v = _mm512_maskz_loadu_epi16(m, p);
        const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
        const __m512i out = _mm512_or_si512(_mm512_srli_epi32(round_bf16_high(_mm512_add_ps(even, lo)), 16),
                                            round_bf16_high(_mm512_add_ps(odd, hi)));
        _mm512_mask_storeu_epi16(p, m, out);
    } else {
        float *p = (float *)base + c;
        const __mmask16 m0 = (__mmask16)m, m1 = (__mmask16)(m >> 16);
        _mm512_mask_storeu_ps(p, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, p), lo));
        _mm512_mask_storeu_ps(p + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, p + 16), hi));
    }
}

/* ---------------------------------------------------------------------------- AVX2 + FMA */
#elif LP_ISA == 1
typedef struct {
    __m256 l, h; /* lanes 0-7, 8-15 */
} vf;

LP_INLINE vf vzero(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
LP_INLINE vf vset1(float v) { return (vf){_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
LP_INLINE vf vmul(vf a, vf b) { return (vf){_mm256_mul_ps(a.l, b.l), _mm256_mul_ps(a.h, b.h)}; }
LP_INLINE vf vfma(vf a, vf b, vf c) { return (vf){_mm256_fmadd_ps(a.l, b.l, c.l), _mm256_fmadd_ps(a.h, b.h, c.h)}; }

LP_INLINE void sum4(vf a, vf b, vf c, vf d, float out[4]) {
    sum4_m256(_mm256_add_ps(a.l, a.h), _mm256_add_ps(b.l, b.h), _mm256_add_ps(c.l, c.h), _mm256_add_ps(d.l, d.h),
              out);
}

/* 32 elements at p (no tail). */
LP_INLINE void ld_pair_full(const void *p, vf *lo, vf *hi, int mode) {
    if (mode == LD_WIDEN) {
        const __m128i *q = (const __m128i *)p;
        lo->l = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q)), 16));
        lo->h = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 1)), 16));
        hi->l = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 2)), 16));
        hi->h = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(q + 3)), 16));
    } else if (mode == LD_SPLIT) {
        /* 32-bit word w of the 64 bytes holds elements 2w (low half) and 2w + 1 (high half). */
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)p), v1 = _mm256_loadu_si256((const __m256i *)p + 1);
        const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
        lo->l = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        lo->h = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        hi->l = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
        hi->h = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
    } else {
        const float *q = (const float *)p;
        lo->l = _mm256_loadu_ps(q);
        lo->h = _mm256_loadu_ps(q + 8);
        hi->l = _mm256_loadu_ps(q + 16);
        hi->h = _mm256_loadu_ps(q + 24);
    }
}

LP_INLINE void ld_pair(const void *base, int64_t k, int64_t n, vf *lo, vf *hi, int mode) {
    const int64_t es = mode == LD_F32 ? 4 : 2;
    const char *p = (const char *)base + k * es;
    if (n >= 32) {
        ld_pair_full(p, lo, hi, mode);
        return;
    }
    _Alignas(32) char buf[128] = {0}; /* the tail, zero-padded */
    memcpy(buf, p, (size_t)(n * es));
    ld_pair_full(buf, lo, hi, mode);
}

LP_INLINE void add_pair_full(void *p, vf lo, vf hi, int bf16) {
    if (bf16) {
        __m256i *q = (__m256i *)p;
        const __m256i hi_mask = _mm256_set1_epi32((int)0xFFFF0000u);
        const __m256i v[2] = {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
        const __m256 add_even[2] = {lo.l, lo.h}, add_odd[2] = {hi.l, hi.h};
        for (int i = 0; i < 2; ++i) {
            const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v[i], 16));
            const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v[i], hi_mask));
            const __m256i out = _mm256_or_si256(_mm256_srli_epi32(round_bf16_high_256(_mm256_add_ps(even, add_even[i])), 16),
                                                round_bf16_high_256(_mm256_add_ps(odd, add_odd[i])));
            _mm256_storeu_si256(q + i, out);
        }
    } else {
        float *q = (float *)p;
        _mm256_storeu_ps(q, _mm256_add_ps(_mm256_loadu_ps(q), lo.l));
        _mm256_storeu_ps(q + 8, _mm256_add_ps(_mm256_loadu_ps(q + 8), lo.h));
        _mm256_storeu_ps(q + 16, _mm256_add_ps(_mm256_loadu_ps(q + 16), hi.l));
        _mm256_storeu_ps(q + 24, _mm256_add_ps(_mm256_loadu_ps(q + 24), hi.h));
    }
}

LP_INLINE void add_pair(void *base, int64_t c, int64_t n, vf lo, vf hi, int bf16) {
    const int64_t es = bf16 ? 2 : 4;
    char *p = (char *)base + c * es;
    if (n >= 32) {
        add_pair_full(p, lo, hi, bf16);
        return;
    }
    _Alignas(32) char buf[128] = {0};
    memcpy(buf, p, (size_t)(n * es));
    add_pair_full(buf, lo, hi, bf16);
    memcpy(p, buf, (size_t)(n * es));
}

/* ------------------------------------------------------------------------------ portable */
#else
typedef struct {
    float v[16];
} vf;

LP_INLINE vf vzero(void) { return (vf){{0}}; }
LP_INLINE vf vset1(float s) {
    vf r;
    for (int i = 0; i < 16; ++i) r.v[i] = s;
    return r;
}
LP_INLINE vf vmul(vf a, vf b) {
    for (int i = 0; i < 16; ++i) a.v[i] = a.v[i] * b.v[i];
    return a;
}
LP_INLINE vf vfma(vf a, vf b, vf c) {
    for (int i = 0; i < 16; ++i) c.v[i] = fmaf(a.v[i], b.v[i], c.v[i]);
    return c;
}

LP_INLINE float sum16(vf a) {
    float s8[8], s4[4];
    for (int i = 0; i < 8; ++i) s8[i] = a.v[i] + a.v[i + 8];
    for (int i = 0; i < 4; ++i) s4[i] = s8[i] + s8[i + 4];
    return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

LP_INLINE void sum4(vf a, vf b, vf c, vf d, float out[4]) {
    out[0] = sum16(a);
    out[1] = sum16(b);
    out[2] = sum16(c);
    out[3] = sum16(d);
}

LP_INLINE float bf16_to_f32(uint16_t v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

LP_INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0x7FC0; /* NaN, as torch does */
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element e of the 32 in a pair's layout: (vector, lane). */
LP_INLINE float *pair_lane(vf *lo, vf *hi, int e, int split) {
    if (split) return (e & 1 ? hi : lo)->v + (e >> 1);
    return (e < 16 ? lo : hi)->v + (e & 15);
}

LP_INLINE void ld_pair(const void *base, int64_t k, int64_t n, vf *lo, vf *hi, int mode) {
    *lo = vzero();
    *hi = vzero();
    for (int e = 0; e < n && e < 32; ++e)
        *pair_lane(lo, hi, e, mode == LD_SPLIT) =
            mode == LD_F32 ? ((const float *)base)[k + e] : bf16_to_f32(((const uint16_t *)base)[k + e]);
}

LP_INLINE void add_pair(void *base, int64_t c, int64_t n, vf lo, vf hi, int bf16) {
    for (int e = 0; e < n && e < 32; ++e) {
        const float d = *pair_lane(&lo, &hi, e, bf16);
        if (bf16) {
            uint16_t *p = (uint16_t *)base + c + e;
            *p = f32_to_bf16(bf16_to_f32(*p) + d);
        } else {
            ((float *)base)[c + e] += d;
        }
    }
}
#endif

#endif /* LP_LORA_VEC_H */
