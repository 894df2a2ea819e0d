// InfLLM-v2 on the CPU, fused (fp32): the native half of cpu.py, built and loaded by zoo.kernels.native.
//
// Stage 1, infllmv2_block_scores (= reference.block_scores_ref): for each query row r (a row = one (batch, KV head,
// query) and its G heads), with q scaled and the compressed keys as C^T [HEAD_DIM, n] (64 keys per step):
//
//     lse_g = log sum_{j < vn} e^(q_g . Cn_j)            (Cn: C2, or C1 for the exact / v1 form; -inf if vn = 0)
//     S_j   = sum_g e^(q_g . C1_j - lse_g)   (j < v1)      0 (v1 <= j < e1)      -inf (j >= e1)
//     out_b = max(S_{b st - 1}, S_{b st}, ..., S_{b st + st - 1})                   (st = block_size / stride)
//
// e^(x - (-inf)) = +inf, as in the reference (a query that sees no normalising key yet). The keys come as chunks
// C^T [HEAD_DIM, 64], each read once per row by all G heads.
//
// Stage 2, infllmv2_attend (= reference.sparse_attention_ref, the schedule of cpu.sparse_attention_cpu): for a range
// of rows the (row, block) pairs are visited block by block, the latest block first (a counting sort inside the
// call), so a block's K and V stay in L1 while every row that selected it reads it, and the rows' accumulators stay
// in L2:
//
//     S = q_r K_b^T                      [G, BLOCK]   (keys past the query's position: -inf)
//     m' = max(m, rowmax S);  o *= e^(m - m');  l *= e^(m - m')           (only when the maximum rises)
//     P = e^(S - m');  l += rowsum P;  o += P V_b                          [G, HEAD_DIM]
//     out_r = o / l                     (0 for a row without a visible key)
//
// Tiles of 4 heads (flash_tile.h's flash_rows) keep the scores (4 x 64) and the o rows (4 x HEAD_DIM) in vector
// registers. e^x is Cephes' expf polynomial (~1 ulp), 0 below -87.3 (no denormals), +inf above 88.72. HEAD_DIM and
// BLOCK are compile-time macros (multiples of the vector width); one library per pair.

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "../simd.h"
#include "../flash_tile.h"

// ---- stage 1: block scores -----------------------------------------------------------------------------------

constexpr int KC = 64, KV = KC / L;  // compressed keys per chunk: C^T chunks [HEAD_DIM, KC] are contiguous

// x[i][.] = q_i . C_{chunk} for NR heads (q [NR, HEAD_DIM]) against one chunk cT [HEAD_DIM, KC]
template <int NR>
static inline void logits(const float *q, const float *cT, vf x[NR][KV]) {
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < KV; j++) x[i][j] = splat(0.0f);
    for (int d = 0; d < HEAD_DIM; d++) {
        const vf_mem *cd = (const vf_mem *)(cT + d * KC);
        for (int i = 0; i < NR; i++) {
            vf qd = splat(q[i * HEAD_DIM + d]);
            for (int j = 0; j < KV; j++) x[i][j] += qd * cd[j];
        }
    }
}

template <int NR>  // one chunk (keys j0 + .. < count) into the running maxima m and sums s of NR heads
static inline void lse_chunk(const float *q, const float *cT, int j0, int count, float *m, float *s) {
    vf x[NR][KV];
    logits<NR>(q, cT, x);
    for (int i = 0; i < NR; i++) {
        for (int j = 0; j < KV; j++) x[i][j] = lanes(j0 + j * L) < count ? x[i][j] : splat(-INFINITY);
        vf mx = x[i][0];
        for (int j = 1; j < KV; j++) mx = mx > x[i][j] ? mx : x[i][j];
        float top = hmax(mx);
        if (top > m[i]) {
            if (m[i] > -INFINITY) s[i] *= vexp(splat(m[i] - top))[0];
            m[i] = top;
        }
        vf sum = splat(0.0f);
        for (int j = 0; j < KV; j++) sum += vexp(x[i][j] - m[i]);
        s[i] += hsum(sum);
    }
}

template <int NR>  // acc[.] += sum_i e^(q_i . C_j - lse_i) over one chunk
static inline void score_chunk(const float *q, const float *cT, const float *lse, vf acc[KV]) {
    vf x[NR][KV];
    logits<NR>(q, cT, x);
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < KV; j++) acc[j] += lse[i] == -INFINITY ? splat(INFINITY) : vexp(x[i][j] - lse[i]);
}

// One row: pooled block scores out [nb]; S: scratch of width floats
static void row_block_scores(int64_t G, const float *qr, const float *c1, const float *cn, int v1, int e1, int vn,
                             int64_t st, int64_t nb, int64_t width, float *S, float *m, float *s, float *lse,
                             float *out) {
    for (int64_t g = 0; g < G; g++) m[g] = -INFINITY, s[g] = 0.0f;
    for (int j0 = 0; j0 < vn; j0 += KC) {
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) lse_chunk<4>(qr + g * HEAD_DIM, cn + j0 * HEAD_DIM, j0, vn, m + g, s + g);
        for (; g < G; g++) lse_chunk<1>(qr + g * HEAD_DIM, cn + j0 * HEAD_DIM, j0, vn, m + g, s + g);
    }
    for (int64_t g = 0; g < G; g++) lse[g] = vn > 0 ? m[g] + logf(s[g]) : -INFINITY;
    for (int j0 = 0; j0 < v1; j0 += KC) {
        vf acc[KV];
        for (int j = 0; j < KV; j++) acc[j] = splat(0.0f);
        int64_t g = 0;
        for (; g + 4 <= G; g += 4) score_chunk<4>(qr + g * HEAD_DIM, c1 + j0 * HEAD_DIM, lse + g, acc);
        for (; g < G; g++) score_chunk<1>(qr + g * HEAD_DIM, c1 + j0 * HEAD_DIM, lse + g, acc);
        for (int j = 0; j < KV; j++) *(vf_mem *)(S + j0 + j * L) = lanes(j0 + j * L) < v1 ? acc[j] : splat(0.0f);
    }
    for (int64_t j = v1 > 0 ? (v1 + KC - 1) / KC * KC : 0; j < width; j++) S[j] = 0.0f;
    for (int64_t j = e1 < 0 ? 0 : e1; j < width; j++) S[j] = -INFINITY;
    for (int64_t b = 0; b < nb; b++) {
        float mb = b > 0 ? S[b * st - 1] : -INFINITY;
        for (int64_t j = b * st; j < b * st + st; j++) mb = S[j] > mb ? S[j] : mb;
        out[b] = mb;
    }
}

struct Stage1 {  // the per-call scratch of stage 1
    int64_t width;
    std::vector<float> S, m, s, lse;
    Stage1(int64_t G, int64_t n1, int64_t st, int64_t nb)
        : width((nb * st > n1 ? nb * st : n1) + KC), S(width), m(G), s(G), lse(G) {}
};

// Rows [0, R) of q [R, G, HEAD_DIM] (scaled), T rows per (batch, KV head) bh; the compressed keys as chunks
// c1T [BH, n1 / KC, HEAD_DIM, KC] and cnT [BH, nn / KC, HEAD_DIM, KC] (zero padded); counts v1, e1, vn [R];
// out [R, nb]. Each chunk is read once per row by all G heads (it stays in L1).
extern "C" void infllmv2_block_scores(int64_t R, int64_t T, int64_t G, const float *q, const float *c1T, int64_t n1,
                                      const float *cnT, int64_t nn, const int32_t *v1, const int32_t *e1,
                                      const int32_t *vn, int64_t st, int64_t nb, float *out) {
    Stage1 w(G, n1, st, nb);
    for (int64_t r = 0; r < R; r++)
        row_block_scores(G, q + r * G * HEAD_DIM, c1T + (r / T) * HEAD_DIM * n1, cnT + (r / T) * HEAD_DIM * nn, v1[r],
                         e1[r], vn[r], st, nb, w.width, w.S.data(), w.m.data(), w.s.data(), w.lse.data(),
                         out + r * nb);
}

// Stage 1 with the selection (= cpu.select_blocks_cpu): the same scores, then per row the forced blocks (b < init
// or bq - local <= b <= bq, every visible block for a dense row) and the best others b <= bq = qpos / block_size
// (ties to the lower block), min(budget, width) of them (width for a dense row) -> idx [R, width] ascending, -1
// padded. Keys as there: (order image of the clamped score, +inf if forced) << 32 | (nb - 1 - b).
extern "C" void infllmv2_select(int64_t R, int64_t T, int64_t G, const float *q, const float *c1T, int64_t n1,
                                const float *cnT, int64_t nn, const int32_t *v1, const int32_t *e1, const int32_t *vn,
                                int64_t st, int64_t nb, const int64_t *qpos, const uint8_t *dense, int64_t block_size,
                                int64_t init_blocks, int64_t local_blocks, int64_t budget, int64_t width,
                                int32_t *idx) {
    Stage1 w(G, n1, st, nb);
    std::vector<float> scores(nb);
    std::vector<int64_t> keys(nb);
    std::vector<int32_t> picked;
    for (int64_t r = 0; r < R; r++) {
        row_block_scores(G, q + r * G * HEAD_DIM, c1T + (r / T) * HEAD_DIM * n1, cnT + (r / T) * HEAD_DIM * nn, v1[r],
                         e1[r], vn[r], st, nb, w.width, w.S.data(), w.m.data(), w.s.data(), w.lse.data(),
                         scores.data());
        int64_t bq = qpos[r] >= 0 ? qpos[r] / block_size : -1, n = bq + 1 < nb ? bq + 1 : nb;
        bool all = dense != nullptr && dense[r];
        for (int64_t b = 0; b < n; b++) {
            float key = scores[b];
            key = key < -FLT_MAX ? -FLT_MAX : key > FLT_MAX ? FLT_MAX : key;
            key += 0.0f;  // -0 -> 0
            if (all || b < init_blocks || b >= bq - local_blocks) key = INFINITY;
            int32_t bits;
            memcpy(&bits, &key, 4);
            int64_t order = bits >= 0 ? bits : bits ^ 0x7FFFFFFF;
            keys[b] = (order << 32) | (nb - 1 - b);
        }
        int64_t limit = all ? width : (budget < width ? budget : width), k = limit < n ? limit : n;
        if (k > 0) std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.begin() + n, std::greater<int64_t>());
        picked.resize(k);
        for (int64_t i = 0; i < k; i++) picked[i] = (int32_t)(nb - 1 - (keys[i] & 0xFFFFFFFF));
        std::sort(picked.begin(), picked.end());
        for (int64_t i = 0; i < width; i++) idx[r * width + i] = i < k ? picked[i] : -1;
    }
}

// ---- stage 2: attention over the selected blocks -----------------------------------------------------------------

// Rows [r0, r1) of q [R, G, HEAD_DIM] (scaled); their pairs blk, cnt [R, W]: the row of kT [NB, HEAD_DIM, BLOCK] and
// v [NB, BLOCK, HEAD_DIM] of the selected block (-1: none) and its number of visible keys; out [R, G, HEAD_DIM].
extern "C" void infllmv2_attend(int64_t r0, int64_t r1, int64_t G, int64_t W, const float *q, const float *kT,
                                const float *v, const int64_t *blk, const int32_t *cnt, float *out) {
    if (r1 <= r0) return;
    int64_t lo = INT64_MAX, hi = -1;
    for (int64_t e = r0 * W; e < r1 * W; e++)
        if (blk[e] >= 0 && cnt[e] > 0) lo = blk[e] < lo ? blk[e] : lo, hi = blk[e] > hi ? blk[e] : hi;
    std::vector<int64_t> start(hi >= lo ? hi - lo + 2 : 1, 0), order;  // counting sort, latest block first
    for (int64_t e = r0 * W; e < r1 * W; e++)
        if (blk[e] >= 0 && cnt[e] > 0) start[hi - blk[e] + 1]++;
    for (size_t i = 1; i < start.size(); i++) start[i] += start[i - 1];
    order.resize(start.back());
    for (int64_t e = r0 * W; e < r1 * W; e++)
        if (blk[e] >= 0 && cnt[e] > 0) order[start[hi - blk[e]]++] = e;
    std::vector<float> m((r1 - r0) * G, -INFINITY), l((r1 - r0) * G, 0.0f);
    std::vector<int> from(G, 0), to(G);  // every head of a pair sees the block's first cnt keys
    memset(out + r0 * G * HEAD_DIM, 0, sizeof(float) * (r1 - r0) * G * HEAD_DIM);
    for (int64_t e : order) {
        int64_t r = e / W, b = blk[e];
        std::fill(to.begin(), to.end(), cnt[e]);
        flash_rows(G, q + r * G * HEAD_DIM, kT + b * HEAD_DIM * BLOCK, v + b * BLOCK * HEAD_DIM, HEAD_DIM,
                   from.data(), to.data(), out + r * G * HEAD_DIM, HEAD_DIM, m.data() + (r - r0) * G,
                   l.data() + (r - r0) * G);
    }
    flash_rows_finish((r1 - r0) * G, out + r0 * G * HEAD_DIM, HEAD_DIM, m.data(), l.data(), nullptr);
}
