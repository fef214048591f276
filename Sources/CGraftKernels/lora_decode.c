// A decoding step's low-rank update, y += scale · B (A x), for one activation row: the down projection h = A x
// (A is [rank, in]) and the up projection into a range of output rows (B is [out, rank]). Both stream a small
// row-major matrix once, float32 or (fast mode) IEEE float16; compiled three times by target_clones (AVX-512, AVX2, baseline x86-64) and picked
// at load time, with independent partial sums so every width vectorizes without reassociating a single sum.
#include "CGraftKernels.h"
#include <stdint.h>

#if defined(__x86_64__) && defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define LANES 16

/// Σ_j a[j] · x[j] over `n` floats, in LANES independent partial sums.
__attribute__((always_inline)) static inline float dot(const float *restrict a, const float *restrict x, int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[j + l] * x[j + l];
    float sum = 0;
    for (; j < n; j++) sum += a[j] * x[j];
    for (int l = 0; l < LANES; l++) sum += acc[l];
    return sum;
}

/// Σ_j a[j] · x[j] over `n` float16 weights and float32 inputs, widened lane by lane (vcvtph2ps where the clone
/// has F16C).
__attribute__((always_inline)) static inline float dot_half(const _Float16 *restrict a, const float *restrict x,
                                                            int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += (float)a[j + l] * x[j + l];
    float sum = 0;
    for (; j < n; j++) sum += (float)a[j] * x[j];
    for (int l = 0; l < LANES; l++) sum += acc[l];
    return sum;
}

CLONES void cgraft_lora_down(const float *x, int64_t in, const float *a, int64_t rank, float *h) {
    for (int64_t k = 0; k < rank; k++) h[k] = dot(a + k * in, x, in);
}

CLONES void cgraft_lora_up(const float *h, int64_t rank, const float *b, int64_t begin, int64_t end, float scale,
                           float *y) {
    for (int64_t o = begin; o < end; o++) y[o] += scale * dot(b + o * rank, h, rank);
}

CLONES void cgraft_lora_down_half(const float *x, int64_t in, const uint16_t *a, int64_t rank, float *h) {
    const _Float16 *half = (const _Float16 *)a;
    for (int64_t k = 0; k < rank; k++) h[k] = dot_half(half + k * in, x, in);
}

// Each output's sum runs over k in order, as separate multiplies and adds (no fused multiply-add), so the value of
// y[o] is the same whichever range [begin, end) holds it: in a block of 32 lanes or in the scalar tail.
#pragma clang fp contract(off)
CLONES void cgraft_lora_up_half(const float *h, int64_t rank, const uint16_t *bt, int64_t out, int64_t begin,
                                int64_t end, float scale, float *y) {
    const _Float16 *half = (const _Float16 *)bt;
    int64_t o = begin;
    for (; o + 32 <= end; o += 32) {
        float acc[32] = {0};
        for (int64_t k = 0; k < rank; k++) {
            const _Float16 *row = half + k * out + o;
            float hk = h[k];
            for (int l = 0; l < 32; l++) acc[l] += hk * (float)row[l];
        }
        for (int l = 0; l < 32; l++) y[o + l] += scale * acc[l];
    }
    for (; o < end; o++) {
        float acc = 0;
        for (int64_t k = 0; k < rank; k++) acc += h[k] * (float)half[k * out + o];
        y[o] += scale * acc;
    }
}
#pragma clang fp contract(on)

CLONES void cgraft_f32_to_half(const float *src, uint16_t *dst, int64_t n) {
    _Float16 *half = (_Float16 *)dst;
    for (int64_t i = 0; i < n; i++) half[i] = (_Float16)src[i];
}

void cgraft_f32_to_half_transposed(const float *src, int64_t rows, int64_t cols, uint16_t *dst) {
    _Float16 *half = (_Float16 *)dst;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t c = 0; c < cols; c++) half[c * rows + r] = (_Float16)src[r * cols + c];
}
