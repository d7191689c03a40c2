/*
 * Mixed-adapter LoRA for the short runs of a batch (decode tokens), on CPU.
 *
 * Semantics (all three dtype combinations alike):
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
 * int32. Strides count elements; columns are unit-stride.
 *
 * Dtype code (`dt` below, the first packed argument):
 *   0 = fp32:  x, y, A, BT all float32;
 *   1 = bf16:  x, y, A, BT all bf16 bit patterns (uint16); y is rounded to
 *              nearest even, once, when stored;
 *   2 = mixed: x, y float32, A and BT bf16 (uint16). Weights are widened
 *              exactly to fp32, so the result is the fp32 one on A, BT taken
 *              as their bf16 values; the point is half the adapter bytes read.
 * Products are accumulated in fp32 in every case.
 *
 * Plan: tokens are grouped by slot (a stable counting sort) into blocks of up
 * to MT tokens, so tokens sharing an adapter read its rows once. One OpenMP
 * region per call runs two phases separated by a barrier: the shrink
 * h = x @ A.T, split across threads over (token block, rank row), and the
 * expand y += scale * h @ BT, split over (token block, 32-column group).
 * Each thread takes one contiguous, cost-weighted range of that work, so a
 * single token still uses every thread and nothing is handed out dynamically.
 * Only the rows j < rank[s] are read. Small calls run on the calling thread.
 * The grouping and h live in a scratch buffer owned by the calling thread
 * that only grows, so calls do not allocate.
 *
 * Vectors (_lora_vec.h): data moves in pairs of 16-lane vectors covering 32
 * elements. For fp32 a pair is elements [0, 16) and [16, 32); for bf16
 * activations it is the even and the odd elements (a shift or a mask per
 * 32-bit word, no widening shuffles); dot products pair x and A the same way,
 * and the expand re-interleaves before it stores, so the split never shows. In
 * the mixed path the bf16 weights are widened instead, into the fp32 order.
 *
 * Builds: the same source is compiled for AVX-512, AVX2 + FMA and portable C
 * (server/native.py picks the best this CPU runs). Every build fuses the same
 * multiply-adds, sums lanes in the same tree and splits work so that no sum
 * depends on the thread count, so all builds, at any thread count, give
 * bit-identical results; and the mixed path equals the fp32 path on the
 * widened weights bit for bit.
 *
 * Prefetch: each thread runs its tiles one behind the tile it has just
 * worked out, and prefetches that next tile's adapter rows while computing
 * (the weights are read once per call and come from DRAM in a real step); its
 * first shrink tile is prefetched up front and its first expand tile during
 * its last shrink tile, across the barrier.
 *
 * Return value: 0 on success, 1 if a slot is >= S, 2 if a used slot's rank is
 * outside [0, R], 3 if the scratch buffer could not be allocated, 4 on bad
 * sizes. Nothing is written to y unless the return value is 0.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

#include "_lora_vec.h"

/* Tile sizes: tokens per tile (tokens sharing an adapter read its rows once per tile), rank rows
 * per shrink tile, and column groups of GW elements per expand tile (fewer for more tokens), so
 * that the accumulators stay in registers: AVX2 has 16 (AVX-512 32), and a vf takes two. No sum
 * depends on the tile sizes. */
enum { GW = 32 }; /* elements per vector pair */
#if LP_ISA == 1
enum { MT = 2, MJ = 4, MAX_NG = 4 };
static inline int shrink_rows(int nt) { return nt == 1 ? 4 : 2; }
static inline int expand_groups(int nt) { return nt == 1 ? 4 : 1; }
#else
enum { MT = 4, MJ = 4, MAX_NG = 8 };
static inline int shrink_rows(int nt) { return (void)nt, MJ; }
static inline int expand_groups(int nt) { return nt == 1 ? 8 : nt == 2 ? 4 : nt == 3 ? 3 : 2; }
#endif
/* One thread does the calls estimated below MIN_PAR_NS (fork, barrier and join cost about
 * 1.5 us); a call is taken as bound by adapter bytes (~10 B/ns: in a decode step they come from
 * memory, the step's other weights having passed through the caches since) or by multiply-adds
 * (~60/ns), whichever is slower. (At 100 B/ns, the cache-hot figure, a one-token step on one
 * adapter ran its 210 calls on one thread: 1.6-2.8 ms a token slower on a Xeon.) */
enum { MIN_PAR_NS = 3500, BYTES_PER_NS = 10, FMAS_PER_NS = 60 };

typedef struct {
    int32_t slot, p0, nt, r; /* slot, first position in the sorted order, tokens, rank */
    int64_t ws, we;          /* shrink / expand cost of the blocks before this one */
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

/* Dtype codes (see the top): activations x, y are bf16 only for code 1, weights for codes 1 and 2. */
enum { DT_F32 = 0, DT_BF16 = 1, DT_MIXED = 2 };
static inline int act_bf16(int dt) { return dt == DT_BF16; }
static inline int64_t act_esize(int dt) { return dt == DT_BF16 ? 2 : 4; }
static inline int64_t w_esize(int dt) { return dt == DT_F32 ? 4 : 2; }
static inline int act_mode(int dt) { return dt == DT_BF16 ? LD_SPLIT : LD_F32; }
static inline int w_mode(int dt) { return dt == DT_BF16 ? LD_SPLIT : dt == DT_MIXED ? LD_WIDEN : LD_F32; }

/* ------------------------------------------------------------------ tiles (every ISA build) */

/* acc += the products of the pairs at element k (n elements) of the rows xr[i] and ar[q]: the
 * low half, then the high half, into one accumulator per (i, q). */
LP_INLINE void shrink_step(vf acc[MT][MJ], const void *const *xr, const void *const *ar, int64_t k, int64_t n,
                           int NT, int NJ, int dt) {
    vf xl[MT], xh[MT];
    for (int i = 0; i < NT; ++i) ld_pair(xr[i], k, n, &xl[i], &xh[i], act_mode(dt));
    for (int q = 0; q < NJ; ++q) {
        vf al, ah;
        ld_pair(ar[q], k, n, &al, &ah, w_mode(dt));
        for (int i = 0; i < NT; ++i) {
            acc[i][q] = vfma(xh[i], ah, vfma(xl[i], al, acc[i][q]));
        }
    }
}

/* h[p + i, j0 + q] = x[tok[p + i]] . A[slot, j0 + q] for i < NT, q < NJ. Each h is the same sum
 * in the same order whatever the tile, the thread count or the ISA build. (The kernel is bound by
 * the adapter bytes it reads, so one FMA chain per accumulator costs nothing.) */
LP_TILE void shrink_tile(const job_t *jb, const tblock_t *b, int p, int j0, int NT, int NJ, int dt,
                           const char *pf, int pf_nj) {
    const int64_t d = jb->d_in, xs = act_esize(dt), ws = w_esize(dt);
    const void *xr[MT];
    const void *ar[MJ];
    for (int i = 0; i < NT; ++i) xr[i] = (const char *)jb->x + jb->tok[p + i] * jb->ldx * xs;
    for (int q = 0; q < NJ; ++q) ar[q] = (const char *)jb->a + ((int64_t)b->slot * jb->R + j0 + q) * d * ws;
    vf acc[MT][MJ];
    for (int i = 0; i < NT; ++i)
        for (int q = 0; q < NJ; ++q) acc[i][q] = vzero();
    int64_t k = 0;
    if (pf) {
        /* Stream the next tile's rows in while this one computes: one row's worth of lines per step. */
        for (; k + GW <= d; k += GW) {
            for (int q = 0; q < MJ; ++q) {
                if (q >= pf_nj) break;
                const char *pq = pf + (q * d + k) * ws;
                prefetch(pq);
                if (ws == 4) prefetch(pq + 64);
            }
            shrink_step(acc, xr, ar, k, GW, NT, NJ, dt);
        }
    } else {
        for (; k + GW <= d; k += GW) shrink_step(acc, xr, ar, k, GW, NT, NJ, dt);
    }
    if (k < d) shrink_step(acc, xr, ar, k, d - k, NT, NJ, dt); /* the rest, as zeros */
    for (int i = 0; i < NT; ++i) {
        vf v[4];
        for (int q = 0; q < 4; ++q) v[q] = q < NJ ? acc[i][q] : vzero();
        float sums[4];
        sum4(v[0], v[1], v[2], v[3], sums);
        memcpy(jb->h + (int64_t)(p + i) * jb->R + j0, sums, (size_t)NJ * sizeof(float));
    }
}

/* y[tok[p + i], c0 : c0 + 32 * NG] += scale * h[p + i, :r] @ BT[slot, :r, same columns] for i < NT;
 * the last group has `last` columns. BT is read row by row, so a tile spanning a whole output row
 * streams the adapter's block of BT in order. */
LP_TILE void expand_tile(const job_t *jb, const tblock_t *b, int p, int64_t c0, int64_t last, int NT, int NG,
                           int dt, const char *pf, int pf_r, int pf_lines) {
    const int64_t d = jb->d_out, ys = act_esize(dt), ws = w_esize(dt);
    const int r = b->r;
    const char *btr = (const char *)jb->bt + ((int64_t)b->slot * jb->R * d + c0) * ws;
    const float *hr[MT];
    for (int i = 0; i < NT; ++i) hr[i] = jb->h + (int64_t)(p + i) * jb->R;
    vf acc[MT][MAX_NG][2];
    for (int i = 0; i < NT; ++i)
        for (int g = 0; g < NG; ++g) acc[i][g][0] = acc[i][g][1] = vzero();
    for (int j = 0; j < r; ++j) {
        const char *row = btr + j * d * ws;
        if (pf && j < pf_r)
            for (int l = 0; l < pf_lines; ++l) prefetch(pf + j * d * ws + l * 64);
        vf hv[MT];
        for (int i = 0; i < NT; ++i) hv[i] = vset1(hr[i][j]);
        for (int g = 0; g < NG; ++g) {
            vf lo, hi;
            ld_pair(row, (int64_t)g * GW, g == NG - 1 ? last : GW, &lo, &hi, w_mode(dt));
            for (int i = 0; i < NT; ++i) {
                acc[i][g][0] = vfma(hv[i], lo, acc[i][g][0]);
                acc[i][g][1] = vfma(hv[i], hi, acc[i][g][1]);
            }
        }
    }
    const vf sc = vset1(jb->scale[b->slot]);
    for (int i = 0; i < NT; ++i) {
        char *yr = (char *)jb->y + (jb->tok[p + i] * jb->ldy + c0) * ys;
        for (int g = 0; g < NG; ++g)
            add_pair(yr, (int64_t)g * GW, g == NG - 1 ? last : GW, vmul(sc, acc[i][g][0]), vmul(sc, acc[i][g][1]),
                     act_bf16(dt));
    }
}

/* ------------------------------------------------------------- dispatch */

#if LP_ISA == 0
/* The portable build: one out-of-line tile each, sizes and dtype at run time. */
LP_INLINE void shrink_dispatch(const job_t *jb, const tblock_t *b, int j0, int nj, int dt, const char *pf,
                                int pf_nj) {
    shrink_tile(jb, b, b->p0, j0, b->nt, nj, dt, pf, pf_nj);
}

LP_INLINE void expand_dispatch(const job_t *jb, const tblock_t *b, int64_t g0, int ng, int dt, const char *pf,
                                int pf_r, int pf_lines) {
    const int64_t c0 = g0 * GW;
    const int64_t rest = jb->d_out - (c0 + (int64_t)(ng - 1) * GW), last = rest < GW ? rest : GW;
    expand_tile(jb, b, b->p0, c0, last, b->nt, ng, dt, pf, pf_r, pf_lines);
}
#else
/* Turn the runtime tile sizes into calls with constant sizes, so each instance is fully
 * unrolled with its accumulators in registers. */
LP_INLINE void shrink_dispatch(const job_t *jb, const tblock_t *b, int j0, int nj, int dt, const char *pf,
                                int pf_nj) {
#define LP_S(NT_, NJ_) \
    case (NT_) * 8 + (NJ_): shrink_tile(jb, b, b->p0, j0, NT_, NJ_, dt, pf, pf_nj); break;
    switch (b->nt * 8 + nj) {
        LP_S(1, 1) LP_S(1, 2) LP_S(1, 3) LP_S(1, 4) LP_S(2, 1) LP_S(2, 2)
#if LP_ISA == 2
        LP_S(2, 3) LP_S(2, 4)
        LP_S(3, 1) LP_S(3, 2) LP_S(3, 3) LP_S(3, 4)
        LP_S(4, 1) LP_S(4, 2) LP_S(4, 3) LP_S(4, 4)
#endif
        default: break;
    }
#undef LP_S
}

LP_INLINE void expand_dispatch(const job_t *jb, const tblock_t *b, int64_t g0, int ng, int dt, const char *pf,
                                int pf_r, int pf_lines) {
    const int64_t c0 = g0 * GW;
    const int64_t rest = jb->d_out - (c0 + (int64_t)(ng - 1) * GW), last = rest < GW ? rest : GW;
#define LP_E(NT_, NG_) \
    case (NT_) * 16 + (NG_): expand_tile(jb, b, b->p0, c0, last, NT_, NG_, dt, pf, pf_r, pf_lines); break;
    switch (b->nt * 16 + ng) {
        LP_E(1, 1) LP_E(1, 2) LP_E(1, 3) LP_E(1, 4) LP_E(2, 1)
#if LP_ISA == 2
        LP_E(1, 5) LP_E(1, 6) LP_E(1, 7) LP_E(1, 8)
        LP_E(2, 2) LP_E(2, 3) LP_E(2, 4)
        LP_E(3, 1) LP_E(3, 2) LP_E(3, 3)
        LP_E(4, 1) LP_E(4, 2)
#endif
        default: break;
    }
#undef LP_E
}
#endif

/* -------------------------------------------------------- work partition */

/* Shrink work of a block: its rank rows, each costing about (tokens + 2) row reads; expand work:
 * its column groups, each costing about rank * (tokens + 2). */
static inline int64_t shrink_unit(const tblock_t *b) { return b->nt + 2; }
static inline int64_t expand_unit(const tblock_t *b) { return (int64_t)b->r * (b->nt + 2); }

/* Units i < m of a block cost w each, the first starting at `prefix`: the thread owning the cost
 * range [lo, hi) does the units that start inside it. */
static inline void unit_range(int64_t prefix, int64_t w, int64_t m, int64_t lo, int64_t hi, int64_t *i0,
                              int64_t *i1) {
    int64_t a = lo <= prefix ? 0 : (lo - prefix + w - 1) / w;
    int64_t z = hi <= prefix ? 0 : (hi - prefix + w - 1) / w;
    *i0 = a < m ? a : m;
    *i1 = z < m ? z : m;
}

/* The first block whose cost range ends after `at`. */
static inline int first_block(const job_t *jb, int64_t at, int expand) {
    int lo = 0, hi = jb->n_tb;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        int64_t end = mid + 1 < jb->n_tb ? (expand ? jb->tb[mid + 1].we : jb->tb[mid + 1].ws)
                                         : (expand ? jb->we_total : jb->ws_total);
        if (end <= at) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

/* Prefetch n rows of `lines` cache lines each, `stride` bytes apart. */
LP_INLINE void prefetch_rows(const char *p, int64_t n, int64_t stride, int64_t lines) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t l = 0; l < lines; ++l) prefetch(p + i * stride + l * 64);
}

/* Prefetch the first expand tile of the cost range [lo, hi), if any. */
LP_INLINE void prefetch_first_expand(const job_t *jb, int64_t lo, int64_t hi, int dt) {
    const int64_t ngroups = (jb->d_out + GW - 1) / GW, ws = w_esize(dt);
    for (int t = first_block(jb, lo, 1); t < jb->n_tb && jb->tb[t].we < hi; ++t) {
        const tblock_t *b = &jb->tb[t];
        int64_t i0, i1;
        unit_range(b->we, expand_unit(b), ngroups, lo, hi, &i0, &i1);
        if (i0 >= i1) continue;
        const int w = expand_groups(b->nt);
        const int64_t ng = i1 - i0 < w ? i1 - i0 : w;
        const int64_t c0 = i0 * GW, cw = (c0 + ng * GW < jb->d_out ? ng * GW : jb->d_out - c0);
        prefetch_rows((const char *)jb->bt + ((int64_t)b->slot * jb->R * jb->d_out + c0) * ws, b->r, jb->d_out * ws,
                      (cw * ws + 63) / 64);
        return;
    }
}

LP_INLINE void run(const job_t *jb, int tid, int nth, int dt) {
    {
        const int64_t lo = jb->ws_total * tid / nth, hi = jb->ws_total * (tid + 1) / nth;
        const tblock_t *pb = NULL;
        int pj = 0, pn = 0;
        for (int t = first_block(jb, lo, 0); t < jb->n_tb && jb->tb[t].ws < hi; ++t) {
            const tblock_t *b = &jb->tb[t];
            int64_t i0, i1;
            unit_range(b->ws, shrink_unit(b), b->r, lo, hi, &i0, &i1);
            const int mj = shrink_rows(b->nt);
            for (int64_t j = i0; j < i1; j += mj) {
                const int nj = (int)(i1 - j < mj ? i1 - j : mj);
                /* Each tile prefetches the one run before it, so the pending tile runs once the next is known. */
                const char *ptr = (const char *)jb->a + ((int64_t)b->slot * jb->R + j) * jb->d_in * w_esize(dt);
                if (pb) shrink_dispatch(jb, pb, pj, pn, dt, ptr, nj);
                else prefetch_rows(ptr, 1, 0, (nj * jb->d_in * w_esize(dt) + 63) / 64);
                pb = b;
                pj = (int)j;
                pn = nj;
            }
        }
        if (pb) {
            /* The last tile prefetches this thread's first expand tile instead, to read it across the barrier. */
            prefetch_first_expand(jb, jb->we_total * tid / nth, jb->we_total * (tid + 1) / nth, dt);
            shrink_dispatch(jb, pb, pj, pn, dt, NULL, 0);
        }
    }
#pragma omp barrier
    {
        const int64_t ngroups = (jb->d_out + GW - 1) / GW;
        const int64_t lo = jb->we_total * tid / nth, hi = jb->we_total * (tid + 1) / nth;
        const tblock_t *pb = NULL;
        int64_t pg = 0;
        int pn = 0;
        for (int t = first_block(jb, lo, 1); t < jb->n_tb && jb->tb[t].we < hi; ++t) {
            const tblock_t *b = &jb->tb[t];
            const int w = expand_groups(b->nt);
            int64_t i0, i1;
            unit_range(b->we, expand_unit(b), ngroups, lo, hi, &i0, &i1);
            for (int64_t g = i0; g < i1; g += w) {
                const int ng = (int)(i1 - g < w ? i1 - g : w);
                const int64_t c0 = g * GW, cw = (c0 + (int64_t)ng * GW < jb->d_out ? (int64_t)ng * GW : jb->d_out - c0);
                const char *ptr = (const char *)jb->bt + ((int64_t)b->slot * jb->R * jb->d_out + c0) * w_esize(dt);
                const int lines = (int)((cw * w_esize(dt) + 63) / 64);
                if (pb) expand_dispatch(jb, pb, pg, pn, dt, ptr, b->r, lines);
                pb = b;
                pg = g;
                pn = ng;
            }
        }
        if (pb) expand_dispatch(jb, pb, pg, pn, dt, NULL, 0, 0);
    }
}

static void run_f32(const job_t *jb, int tid, int nth) { run(jb, tid, nth, DT_F32); }
static void run_bf16(const job_t *jb, int tid, int nth) { run(jb, tid, nth, DT_BF16); }
static void run_mixed(const job_t *jb, int tid, int nth) { run(jb, tid, nth, DT_MIXED); }

/* ---------------------------------------------------------------- entry */

static int add_lora_sparse(void *y, int64_t ldy, const void *x, int64_t ldx, const void *a, const void *bt,
                           const float *scale, const int32_t *rank, const int32_t *slots, int64_t T, int64_t d_in,
                           int64_t d_out, int64_t S, int64_t R, int nthreads, int64_t dt) {
    if (dt < DT_F32 || dt > DT_MIXED) return 4;
    if (T < 0 || d_in < 0 || d_out < 0 || S < 0 || R < 0 || T > INT32_MAX / 2 || S > INT32_MAX - 1) return 4;
    /* Scratch: count[S + 1] | tok[T] | tb[T] | h[T * R], each 64-byte aligned. */
    const size_t off_tok = ((size_t)(S + 1) * 4 + 63) & ~(size_t)63;
    const size_t off_tb = off_tok + (((size_t)T * 4 + 63) & ~(size_t)63);
    const size_t off_h = off_tb + (((size_t)T * sizeof(tblock_t) + 63) & ~(size_t)63);
    char *buf = scratch(off_h + (size_t)T * R * sizeof(float));
    if (!buf) return 3;
    int32_t *count = (int32_t *)buf;
    int32_t *tok = (int32_t *)(buf + off_tok);
    tblock_t *tb = (tblock_t *)(buf + off_tb);
    float *h = (float *)(buf + off_h);

    /* Stable counting sort of the adapter tokens by slot, checking slots and ranks on the way. */
    memset(count, 0, (size_t)(S + 1) * sizeof *count);
    for (int64_t t = 0; t < T; ++t) {
        const int32_t s = slots[t];
        if (s < 0) continue;
        if (s >= S) return 1;
        if (rank[s] < 0 || rank[s] > R) return 2;
        if (rank[s] > 0) count[s + 1]++;
    }
    for (int64_t s = 0; s < S; ++s) count[s + 1] += count[s];
    const int32_t n = count[S];
    if (n == 0 || d_out == 0) return 0;
    for (int64_t t = 0; t < T; ++t) {
        const int32_t s = slots[t];
        if (s >= 0 && rank[s] > 0) tok[count[s]++] = (int32_t)t;
    }
    /* count[s] is now the end of slot s's run: cut the runs into blocks of up to MT tokens. */
    const int64_t ngroups = (d_out + GW - 1) / GW;
    int n_tb = 0;
    int64_t ws = 0, we = 0, fmas = 0, bytes = 0;
    for (int32_t p = 0; p < n;) {
        const int32_t s = slots[tok[p]], end = count[s];
        bytes += (int64_t)rank[s] * (d_in + d_out) * w_esize((int)dt);
        while (p < end) {
            tblock_t *b = &tb[n_tb++];
            b->slot = s;
            b->p0 = p;
            b->nt = end - p < MT ? end - p : MT;
            b->r = rank[s];
            b->ws = ws;
            b->we = we;
            ws += b->r * shrink_unit(b);
            we += ngroups * expand_unit(b);
            fmas += (int64_t)b->nt * b->r * (d_in + d_out);
            p += b->nt;
        }
    }
    const job_t jb = {x, y, a, bt, scale, ldx, ldy, d_in, d_out, R, tok, h, tb, n_tb, ws, we};
    void (*fn)(const job_t *, int, int) = dt == DT_BF16 ? run_bf16 : dt == DT_MIXED ? run_mixed : run_f32;
    const int64_t est_ns = bytes / BYTES_PER_NS > fmas / FMAS_PER_NS ? bytes / BYTES_PER_NS : fmas / FMAS_PER_NS;
    if (nthreads <= 1 || est_ns < MIN_PAR_NS || omp_in_parallel()) {
        fn(&jb, 0, 1);
        return 0;
    }
#pragma omp parallel num_threads(nthreads)
    fn(&jb, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}

int loraplex_add_lora_sparse_f32(float *y, int64_t ldy, const float *x, int64_t ldx, const float *a,
                                 const float *bt, const float *scale, const int32_t *rank, const int32_t *slots,
                                 int64_t T, int64_t d_in, int64_t d_out, int64_t S, int64_t R, int nthreads) {
    return add_lora_sparse(y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, nthreads, DT_F32);
}

int loraplex_add_lora_sparse_bf16(uint16_t *y, int64_t ldy, const uint16_t *x, int64_t ldx, const uint16_t *a,
                                  const uint16_t *bt, const float *scale, const int32_t *rank,
                                  const int32_t *slots, int64_t T, int64_t d_in, int64_t d_out, int64_t S,
                                  int64_t R, int nthreads) {
    return add_lora_sparse(y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, nthreads, DT_BF16);
}

/* fp32 activations x, y with bf16 weights a, bt (dtype code 2). */
int loraplex_add_lora_sparse_f32_bf16w(float *y, int64_t ldy, const float *x, int64_t ldx, const uint16_t *a,
                                       const uint16_t *bt, const float *scale, const int32_t *rank,
                                       const int32_t *slots, int64_t T, int64_t d_in, int64_t d_out, int64_t S,
                                       int64_t R, int nthreads) {
    return add_lora_sparse(y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in, d_out, S, R, nthreads, DT_MIXED);
}

/* All entry points behind one pointer argument, which is cheaper to call through ctypes than
 * fifteen converted arguments: args = {dt, y, ldy, x, ldx, a, bt, scale, rank, slots, T, d_in,
 * d_out, S, R, nthreads}, pointers as integers; dt is the dtype code (0 = fp32, 1 = bf16,
 * 2 = fp32 activations with bf16 weights; anything else returns 4). */
int loraplex_add_lora_sparse_packed(const void *packed) {
    int64_t v[16];
    memcpy(v, packed, sizeof v); /* the caller's buffer need not be aligned */
    return add_lora_sparse((void *)(intptr_t)v[1], v[2], (const void *)(intptr_t)v[3], v[4],
                           (const void *)(intptr_t)v[5], (const void *)(intptr_t)v[6], (const float *)(intptr_t)v[7],
                           (const int32_t *)(intptr_t)v[8], (const int32_t *)(intptr_t)v[9], v[10], v[11], v[12],
                           v[13], v[14], (int)v[15], v[0]);
}

/* Which vector layer this build compiled (see _lora_vec.h): 2 = AVX-512, 1 = AVX2 + FMA, 0 = portable C. */
int loraplex_kernel_isa(void) { return LP_ISA; }
