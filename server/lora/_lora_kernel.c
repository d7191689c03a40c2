/*
 * Mixed-adapter LoRA for the short runs of a batch (decode tokens), on CPU.
 *
 * Semantics (fp32 and bf16 entry points alike):
 *
 *     for t in range(T):
 *         s = slots[t]
 *         if s < 0 or rank[s] == 0: continue          # exactly zero contribution
 *         r = rank[s]
 *         h = x[t] @ A[s, :r].T                         # [r], fp32
 *         y[t] += scale[s] * (h @ BT[s, :r])            # [d_out], fp32, then stored
 *
 * Shapes: x [T, d_in] (row stride ldx), y [T, d_out] (row stride ldy; often a
 * column slice of a fused projection's output), A [S, R, d_in] and
 * BT [S, R, d_out] contiguous, scale [S] float32, rank [S] int32, slots [T]
 * int32. Strides count elements; columns are unit-stride. In the bf16 entry
 * point x, y, A, BT hold bf16 bit patterns (uint16); products are accumulated
 * in fp32 and y is rounded to nearest even when stored.
 *
 * Plan: tokens are grouped by slot (a stable counting sort) into blocks of up
 * to MT tokens, so tokens sharing an adapter read its rows once. One OpenMP
 * region per call runs two phases separated by a barrier: the shrink
 * h = x @ A.T, split across threads over (token block, rank row), and the
 * expand y += scale * h @ BT, split over (token block, 16-column vector).
 * Each thread takes one contiguous, cost-weighted range of work, so a single
 * token still uses every thread and no chunk is handed out dynamically. Only
 * the rows j < rank[s] are touched. h and the grouping live in a scratch
 * buffer owned by the calling thread that only grows, so calls do not malloc.
 *
 * Return value: 0 on success, 1 if a slot is >= S, 2 if a rank is outside
 * [0, R], 3 if the scratch buffer could not be allocated, 4 on bad sizes.
 * Nothing is written to y unless the return value is 0.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define LP_AVX512 1
#include <immintrin.h>
#else
#define LP_AVX512 0
#endif

#define LP_INLINE static inline __attribute__((always_inline))

typedef uint16_t lp_mask; /* which of a vector's 16 columns are real */

enum { MT = 4 };           /* tokens per tile (shared adapter rows are read once per tile) */
enum { MJ = 4 };           /* rank rows per shrink tile */
enum { MAX_NV = 16 };      /* 16-column vectors per expand tile: 16 / tokens in the tile */
enum { VW = 16 };          /* columns per vector */
enum { MIN_PAR_WORK = 1 << 15 }; /* below this many multiply-adds one thread does it all */

typedef struct {
    int32_t slot, p0, nt, r; /* slot, first position in the sorted order, tokens, rank */
    int64_t ws, we;          /* prefix of shrink / expand cost before this block */
} tblock_t;

typedef struct {
    const void *x;
    void *y;
    const void *a;
    const void *bt;
    const float *scale;
    int64_t ldx, ldy, d_in, d_out, R;
    const int32_t *tok; /* [n] token index of each sorted position */
    float *h;           /* [n, R] shrink result by sorted position */
    const tblock_t *tb;
    int n_tb;
    int64_t ws_total, we_total;
} job_t;

/* ---------------------------------------------------------------- scratch */

static __thread void *scratch_ptr = NULL;
static __thread size_t scratch_cap = 0;

static void *scratch(size_t bytes) {
    if (bytes > scratch_cap) {
        size_t cap = scratch_cap ? scratch_cap : 4096;
        while (cap < bytes) cap *= 2;
        void *p = NULL;
        if (posix_memalign(&p, 64, cap) != 0) return NULL;
        free(scratch_ptr);
        scratch_ptr = p;
        scratch_cap = cap;
    }
    return scratch_ptr;
}

/* ------------------------------------------------------------ conversions */

LP_INLINE float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
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

LP_INLINE float ld1(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

#if LP_AVX512

LP_INLINE __m512 ld16(const void *base, int64_t i, int bf16) {
    if (bf16) {
        __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

LP_INLINE __m512 ld16m(const void *base, int64_t i, __mmask16 m, int bf16) {
    if (bf16) {
        __m256i v = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)base + i);
}

LP_INLINE __m256i pack_bf16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

/* y[i : i+16] (masked by m) += v */
LP_INLINE void acc16(void *base, int64_t i, __mmask16 m, __m512 v, int bf16) {
    if (bf16) {
        uint16_t *p = (uint16_t *)base + i;
        __m512 cur = ld16m(base, i, m, 1);
        _mm256_mask_storeu_epi16(p, m, pack_bf16(_mm512_add_ps(cur, v)));
    } else {
        float *p = (float *)base + i;
        _mm512_mask_storeu_ps(p, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, p), v));
    }
}

/* The four horizontal sums of a, b, c, d, in that order. */
LP_INLINE __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    __m512 s = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(s),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
}

/* h[i, jj] = x[tok[i]] . A[j0 + jj] for i < NT, jj < NJ. */
LP_INLINE void shrink_tile(const job_t *jb, const tblock_t *b, int p, int j0, int NT, int NJ, int bf16) {
    const int64_t d = jb->d_in;
    const void *xr[MT];
    const void *ar[MJ];
    for (int i = 0; i < NT; ++i) xr[i] = (const char *)jb->x + (size_t)jb->tok[p + i] * jb->ldx * (bf16 ? 2 : 4);
    for (int q = 0; q < NJ; ++q)
        ar[q] = (const char *)jb->a + ((size_t)b->slot * jb->R + j0 + q) * d * (bf16 ? 2 : 4);
    /* Small tiles get a second set of accumulators to hide FMA latency. */
    const int U = NT * NJ <= 4 ? 2 : 1;
    __m512 acc[2][MT][MJ];
    for (int u = 0; u < U; ++u)
        for (int i = 0; i < NT; ++i)
            for (int q = 0; q < NJ; ++q) acc[u][i][q] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + U * VW <= d; k += U * VW) {
        for (int u = 0; u < U; ++u) {
            __m512 xv[MT];
            for (int i = 0; i < NT; ++i) xv[i] = ld16(xr[i], k + u * VW, bf16);
            for (int q = 0; q < NJ; ++q) {
                __m512 av = ld16(ar[q], k + u * VW, bf16);
                for (int i = 0; i < NT; ++i) acc[u][i][q] = _mm512_fmadd_ps(xv[i], av, acc[u][i][q]);
            }
        }
    }
    for (; k < d; k += VW) {
        __mmask16 m = d - k >= VW ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - k)) - 1u);
        __m512 xv[MT];
        for (int i = 0; i < NT; ++i) xv[i] = ld16m(xr[i], k, m, bf16);
        for (int q = 0; q < NJ; ++q) {
            __m512 av = ld16m(ar[q], k, m, bf16);
            for (int i = 0; i < NT; ++i) acc[0][i][q] = _mm512_fmadd_ps(xv[i], av, acc[0][i][q]);
        }
    }
    for (int i = 0; i < NT; ++i) {
        __m512 v[MJ];
        for (int q = 0; q < MJ; ++q)
            v[q] = q >= NJ ? _mm512_setzero_ps() : U == 2 ? _mm512_add_ps(acc[0][i][q], acc[1][i][q]) : acc[0][i][q];
        __m128 sums = reduce4(v[0], v[1], v[2], v[3]);
        float *hp = jb->h + (size_t)(p + i) * jb->R + j0;
        if (NJ == MJ) _mm_storeu_ps(hp, sums);
        else _mm_mask_storeu_ps(hp, (__mmask8)((1u << NJ) - 1u), sums);
    }
}

/* y[tok[i], c0 : c0 + 16 * NVT] += scale * sum_j h[i, j] * BT[j, same columns] for i < NT; only the
 * last vector may be partial (mask `last`). Reads BT row by row, so a tile spanning a whole output row
 * streams the adapter's BT block sequentially. */
LP_INLINE void expand_tile(const job_t *jb, const tblock_t *b, int p, int64_t c0, lp_mask last, int NT,
                           int NVT, int bf16) {
    const int64_t d = jb->d_out;
    const int r = b->r;
    const size_t es = bf16 ? 2 : 4;
    const char *btr = (const char *)jb->bt + (size_t)b->slot * jb->R * d * es + (size_t)c0 * es;
    const float *hr[MT];
    for (int i = 0; i < NT; ++i) hr[i] = jb->h + (size_t)(p + i) * jb->R;
    __m512 acc[MT][MAX_NV];
    for (int i = 0; i < NT; ++i)
        for (int v = 0; v < NVT; ++v) acc[i][v] = _mm512_setzero_ps();
    for (int j = 0; j < r; ++j) {
        const char *row = btr + (size_t)j * d * es;
        __m512 hv[MT];
        for (int i = 0; i < NT; ++i) hv[i] = _mm512_set1_ps(hr[i][j]);
        for (int v = 0; v < NVT; ++v) {
            __m512 bv = v == NVT - 1 ? ld16m(row, v * VW, last, bf16) : ld16(row, v * VW, bf16);
            for (int i = 0; i < NT; ++i) acc[i][v] = _mm512_fmadd_ps(hv[i], bv, acc[i][v]);
        }
    }
    const __m512 sc = _mm512_set1_ps(jb->scale[b->slot]);
    for (int i = 0; i < NT; ++i) {
        char *yr = (char *)jb->y + ((size_t)jb->tok[p + i] * jb->ldy + c0) * es;
        for (int v = 0; v < NVT; ++v)
            acc16(yr, v * VW, v == NVT - 1 ? last : (__mmask16)0xFFFF, _mm512_mul_ps(sc, acc[i][v]), bf16);
    }
}

#else /* portable fallback: plain loops the compiler may vectorise */

LP_INLINE void shrink_tile(const job_t *jb, const tblock_t *b, int p, int j0, int NT, int NJ, int bf16) {
    const int64_t d = jb->d_in;
    for (int i = 0; i < NT; ++i) {
        const void *xr = (const char *)jb->x + (size_t)jb->tok[p + i] * jb->ldx * (bf16 ? 2 : 4);
        for (int q = 0; q < NJ; ++q) {
            const void *ar = (const char *)jb->a + ((size_t)b->slot * jb->R + j0 + q) * d * (bf16 ? 2 : 4);
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t k = 0; k < d; ++k) acc += ld1(xr, k, bf16) * ld1(ar, k, bf16);
            jb->h[(size_t)(p + i) * jb->R + j0 + q] = acc;
        }
    }
}

LP_INLINE void expand_tile(const job_t *jb, const tblock_t *b, int p, int64_t c0, lp_mask last, int NT,
                           int NVT, int bf16) {
    (void)last;
    const int64_t d = jb->d_out;
    const size_t es = bf16 ? 2 : 4;
    const int nv = NVT;
    const char *btr = (const char *)jb->bt + (size_t)b->slot * jb->R * d * es;
    const float sc = jb->scale[b->slot];
    int64_t c1 = c0 + (int64_t)nv * VW;
    if (c1 > d) c1 = d;
    const int64_t w = c1 - c0;
    for (int i = 0; i < NT; ++i) {
        const float *hr = jb->h + (size_t)(p + i) * jb->R;
        float acc[MAX_NV * VW];
        for (int64_t c = 0; c < w; ++c) acc[c] = 0.0f;
        for (int j = 0; j < b->r; ++j) {
            const void *row = btr + (size_t)j * d * es;
            const float hj = hr[j];
#pragma omp simd
            for (int64_t c = 0; c < w; ++c) acc[c] += hj * ld1(row, c0 + c, bf16);
        }
        char *yr = (char *)jb->y + (size_t)jb->tok[p + i] * jb->ldy * es;
        for (int64_t c = 0; c < w; ++c) {
            if (bf16) {
                uint16_t *yp = (uint16_t *)yr + c0 + c;
                *yp = f32_to_bf16(bf16_to_f32(*yp) + sc * acc[c]);
            } else {
                ((float *)yr)[c0 + c] += sc * acc[c];
            }
        }
    }
}

#endif

/* ------------------------------------------------------------ dispatch */

/* Expand the runtime tile sizes into calls with constant sizes, so each
 * instance is fully unrolled with its accumulators in registers. */
LP_INLINE void shrink_dispatch(const job_t *jb, const tblock_t *b, int p, int j0, int nt, int nj, int bf16) {
#define LP_S(NT_, NJ_) \
    case (NT_) * 8 + (NJ_): shrink_tile(jb, b, p, j0, NT_, NJ_, bf16); break;
    switch (nt * 8 + nj) {
        LP_S(1, 1) LP_S(1, 2) LP_S(1, 3) LP_S(1, 4)
        LP_S(2, 1) LP_S(2, 2) LP_S(2, 3) LP_S(2, 4)
        LP_S(3, 1) LP_S(3, 2) LP_S(3, 3) LP_S(3, 4)
        LP_S(4, 1) LP_S(4, 2) LP_S(4, 3) LP_S(4, 4)
        default: break;
    }
#undef LP_S
}

static inline int expand_width(int nt) { return nt == 1 ? 16 : nt == 2 ? 8 : nt == 3 ? 5 : 4; }

LP_INLINE void expand_dispatch(const job_t *jb, const tblock_t *b, int p, int64_t c0, int nv, int nt, int bf16) {
    int64_t left = jb->d_out - (c0 + (int64_t)(nv - 1) * VW); /* columns in the last vector */
    lp_mask last = left >= VW ? (lp_mask)0xFFFF : (lp_mask)((1u << left) - 1u);
#define LP_E(NT_, NV_) \
    case (NT_) * 32 + (NV_): expand_tile(jb, b, p, c0, last, NT_, NV_, bf16); break;
    switch (nt * 32 + nv) {
        LP_E(1, 1) LP_E(1, 2) LP_E(1, 3) LP_E(1, 4) LP_E(1, 5) LP_E(1, 6) LP_E(1, 7) LP_E(1, 8)
        LP_E(1, 9) LP_E(1, 10) LP_E(1, 11) LP_E(1, 12) LP_E(1, 13) LP_E(1, 14) LP_E(1, 15) LP_E(1, 16)
        LP_E(2, 1) LP_E(2, 2) LP_E(2, 3) LP_E(2, 4) LP_E(2, 5) LP_E(2, 6) LP_E(2, 7) LP_E(2, 8)
        LP_E(3, 1) LP_E(3, 2) LP_E(3, 3) LP_E(3, 4) LP_E(3, 5)
        LP_E(4, 1) LP_E(4, 2) LP_E(4, 3) LP_E(4, 4)
        default: break;
    }
#undef LP_E
}

/* Units of block b are numbered 0..m-1 and unit i costs w, starting at
 * prefix + i * w; the thread owning [lo, hi) does the units starting inside. */
static inline void unit_range(int64_t prefix, int64_t w, int64_t m, int64_t lo, int64_t hi, int64_t *i0,
                              int64_t *i1) {
    int64_t a = lo <= prefix ? 0 : (lo - prefix + w - 1) / w;
    int64_t z = hi <= prefix ? 0 : (hi - prefix + w - 1) / w;
    *i0 = a < m ? a : m;
    *i1 = z < m ? z : m;
}

/* First block whose cost range [pre(b), pre(b+1)) contains `at` (blocks with zero cost are skipped). */
static inline int first_block(const job_t *jb, int64_t at, int expand) {
    int lo = 0, hi = jb->n_tb; /* invariant: answer in [lo, hi] */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        int64_t end = expand ? (mid + 1 < jb->n_tb ? jb->tb[mid + 1].we : jb->we_total)
                             : (mid + 1 < jb->n_tb ? jb->tb[mid + 1].ws : jb->ws_total);
        if (end <= at) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static inline int64_t shrink_w(const tblock_t *b) { return b->nt + 2; }
static inline int64_t expand_w(const tblock_t *b) { return (int64_t)b->r * (b->nt + 2); }

LP_INLINE void run(const job_t *jb, int tid, int nth, int bf16) {
    /* Shrink: units are the rank rows of each token block. */
    {
        const int64_t lo = jb->ws_total * tid / nth, hi = jb->ws_total * (tid + 1) / nth;
        for (int t = first_block(jb, lo, 0); t < jb->n_tb && jb->tb[t].ws < hi; ++t) {
            const tblock_t *b = &jb->tb[t];
            int64_t i0, i1;
            unit_range(b->ws, shrink_w(b), b->r, lo, hi, &i0, &i1);
            for (int64_t j = i0; j < i1; j += MJ) {
                int nj = (int)(i1 - j < MJ ? i1 - j : MJ);
                shrink_dispatch(jb, b, b->p0, (int)j, b->nt, nj, bf16);
            }
        }
    }
#pragma omp barrier
    /* Expand: units are the 16-column vectors of each token block's output rows. */
    {
        const int64_t nvec = (jb->d_out + VW - 1) / VW;
        const int64_t lo = jb->we_total * tid / nth, hi = jb->we_total * (tid + 1) / nth;
        for (int t = first_block(jb, lo, 1); t < jb->n_tb && jb->tb[t].we < hi; ++t) {
            const tblock_t *b = &jb->tb[t];
            int64_t i0, i1;
            unit_range(b->we, expand_w(b), nvec, lo, hi, &i0, &i1);
            const int w = expand_width(b->nt);
            for (int64_t v = i0; v < i1; v += w) {
                int nv = (int)(i1 - v < w ? i1 - v : w);
                expand_dispatch(jb, b, b->p0, v * VW, nv, b->nt, bf16);
            }
        }
    }
}

static void run_f32(const job_t *jb, int tid, int nth) { run(jb, tid, nth, 0); }
static void run_bf16(const job_t *jb, int tid, int nth) { run(jb, tid, nth, 1); }

static int add_lora_sparse(void *y, int64_t ldy, const void *x, int64_t ldx, const void *a, const void *bt,
                           const float *scale, const int32_t *rank, const int32_t *slots, int64_t T,
                           int64_t d_in, int64_t d_out, int64_t S, int64_t R, int nthreads, int bf16) {
    if (T < 0 || d_in < 0 || d_out < 0 || S < 0 || R < 0 || T > INT32_MAX / 2) return 4;
    if (T == 0 || d_out == 0 || S == 0 || R == 0) {
        for (int64_t t = 0; t < T; ++t)
            if (slots[t] >= S) return 1;
        return 0;
    }
    /* Scratch: count[S + 1] | tok[T] | tb[T] | h[T * R] (each 64-byte aligned). */
    size_t off_tok = ((size_t)(S + 1) * 4 + 63) & ~(size_t)63;
    size_t off_tb = off_tok + (((size_t)T * 4 + 63) & ~(size_t)63);
    size_t off_h = off_tb + (((size_t)T * sizeof(tblock_t) + 63) & ~(size_t)63);
    size_t total = off_h + (size_t)T * R * sizeof(float);
    char *buf = scratch(total);
    if (!buf) return 3;
    int32_t *count = (int32_t *)buf;
    int32_t *tok = (int32_t *)(buf + off_tok);
    tblock_t *tb = (tblock_t *)(buf + off_tb);
    float *h = (float *)(buf + off_h);

    /* Stable counting sort of the adapter tokens by slot. */
    memset(count, 0, (size_t)(S + 1) * sizeof *count);
    for (int64_t t = 0; t < T; ++t) {
        int32_t s = slots[t];
        if (s < 0) continue;
        if (s >= S) return 1;
        int32_t r = rank[s];
        if (r < 0 || r > R) return 2;
        if (r > 0) count[s + 1]++;
    }
    for (int64_t s = 0; s < S; ++s) count[s + 1] += count[s];
    const int32_t n = count[S];
    if (n == 0) return 0;
    for (int64_t t = 0; t < T; ++t) {
        int32_t s = slots[t];
        if (s >= 0 && rank[s] > 0) tok[count[s]++] = (int32_t)t;
    }
    /* count[s] is now the end of slot s's run; cut the runs into blocks of MT tokens. */
    int n_tb = 0;
    int64_t ws = 0, we = 0, work = 0;
    for (int32_t p = 0; p < n;) {
        int32_t s = slots[tok[p]];
        int32_t end = count[s];
        while (p < end) {
            tblock_t *b = &tb[n_tb++];
            b->slot = s;
            b->p0 = p;
            b->nt = end - p < MT ? end - p : MT;
            p += b->nt;
            b->r = rank[s];
            b->ws = ws;
            b->we = we;
            ws += (int64_t)b->r * shrink_w(b);
            we += ((d_out + VW - 1) / VW) * expand_w(b);
            work += (int64_t)b->nt * b->r * (d_in + d_out);
        }
    }
    job_t jb = {x, y, a, bt, scale, ldx, ldy, d_in, d_out, R, tok, h, tb, n_tb, ws, we};
    void (*fn)(const job_t *, int, int) = bf16 ? run_bf16 : run_f32;
    int nth = nthreads < 1 ? 1 : nthreads;
    if (nth > 1 && work < MIN_PAR_WORK) nth = 1;
    if (nth == 1 || omp_in_parallel()) {
        fn(&jb, 0, 1);
        return 0;
    }
#pragma omp parallel num_threads(nth)
    fn(&jb, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}

int loraplex_add_lora_sparse_f32(float *y, int64_t ldy, const float *x, int64_t ldx, const float *a,
                                 const float *bt, const float *scale, const int32_t *rank,
                                 const int32_t *slots, int64_t T, int64_t d_in, int64_t d_out, int64_t S,
                                 int64_t R, int nthreads) {
    return add_lora_sparse(y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, nthreads, 0);
}

int loraplex_add_lora_sparse_bf16(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx,
                                  const uint16_t *a, const uint16_t *bt, const float *scale,
                                  const int32_t *rank, const int32_t *slots, int64_t T, int64_t d_in,
                                  int64_t d_out, int64_t S, int64_t R, int nthreads) {
    return add_lora_sparse(y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, nthreads, 1);
}

/* Both entry points behind one pointer argument, which is cheaper to call through ctypes than
 * fifteen converted arguments: args = {bf16, y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in,
 * d_out, S, R, nthreads}, pointers as integers. */
int loraplex_add_lora_sparse_packed(const int64_t *args) {
    return add_lora_sparse((void *)(intptr_t)args[1], args[2], (const void *)(intptr_t)args[3], args[4],
                           (const void *)(intptr_t)args[5], (const void *)(intptr_t)args[6],
                           (const float *)(intptr_t)args[7], (const int32_t *)(intptr_t)args[8],
                           (const int32_t *)(intptr_t)args[9], args[10], args[11], args[12], args[13], args[14],
                           (int)args[15], args[0] != 0);
}

/* Which code path this build compiled: 1 = AVX-512, 0 = portable loops. */
int loraplex_kernel_isa(void) { return LP_AVX512; }
