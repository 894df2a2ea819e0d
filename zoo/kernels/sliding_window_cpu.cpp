// Sliding-window causal attention on the CPU, fused (fp32): query t sees keys t - window < j <= t. Built and loaded
// by zoo.kernels.native; zoo.layers.sparse_cpu.window_attention calls it (its torch schedule is the fallback).
//
// Work items are (batch x query head, 16 consecutive queries). An item visits the key blocks its window covers
// (~window / BLOCK + 1), each block's K^T and V read once into L1 and used by the 4 tiles of 4 queries
// (flash_tile.h: scores and output rows in vector registers, online softmax, per-row key ranges at the window's
// two edges). Output rows are written in place in a [B, T, H, D] buffer.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"
#include "flash_tile.h"

constexpr int ITEM = 16;  // queries per work item (4 tiles of 4)

// q: element strides (batch, head, token) and the softmax scale; kT [B*Hkv, nb, HEAD_DIM, BLOCK] (zero padded);
// v: element strides (batch, KV head, token); out [B, T, H, HEAD_DIM]. Items [i0, i1) of B * H * ceil(T / ITEM);
// G = H / Hkv. The rows of q and v are read in place (unit stride inside a row; an item copies its queries, scaled).
extern "C" void sliding_window_attend(int64_t i0, int64_t i1, int64_t H, int64_t G, int64_t T, int64_t window,
                                      const float *q, int64_t qsb, int64_t qsh, int64_t qst, float scale,
                                      const float *kT, const float *v, int64_t vsb, int64_t vsh, int64_t vst,
                                      float *out) {
    const int64_t items_per_head = (T + ITEM - 1) / ITEM, nb = (T + BLOCK - 1) / BLOCK;
    for (int64_t item = i0; item < i1; item++) {
        int64_t bh = item / items_per_head, t0 = item % items_per_head * ITEM;
        int64_t b = bh / H, h = bh % H, kv = b * (H / G) + h / G;
        int64_t n = T - t0 < ITEM ? T - t0 : ITEM;
        const float *vh = v + b * vsb + (h / G) * vsh;
        float *oi = out + ((b * T + t0) * H + h) * HEAD_DIM;
        float m[ITEM], l[ITEM];
        alignas(64) float qs[ITEM * HEAD_DIM];
        flash_rows_start(n, q + b * qsb + h * qsh + t0 * qst, qst, scale, qs, oi, H * HEAD_DIM, m, l);
        int64_t first = t0 - window + 1 < 0 ? 0 : (t0 - window + 1) / BLOCK, last = (t0 + n - 1) / BLOCK;
        for (int64_t blk = first; blk <= last && blk < nb; blk++) {
            int lo[ITEM], hi[ITEM];
            for (int64_t r = 0; r < n; r++) {  // keys [t - window + 1, t] of this block
                int64_t t = t0 + r, a = t - window + 1 - blk * BLOCK, z = t + 1 - blk * BLOCK;
                lo[r] = (int)(a < 0 ? 0 : a > BLOCK ? BLOCK : a);
                hi[r] = (int)(z < 0 ? 0 : z > BLOCK ? BLOCK : z);  // lo >= hi: no key of this block
            }
            flash_rows(n, qs, kT + (kv * nb + blk) * HEAD_DIM * BLOCK, vh + blk * BLOCK * vst, vst, lo, hi, oi,
                       H * HEAD_DIM, m, l);
        }
        flash_rows_finish(n, oi, H * HEAD_DIM, m, l, nullptr);
    }
}
