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
