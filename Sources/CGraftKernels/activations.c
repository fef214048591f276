// Elementwise activations and their gradients (GELU, SiLU, SwiGLU), compiled three times by target_clones (AVX-512,
// AVX2, baseline x86-64) and picked at load time for the CPU. Swift's SIMD types compile for the baseline only
// (four lanes, SSE), so these loops run up to four times as wide here.
//
// The arithmetic is GraftTensor's `vexp`/`verf` (VectorMath.swift) operation for operation, and contraction into
// fused multiply-adds is off, so every result is the same float the Swift kernels give.
#include "CGraftKernels.h"
#include <stdint.h>
#include <string.h>

#pragma STDC FP_CONTRACT OFF

#if defined(__x86_64__) && defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

// Clamps with comparisons, so NaN passes through (as GraftTensor's masked clamp does).
static inline float clamp(float x, float lo, float hi) {
    float r = x < lo ? lo : x;
    return x > hi ? hi : r;
}

static inline float exp_approx(float x_in) {
    float x = clamp(x_in, -87.33f, 88.72f);
    float shifted = x * 1.44269504088896341f + 12582912.0f;
    float n = shifted - 12582912.0f;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.0f;
    int32_t bits;
    memcpy(&bits, &shifted, 4);
    bits -= 0x4B400000;
    // (bits + 127) << 23 in unsigned arithmetic: the exponent field of 2^n.
    uint32_t scale_bits = (uint32_t)(bits + 127) << 23;
    float scale;
    memcpy(&scale, &scale_bits, 4);
    return p * scale;
}

static inline float erf_approx(float x_in) {
    float x = clamp(x_in, -4.0f, 4.0f);
    float x2 = x * x;
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 - 2.10102402082508e-06f;
    p = p * x2 - 5.69250639462346e-05f;
    p = p * x2 - 7.34990630326855e-04f;
    p = p * x2 - 2.95459980854025e-03f;
    p = p * x2 - 1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * x2 - 2.13374055278905e-04f;
    q = q * x2 - 1.68282697438203e-03f;
    q = q * x2 - 7.37332916720468e-03f;
    q = q * x2 - 1.42647390514189e-02f;
    return x * p / q;
}

static const float inv_sqrt2 = 0.70710678118654752f;
static const float inv_sqrt2pi = 0.3989422804014327f;

CLONES void cgraft_gelu(const float *restrict x, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        y[i] = 0.5f * v * (1.0f + erf_approx(v * inv_sqrt2));
    }
}

CLONES void cgraft_gelu_backward(const float *restrict x, const float *restrict g, float *restrict dx, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float cdf = 0.5f * (1.0f + erf_approx(v * inv_sqrt2));
        float pdf = exp_approx(-0.5f * v * v) * inv_sqrt2pi;
        dx[i] = g[i] * (cdf + v * pdf);
    }
}

CLONES void cgraft_silu(const float *restrict x, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        y[i] = v / (1.0f + exp_approx(-v));
    }
}

CLONES void cgraft_silu_backward(const float *restrict x, const float *restrict g, float *restrict dx, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float s = 1.0f / (1.0f + exp_approx(-v));
        dx[i] = g[i] * s * (1.0f + v * (1.0f - s));
    }
}

CLONES void cgraft_swiglu(const float *restrict gate, const float *restrict up, float *restrict y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        float v = gate[i];
        y[i] = (v / (1.0f + exp_approx(-v))) * up[i];
    }
}

CLONES void cgraft_swiglu_backward(const float *restrict gate, const float *restrict up, const float *restrict g,
                                   float *restrict dgate, float *restrict dup, int64_t n) {
    if (dup) {
        for (int64_t i = 0; i < n; i++) {
            float v = gate[i];
            dup[i] = g[i] * (v / (1.0f + exp_approx(-v)));
        }
    }
    if (dgate) {
        for (int64_t i = 0; i < n; i++) {
            float v = gate[i];
            float s = 1.0f / (1.0f + exp_approx(-v));
            dgate[i] = (g[i] * up[i]) * s * (1.0f + v * (1.0f - s));
        }
    }
}
