// InfLLM-v2 stage 2 on the CPU, fused: attention of each query's G heads over its selected key blocks (fp32).
//
// Same result as zoo.kernels.infllmv2.reference.sparse_attention_ref (the oracle) and cpu.sparse_attention_cpu (the
// torch schedule); built and loaded by zoo.kernels.native, called by cpu.sparse_attention_cpu without gradient.
//
// For a range of query rows r (a row = one (batch, KV head, query); its G heads share the selection), the
// (row, block) pairs are visited block by block, the latest block first (a counting sort inside the call), so a
// block's K and V stay in L1 while every row that selected it reads it, and the rows' accumulators stay in L2:
//
//     S = q_r K_b^T                      [G, BLOCK]   (q scaled; keys past the query's position: -inf)
//     m' = max(m, rowmax S);  o *= e^(m - m');  l *= e^(m - m')           (only when the maximum rises)
//     P = e^(S - m');  l += rowsum P;  o += P V_b                          [G, HEAD_DIM]
//     out_r = o / l                     (0 for a row without a visible key)
//
// Tiles of 4 heads keep S (4 x BLOCK) and the o rows (4 x HEAD_DIM) in vector registers. e^x is Cephes' expf
// polynomial (~1 ulp) and flushes to 0 below -87.3 (no denormals), as the torch paths' floors do.
// HEAD_DIM and BLOCK are compile-time macros (multiples of the vector width); one library per pair.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#ifndef HEAD_DIM
#define HEAD_DIM 64
#endif
#ifndef BLOCK
#define BLOCK 64
#endif

#if defined(__AVX512F__)
constexpr int L = 16;  // floats per vector
#else
constexpr int L = 8;
#endif
typedef float vf __attribute__((vector_size(4 * L)));
typedef float vf_mem __attribute__((vector_size(4 * L), aligned(4)));  // loads and stores at any address
typedef int32_t vi __attribute__((vector_size(4 * L)));
constexpr int DV = HEAD_DIM / L, BV = BLOCK / L, ROWS = 4;
static_assert(HEAD_DIM % L == 0 && BLOCK % L == 0, "HEAD_DIM and BLOCK must be multiples of the vector width");

static inline vf splat(float x) { return x - (vf){}; }

static inline vf vexp(vf x) {  // e^x to ~1 ulp (Cephes expf); 0 below -87.3 and for -inf
    vi tiny = x < -87.3f;
    x = tiny ? splat(-87.3f) : x;
    vf n = x * 1.44269504088896341f + 12582912.0f;
    n = n - 12582912.0f;  // round(x / ln 2)
    vf r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    vf y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    vf two_n = (vf)((__builtin_convertvector(n, vi) + 127) << 23);
    return tiny ? splat(0.0f) : y * two_n;
}

// NR heads of one row against one block of `c` visible keys (K^T [HEAD_DIM, BLOCK], V [BLOCK, HEAD_DIM]):
// online softmax into o [NR, HEAD_DIM], m, l [NR]
template <int NR>
static inline void tile(const float *q, const float *kT, const float *v, int c, float *o, float *m, float *l) {
    vf s[NR][BV];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < BV; j++) s[i][j] = splat(0.0f);
    for (int d = 0; d < HEAD_DIM; d++) {  // S = q K^T, a row of K^T at a time
        const vf_mem *kd = (const vf_mem *)(kT + d * BLOCK);
        for (int i = 0; i < NR; i++) {
            vf qd = splat(q[i * HEAD_DIM + d]);
            for (int j = 0; j < BV; j++) s[i][j] += qd * kd[j];
        }
    }
    if (c < BLOCK) {  // keys after the query (or past the end of the keys)
        for (int j = 0; j < BV; j++) {
            vi key;
            for (int t = 0; t < L; t++) key[t] = j * L + t;
            for (int i = 0; i < NR; i++) s[i][j] = key < c ? s[i][j] : splat(-INFINITY);
        }
    }
    alignas(64) float p[NR][BLOCK];
    for (int i = 0; i < NR; i++) {
        vf mx = s[i][0];
        for (int j = 1; j < BV; j++) mx = mx > s[i][j] ? mx : s[i][j];
        float top = mx[0];
        for (int t = 1; t < L; t++) top = mx[t] > top ? mx[t] : top;
        if (top > m[i]) {
            if (m[i] > -INFINITY) {  // rescale what this head accumulated to the new maximum
                float a = vexp(splat(m[i] - top))[0];
                for (int j = 0; j < DV; j++) ((vf_mem *)(o + i * HEAD_DIM))[j] *= a;
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
        for (int t = 0; t < L; t++) l[i] += sum[t];
    }
    vf acc[NR][DV];
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) acc[i][j] = ((const vf_mem *)(o + i * HEAD_DIM))[j];
    for (int key = 0; key < c; key++) {  // o += P V, a row of V at a time
        const vf_mem *vk = (const vf_mem *)(v + key * HEAD_DIM);
        for (int i = 0; i < NR; i++) {
            vf pk = splat(p[i][key]);
            for (int j = 0; j < DV; j++) acc[i][j] += pk * vk[j];
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < DV; j++) ((vf_mem *)(o + i * HEAD_DIM))[j] = acc[i][j];
}

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
    memset(out + r0 * G * HEAD_DIM, 0, sizeof(float) * (r1 - r0) * G * HEAD_DIM);
    for (int64_t e : order) {
        int64_t r = e / W, b = blk[e];
        const float *qr = q + r * G * HEAD_DIM, *kb = kT + b * HEAD_DIM * BLOCK, *vb = v + b * BLOCK * HEAD_DIM;
        float *o = out + r * G * HEAD_DIM, *mr = m.data() + (r - r0) * G, *lr = l.data() + (r - r0) * G;
        int64_t g = 0;
        for (; g + ROWS <= G; g += ROWS) tile<ROWS>(qr + g * HEAD_DIM, kb, vb, cnt[e], o + g * HEAD_DIM, mr + g, lr + g);
        for (; g < G; g++) tile<1>(qr + g * HEAD_DIM, kb, vb, cnt[e], o + g * HEAD_DIM, mr + g, lr + g);
    }
    for (int64_t i = 0; i < (r1 - r0) * G; i++) {
        float inv = l[i] > 0 ? 1.0f / l[i] : 0.0f;
        float *o = out + (r0 * G + i) * HEAD_DIM;
        for (int d = 0; d < HEAD_DIM; d++) o[d] *= inv;
    }
}
