/*
 * Decode steps on quantized weights by integer dot products (included by _gemv.c), as GGML does:
 * each token's activations are quantized to 8 bits per 32-value block, and a block of weight codes
 * meets a block of activation codes in 8-bit multiplies summed exactly in 32-bit integers; floats
 * appear once per block (the two scales) instead of once per value.
 *
 *   activations   per token, block b:  d_b = max|x| / 127,  q_i = round(x_i * (127 / max|x|))  (-127..127)
 *   weights       value = s_b * (c_i - o) + m_b  (W_I8: signed codes, o = 0; W_U4: codes 0..15, o the
 *                 matrix's integral offset)
 *   lanes         v_l = sum over i in 4l .. 4l + 3 of c_i q_i  -  o * (sum of those q_i)   (exact, l < 8)
 *                 (the byte multiplies take an unsigned operand: W_I8 multiplies |c| by q with c's sign)
 *   dot           acc_L = fma((float)v_l, s_b * d_b, acc_L),  L = l + 8 (b mod 2), blocks in order;
 *                 mins  = fma(m_b, d_b * sum(q), mins_L'),  L' = b mod 16, blocks in order;
 *                 y = sum16(acc) + sum16(mins) (+ bias)       (sum16: the tree of _lora_vec.h's sum4)
 *
 * The avx512 build takes a pair of blocks per 512-bit instruction, the avx2 build even blocks then
 * odd ones in two passes of 256-bit instructions, the portable one scalar integers: the integer sums
 * are exact and the float operations the same ones in the same order, so every build and thread count
 * gives the same bits. Only for K a multiple of 32 and an integral offset (GGUF Q8_0 / Q4_0 / Q4_1,
 * our int8 and int4); other matrices take the dequantizing path.
 */
#ifndef LP_GEMV_QDOT_H
#define LP_GEMV_QDOT_H

#include <math.h>

/* A step's activations, quantized. Rows are padded to an even number of blocks (zeros), so a pair of
 * blocks can always be read whole. */
typedef struct {
    int8_t *q;    /* [T, kp] codes, kp = 32 * bp */
    float *d;     /* [T, bp] scales: x ~ d * q */
    float *xs;    /* [T, bp] d * sum(q), the minimum's term */
    int32_t *oq;  /* [T, bp, 8] o * (lane sums of q), the offset's term */
    int64_t bp;   /* blocks, rounded up to even */
    int32_t o;    /* the matrix's offset (0 for W_I8) */
} qacts;

/* Quantize token row x (K values, K % 32 == 0) into row t of A. */
static void quantize_row(const float *x, int64_t K, int64_t t, const qacts *A) {
    const int64_t blocks = K / GW, kp = A->bp * GW;
    for (int64_t b = 0; b < A->bp; ++b) {
        int8_t *q = A->q + t * kp + b * GW;
        float amax = 0.0f;
        if (b == blocks) { /* the padding block */
            memset(q, 0, GW);
        } else {
            const float *xb = x + b * GW;
#if LP_ISA >= 1
            const __m256 sign = _mm256_set1_ps(-0.0f);
            __m256 v[4], m = _mm256_setzero_ps();
            for (int i = 0; i < 4; ++i) {
                v[i] = _mm256_loadu_ps(xb + 8 * i);
                m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
            }
            float lanes[8];
            _mm256_storeu_ps(lanes, m);
            for (int i = 0; i < 8; ++i) amax = lanes[i] > amax ? lanes[i] : amax;
            const __m256 vi = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m256i n[4];
            for (int i = 0; i < 4; ++i) n[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vi)); /* nearest, ties even */
            /* packs interleave 128-bit halves; the permutation puts the 32 bytes back in order */
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(n[0], n[1]), _mm256_packs_epi32(n[2], n[3]));
            _mm256_storeu_si256((__m256i *)q,
                                _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
#else
            for (int i = 0; i < GW; ++i) {
                const float a = fabsf(xb[i]);
                amax = a > amax ? a : amax;
            }
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            for (int i = 0; i < GW; ++i) q[i] = (int8_t)nearbyintf(xb[i] * inv); /* nearest, ties to even */
#endif
        }
        const float d = amax / 127.0f;
        int32_t sum = 0;
        for (int l = 0; l < 8; ++l) {
            const int32_t s = q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3];
            A->oq[(t * A->bp + b) * 8 + l] = A->o * s;
            sum += s;
        }
        A->d[t * A->bp + b] = d;
        A->xs[t * A->bp + b] = d * (float)sum;
    }
}

/* Tokens per tile of the integer path. */
enum { QT = 2 };

/* sum over blocks of m_b * xs_b for the tile's rows and tokens, accumulated in 16 lanes (L' = b mod 16). */
LP_INLINE void mins_terms(const weights *W, const qacts *A, int64_t blocks, int64_t t0, int NT, int64_t n0, int NJ,
                          float out[QT][MJ]) {
    for (int r = 0; r < NJ; ++r) {
        vf acc[QT];
        for (int i = 0; i < NT; ++i) acc[i] = vzero();
        const float *row = W->mins + (n0 + r) * W->groups; /* one minimum a block (32-value groups) */
        for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
            const int nb = (int)(blocks - b0 < 16 ? blocks - b0 : 16);
            vf mv, unused;
            if (W->group == GW) {
                ld_pair(row, b0, nb, &mv, &unused, LD_F32);
            } else {
                float m[16] = {0};
                for (int e = 0; e < nb; ++e) m[e] = W->mins[group_of(W, n0 + r, (b0 + e) * GW)];
                ld_pair(m, 0, 16, &mv, &unused, LD_F32);
            }
            for (int i = 0; i < NT; ++i) {
                vf xv;
                ld_pair(A->xs + (t0 + i) * A->bp + b0, 0, nb, &xv, &unused, LD_F32);
                acc[i] = vfma(mv, xv, acc[i]);
            }
        }
        for (int i = 0; i < NT; ++i) {
            float s[4];
            sum4(acc[i], vzero(), vzero(), vzero(), s);
            out[i][r] = s[0];
        }
    }
}

/* y[t0 + i, n0 + r] (i < NT, r < NJ) = sum16(acc) + the minimum's terms (+ bias). */
LP_INLINE void qdot_store(const job *j, const qacts *A, int64_t blocks, int64_t t0, int NT, int64_t n0, int NJ,
                          vf acc[QT][MJ]) {
    float mins[QT][MJ] = {{0}};
    if (j->W.mins) mins_terms(&j->W, A, blocks, t0, NT, n0, NJ, mins);
    for (int i = 0; i < NT; ++i) {
        float sums[4];
        sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], sums);
        for (int r = 0; r < NJ; ++r) sums[r] = sums[r] + mins[i][r];
        store_sums(j, 0, t0 + i, n0, NJ, sums);
    }
}

#if LP_ISA == 2
/* The 64 codes of blocks (b, b + 1) of a row (zeros for b + 1 past the row): W_I8 signed, W_U4 0..15. */
LP_INLINE __m512i codes_pair(const char *row, int mode, int64_t b, int two) {
    if (mode == W_I8) {
        return two ? _mm512_loadu_si512(row + b * GW)
                   : _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(row + b * GW)));
    }
    const __m256i p = two ? _mm256_loadu_si256((const __m256i *)(row + b * GW / 2))
                          : _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(row + b * GW / 2)));
    /* [p_b, p_b+1, p_b >> 4, p_b+1 >> 4] -> [p_b, p_b >> 4, p_b+1, p_b+1 >> 4]: each block's 32 codes in order */
    const __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(p), _mm256_srli_epi16(p, 4), 1);
    return _mm512_and_si512(_mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0)), _mm512_set1_epi8(0x0F));
}

LP_INLINE __m512 pair_of(float lo, float hi) {
    return _mm512_insertf32x8(_mm512_set1_ps(lo), _mm256_set1_ps(hi), 1);
}

/* [s_b x 8, s_b+1 x 8] of a row (0 for b + 1 past it). */
LP_INLINE __m512 scales_pair(const weights *W, int64_t r, int64_t b, int two) {
    if (W->group == GW && two) { /* one 8-byte load, each float spread over its 8 lanes */
        const __m128 p = _mm_castpd_ps(_mm_load_sd((const double *)(W->scales + r * W->groups + b)));
        return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                     _mm512_castps128_ps512(p));
    }
    return pair_of(W->scales[group_of(W, r, b * GW)], two ? W->scales[group_of(W, r, (b + 1) * GW)] : 0.0f);
}

LP_TILE void qdot_tile(const job *j, const qacts *A, int mode, int64_t t0, int NT, int64_t n0, int NJ) {
    const weights *W = &j->W;
    const int64_t blocks = j->K / GW, kp = A->bp * GW;
    const int offset = A->o != 0;
    vf acc[QT][MJ];
    for (int i = 0; i < NT; ++i)
        for (int r = 0; r < MJ; ++r) acc[i][r] = vzero();
    const __m512i ones = _mm512_set1_epi16(1);
    for (int64_t b = 0; b < blocks; b += 2) {
        const int two = b + 1 < blocks;
        __m512i q[QT], oq[QT];
        __m512 d[QT];
        for (int i = 0; i < NT; ++i) {
            q[i] = _mm512_loadu_si512(A->q + (t0 + i) * kp + b * GW);
            oq[i] = _mm512_loadu_si512(A->oq + ((t0 + i) * A->bp + b) * 8);
            d[i] = pair_of(A->d[(t0 + i) * A->bp + b], A->d[(t0 + i) * A->bp + b + 1]);
        }
        for (int r = 0; r < NJ; ++r) {
            const char *row = W->w + (n0 + r - W->row0) * W->row_bytes;
            const __m512i c = codes_pair(row, mode, b, two);
            const __m512i u = mode == W_I8 ? _mm512_abs_epi8(c) : c;
            const __mmask64 neg = mode == W_I8 ? _mm512_movepi8_mask(c) : 0;
            const __m512 s = scales_pair(W, n0 + r, b, two);
            for (int i = 0; i < NT; ++i) {
                const __m512i qs = mode == W_I8 ? _mm512_mask_sub_epi8(q[i], neg, _mm512_setzero_si512(), q[i]) : q[i];
                __m512i v = _mm512_madd_epi16(_mm512_maddubs_epi16(u, qs), ones);
                if (offset) v = _mm512_sub_epi32(v, oq[i]);
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v), _mm512_mul_ps(s, d[i]), acc[i][r]);
            }
        }
    }
    qdot_store(j, A, blocks, t0, NT, n0, NJ, acc);
}

#elif LP_ISA == 1
LP_TILE void qdot_tile(const job *j, const qacts *A, int mode, int64_t t0, int NT, int64_t n0, int NJ) {
    const weights *W = &j->W;
    const int64_t blocks = j->K / GW, kp = A->bp * GW;
    const int offset = A->o != 0;
    vf acc[QT][MJ];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; ++half) { /* even blocks into lanes 0-7, then odd ones into 8-15 */
        __m256 a[QT][MJ];
        for (int i = 0; i < NT; ++i)
            for (int r = 0; r < MJ; ++r) a[i][r] = _mm256_setzero_ps();
        for (int64_t b = half; b < blocks; b += 2) {
            __m256i q[QT], oq[QT];
            __m256 d[QT];
            for (int i = 0; i < NT; ++i) {
                q[i] = _mm256_loadu_si256((const __m256i *)(A->q + (t0 + i) * kp + b * GW));
                oq[i] = _mm256_loadu_si256((const __m256i *)(A->oq + ((t0 + i) * A->bp + b) * 8));
                d[i] = _mm256_set1_ps(A->d[(t0 + i) * A->bp + b]);
            }
            for (int r = 0; r < NJ; ++r) {
                const char *row = W->w + (n0 + r - W->row0) * W->row_bytes;
                __m256i c;
                if (mode == W_I8) {
                    c = _mm256_loadu_si256((const __m256i *)(row + b * GW));
                } else {
                    const __m128i p = _mm_loadu_si128((const __m128i *)(row + b * GW / 2));
                    c = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), _mm256_set1_epi8(0x0F));
                }
                const __m256i u = mode == W_I8 ? _mm256_abs_epi8(c) : c;
                const __m256 s = _mm256_set1_ps(W->scales[group_of(W, n0 + r, b * GW)]);
                for (int i = 0; i < NT; ++i) {
                    const __m256i qs = mode == W_I8 ? _mm256_sign_epi8(q[i], c) : q[i];
                    __m256i v = _mm256_madd_epi16(_mm256_maddubs_epi16(u, qs), ones);
                    if (offset) v = _mm256_sub_epi32(v, oq[i]);
                    a[i][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), _mm256_mul_ps(s, d[i]), a[i][r]);
                }
            }
        }
        for (int i = 0; i < NT; ++i)
            for (int r = 0; r < MJ; ++r) {
                if (half) acc[i][r].h = a[i][r];
                else acc[i][r].l = a[i][r];
            }
    }
    qdot_store(j, A, blocks, t0, NT, n0, NJ, acc);
}

#else
LP_TILE void qdot_tile(const job *j, const qacts *A, int mode, int64_t t0, int NT, int64_t n0, int NJ) {
    const weights *W = &j->W;
    const int64_t blocks = j->K / GW, kp = A->bp * GW;
    vf acc[QT][MJ];
    for (int i = 0; i < NT; ++i)
        for (int r = 0; r < MJ; ++r) acc[i][r] = vzero();
    for (int64_t b = 0; b < blocks; ++b)
        for (int r = 0; r < NJ; ++r) {
            const char *row = W->w + (n0 + r - W->row0) * W->row_bytes;
            int32_t u[GW]; /* the codes, signed (W_I8) or 0..15 */
            for (int e = 0; e < GW; ++e)
                u[e] = mode == W_I8 ? ((const int8_t *)row)[b * GW + e]
                       : e < 16     ? ((const uint8_t *)row)[b * GW / 2 + e] & 0x0F
                                    : ((const uint8_t *)row)[b * GW / 2 + e - 16] >> 4;
            const float s = W->scales[group_of(W, n0 + r, b * GW)];
            for (int i = 0; i < NT; ++i) {
                const int8_t *q = A->q + (t0 + i) * kp + b * GW;
                const int32_t *oq = A->oq + ((t0 + i) * A->bp + b) * 8;
                const float sd = s * A->d[(t0 + i) * A->bp + b];
                for (int l = 0; l < 8; ++l) {
                    int32_t v = 0;
                    for (int e = 4 * l; e < 4 * l + 4; ++e) v += u[e] * q[e];
                    float *lane = &acc[i][r].v[l + 8 * (b & 1)];
                    *lane = fmaf((float)(v - oq[l]), sd, *lane);
                }
            }
        }
    qdot_store(j, A, blocks, t0, NT, n0, NJ, acc);
}
#endif

/* This thread's rows (whole tiles, as run_mode), every token pair. */
static void run_qdot(const job *j, const qacts *A, int mode, int tid, int nth) {
    const int64_t N = j->N, tiles = (N + MJ - 1) / MJ;
    const int64_t n_lo = tiles * tid / nth * MJ, n_hi = tiles * (tid + 1) / nth * MJ;
    const weights *W = &j->W;
    for (int64_t n0 = n_lo; n0 < n_hi && n0 < N; n0 += MJ) {
        const int nj = (int)(N - n0 < MJ ? N - n0 : MJ);
        prefetch_ahead(W, n0, n_hi < N ? n_hi : N);
        for (int64_t t0 = 0; t0 < j->T; t0 += QT) {
            const int nt = (int)(j->T - t0 < QT ? j->T - t0 : QT);
            if (nj == MJ && nt == 2) qdot_tile(j, A, mode, t0, 2, n0, MJ);
            else if (nj == MJ && nt == 1) qdot_tile(j, A, mode, t0, 1, n0, MJ);
            else qdot_tile(j, A, mode, t0, nt, n0, nj);
        }
    }
}

#endif /* LP_GEMV_QDOT_H */
