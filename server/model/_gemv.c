/*
 * Small-batch fp32 projection on CPU, streaming the weight once with every thread:
 *
 *     for t in range(T):            # T <= 4 tokens (decode steps)
 *         y[t] = W @ x[t] (+ b)      # W [N, K] row-major, x [T, K] (row stride ldx), y [T, N] contiguous
 *
 * Each thread takes a contiguous range of output rows, so the weight is read
 * once, in order, split across threads; tiles of up to 4 rows and all T
 * tokens keep the accumulators in registers. Dot products use the LoRA
 * kernel's 16-lane vectors (../lora/_lora_vec.h): the same fused
 * multiply-adds and summation tree in every ISA build, so the builds agree
 * bit for bit.
 *
 * Returns 0, or 4 on bad sizes.
 */
#include <stdint.h>
#include <string.h>

#include <omp.h>

#include "../lora/_lora_vec.h"

enum { GW = 32, MT = 4, MJ = 4 };
/* One thread does the calls below this many weight bytes (fork and join cost ~1.5 us). */
enum { MIN_PAR_BYTES = 1 << 17 };

/* y[t, n0 + q] = x[t] . W[n0 + q] for t < NT, q < NJ. */
LP_TILE void gemv_tile(float *y, const float *x, int64_t ldx, const float *w, const float *b, int64_t K, int64_t N,
                       int64_t n0, int NT, int NJ) {
    const float *wr[MJ];
    for (int q = 0; q < NJ; ++q) wr[q] = w + (n0 + q) * K;
    vf acc[MT][MJ];
    for (int i = 0; i < NT; ++i)
        for (int q = 0; q < NJ; ++q) acc[i][q] = vzero();
    for (int64_t k = 0; k < K; k += GW) {
        const int64_t n = K - k < GW ? K - k : GW;
        vf xl[MT], xh[MT];
        for (int i = 0; i < NT; ++i) ld_pair(x + i * ldx, k, n, &xl[i], &xh[i], LD_F32);
        for (int q = 0; q < NJ; ++q) {
            vf wl, wh;
            ld_pair(wr[q], k, n, &wl, &wh, LD_F32);
            for (int i = 0; i < NT; ++i) acc[i][q] = vfma(xh[i], wh, vfma(xl[i], wl, acc[i][q]));
        }
    }
    for (int i = 0; i < NT; ++i) {
        vf v[4];
        for (int q = 0; q < 4; ++q) v[q] = q < NJ ? acc[i][q] : vzero();
        float sums[4];
        sum4(v[0], v[1], v[2], v[3], sums);
        for (int q = 0; q < NJ; ++q) y[i * N + n0 + q] = b ? sums[q] + b[n0 + q] : sums[q];
    }
}

#if LP_ISA == 0
LP_INLINE void gemv_dispatch(float *y, const float *x, int64_t ldx, const float *w, const float *b, int64_t K,
                             int64_t N, int64_t n0, int nt, int nj) {
    gemv_tile(y, x, ldx, w, b, K, N, n0, nt, nj);
}
#else
LP_INLINE void gemv_dispatch(float *y, const float *x, int64_t ldx, const float *w, const float *b, int64_t K,
                             int64_t N, int64_t n0, int nt, int nj) {
#define LP_G(NT_, NJ_) \
    case (NT_) * 8 + (NJ_): gemv_tile(y, x, ldx, w, b, K, N, n0, NT_, NJ_); break;
    switch (nt * 8 + nj) {
        LP_G(1, 1) LP_G(1, 2) LP_G(1, 3) LP_G(1, 4)
        LP_G(2, 1) LP_G(2, 2) LP_G(2, 3) LP_G(2, 4)
        LP_G(3, 1) LP_G(3, 2) LP_G(3, 3) LP_G(3, 4)
        LP_G(4, 1) LP_G(4, 2) LP_G(4, 3) LP_G(4, 4)
        default: break;
    }
#undef LP_G
}
#endif

static void run(float *y, const float *x, int64_t ldx, const float *w, const float *b, int64_t T, int64_t K,
                int64_t N, int tid, int nth) {
    /* Row ranges in whole tiles, so a tile never straddles two threads. */
    const int64_t tiles = (N + MJ - 1) / MJ;
    const int64_t n_lo = tiles * tid / nth * MJ, n_hi = tiles * (tid + 1) / nth * MJ;
    for (int64_t n0 = n_lo; n0 < n_hi && n0 < N; n0 += MJ) {
        const int nj = (int)(N - n0 < MJ ? N - n0 : MJ);
        gemv_dispatch(y, x, ldx, w, b, K, N, n0, (int)T, nj);
    }
}

int loraplex_gemv_f32(float *y, const float *x, int64_t ldx, const float *w, const float *b, int64_t T, int64_t K,
                      int64_t N, int nthreads) {
    if (T < 1 || T > MT || K < 1 || N < 1 || ldx < K) return 4;
    if (nthreads <= 1 || N * K * 4 < MIN_PAR_BYTES || omp_in_parallel()) {
        run(y, x, ldx, w, b, T, K, N, 0, 1);
        return 0;
    }
#pragma omp parallel num_threads(nthreads)
    run(y, x, ldx, w, b, T, K, N, omp_get_thread_num(), omp_get_num_threads());
    return 0;
}

/* Which vector layer this build compiled (see _lora_vec.h). */
int loraplex_gemv_isa(void) { return LP_ISA; }
