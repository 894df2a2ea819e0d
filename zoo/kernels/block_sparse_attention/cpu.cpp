// Local + vertical-stride block-sparse causal attention on the CPU, fused (fp32), forward with its log-sum-exp.
// Built and loaded by zoo.kernels.native through zoo.kernels.block_sparse_attention.cpu; the torch schedule of
// zoo.layers.sparse_cpu (flash calls per part of the keys, merged by log-sum-exp) is the reference and the backward.
//
// The pattern (dkernel's, zoo.layers.masks.LocalStrideRule without dense heads): query block qb of bs tokens sees
//     the local blocks  qb - local + 1 .. qb  (the last one causal), and
//     the vertical blocks kb < qb - local + 1 with kb = residue[h_kv] (mod stride).
// Work items are (batch x query head, 16 consecutive queries of one query block). An item visits only its active
// key blocks, each read once into L1 (K^T [HEAD_DIM, BLOCK] and V [BLOCK, HEAD_DIM]; a sparse block is bs / BLOCK
// kernel blocks) and used by its 4 tiles of 4 queries (flash_tile.h: online softmax, scores and output rows in
// vector registers, per-row key ranges on the diagonal). Output rows are written in place in [B, T, H, D].

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "../simd.h"
#include "../flash_tile.h"

constexpr int ROWS = 4, TILES = 4, ITEM = ROWS * TILES;  // queries per tile, tiles per item

// q: element strides (batch, head, token) and the softmax scale; kT [B*Hkv, ceil(T / BLOCK), HEAD_DIM, BLOCK]
// (zero padded); v: element strides (batch, KV head, token); out [B, T, H, HEAD_DIM]; lse [B, H, T] (natural log).
// Items [i0, i1) of B * H * ceil(T / ITEM); G = H / Hkv; bs a multiple of BLOCK and of ITEM.
extern "C" void block_sparse_attend(int64_t i0, int64_t i1, int64_t H, int64_t G, int64_t T, int64_t bs,
                                    int64_t local, int64_t stride, const int64_t *residue, const float *q,
                                    int64_t qsb, int64_t qsh, int64_t qst, float scale, const float *kT,
                                    const float *v, int64_t vsb, int64_t vsh, int64_t vst, float *out, float *lse) {
    const int64_t items_per_head = (T + ITEM - 1) / ITEM, nkb = (T + BLOCK - 1) / BLOCK, sub = bs / BLOCK;
    for (int64_t item = i0; item < i1; item++) {
        int64_t bh = item / items_per_head, t0 = item % items_per_head * ITEM;
        int64_t b = bh / H, h = bh % H, kv = b * (H / G) + h / G;
        int64_t n = T - t0 < ITEM ? T - t0 : ITEM, qb = t0 / bs;
        const float *qi = q + b * qsb + h * qsh + t0 * qst, *vh = v + b * vsb + (h / G) * vsh;
        float *oi = out + ((b * T + t0) * H + h) * HEAD_DIM;
        float m[ITEM], l[ITEM];
        alignas(64) float qs[ITEM][HEAD_DIM];  // the item's queries, scaled, contiguous
        for (int64_t r = 0; r < ITEM; r++) {
            m[r] = -INFINITY, l[r] = 0.0f;
            if (r < n) {
                memset(oi + r * H * HEAD_DIM, 0, sizeof(float) * HEAD_DIM);
                for (int d = 0; d < HEAD_DIM; d++) qs[r][d] = qi[r * qst + d] * scale;
            }
        }
        auto visit = [&](int64_t blk, bool diagonal) {  // kernel block blk: whole, or causal (row t sees j <= t)
            const float *kb = kT + (kv * nkb + blk) * HEAD_DIM * BLOCK, *vb = vh + blk * BLOCK * vst;
            for (int64_t tile = 0; tile * ROWS < n; tile++) {
                int lo[ROWS] = {0}, hi[ROWS];
                int64_t r0 = tile * ROWS, rows = n - r0 < ROWS ? n - r0 : ROWS;
                for (int r = 0; r < ROWS; r++) {
                    int64_t z = r >= rows ? 0 : diagonal ? t0 + r0 + r + 1 - blk * BLOCK : BLOCK;
                    hi[r] = (int)(z < 0 ? 0 : z > BLOCK ? BLOCK : z);  // 0: no key of this block
                }
                if (rows == ROWS)
                    flash_tile<ROWS>(qs[r0], HEAD_DIM, kb, vb, vst, lo, hi, oi + r0 * H * HEAD_DIM,
                                     H * HEAD_DIM, m + r0, l + r0);
                else
                    for (int64_t r = 0; r < rows; r++)
                        flash_tile<1>(qs[r0 + r], HEAD_DIM, kb, vb, vst, lo + r, hi + r,
                                      oi + (r0 + r) * H * HEAD_DIM, H * HEAD_DIM, m + r0 + r, l + r0 + r);
            }
        };
        int64_t first_local = qb - local + 1 < 0 ? 0 : qb - local + 1;
        for (int64_t sb = residue[h / G]; sb < first_local; sb += stride)  // vertical blocks: every key
            for (int64_t s = 0; s < sub; s++) visit(sb * sub + s, false);
        for (int64_t sb = first_local; sb <= qb; sb++)  // local blocks: causal on the diagonal
            for (int64_t s = 0; s < sub && (sb * sub + s) * BLOCK < t0 + n; s++) visit(sb * sub + s, sb == qb);
        for (int64_t r = 0; r < n; r++) {  // every row sees at least its own token: l > 0
            float inv = 1.0f / l[r];
            for (int d = 0; d < HEAD_DIM; d++) oi[r * H * HEAD_DIM + d] *= inv;
            lse[bh * T + t0 + r] = m[r] + logf(l[r]);
        }
    }
}
