// Mamba-2 decode on the CPU, fused (fp32): one token of a layer between its two GEMVs, the state updated in place.
// The same math as zoo.layers.mamba2_ops.decode_step_ (its torch calls; tests pin the two together), built and
// loaded by zoo.kernels.native. Per batch row, from the in_proj output zx = [z0, x0 | z, xBC, dt]:
//
//     window <- [window[1:], xBC];  u = silu(sum_k window[k] * w[k] + b)       conv over K taps  [C]
//     x, B, C = u[:d_ssm], input_scale * u[d_ssm : +G N], u[d_ssm + G N :]
//     dt = dt_scale * clamp(softplus(dt), lo, hi);  a = exp(dt A + log_decay_scale)              [H]
//     S[h, p] <- a_h S[h, p] + dt_h x[h, p] B[g(h)];  y[h, p] = S[h, p] . C[g(h)] + D x[h, p]   [H, P, N]
//     y <- rmsnorm_groups(y * silu(z)) * w   (gate first)   or   rmsnorm_groups(y) * w * silu(z)   (or y * silu(z))
//     out = [silu(z0) * x0, y]                                                    -> out_proj (a GEMV in torch)
//
// The state row S[h, p] (N floats) is read once and written once: decay, input and output in one pass.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "../simd.h"

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }  // torch's threshold 20

// Sizes: d_mlp, d_ssm, H heads of P channels, G groups of N states, K conv taps (C = d_ssm + 2 G N channels).
// zx [Bsz, 2 d_mlp + d_ssm + C + H]; window [Bsz, K, C]; conv_w [K, C]; conv_b [C] or null; neg_a [H]; d [d_ssm];
// ssm [Bsz, H, P, N]; norm_w [d_ssm] or null (norm groups of d_ssm / G); out [Bsz, d_mlp + d_ssm].
extern "C" void mamba2_decode(int64_t Bsz, int64_t d_mlp, int64_t d_ssm, int64_t H, int64_t P, int64_t G, int64_t N,
                              int64_t K, const float *zx, float *window, const float *conv_w, const float *conv_b,
                              const float *neg_a, const float *d, float dt_lo, float dt_hi, float dt_scale,
                              float input_scale, float log_decay_scale, float *ssm, const float *norm_w,
                              int32_t gate_first, float eps, float *out) {
    const int64_t C = d_ssm + 2 * G * N, n_in = 2 * d_mlp + d_ssm + C + H, hg = H / G, gs = d_ssm / G;
    std::vector<float> u(C), a(H), dt(H);
    for (int64_t b = 0; b < Bsz; b++) {
        const float *z0 = zx + b * n_in, *x0 = z0 + d_mlp, *z = x0 + d_mlp, *xbc = z + d_ssm, *dt_raw = xbc + C;
        float *win = window + b * K * C, *o = out + b * (d_mlp + d_ssm), *y = o + d_mlp;
        memmove(win, win + C, sizeof(float) * (K - 1) * C);
        memcpy(win + (K - 1) * C, xbc, sizeof(float) * C);
        for (int64_t c = 0; c < C; c++) u[c] = 0.0f;
        for (int64_t k = 0; k < K; k++)
            for (int64_t c = 0; c < C; c++) u[c] += win[k * C + c] * conv_w[k * C + c];
        for (int64_t c = 0; c < C; c++) u[c] = silu(conv_b ? u[c] + conv_b[c] : u[c]);
        for (int64_t i = d_ssm; i < d_ssm + G * N; i++) u[i] *= input_scale;
        const float *xs = u.data(), *Bm = xs + d_ssm, *Cm = Bm + G * N;
        for (int64_t h = 0; h < H; h++) {
            float t = softplus(dt_raw[h]);
            t = t < dt_lo ? dt_lo : t > dt_hi ? dt_hi : t;
            dt[h] = t * dt_scale;
            a[h] = expf(dt[h] * neg_a[h] + log_decay_scale);
        }
        for (int64_t h = 0; h < H; h++) {
            const float *Bg = Bm + (h / hg) * N, *Cg = Cm + (h / hg) * N;
            for (int64_t p = 0; p < P; p++) {
                float x = xs[h * P + p], dtx = dt[h] * x;
                vf_mem *s = (vf_mem *)(ssm + ((b * H + h) * P + p) * N);
                vf acc = splat(0.0f), decay = splat(a[h]), in = splat(dtx);
                for (int64_t j = 0; j < N / L; j++) {
                    vf v = s[j] * decay + in * ((const vf_mem *)Bg)[j];
                    s[j] = v;
                    acc += v * ((const vf_mem *)Cg)[j];
                }
                y[h * P + p] = hsum(acc) + d[h * P + p] * x;
            }
        }
        if (norm_w == nullptr) {
            for (int64_t i = 0; i < d_ssm; i++) y[i] *= silu(z[i]);
        } else {
            if (gate_first)
                for (int64_t i = 0; i < d_ssm; i++) y[i] *= silu(z[i]);
            for (int64_t g = 0; g < G; g++) {
                float ss = 0.0f;
                for (int64_t i = g * gs; i < (g + 1) * gs; i++) ss += y[i] * y[i];
                float r = 1.0f / sqrtf(ss / gs + eps);
                for (int64_t i = g * gs; i < (g + 1) * gs; i++) y[i] = y[i] * r * norm_w[i];
            }
            if (!gate_first)
                for (int64_t i = 0; i < d_ssm; i++) y[i] *= silu(z[i]);
        }
        for (int64_t i = 0; i < d_mlp; i++) o[i] = silu(z0[i]) * x0[i];
    }
}
