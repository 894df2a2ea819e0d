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

constexpr int ITEM = 16;  // queries per work item (4 tiles of 4)

// q: element strides (batch, head, token) and the softmax scale; kT: per (batch, KV head) kT_hs elements apart,
// [ceil(T / BLOCK), HEAD_DIM, BLOCK] (zero padded); v: element strides (batch, KV head, token); out [B, T, H,
// HEAD_DIM]; lse [B, H, T] (natural log).
// Items [i0, i1) of B * H * ceil(T / ITEM); G = H / Hkv; bs a multiple of BLOCK and of ITEM.
extern "C" void block_sparse_attend(int64_t i0, int64_t i1, int64_t H, int64_t G, int64_t T, int64_t bs,
                                    int64_t local, int64_t stride, const int64_t *residue, const float *q,
                                    int64_t qsb, int64_t qsh, int64_t qst, float scale, const float *kT,
                                    int64_t kT_hs, const float *v, int64_t vsb, int64_t vsh, int64_t vst,
                                    float *out, float *lse) {
    const int64_t items_per_head = (T + ITEM - 1) / ITEM, nkb = (T + BLOCK - 1) / BLOCK, sub = bs / BLOCK;
    for (int64_t item = i0; item < i1; item++) {
        int64_t bh = item / items_per_head, t0 = item % items_per_head * ITEM;
        int64_t b = bh / H, h = bh % H, kv = b * (H / G) + h / G;
        int64_t n = T - t0 < ITEM ? T - t0 : ITEM, qb = t0 / bs;
        const float *vh = v + b * vsb + (h / G) * vsh;
        float *oi = out + ((b * T + t0) * H + h) * HEAD_DIM;
        float m[ITEM], l[ITEM];
        alignas(64) float qs[ITEM * HEAD_DIM];
        flash_rows_start(n, q + b * qsb + h * qsh + t0 * qst, qst, scale, qs, oi, H * HEAD_DIM, m, l);
        const int lo[ITEM] = {0};
        auto visit = [&](int64_t blk, bool diagonal) {  // kernel block blk: whole, or causal (row t sees j <= t)
            int hi[ITEM];
            for (int64_t r = 0; r < n; r++) {
                int64_t z = diagonal ? t0 + r + 1 - blk * BLOCK : BLOCK;
                hi[r] = (int)(z < 0 ? 0 : z > BLOCK ? BLOCK : z);  // 0: no key of this block
            }
            flash_rows(n, qs, kT + kv * kT_hs + blk * HEAD_DIM * BLOCK, vh + blk * BLOCK * vst, vst, lo, hi, oi,
                       H * HEAD_DIM, m, l);
        };
        int64_t first_local = qb - local + 1 < 0 ? 0 : qb - local + 1;
        for (int64_t sb = residue[h / G]; sb < first_local; sb += stride)  // vertical blocks: every key
            for (int64_t s = 0; s < sub; s++) visit(sb * sub + s, false);
        for (int64_t sb = first_local; sb <= qb; sb++)  // local blocks: causal on the diagonal
            for (int64_t s = 0; s < sub && (sb * sub + s) * BLOCK < t0 + n; s++) visit(sb * sub + s, sb == qb);
        flash_rows_finish(n, oi, H * HEAD_DIM, m, l, lse + bh * T + t0);  // every row sees its own token: l > 0
    }
}

// ------------------------------------------------------------------------------------------------------ backward
// The flash backward over the same active blocks, key-block stationary: with S = scale q k^T, P = e^(S - lse) and
// delta_i = dO_i . O_i,
//     dP = dO V^T;  dS = scale P o (dP - delta);  dV += P^T dO;  dK += dS^T q;  dQ += dS K.
// A work item is one (batch, KV head): its key blocks in turn, each block's K and V transposed into L1 once and
// its dK, dV rows accumulated there while every query tile of the G heads that reads the block passes (the local
// query blocks sb .. sb + local - 1, and all later ones for a vertical block). dQ rows belong to the item's heads
// only: no two threads write a row. Tiles of 4 queries keep S and dP (4 x BLOCK), then the 4 rows of dO, q or dQ,
// in vector registers. q, dO, K and V are read in place (unit stride inside a row).

// acc[key] += sum_i w[i][key] x_i for the keys < end: the NR rows x_i (x + i x_stride) in registers, a row of acc
// [BLOCK, HEAD_DIM] at a time.
template <int NR>
static inline void add_outer(float *acc, const float (*w)[BLOCK], const float *x, int64_t x_stride, int end) {
    vf rows[NR][DV];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) rows[i][j] = ((const vf_mem *)(x + i * x_stride))[j];
    for (int key = 0; key < end; key++) {
        vf *a = (vf *)(acc + key * HEAD_DIM);
        for (int j = 0; j < DV; j++) {
            vf sum = a[j];
            for (int i = 0; i < NR; i++) sum += splat(w[i][key]) * rows[i][j];
            a[j] = sum;
        }
    }
}

template <int NR>
static inline void backward_tile(const float *q, int64_t qst, const float *dO, int64_t gst, const float *lse,
                                 const float *delta, const int *hi, float scale, const float *kT, const float *vT,
                                 const float *k, int64_t kst, float *dK, float *dV, float *dq) {
    vf s[NR][BV], dp[NR][BV];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < BV; j++) s[i][j] = dp[i][j] = splat(0.0f);
    for (int d = 0; d < HEAD_DIM; d++) {  // q K^T and dP = dO V^T, a row of K^T and V^T at a time
        const vf *kd = (const vf *)(kT + d * BLOCK), *vd = (const vf *)(vT + d * BLOCK);
        for (int i = 0; i < NR; i++) {
            vf qd = splat(q[i * qst + d]), od = splat(dO[i * gst + d]);
            for (int j = 0; j < BV; j++) s[i][j] += qd * kd[j], dp[i][j] += od * vd[j];
        }
    }
    alignas(64) float p[NR][BLOCK], ds[NR][BLOCK];
    int end = 0;  // keys past every row's range are never read
    for (int i = 0; i < NR; i++) {
        end = hi[i] > end ? hi[i] : end;
        for (int j = 0; j < BV; j++) {
            vf e = vexp(s[i][j] * scale - lse[i]);
            e = lanes(j * L) < hi[i] ? e : splat(0.0f);
            ((vf *)p[i])[j] = e;
            ((vf *)ds[i])[j] = scale * e * (dp[i][j] - delta[i]);
        }
    }
    add_outer<NR>(dV, p, dO, gst, end);  // dV += P^T dO
    add_outer<NR>(dK, ds, q, qst, end);  // dK += dS^T q
    vf rows[NR][DV];  // dQ += dS K: the 4 dQ rows in registers
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) rows[i][j] = splat(0.0f);
    for (int key = 0; key < end; key++) {
        const vf_mem *kk = (const vf_mem *)(k + key * kst);
        for (int i = 0; i < NR; i++) {
            vf w = splat(ds[i][key]);
            for (int j = 0; j < DV; j++) rows[i][j] += w * kk[j];
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) ((vf_mem *)(dq + i * HEAD_DIM))[j] += rows[i][j];
}

// q, dO, O: element strides (batch, head, token); lse [B, H, T]; k, v: element strides (batch, KV head, token)
// -> dq [B, H, T, HEAD_DIM] (zeroed by the caller, added to), dk, dv [B, Hkv, T, HEAD_DIM] (written); delta
// [B, H, T] is scratch. Items [i0, i1) of B * Hkv; G = H / Hkv; bs a multiple of BLOCK.
extern "C" void block_sparse_backward(int64_t i0, int64_t i1, int64_t H, int64_t G, int64_t T, int64_t bs,
                                      int64_t local, int64_t stride, const int64_t *residue, const float *q,
                                      int64_t qsb, int64_t qsh, int64_t qst, const float *dO, int64_t gsb,
                                      int64_t gsh, int64_t gst, const float *o, int64_t osb, int64_t osh,
                                      int64_t ost, const float *lse, float *delta, float scale, const float *k,
                                      int64_t ksb, int64_t ksh, int64_t kst, const float *v, int64_t vsb,
                                      int64_t vsh, int64_t vst, float *dq, float *dk, float *dv) {
    constexpr int NR = 4;
    const int64_t nkb = (T + BLOCK - 1) / BLOCK, nb = (T + bs - 1) / bs, Hkv = H / G;
    alignas(64) float kT[HEAD_DIM * BLOCK], vT[HEAD_DIM * BLOCK], dK[BLOCK * HEAD_DIM], dV[BLOCK * HEAD_DIM];
    for (int64_t item = i0; item < i1; item++) {
        int64_t b = item / Hkv, kvh = item % Hkv;
        for (int64_t h = kvh * G; h < (kvh + 1) * G; h++)  // delta_t = dO_t . O_t of the item's heads
            for (int64_t t = 0; t < T; t++) {
                const vf_mem *gr = (const vf_mem *)(dO + b * gsb + h * gsh + t * gst);
                const vf_mem *orow = (const vf_mem *)(o + b * osb + h * osh + t * ost);
                vf acc = splat(0.0f);
                for (int j = 0; j < DV; j++) acc += gr[j] * orow[j];
                delta[(b * H + h) * T + t] = hsum(acc);
            }
        const float *kh = k + b * ksb + kvh * ksh, *vh = v + b * vsb + kvh * vsh;
        for (int64_t blk = 0; blk < nkb; blk++) {
            int64_t k0 = blk * BLOCK, sb = k0 / bs, nk = T - k0 < BLOCK ? T - k0 : BLOCK;
            for (int d = 0; d < HEAD_DIM; d++)  // K^T and V^T of the block (zeros past T)
                for (int j = 0; j < BLOCK; j++) {
                    kT[d * BLOCK + j] = j < nk ? kh[(k0 + j) * kst + d] : 0.0f;
                    vT[d * BLOCK + j] = j < nk ? vh[(k0 + j) * vst + d] : 0.0f;
                }
            memset(dK, 0, sizeof dK), memset(dV, 0, sizeof dV);
            bool vertical = sb >= residue[kvh] && (sb - residue[kvh]) % stride == 0;
            int64_t last = vertical || sb + local - 1 > nb - 1 ? nb - 1 : sb + local - 1;  // query blocks reading it
            for (int64_t g = 0; g < G; g++) {
                int64_t h = kvh * G + g;
                const float *qh = q + b * qsb + h * qsh, *gh = dO + b * gsb + h * gsh;
                const float *lh = lse + (b * H + h) * T, *deh = delta + (b * H + h) * T;
                float *dqh = dq + (b * H + h) * T * HEAD_DIM;
                for (int64_t t = k0; t < T && t / bs <= last; t += NR) {  // rows before k0 see none of the block
                    int hi[NR];
                    int64_t rows = T - t < NR ? T - t : NR;
                    for (int r = 0; r < NR; r++) {  // causal inside the diagonal block only
                        int64_t z = r >= rows ? 0 : (t + r) / bs == sb ? t + r + 1 - k0 : BLOCK;
                        hi[r] = (int)(z > BLOCK ? BLOCK : z);
                    }
                    const float *kb = kh + k0 * kst;
                    if (rows == NR)
                        backward_tile<NR>(qh + t * qst, qst, gh + t * gst, gst, lh + t, deh + t, hi, scale, kT, vT,
                                          kb, kst, dK, dV, dqh + t * HEAD_DIM);
                    else
                        for (int64_t r = 0; r < rows; r++)
                            backward_tile<1>(qh + (t + r) * qst, qst, gh + (t + r) * gst, gst, lh + t + r,
                                             deh + t + r, hi + r, scale, kT, vT, kb, kst, dK, dV,
                                             dqh + (t + r) * HEAD_DIM);
                }
            }
            memcpy(dk + ((b * Hkv + kvh) * T + k0) * HEAD_DIM, dK, sizeof(float) * nk * HEAD_DIM);
            memcpy(dv + ((b * Hkv + kvh) * T + k0) * HEAD_DIM, dV, sizeof(float) * nk * HEAD_DIM);
        }
    }
}
