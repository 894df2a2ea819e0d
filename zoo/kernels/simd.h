// Vectors for the native CPU kernels (zoo.kernels.native): GCC / Clang vector extensions, 16 floats with AVX-512 and
// 8 otherwise (the compiler splits them where the machine has less), and the few helpers the kernels share.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
constexpr int L = 16;  // floats per vector
#else
constexpr int L = 8;
#endif
typedef float vf __attribute__((vector_size(4 * L)));
typedef float vf_mem __attribute__((vector_size(4 * L), aligned(4)));  // loads and stores at any address
typedef int32_t vi __attribute__((vector_size(4 * L)));

static inline vf splat(float x) { return x - (vf){}; }

static inline vf vexp(vf x) {  // e^x to ~1 ulp (Cephes expf); 0 below -87.3 and for -inf, +inf above 88.72
    vi tiny = x < -87.3f, huge = x > 88.7228f;
    x = tiny ? splat(-87.3f) : huge ? splat(88.7228f) : x;
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
    vi k = __builtin_convertvector(n, vi), k1 = k >> 1;  // 2^n as 2^k1 2^(n - k1): n = 128 stays in range
    y = y * (vf)((k1 + 127) << 23) * (vf)((k - k1 + 127) << 23);
    return tiny ? splat(0.0f) : huge ? splat(INFINITY) : y;
}

static inline float hmax(vf x) {
    float m = x[0];
    for (int t = 1; t < L; t++) m = x[t] > m ? x[t] : m;
    return m;
}

static inline float hsum(vf x) {
    float s = 0.0f;
    for (int t = 0; t < L; t++) s += x[t];
    return s;
}

static inline vi lanes(int first) {  // first, first + 1, ..., first + L - 1
    vi idx;
    for (int t = 0; t < L; t++) idx[t] = first + t;
    return idx;
}

// This thread's number and its team's size in an OpenMP parallel region (0 and 1 in a kernel built without -fopenmp).
static inline void thread_team(int *tid, int *nt) {
#ifdef _OPENMP
    *tid = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *tid = 0;
    *nt = 1;
#endif
}

// This thread's share [r0, r1) of n rows in an OpenMP parallel region: contiguous, in whole groups of `group` rows.
static inline void thread_share(int64_t n, int64_t group, int64_t *r0, int64_t *r1) {
    int tid, nt;
    thread_team(&tid, &nt);
    const int64_t groups = (n + group - 1) / group, g0 = groups * tid / nt, g1 = groups * (tid + 1) / nt;
    *r0 = g0 * group < n ? g0 * group : n;
    *r1 = g1 * group < n ? g1 * group : n;
}

// ---- rows of the Mamba-2 kernels (the decode steps, the elementwise passes)

static inline float silu(float x) { return x / (1.0f + expf(-x)); }
static inline vf vsilu(vf x) { return x / (1.0f + vexp(-x)); }

static inline void gate_row(float *u, const float *z, int64_t d) {  // u *= silu(z)
    int64_t i = 0;
    for (; i + L <= d; i += L) *(vf_mem *)(u + i) *= vsilu(*(const vf_mem *)(z + i));
    for (; i < d; i++) u[i] *= silu(z[i]);
}

// u [d] in place, Mamba-2's RMSNormGated: each group of gs channels times 1 / sqrt(mean(u^2) + eps), times w (+ bias);
// with z, gated by silu(z) before the norm, or after it when norm_before_gate. Without z: a (group) RMSNorm.
static inline void gated_rmsnorm_row(float *u, const float *z, int64_t d, int64_t gs, const float *w,
                                     const float *bias, float eps, bool norm_before_gate) {
    if (z && !norm_before_gate) gate_row(u, z, d);
    for (int64_t g0 = 0; g0 < d; g0 += gs) {
        vf acc = splat(0.0f);
        int64_t i = g0;
        for (; i + L <= g0 + gs; i += L) {
            const vf v = *(const vf_mem *)(u + i);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; i < g0 + gs; i++) ss += u[i] * u[i];
        const float scale = 1.0f / sqrtf(ss / gs + eps);
        const vf sv = splat(scale);
        for (i = g0; i + L <= g0 + gs; i += L) {
            const vf v = *(const vf_mem *)(u + i) * sv * *(const vf_mem *)(w + i);
            *(vf_mem *)(u + i) = bias ? v + *(const vf_mem *)(bias + i) : v;
        }
        for (; i < g0 + gs; i++) u[i] = u[i] * scale * w[i] + (bias ? bias[i] : 0.0f);
    }
    if (z && norm_before_gate) gate_row(u, z, d);
}
