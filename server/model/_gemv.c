/*
 * Small-batch projections on CPU, streaming the weight once with every thread:
 *
 *     for t in range(T):            # decode steps: a few tokens
 *         y[t] = W @ x[t] (+ b)      # W [N, K], x [T, K] (row stride ldx), y [T, N] contiguous
 *
 * W is stored in one of four ways (the `mode`):
 *   W_F32   fp32 values, x and y fp32;
 *   W_BF16  bf16 values, x, y and b bf16 (products summed in fp32, y rounded once);
 *   W_I8    signed 8-bit codes, one fp32 scale (and optional minimum) per `group` values of a row;
 *   W_U4    4-bit codes in GGML's 32-value block order (../model/_gemv_codes.h), scales likewise.
 * Quantized matrices take two paths. Where the caller asks (int8_acts), steps of up to QDOT_TOKENS
 * tokens quantize the activations to 8 bits per block and take integer dot
 * products (_gemv_qdot.h: GGML's arithmetic, close to the fp32 product, not equal to it). Other steps
 * dequantize each tile of rows to the fp32 values GGML
 * writes out (see scale_and_shift) and multiply those: bit for bit what the dequantized copy
 * (loraplex_dequantize) gives in W_F32 mode.
 *
 * Each thread takes a contiguous range of output rows, so the weight is read from memory once,
 * in order, split across threads; a tile of 4 rows and up to 4 tokens keeps its accumulators in
 * registers, and the tokens beyond 4 reuse the tile's rows from the cache. Dot products use the
 * LoRA kernel's 16-lane vectors (../lora/_lora_vec.h): the same fused multiply-adds and summation
 * tree in every ISA build, so builds and thread counts agree bit for bit.
 *
 * Returns 0, 4 on bad sizes or arguments, 5 when memory for the quantized activations is short.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "_bf16.h"
#include "_gemv_codes.h"

enum { W_F32 = 0, W_BF16 = 1, W_I8 = 2, W_U4 = 3 };
enum { GW = 32, MT = 4, MJ = 4 };
/* One thread does the calls below this many weight bytes (fork and join cost ~1.5 us). */
enum { MIN_PAR_BYTES = 1 << 17 };
/* Steps of quantized weights up to this many tokens may take integer dot products (when the caller
 * asks); longer ones take the exact path (on a Xeon the integer path wins at 1 token, ties at 2 in the
 * AVX-512 build, and from 3 tokens on is no faster than exact tiles dequantized in registers). */
enum { QDOT_TOKENS = 2 };
/* Exact steps (fp32 activations) on codes up to this many tokens dequantize each tile's rows in
 * registers for its tokens (run_mode); longer ones dequantize a tile once into a buffer that every
 * group of 4 tokens reads (run_dequantized). Xeon, 2 threads, 3072x576 4-bit: 1 token 84 against
 * 125 us, 4 tokens 121 against 185 us (AVX2 build: 126 / 171 and 216 / 363 us). */
enum { EXACT_IN_REGISTERS = 4 };

typedef struct {
    const char *w;        /* rows row0, row0 + 1, ... of row_bytes bytes each */
    int64_t row_bytes;
    const float *scales;  /* W_I8, W_U4: [N, groups] */
    const float *mins;    /* [N, groups], or NULL */
    int64_t group, groups;
    float offset;
    int gshift;           /* k / group == k >> gshift when >= 0 (a power-of-two group, or one group per row) */
    int64_t row0;
} weights;

LP_INLINE int64_t group_of(const weights *W, int64_t r, int64_t k) {
    return r * W->groups + (W->gshift >= 0 ? k >> W->gshift : k / W->group);
}

typedef struct {
    void *y;
    const void *x;
    int64_t ldx;
    const void *b;
    int64_t T, K, N;
    weights W;
} job;

/* w = scale * (code - offset) + minimum as one fused multiply-add, w = fma(scale, code, c) with
 * c = minimum - offset * scale: one rounding where GGML's dequantization rounds the product and then
 * the sum. The same values for GGUF blocks: their fp16 scale (11 significant bits) times a code of at
 * most 8 bits is exact in fp32, and so is offset * scale (offset 8), so only the sum rounds either way. */
LP_INLINE void scale_and_shift(const weights *W, int64_t g, float *sc, float *c) {
    *sc = W->scales[g];
    *c = W->mins ? W->mins[g] : 0.0f;
    if (W->offset != 0.0f) *c -= W->offset * *sc;
}

/* Values [k, k + n) of row r (n <= 32; W_U4 whole blocks only) as fp32, zeros past n. */
LP_INLINE void ld_w(const weights *W, int mode, int64_t r, int64_t k, int64_t n, vf *lo, vf *hi) {
    const char *row = W->w + (r - W->row0) * W->row_bytes;
    if (mode == W_F32 || mode == W_BF16) {
        ld_pair(row, k, n, lo, hi, mode == W_F32 ? LD_F32 : LD_WIDEN);
        return;
    }
    if (mode == W_U4) {
        ld_u4((const uint8_t *)row + k / 2, lo, hi);
    } else if (n >= GW) {
        ld_i8((const int8_t *)row + k, lo, hi);
    } else {
        int8_t buf[GW] = {0};
        memcpy(buf, row + k, (size_t)n);
        ld_i8(buf, lo, hi);
    }
    float sc, c;
    scale_and_shift(W, group_of(W, r, k), &sc, &c);
    const vf vs = vset1(sc), vc = vset1(c);
    *lo = vfma(vs, *lo, vc);
    *hi = vfma(vs, *hi, vc);
}

/* y[t, n0 + q] = sums[q] (+ b[n0 + q]) for q < nj: fp32, or bf16 rounded once. */
LP_INLINE void store_sums(const job *j, int xbf16, int64_t t, int64_t n0, int nj, const float sums[4]) {
    const int64_t at = t * j->N + n0;
    for (int q = 0; q < nj; ++q) {
        if (xbf16) {
            const float s = j->b ? sums[q] + bf16_widen(((const uint16_t *)j->b)[n0 + q]) : sums[q];
            ((uint16_t *)j->y)[at + q] = bf16_round(s);
        } else {
            ((float *)j->y)[at + q] = j->b ? sums[q] + ((const float *)j->b)[n0 + q] : sums[q];
        }
    }
}

/* y[t0 + i, n0 + q] = x[t0 + i] . W[n0 + q] (+ b) for i < NT, q < NJ. */
LP_TILE void gemv_tile(const job *j, int mode, int64_t t0, int NT, int64_t n0, int NJ) {
    const int xbf16 = mode == W_BF16;
    const int64_t K = j->K;
    const char *x = (const char *)j->x + t0 * j->ldx * (xbf16 ? 2 : 4);
    vf acc[MT][MJ];
    for (int i = 0; i < NT; ++i)
        for (int q = 0; q < NJ; ++q) acc[i][q] = vzero();
    for (int64_t k = 0; k < K; k += GW) {
        const int64_t n = K - k < GW ? K - k : GW;
        vf xl[MT], xh[MT];
        for (int i = 0; i < NT; ++i)
            ld_pair(x + i * j->ldx * (xbf16 ? 2 : 4), k, n, &xl[i], &xh[i], xbf16 ? LD_WIDEN : LD_F32);
        for (int q = 0; q < NJ; ++q) {
            vf wl, wh;
            ld_w(&j->W, mode, n0 + q, k, n, &wl, &wh);
            for (int i = 0; i < NT; ++i) acc[i][q] = vfma(xh[i], wh, vfma(xl[i], wl, acc[i][q]));
        }
    }
    for (int i = 0; i < NT; ++i) {
        vf v[4];
        for (int q = 0; q < 4; ++q) v[q] = q < NJ ? acc[i][q] : vzero();
        float sums[4];
        sum4(v[0], v[1], v[2], v[3], sums);
        store_sums(j, xbf16, t0 + i, n0, NJ, sums);
    }
}

#if LP_ISA == 1
/* AVX2 has 16 vector registers: a tile of 4 rows x 2 tokens holding all 16 lanes needs 16 for its
 * accumulators alone. The lanes never mix until the final sum, so this build runs lanes 0-7 and 8-15
 * in two passes over K (the tile's rows come back from L1 for the second), each pass with 8
 * accumulators of one __m256: the same fused multiply-adds on the same lanes as every other build. */
enum { MT2 = 2 };

/* Lanes [8 * half, 8 * half + 8) of values [k, k + 32) of a row: elements k + 8 half + i (lo)
 * and k + 16 + 8 half + i (hi), as fp32. */
LP_INLINE void ld_w_half(const weights *W, int mode, int64_t r, int64_t k, int64_t n, int half, __m256 *lo,
                         __m256 *hi) {
    if (n < GW) { /* a row's tail: the zero-padded general path */
        vf l, h;
        ld_w(W, mode, r, k, n, &l, &h);
        *lo = half ? l.h : l.l;
        *hi = half ? h.h : h.l;
        return;
    }
    const char *row = W->w + (r - W->row0) * W->row_bytes;
    const int64_t e = k + 8 * half;
    if (mode == W_F32) {
        *lo = _mm256_loadu_ps((const float *)row + e);
        *hi = _mm256_loadu_ps((const float *)row + e + 16);
        return;
    }
    const uint16_t *p = (const uint16_t *)row + e; /* W_BF16 */
    *lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    *hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + 16))), 16));
}

LP_INLINE void ld_x_half(const char *x, int xbf16, int64_t k, int64_t n, int half, __m256 *lo, __m256 *hi) {
    if (n < GW || xbf16) {
        vf l, h;
        ld_pair(x, k, n, &l, &h, xbf16 ? LD_WIDEN : LD_F32);
        *lo = half ? l.h : l.l;
        *hi = half ? h.h : h.l;
        return;
    }
    *lo = _mm256_loadu_ps((const float *)x + k + 8 * half);
    *hi = _mm256_loadu_ps((const float *)x + k + 16 + 8 * half);
}

/* Tokens t0 .. t0 + NT - 1 (NT <= 2) x rows n0 .. n0 + MJ - 1: both halves' sums, then the usual store. */
LP_INLINE void gemv_tile2(const job *j, int mode, int64_t t0, int NT, int64_t n0) {
    const int xbf16 = mode == W_BF16;
    const int64_t K = j->K, es = xbf16 ? 2 : 4;
    const char *x = (const char *)j->x + t0 * j->ldx * es;
    vf acc[MT2][MJ];
    for (int half = 0; half < 2; ++half) {
        __m256 a[MT2][MJ];
        for (int i = 0; i < NT; ++i)
            for (int q = 0; q < MJ; ++q) a[i][q] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += GW) {
            const int64_t n = K - k < GW ? K - k : GW;
            __m256 xl[MT2], xh[MT2];
            for (int i = 0; i < NT; ++i) ld_x_half(x + i * j->ldx * es, xbf16, k, n, half, &xl[i], &xh[i]);
            for (int q = 0; q < MJ; ++q) {
                __m256 wl, wh;
                ld_w_half(&j->W, mode, n0 + q, k, n, half, &wl, &wh);
                for (int i = 0; i < NT; ++i) a[i][q] = _mm256_fmadd_ps(xh[i], wh, _mm256_fmadd_ps(xl[i], wl, a[i][q]));
            }
        }
        for (int i = 0; i < NT; ++i)
            for (int q = 0; q < MJ; ++q) {
                if (half) acc[i][q].h = a[i][q];
                else acc[i][q].l = a[i][q];
            }
    }
    for (int i = 0; i < NT; ++i) {
        float sums[4];
        sum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], sums);
        store_sums(j, xbf16, t0 + i, n0, MJ, sums);
    }
}
#endif

/* Before the tile at row n0 of a thread's rows [.., n_hi): prefetch the rows (and scales, minimums) of
 * the tile AHEAD tiles on. The hardware's prefetchers alone leave a core well short of its share of the
 * memory bandwidth on these streams (measured on a Xeon: 15-20% of a quantized or bf16 decode step;
 * fp32 rows, read twice as fast per value, gain nothing). */
enum { AHEAD = 2 };
LP_INLINE void prefetch_ahead(const weights *W, int64_t n0, int64_t n_hi) {
    const int64_t r = n0 + AHEAD * MJ;
    if (r + MJ > n_hi) return; /* (n_hi clamped to N by the callers: the last tiles go without) */
    const char *rows = W->w + (r - W->row0) * W->row_bytes;
    for (int64_t o = 0; o < MJ * W->row_bytes; o += 64) prefetch(rows + o);
    if (!W->scales) return;
    for (int64_t o = 0; o < MJ * W->groups; o += 16) {
        prefetch(W->scales + r * W->groups + o);
        if (W->mins) prefetch(W->mins + r * W->groups + o);
    }
}

#include "_gemv_qdot.h"

/* Full tiles get code specialized for their token count; the last rows of a matrix take the general one. */
LP_INLINE void gemv_dispatch(const job *j, int mode, int64_t t0, int nt, int64_t n0, int nj) {
#if LP_ISA == 0
    gemv_tile(j, mode, t0, nt, n0, nj);
#elif LP_ISA == 1
    if (nj == MJ && (mode == W_F32 || mode == W_BF16)) {
        for (int64_t t = t0; t < t0 + nt; t += MT2) {
            if (t0 + nt - t >= MT2) gemv_tile2(j, mode, t, MT2, n0);
            else gemv_tile2(j, mode, t, 1, n0);
        }
        return;
    }
    gemv_tile(j, mode, t0, nt, n0, nj);
#else
    if (nj == MJ) {
        switch (nt) {
            case 1: gemv_tile(j, mode, t0, 1, n0, MJ); return;
            case 2: gemv_tile(j, mode, t0, 2, n0, MJ); return;
            case 3: gemv_tile(j, mode, t0, 3, n0, MJ); return;
            default: gemv_tile(j, mode, t0, 4, n0, MJ); return;
        }
    }
    gemv_tile(j, mode, t0, nt, n0, nj);
#endif
}

LP_INLINE void run_mode(const job *j, int mode, int tid, int nth) {
    /* Row ranges in whole tiles, so a tile never straddles two threads. */
    const int64_t N = j->N, tiles = (N + MJ - 1) / MJ;
    const int64_t n_lo = tiles * tid / nth * MJ, n_hi = tiles * (tid + 1) / nth * MJ;
    for (int64_t n0 = n_lo; n0 < n_hi && n0 < N; n0 += MJ) {
        const int nj = (int)(N - n0 < MJ ? N - n0 : MJ);
        if (mode != W_F32) prefetch_ahead(&j->W, n0, n_hi < N ? n_hi : N); /* fp32 streams as fast without */
        for (int64_t t0 = 0; t0 < j->T; t0 += MT) gemv_dispatch(j, mode, t0, (int)(j->T - t0 < MT ? j->T - t0 : MT), n0, nj);
    }
}

/* Rows [n0, n0 + nj) of a quantized matrix, dequantized to fp32 rows of K at out (the values ld_w gives). */
static void dequantize_rows(const weights *W, int mode, int64_t n0, int nj, int64_t K, float *out) {
    for (int q = 0; q < nj; ++q)
        for (int64_t k = 0; k < K; k += GW) {
            const int64_t n = K - k < GW ? K - k : GW;
            vf lo, hi;
            ld_w(W, mode, n0 + q, k, n, &lo, &hi);
            float *dst = out + q * K + k;
            if (n == GW) { /* a vf holds its 16 lanes in order in every build */
                memcpy(dst, &lo, sizeof lo);
                memcpy(dst + GW / 2, &hi, sizeof hi);
            } else {
                float buf[GW];
                memcpy(buf, &lo, sizeof lo);
                memcpy(buf + GW / 2, &hi, sizeof hi);
                memcpy(dst, buf, (size_t)n * sizeof(float));
            }
        }
}

/* Steps of more than EXACT_IN_REGISTERS tokens on quantized weights: each tile's rows are dequantized
 * once into a small fp32 buffer (L1-resident) that every token of the step then reads, instead of once
 * per group of 4 tokens. */
static void run_dequantized(const job *j, int mode, int tid, int nth) {
    const int64_t N = j->N, K = j->K, tiles = (N + MJ - 1) / MJ;
    const int64_t n_lo = tiles * tid / nth * MJ, n_hi = tiles * (tid + 1) / nth * MJ;
    float *buf = malloc((size_t)(MJ * K) * sizeof(float));
    if (!buf) return;
    job f = *j;
    f.W = (weights){(const char *)buf, K * 4, NULL, NULL, K, 1, 0.0f, 62, 0};
    for (int64_t n0 = n_lo; n0 < n_hi && n0 < N; n0 += MJ) {
        const int nj = (int)(N - n0 < MJ ? N - n0 : MJ);
        prefetch_ahead(&j->W, n0, n_hi < N ? n_hi : N);
        dequantize_rows(&j->W, mode, n0, nj, K, buf);
        f.W.row0 = n0;
        for (int64_t t0 = 0; t0 < j->T; t0 += MT) gemv_dispatch(&f, W_F32, t0, (int)(j->T - t0 < MT ? j->T - t0 : MT), n0, nj);
    }
    free(buf);
}

static void run(const job *j, int mode, int tid, int nth) {
    if ((mode == W_I8 || mode == W_U4) && j->T > EXACT_IN_REGISTERS) {
        run_dequantized(j, mode, tid, nth);
        return;
    }
    switch (mode) {
        case W_F32: run_mode(j, W_F32, tid, nth); break;
        case W_BF16: run_mode(j, W_BF16, tid, nth); break;
        case W_I8: run_mode(j, W_I8, tid, nth); break;
        default: run_mode(j, W_U4, tid, nth); break;
    }
}

/* One thread's share of a call: with quantized activations A, first its tokens' quantization (every
 * thread then waits for all of them), then its rows by integer dot products. */
static void run_share(const job *j, const qacts *A, int mode, int tid, int nth) {
    if (!A) {
        run(j, mode, tid, nth);
        return;
    }
    for (int64_t t = tid; t < j->T; t += nth) quantize_row((const float *)j->x + t * j->ldx, j->K, t, A);
    if (nth > 1) {
#pragma omp barrier
    }
    run_qdot(j, A, mode, tid, nth);
}

static int check(const weights *W, int mode, int64_t K, int64_t N) {
    if (K < 1 || N < 1 || mode < W_F32 || mode > W_U4 || !W->w) return 4;
    const int64_t need = mode == W_F32 ? K * 4 : mode == W_BF16 ? K * 2 : mode == W_I8 ? K : K / 2;
    if (W->row_bytes < need) return 4;
    if (mode == W_I8 || mode == W_U4) {
        if (!W->scales || W->group < 1 || (W->group % GW && W->group != K)) return 4;
        if (W->groups != (K + W->group - 1) / W->group) return 4;
        if (mode == W_U4 && (K % GW || W->group % GW)) return 4;
    }
    return 0;
}

static weights describe(const void *w, int64_t row_bytes, const float *scales, const float *mins, int64_t group,
                        float offset, int64_t K) {
    weights W = {(const char *)w, row_bytes, scales, mins, group > 0 ? group : K, 0, offset, -1, 0};
    W.groups = (K + W.group - 1) / W.group;
    if (W.group >= K) W.gshift = 62; /* one group per row: k >> 62 == 0 */
    else if ((W.group & (W.group - 1)) == 0) W.gshift = __builtin_ctzll((unsigned long long)W.group);
    return W;
}

int loraplex_gemv(void *y, const void *x, int64_t ldx, const void *w, int64_t row_bytes, const float *scales,
                  const float *mins, int64_t group, float offset, const void *b, int64_t T, int64_t K, int64_t N,
                  int mode, int nthreads, int int8_acts) {
    const job j = {y, x, ldx, b, T, K, N, describe(w, row_bytes, scales, mins, group, offset, K)};
    if (T < 1 || ldx < K || check(&j.W, mode, K, N)) return 4;
    /* Decode-sized steps on codes, when the caller asks (int8_acts): integer dot products (_gemv_qdot.h)
     * where the format allows */
    const int qdot = int8_acts && (mode == W_I8 || mode == W_U4) && T <= QDOT_TOKENS && K % GW == 0 &&
                     offset == (float)(int32_t)offset && (mode == W_U4 || offset == 0.0f);
    qacts A = {0}, *pa = NULL;
    void *mem = NULL;
    if (qdot) {
        A.bp = (K / GW + 1) / 2 * 2;
        mem = malloc((size_t)(T * A.bp) * (8 * sizeof(int32_t) + 2 * sizeof(float) + GW));
        if (!mem) return 5;
        A.oq = mem;
        A.d = (float *)(A.oq + T * A.bp * 8);
        A.xs = A.d + T * A.bp;
        A.q = (int8_t *)(A.xs + T * A.bp);
        A.o = (int32_t)offset;
        pa = &A;
    }
    if (nthreads <= 1 || N * row_bytes < MIN_PAR_BYTES || omp_in_parallel()) {
        run_share(&j, pa, mode, 0, 1);
    } else {
#pragma omp parallel num_threads(nthreads)
        run_share(&j, pa, mode, omp_get_thread_num(), omp_get_num_threads());
    }
    free(mem);
    return 0;
}

/* out [N, K] fp32 = the dequantized rows of a W_I8 / W_U4 matrix (for steps too long for the kernel above). */
int loraplex_dequantize(float *out, const void *w, int64_t row_bytes, const float *scales, const float *mins,
                        int64_t group, float offset, int64_t K, int64_t N, int mode, int nthreads) {
    const weights W = describe(w, row_bytes, scales, mins, group, offset, K);
    if ((mode != W_I8 && mode != W_U4) || check(&W, mode, K, N)) return 4;
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
    for (int64_t r = 0; r < N; ++r) dequantize_rows(&W, mode, r, 1, K, out + r * K);
    return 0;
}

/* Which vector layer this build compiled (see _lora_vec.h). */
int loraplex_gemv_isa(void) { return LP_ISA; }
