// One flash-attention tile for the native CPU kernels: NR query rows against one block of BLOCK keys, online softmax.
// Needs HEAD_DIM and BLOCK (multiples of the vector width) and simd.h.
#pragma once

#include <string.h>

#ifndef HEAD_DIM  // both set by the build (-D); these defaults only let an editor parse the file
#define HEAD_DIM 64
#endif
#ifndef BLOCK
#define BLOCK 64
#endif

constexpr int DV = HEAD_DIM / L, BV = BLOCK / L;
static_assert(HEAD_DIM % L == 0 && BLOCK % L == 0, "HEAD_DIM and BLOCK must be multiples of the vector width");

// Rows q_i = q + i q_stride (scaled by the caller) against K^T [HEAD_DIM, BLOCK] and the V rows v + j v_stride, row
// i seeing the keys [lo[i], hi[i]) of the block (0 <= lo, hi <= BLOCK; lo >= hi: none; keys past hi are never read). S
// (NR x BLOCK) and the o rows (o + i o_stride) stay in vector registers:
//     m' = max(m, rowmax S);  o *= e^(m - m');  l *= e^(m - m')           (only when the maximum rises)
//     P = e^(S - m');  l += rowsum P;  o += P V
// A row that sees no key of the block is left as it is.
template <int NR>
static inline void flash_tile(const float *q, int64_t q_stride, const float *kT, const float *v,
                              int64_t v_stride, const int *lo, const int *hi, float *o, int64_t o_stride, float *m,
                              float *l) {
    vf s[NR][BV];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < BV; j++) s[i][j] = splat(0.0f);
    for (int d = 0; d < HEAD_DIM; d++) {  // S = q K^T, a row of K^T at a time
        const vf_mem *kd = (const vf_mem *)(kT + d * BLOCK);
        for (int i = 0; i < NR; i++) {
            vf qd = splat(q[i * q_stride + d]);
            for (int j = 0; j < BV; j++) s[i][j] += qd * kd[j];
        }
    }
    int first = BLOCK, end = 0;  // the keys some row sees
    for (int i = 0; i < NR; i++) {
        if (lo[i] < hi[i]) {
            first = lo[i] < first ? lo[i] : first;
            end = hi[i] > end ? hi[i] : end;
        }
        if (lo[i] > 0 || hi[i] < BLOCK)  // keys outside the row's range: -inf
            for (int j = 0; j < BV; j++)
                s[i][j] = (lanes(j * L) >= lo[i]) & (lanes(j * L) < hi[i]) ? s[i][j] : splat(-INFINITY);
    }
    alignas(64) float p[NR][BLOCK];
    for (int i = 0; i < NR; i++) {
        vf mx = s[i][0];
        for (int j = 1; j < BV; j++) mx = mx > s[i][j] ? mx : s[i][j];
        float top = hmax(mx);
        if (top == -INFINITY) {  // no key of this block for this row
            for (int j = 0; j < BV; j++) ((vf_mem *)p[i])[j] = splat(0.0f);
            continue;
        }
        if (top > m[i]) {
            if (m[i] > -INFINITY) {  // rescale what this row accumulated to the new maximum
                float a = vexp(splat(m[i] - top))[0];
                for (int j = 0; j < DV; j++) ((vf_mem *)(o + i * o_stride))[j] *= a;
                l[i] *= a;
            }
            m[i] = top;
        }
        vf sum = splat(0.0f);
        for (int j = 0; j < BV; j++) {
            vf e = vexp(s[i][j] - m[i]);
            sum += e;
            ((vf_mem *)p[i])[j] = e;
        }
        l[i] += hsum(sum);
    }
    vf acc[NR][DV];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) acc[i][j] = ((const vf_mem *)(o + i * o_stride))[j];
    for (int key = first; key < end; key++) {  // o += P V, a row of V at a time
        const vf_mem *vk = (const vf_mem *)(v + key * v_stride);
        for (int i = 0; i < NR; i++) {
            vf pk = splat(p[i][key]);
            for (int j = 0; j < DV; j++) acc[i][j] += pk * vk[j];
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) ((vf_mem *)(o + i * o_stride))[j] = acc[i][j];
}

// A work item of n query rows (16 queries of one head; in InfLLM-V2 the G heads of a row), around the key blocks it
// visits: flash_rows_start scales the q rows into qs [n, HEAD_DIM] (contiguous, so a tile reads them from L1) and
// zeroes the output rows, m and l; flash_rows runs every 4 rows against one key block (flash_tile<4>, then
// flash_tile<1> for the rest), row i seeing the keys [lo[i], hi[i]); flash_rows_finish divides by l (0 for a row
// that saw no key) and writes the log-sum-exp m + log l where lse is given (-inf for such a row).
static inline void flash_rows_start(int64_t n, const float *q, int64_t q_stride, float scale, float *qs, float *o,
                                    int64_t o_stride, float *m, float *l) {
    for (int64_t r = 0; r < n; r++) {
        m[r] = -INFINITY, l[r] = 0.0f;
        memset(o + r * o_stride, 0, sizeof(float) * HEAD_DIM);
        for (int d = 0; d < HEAD_DIM; d++) qs[r * HEAD_DIM + d] = q[r * q_stride + d] * scale;
    }
}

static inline void flash_rows(int64_t n, const float *qs, const float *kT, const float *v, int64_t v_stride,
                              const int *lo, const int *hi, float *o, int64_t o_stride, float *m, float *l) {
    int64_t r = 0;
    for (; r + 4 <= n; r += 4)
        flash_tile<4>(qs + r * HEAD_DIM, HEAD_DIM, kT, v, v_stride, lo + r, hi + r, o + r * o_stride, o_stride,
                      m + r, l + r);
    for (; r < n; r++)
        flash_tile<1>(qs + r * HEAD_DIM, HEAD_DIM, kT, v, v_stride, lo + r, hi + r, o + r * o_stride, o_stride,
                      m + r, l + r);
}

static inline void flash_rows_finish(int64_t n, float *o, int64_t o_stride, const float *m, const float *l,
                                     float *lse) {
    for (int64_t r = 0; r < n; r++) {
        float inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
        for (int d = 0; d < HEAD_DIM; d++) o[r * o_stride + d] *= inv;
        if (lse) lse[r] = l[r] > 0 ? m[r] + logf(l[r]) : -INFINITY;
    }
}
