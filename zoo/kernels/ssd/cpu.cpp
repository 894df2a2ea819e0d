// Mamba-2's chunked SSD scan on the CPU, forward only (fp32): the math of zoo.kernels.ssd.reference (its docstring)
// for one call without autograd, built and loaded by zoo.kernels.native (-fopenmp), glue in zoo/kernels/ssd/cpu.py.
// Per batch row and head h (group g), chunks of Q tokens, a_t = dt_t A_h (+ offset_t), cum = cumsum of a in a chunk:
//
//     Y    = (C B^T o exp(cum_i - cum_j), causal) (dt x)        intra-chunk           [Q, Q] [Q, P]
//     Y   += exp(cum_i) C S^T                                    from the entering state     [Q, N] [N, P]
//     y    = Y + D x
//     S^T <- exp(cum_last) S^T + B^T (exp(cum_last - cum_j) dt_j x_j)                    [N, Q] [Q, P]
//
// The state is kept transposed, S^T [N, P], so that all three products are C += A B with B's rows P contiguous
// floats (one register-blocked routine, gemm_acc). A thread owns a range of heads of every batch row and walks the
// chunks in order; per chunk it builds a group's C B^T and B^T once for its heads of that group; its heads' states
// stay in cache for the whole sequence (the reference writes every chunk's state out and reads it back).

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "../simd.h"

// C[r, :P] += sum_{k < K_r} A[r, k] Bm[k, :P] for r < rows, with K_r = K, or r + 1 rounded up to the row block when
// causal (A is zero above its diagonal). Four rows by NV vectors of columns in registers. P: a multiple of NV * L.
template <int NV>
static void gemm_acc_nv(int64_t rows, int64_t K, const float *A, int64_t lda, const float *Bm, int64_t ldb, float *C,
                        int64_t ldc, int64_t P, bool causal) {
    for (int64_t c0 = 0; c0 < P; c0 += NV * L) {
        int64_t r = 0;
        for (; r + 4 <= rows; r += 4) {
            const int64_t kmax = causal && r + 4 < K ? r + 4 : K;
            vf acc[4][NV];
            for (int i = 0; i < 4; i++)
                for (int v = 0; v < NV; v++) acc[i][v] = *(const vf_mem *)(C + (r + i) * ldc + c0 + v * L);
            for (int64_t k = 0; k < kmax; k++) {
                vf b[NV];
                for (int v = 0; v < NV; v++) b[v] = *(const vf_mem *)(Bm + k * ldb + c0 + v * L);
                for (int i = 0; i < 4; i++) {
                    const vf a = splat(A[(r + i) * lda + k]);
                    for (int v = 0; v < NV; v++) acc[i][v] += a * b[v];
                }
            }
            for (int i = 0; i < 4; i++)
                for (int v = 0; v < NV; v++) *(vf_mem *)(C + (r + i) * ldc + c0 + v * L) = acc[i][v];
        }
        for (; r < rows; r++) {
            const int64_t kmax = causal && r + 1 < K ? r + 1 : K;
            vf acc[NV];
            for (int v = 0; v < NV; v++) acc[v] = *(const vf_mem *)(C + r * ldc + c0 + v * L);
            for (int64_t k = 0; k < kmax; k++) {
                const vf a = splat(A[r * lda + k]);
                for (int v = 0; v < NV; v++) acc[v] += a * *(const vf_mem *)(Bm + k * ldb + c0 + v * L);
            }
            for (int v = 0; v < NV; v++) *(vf_mem *)(C + r * ldc + c0 + v * L) = acc[v];
        }
    }
}

static void gemm_acc(int64_t rows, int64_t K, const float *A, int64_t lda, const float *Bm, int64_t ldb, float *C,
                     int64_t ldc, int64_t P, bool causal) {
    if (P % (4 * L) == 0)
        gemm_acc_nv<4>(rows, K, A, lda, Bm, ldb, C, ldc, P, causal);
    else if (P % (2 * L) == 0)
        gemm_acc_nv<2>(rows, K, A, lda, Bm, ldb, C, ldc, P, causal);
    else
        gemm_acc_nv<1>(rows, K, A, lda, Bm, ldb, C, ldc, P, causal);
}

static void prefetch_rows(const float *p, int64_t rows, int64_t stride, int64_t row_floats) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t k = 0; k < row_floats; k += 16) __builtin_prefetch(p + r * stride + k);
}

// x [Bsz, T, H, P] (batch / token strides xb, xt), dt [Bsz, T, H] (dtb, dtt), B and C [Bsz, T, G, N] (bb, bt, cb, ct),
// neg: A [H]; offset [Bsz, T, H] contiguous or null; d: D [H] (d_per_channel 0) or [H, P] (1), or null;
// state [Bsz, H, P, N]: the initial state in, the final state out; y [Bsz, T, H, P] contiguous. P a multiple of L.
extern "C" void ssd_forward(int64_t Bsz, int64_t T, int64_t H, int64_t P, int64_t G, int64_t N, int64_t Q,
                            const float *x, int64_t xb, int64_t xt, const float *dt, int64_t dtb, int64_t dtt,
                            const float *A, const float *Bm, int64_t bb, int64_t bt, const float *Cm, int64_t cb,
                            int64_t ct, const float *offset, const float *d, int32_t d_per_channel, float *state,
                            float *y, int32_t threads) {
    const int64_t hg = H / G;
#pragma omp parallel num_threads(threads)
    {
        int64_t h0, h1;  // this thread's heads
        thread_share(H, 1, &h0, &h1);
        std::vector<float> ST((h1 - h0) * N * P), CB(Q * Q), Bt(N * Q), M(Q * Q), xdt(Q * P), Y(Q * P), Yoff(Q * P),
            cum(Q), e_in(Q), e_out(Q);
        for (int64_t b = 0; b < Bsz && h0 < h1; b++) {
            for (int64_t h = h0; h < h1; h++)  // S^T [N, P] from the state's [P, N]
                for (int64_t p = 0; p < P; p++)
                    for (int64_t n = 0; n < N; n++) ST[((h - h0) * N + n) * P + p] = state[((b * H + h) * P + p) * N + n];
            for (int64_t t0 = 0; t0 < T; t0 += Q) {
                const int64_t q = T - t0 < Q ? T - t0 : Q;
                int64_t g_ready = -1;
                for (int64_t h = h0; h < h1; h++) {
                    const int64_t g = h / hg;
                    const float *Bc = Bm + b * bb + t0 * bt + g * N, *Cc = Cm + b * cb + t0 * ct + g * N;
                    if (g != g_ready) {  // the group's B^T [N, q] and C B^T [q, q] (used on and below the diagonal)
                        for (int64_t j = 0; j < q; j++)
                            for (int64_t n = 0; n < N; n++) Bt[n * Q + j] = Bc[j * bt + n];
                        memset(CB.data(), 0, sizeof(float) * q * Q);
                        gemm_acc(q, N, Cc, ct, Bt.data(), Q, CB.data(), Q, Q, false);
                        g_ready = g;
                    }
                    const float *xc = x + b * xb + t0 * xt + h * P, *dtc = dt + b * dtb + t0 * dtt + h;
                    // the next head's rows of x (or the next chunk's x, B and C) on their way while this one runs:
                    // a token's rows are a conv output row apart, a new page each, out of the hardware prefetch's reach
                    if (h + 1 < h1) {
                        prefetch_rows(xc + P, q, xt, P);
                    } else if (t0 + Q < T) {
                        const int64_t qn = T - t0 - Q < Q ? T - t0 - Q : Q;
                        prefetch_rows(x + b * xb + (t0 + Q) * xt + h0 * P, qn, xt, P);
                        prefetch_rows(Bm + b * bb + (t0 + Q) * bt + (h0 / hg) * N, qn, bt, N);
                        prefetch_rows(Cm + b * cb + (t0 + Q) * ct + (h0 / hg) * N, qn, ct, N);
                    }
                    float run = 0.0f;
                    for (int64_t i = 0; i < q; i++) {
                        run += dtc[i * dtt] * A[h] + (offset ? offset[(b * T + t0 + i) * H + h] : 0.0f);
                        cum[i] = run;
                    }
                    for (int64_t i = q; i < Q; i++) cum[i] = run;  // a short last chunk: no-op tokens past its end
                    for (int64_t i = 0; i < q; i++) {
                        const vf w = splat(dtc[i * dtt]), ci = splat(cum[i]);
                        for (int64_t p = 0; p < P; p += L)
                            *(vf_mem *)(xdt.data() + i * P + p) = w * *(const vf_mem *)(xc + i * xt + p);
                        for (int64_t j = 0; j < Q; j += L) {  // zeros above the diagonal (the row block reads them)
                            const vi below = lanes(j) <= (int32_t)i;
                            const vf e = vexp(below ? ci - *(const vf_mem *)(cum.data() + j) : splat(0.0f));
                            *(vf_mem *)(M.data() + i * Q + j) = below ? e * *(const vf_mem *)(CB.data() + i * Q + j)
                                                                      : splat(0.0f);
                        }
                    }
                    memset(Y.data(), 0, sizeof(float) * q * P);
                    memset(Yoff.data(), 0, sizeof(float) * q * P);
                    float *S = ST.data() + (h - h0) * N * P;
                    gemm_acc(q, q, M.data(), Q, xdt.data(), P, Y.data(), P, P, true);
                    gemm_acc(q, N, Cc, ct, S, P, Yoff.data(), P, P, false);
                    float *yc = y + ((b * T + t0) * H + h) * P;
                    const float last = cum[q - 1];
                    for (int64_t i = 0; i < Q; i += L) {  // exp(cum_i), exp(cum_last - cum_i) (rows past q unused)
                        const vf c = *(const vf_mem *)(cum.data() + i);
                        *(vf_mem *)(e_in.data() + i) = vexp(c);
                        *(vf_mem *)(e_out.data() + i) = vexp(last - c);
                    }
                    for (int64_t i = 0; i < q; i++) {
                        const vf e = splat(e_in[i]);
                        for (int64_t p = 0; p < P; p += L) {
                            const vf dh = d == nullptr ? splat(0.0f)
                                          : d_per_channel ? *(const vf_mem *)(d + h * P + p) : splat(d[h]);
                            *(vf_mem *)(yc + i * H * P + p) = *(const vf_mem *)(Y.data() + i * P + p)
                                + e * *(const vf_mem *)(Yoff.data() + i * P + p) + dh * *(const vf_mem *)(xc + i * xt + p);
                        }
                    }
                    for (int64_t i = 0; i < q; i++) {  // xdt rows weighted by the decay to the chunk's end
                        const vf w = splat(e_out[i]);
                        for (int64_t p = 0; p < P; p += L) *(vf_mem *)(xdt.data() + i * P + p) *= w;
                    }
                    const vf dec = splat(e_in[q - 1]);
                    for (int64_t k = 0; k < N * P; k += L) *(vf_mem *)(S + k) *= dec;
                    gemm_acc(N, q, Bt.data(), Q, xdt.data(), P, S, P, P, false);
                }
            }
            for (int64_t h = h0; h < h1; h++)
                for (int64_t p = 0; p < P; p++)
                    for (int64_t n = 0; n < N; n++) state[((b * H + h) * P + p) * N + n] = ST[((h - h0) * N + n) * P + p];
        }
    }
}
