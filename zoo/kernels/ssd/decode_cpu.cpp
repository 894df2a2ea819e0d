// Mamba-2 decode on the CPU, fused (fp32): one token of a layer between its two GEMVs, the state updated in place.
// The same math as zoo.layers.mamba2_ops.decode_step_ (its torch calls; tests pin the two together), built and
// loaded by zoo.kernels.native. Per batch row, from the in_proj output zx = [z0, x0 | z, xBC, dt]:
//
//     window <- [window[1:], xBC];  u = silu(sum_k window[k] * w[k] + b)       conv over K taps  [C]
//     x, B, C = u[:d_ssm], input_scale * u[d_ssm : +G N], u[d_ssm + G N :]
//     dt = dt_scale * clamp(softplus(dt), lo, hi);  a = exp(dt A + log_decay_scale)              [H]
//     S[h, p] <- a_h S[h, p] + dt_h x[h, p] B[g(h)];  y[h, p] = S[h, p] . C[g(h)] + D x[h, p]   [H, P, N]
//     y <- rmsnorm_groups(y * silu(z)) * w   (gate first)   or   rmsnorm_groups(y) * w * silu(z)   (or y * silu(z))
//     out = [silu(z0) * x0, y]                                                    -> out_proj
//
// The state row S[h, p] (N floats) is read once and written once: decay, input and output in one pass.
//
// mamba2_decode is that step for one layer (its GEMVs stay in torch). mamba2_stack_decode is a whole decode step of
// a stack of pre-norm Mamba-2 blocks, h += out_proj(mixer(in_proj(rmsnorm(h)))), then the LM head on rmsnorm_f(h):
// every GEMV here too, on `threads` OpenMP threads (built with -fopenmp, the runtime torch already loaded), the
// weight rows split between them and the SSM state by (row, head); the small serial parts run on thread 0.

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#include "../simd.h"

static inline float softplus(float x) { return x > 20.0f ? x : log1pf(expf(x)); }  // torch's threshold 20

// One layer's mixer: sizes (H heads of P channels, G groups of N states, K conv taps, C = d_ssm + 2 G N conv
// channels) and parameters. Mirrored by zoo.layers.mamba2_ops.Mamba2Params (ctypes): keep the two in step.
struct Mamba2Params {
    int64_t d_mlp, d_ssm, H, P, G, N, K;
    const float *conv_w;  // [K, C]
    const float *conv_b;  // [C] or null
    const float *neg_a;   // [H]: -exp(A_log)
    const float *d;       // [d_ssm]
    const float *norm_w;  // [d_ssm] or null (no norm: the gate only); norm groups of d_ssm / G
    float dt_lo, dt_hi, dt_scale, input_scale, log_decay_scale, eps;
    int32_t gate_first;
};

static inline int64_t conv_dim(const Mamba2Params &p) { return p.d_ssm + 2 * p.G * p.N; }
static inline int64_t in_dim(const Mamba2Params &p) { return 2 * p.d_mlp + p.d_ssm + conv_dim(p) + p.H; }

// One batch row's conv window advanced by its token and the taps -> u [C]; dt and the decay a [H].
static void conv_dt(const Mamba2Params &p, const float *zx, float *win, float *u, float *dt, float *a) {
    const int64_t C = conv_dim(p), K = p.K;
    const float *xbc = zx + 2 * p.d_mlp + p.d_ssm, *dt_raw = xbc + C;
    memmove(win, win + C, sizeof(float) * (K - 1) * C);
    memcpy(win + (K - 1) * C, xbc, sizeof(float) * C);
    for (int64_t c = 0; c < C; c++) u[c] = 0.0f;
    for (int64_t k = 0; k < K; k++)
        for (int64_t c = 0; c < C; c++) u[c] += win[k * C + c] * p.conv_w[k * C + c];
    for (int64_t c = 0; c < C; c++) u[c] = silu(p.conv_b ? u[c] + p.conv_b[c] : u[c]);
    for (int64_t i = p.d_ssm; i < p.d_ssm + p.G * p.N; i++) u[i] *= p.input_scale;
    for (int64_t h = 0; h < p.H; h++) {
        float t = softplus(dt_raw[h]);
        t = t < p.dt_lo ? p.dt_lo : t > p.dt_hi ? p.dt_hi : t;
        dt[h] = t * p.dt_scale;
        a[h] = expf(dt[h] * p.neg_a[h] + p.log_decay_scale);
    }
}

// Head h of one batch row: its state rows S [P, N] decayed, input added and read -> y [P] (before the gate).
static void ssm_head(const Mamba2Params &p, int64_t h, const float *u, const float *dt, const float *a, float *S,
                     float *y) {
    const int64_t P = p.P, N = p.N, g = h / (p.H / p.G);
    const float *xs = u + h * P, *Bg = u + p.d_ssm + g * N, *Cg = u + p.d_ssm + p.G * N + g * N;
    const vf decay = splat(a[h]);
    for (int64_t i = 0; i < P; i++) {
        vf_mem *s = (vf_mem *)(S + i * N);
        vf acc = splat(0.0f), in = splat(dt[h] * xs[i]);
        for (int64_t j = 0; j < N / L; j++) {
            vf v = s[j] * decay + in * ((const vf_mem *)Bg)[j];
            s[j] = v;
            acc += v * ((const vf_mem *)Cg)[j];
        }
        y[i] = hsum(acc) + p.d[h * P + i] * xs[i];
    }
}

// One batch row's out_proj input out = [silu(z0) * x0, y] with y (already in place) gated and normalised.
static void gate_norm(const Mamba2Params &p, const float *zx, float *out) {
    const int64_t d_ssm = p.d_ssm, gs = d_ssm / p.G;
    const float *z0 = zx, *x0 = zx + p.d_mlp, *z = x0 + p.d_mlp;
    float *y = out + p.d_mlp;
    if (p.norm_w == nullptr)
        gate_row(y, z, d_ssm);
    else
        gated_rmsnorm_row(y, z, d_ssm, gs, p.norm_w, nullptr, p.eps, !p.gate_first);
    for (int64_t i = 0; i < p.d_mlp; i++) out[i] = silu(z0[i]) * x0[i];
}

// zx [Bsz, in_dim]; window [Bsz, K, C]; ssm [Bsz, H, P, N]; out [Bsz, d_mlp + d_ssm].
extern "C" void mamba2_decode(const Mamba2Params *p, int64_t Bsz, const float *zx, float *window, float *ssm,
                              float *out) {
    const int64_t C = conv_dim(*p), H = p->H, n_in = in_dim(*p), n_out = p->d_mlp + p->d_ssm;
    std::vector<float> u(C), a(H), dt(H);
    for (int64_t b = 0; b < Bsz; b++) {
        conv_dt(*p, zx + b * n_in, window + b * p->K * C, u.data(), dt.data(), a.data());
        for (int64_t h = 0; h < H; h++)
            ssm_head(*p, h, u.data(), dt.data(), a.data(), ssm + (b * H + h) * p->P * p->N,
                     out + b * n_out + p->d_mlp + h * p->P);
        gate_norm(*p, zx + b * n_in, out + b * n_out);
    }
}

// ---------------------------------------------------------------------------------------------- the whole stack

// One pre-norm block and its state. Mirrored by zoo.models.fused_decode.Mamba2Block (ctypes).
struct Mamba2Block {
    Mamba2Params mixer;
    const float *norm_w;  // [d_model]
    float norm_eps;
    const float *in_w, *in_b;    // [in_dim, d_model], [in_dim] (dt_bias in the dt slots)
    const float *out_w, *out_b;  // [d_model, d_mlp + d_ssm], [d_model] or null
    float *window, *ssm;         // [Bsz, K, C], [Bsz, H, P, N]
    int64_t *seen;               // [Bsz]: real tokens absorbed
};

static inline float dot(const float *w, const float *x, int64_t n) {
    vf acc = splat(0.0f);
    int64_t j = 0;
    for (; j + L <= n; j += L) acc += *(const vf_mem *)(w + j) * *(const vf_mem *)(x + j);
    float s = hsum(acc);
    for (; j < n; j++) s += w[j] * x[j];
    return s;
}

// Rows [r0, r1) of y[b] = W x[b] + bias for every batch row b (row strides xs, ys), added to y[b] when accumulate.
// Four weight rows at a time, read from memory once and from L1 for the further batch rows.
static void gemv_rows(const float *W, const float *bias, int64_t n_in, const float *x, int64_t xs, float *y,
                      int64_t ys, int64_t Bsz, int64_t r0, int64_t r1, bool accumulate) {
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float *w0 = W + r * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
        for (int64_t b = 0; b < Bsz; b++) {
            const float *xb = x + b * xs;
            vf a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
            int64_t j = 0;
            for (; j + L <= n_in; j += L) {
                vf v = *(const vf_mem *)(xb + j);
                a0 += *(const vf_mem *)(w0 + j) * v;
                a1 += *(const vf_mem *)(w1 + j) * v;
                a2 += *(const vf_mem *)(w2 + j) * v;
                a3 += *(const vf_mem *)(w3 + j) * v;
            }
            float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
            for (; j < n_in; j++)
                for (int q = 0; q < 4; q++) s[q] += W[(r + q) * n_in + j] * xb[j];
            float *yb = y + b * ys + r;
            for (int q = 0; q < 4; q++) {
                float v = bias ? s[q] + bias[r + q] : s[q];
                yb[q] = accumulate ? yb[q] + v : v;
            }
        }
    }
    for (; r < r1; r++)
        for (int64_t b = 0; b < Bsz; b++) {
            float v = dot(W + r * n_in, x + b * xs, n_in) + (bias ? bias[r] : 0.0f);
            y[b * ys + r] = accumulate ? y[b * ys + r] + v : v;
        }
}

static void rmsnorm(const float *x, const float *w, float eps, int64_t n, float *y) {  // x / sqrt(mean x^2 + eps) w
    memcpy(y, x, sizeof(float) * n);
    gated_rmsnorm_row(y, nullptr, n, n, w, nullptr, eps, false);
}

// h [Bsz, d_model]: the embedded tokens in, the last block's output out (updated in place); every block's window,
// ssm and seen updated; logits [Bsz, vocab] = head_w rmsnorm(h; norm_w, norm_eps).
extern "C" void mamba2_stack_decode(int64_t n_blocks, const Mamba2Block *blocks, int64_t Bsz, int64_t d_model,
                                    float *h, const float *norm_w, float norm_eps, const float *head_w,
                                    int64_t vocab, float *logits, int32_t threads) {
    int64_t max_in = 0, max_C = 0, max_H = 0, max_out = 0;
    for (int64_t l = 0; l < n_blocks; l++) {
        const Mamba2Params &p = blocks[l].mixer;
        max_in = in_dim(p) > max_in ? in_dim(p) : max_in;
        max_C = conv_dim(p) > max_C ? conv_dim(p) : max_C;
        max_H = p.H > max_H ? p.H : max_H;
        max_out = p.d_mlp + p.d_ssm > max_out ? p.d_mlp + p.d_ssm : max_out;
    }
    std::vector<float> normed(Bsz * d_model), zx(Bsz * max_in), u(Bsz * max_C), dt(Bsz * max_H), a(Bsz * max_H),
        out(Bsz * max_out);
#pragma omp parallel num_threads(threads)
    {
        int tid, nt;
        thread_team(&tid, &nt);
        int64_t r0, r1;
        for (int64_t l = 0; l < n_blocks; l++) {
            const Mamba2Block &k = blocks[l];
            const Mamba2Params &p = k.mixer;
            const int64_t n_in = in_dim(p), C = conv_dim(p), H = p.H, n_out = p.d_mlp + p.d_ssm;
            if (tid == 0)
                for (int64_t b = 0; b < Bsz; b++)
                    rmsnorm(h + b * d_model, k.norm_w, k.norm_eps, d_model, normed.data() + b * d_model);
#pragma omp barrier
            thread_share(n_in, 4, &r0, &r1);  // whole groups of 4 weight rows
            gemv_rows(k.in_w, k.in_b, d_model, normed.data(), d_model, zx.data(), n_in, Bsz, r0, r1, false);
#pragma omp barrier
            if (tid == 0)
                for (int64_t b = 0; b < Bsz; b++)
                    conv_dt(p, zx.data() + b * n_in, k.window + b * p.K * C, u.data() + b * C, dt.data() + b * H,
                            a.data() + b * H);
#pragma omp barrier
            thread_share(Bsz * H, 1, &r0, &r1);
            for (int64_t i = r0; i < r1; i++) {  // (row, head) items
                const int64_t b = i / H, hd = i % H;
                ssm_head(p, hd, u.data() + b * C, dt.data() + b * H, a.data() + b * H,
                         k.ssm + (b * H + hd) * p.P * p.N, out.data() + b * n_out + p.d_mlp + hd * p.P);
            }
#pragma omp barrier
            if (tid == 0)
                for (int64_t b = 0; b < Bsz; b++) {
                    gate_norm(p, zx.data() + b * n_in, out.data() + b * n_out);
                    k.seen[b] += 1;
                }
#pragma omp barrier
            thread_share(d_model, 4, &r0, &r1);  // whole groups of 4 weight rows
            gemv_rows(k.out_w, k.out_b, n_out, out.data(), n_out, h, d_model, Bsz, r0, r1, true);  // h += W y + b
#pragma omp barrier
        }
        if (tid == 0)
            for (int64_t b = 0; b < Bsz; b++)
                rmsnorm(h + b * d_model, norm_w, norm_eps, d_model, normed.data() + b * d_model);
#pragma omp barrier
        thread_share(vocab, 4, &r0, &r1);  // whole groups of 4 weight rows
        gemv_rows(head_w, nullptr, d_model, normed.data(), d_model, logits, vocab, Bsz, r0, r1, false);
    }
}
