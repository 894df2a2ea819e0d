// Elementwise passes of the layers' CPU forward without autograd, each one pass over its rows (fp32, OpenMP threads
// over row ranges; built by zoo.kernels.native). Their torch versions, which tests pin them to:
// zoo.layers.mamba2_ops._conv_forward, zoo.kernels.gated_rmsnorm.reference.gated_rmsnorm_inference and
// zoo.layers.rope._rotary_inference.
//
//   causal_conv_silu:  out[t, c] = silu(bias[c] + sum_k w[k, c] x[t - (K-1) + k, c])   x before t = 0 from prev
//   gated_rmsnorm:     gate first:  u = x silu(z);  y = u / sqrt(mean_group(u^2) + eps) * w (+ bias)
//                      gate after:  y = (x / sqrt(mean_group(x^2) + eps) * w (+ bias)) * silu(z)
//   rotary:            y = x cos + rotate_half(x) sin,  rotate_half([a, b]) = [-b, a]   (per head, D channels)

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

// x [Bsz, T, C] (batch / token strides xb, xt; channels contiguous); prev [Bsz, K-1, C] (pb, pt) or null (zeros);
// w [K, C]; bias [C] or null; out [Bsz, T, C] contiguous.
extern "C" void causal_conv_silu(int64_t Bsz, int64_t T, int64_t C, int64_t K, const float *x, int64_t xb, int64_t xt,
                                 const float *prev, int64_t pb, int64_t pt, const float *w, const float *bias,
                                 int32_t activation, float *out, int32_t threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        thread_share(Bsz * T, 1, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t b = r / T, t = r % T;
            float *o = out + r * C;
            int64_t c = 0;
            for (; c + L <= C; c += L) {
                vf acc = bias ? *(const vf_mem *)(bias + c) : splat(0.0f);
                for (int64_t k = 0; k < K; k++) {
                    const int64_t s = t - (K - 1) + k;  // the input this tap reads
                    const float *in = s >= 0 ? x + b * xb + s * xt : prev ? prev + b * pb + (K - 1 + s) * pt : nullptr;
                    if (in) acc += *(const vf_mem *)(in + c) * *(const vf_mem *)(w + k * C + c);
                }
                *(vf_mem *)(o + c) = activation ? vsilu(acc) : acc;
            }
            for (; c < C; c++) {
                float acc = bias ? bias[c] : 0.0f;
                for (int64_t k = 0; k < K; k++) {
                    const int64_t s = t - (K - 1) + k;
                    const float *in = s >= 0 ? x + b * xb + s * xt : prev ? prev + b * pb + (K - 1 + s) * pt : nullptr;
                    if (in) acc += in[c] * w[k * C + c];
                }
                o[c] = activation ? silu(acc) : acc;
            }
        }
    }
}

// x [rows, d] (row stride xs) -> y [rows, d] contiguous (may be x), normalised over groups of gs channels; z [rows, d]
// (row stride zs) or null (no gate); w [d]; bias [d] or null.
extern "C" void gated_rmsnorm(int64_t rows, int64_t d, int64_t gs, const float *x, int64_t xs, float *y,
                              const float *z, int64_t zs, const float *w, const float *bias, float eps,
                              int32_t norm_before_gate, int32_t threads) {
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        thread_share(rows, 1, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            float *u = y + r * d;
            const float *zr = z ? z + r * zs : nullptr;
            if (x + r * xs != u) memcpy(u, x + r * xs, sizeof(float) * d);
            gated_rmsnorm_row(u, zr, d, gs, w, bias, eps, norm_before_gate);
        }
    }
}

// x, y [Bsz, T, H, D] (strides xb, xt, xh and yb, yt, yh; channels contiguous); cos, sin [Bsz or 1, T, D] (batch
// stride cb: 0 when shared), D even.
extern "C" void rotary(int64_t Bsz, int64_t T, int64_t H, int64_t D, const float *x, int64_t xb, int64_t xt,
                       int64_t xh, const float *cos, const float *sin, int64_t cb, float *y, int64_t yb, int64_t yt,
                       int64_t yh, int32_t threads) {
    const int64_t h2 = D / 2;
#pragma omp parallel num_threads(threads)
    {
        int64_t r0, r1;
        thread_share(Bsz * T, 1, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            const int64_t b = r / T, t = r % T;
            const float *c = cos + b * cb + t * D, *s = sin + b * cb + t * D;
            for (int64_t h = 0; h < H; h++) {
                const float *x1 = x + b * xb + t * xt + h * xh, *x2 = x1 + h2;
                float *y1 = y + b * yb + t * yt + h * yh, *y2 = y1 + h2;
                int64_t i = 0;
                for (; i + L <= h2; i += L) {
                    const vf a = *(const vf_mem *)(x1 + i), e = *(const vf_mem *)(x2 + i);
                    *(vf_mem *)(y1 + i) = a * *(const vf_mem *)(c + i) - e * *(const vf_mem *)(s + i);
                    *(vf_mem *)(y2 + i) = e * *(const vf_mem *)(c + h2 + i) + a * *(const vf_mem *)(s + h2 + i);
                }
                for (; i < h2; i++) {
                    y1[i] = x1[i] * c[i] - x2[i] * s[i];
                    y2[i] = x2[i] * c[h2 + i] + x1[i] * s[h2 + i];
                }
            }
        }
    }
}
