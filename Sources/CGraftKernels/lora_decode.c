// A decoding step's low-rank update, y += scale · B (A x), for one activation row: the down projection h = A x
// (A is [rank, in]) and the up projection into a range of output rows (B is [out, rank]). Both stream a small
// row-major matrix once, float32 or (fast mode) int8 with a scale per rank component; compiled three times by
// target_clones (AVX-512, AVX2, baseline x86-64) and picked at load time, with independent partial sums so every
// width vectorizes without reassociating a single sum.
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

CLONES void cgraft_lora_down(const float *x, int64_t in, const float *a, int64_t rank, float *h) {
    for (int64_t k = 0; k < rank; k++) h[k] = dot(a + k * in, x, in);
}

CLONES void cgraft_lora_up(const float *h, int64_t rank, const float *b, int64_t begin, int64_t end, float scale,
                           float *y) {
    for (int64_t o = begin; o < end; o++) y[o] += scale * dot(b + o * rank, h, rank);
}

/// The int8 scale of values whose largest magnitude is `max_abs`, or NaN when one of them is not finite (the row
/// then decodes to NaN, as the float32 factors would propagate it).
static float int8_scale(float max_abs, int finite) { return finite ? max_abs / 127.0f : __builtin_nanf(""); }

static int8_t to_int8(float v, float inverse) {
    float q = __builtin_roundf(v * inverse);
    return (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q == q ? q : 0.0f);
}

static int is_finite(float v) { return __builtin_fabsf(v) <= 3.4028235e38f; }

CLONES void cgraft_int8_rows(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = src + r * cols;
        float max_abs = 0;
        int finite = 1;
        for (int64_t c = 0; c < cols; c++) {
            finite &= is_finite(row[c]);
            max_abs = __builtin_fmaxf(max_abs, __builtin_fabsf(row[c]));
        }
        float inverse = finite && max_abs > 0 ? 127.0f / max_abs : 0.0f;
        scales[r] = int8_scale(max_abs, finite);
        for (int64_t c = 0; c < cols; c++) dst[r * cols + c] = to_int8(row[c], inverse);
    }
}

// Row by row over the source for a block of up to 256 columns at a time (contiguous reads; the column maxima and
// inverses are vectors across columns), writing each source row into a column of `dst`.
CLONES void cgraft_int8_columns_transposed(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales) {
    enum { BLOCK = 256 };
    float max_abs[BLOCK], inverse[BLOCK];
    int finite[BLOCK];
    for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
        int64_t width = cols - c0 < BLOCK ? cols - c0 : BLOCK;
        for (int64_t c = 0; c < width; c++) max_abs[c] = 0, finite[c] = 1;
        for (int64_t r = 0; r < rows; r++) {
            const float *row = src + r * cols + c0;
            for (int64_t c = 0; c < width; c++) {
                finite[c] &= is_finite(row[c]);
                max_abs[c] = __builtin_fmaxf(max_abs[c], __builtin_fabsf(row[c]));
            }
        }
        for (int64_t c = 0; c < width; c++) {
            inverse[c] = finite[c] && max_abs[c] > 0 ? 127.0f / max_abs[c] : 0.0f;
            scales[c0 + c] = int8_scale(max_abs[c], finite[c]);
        }
        for (int64_t r = 0; r < rows; r++) {
            const float *row = src + r * cols + c0;
            for (int64_t c = 0; c < width; c++) dst[(c0 + c) * rows + r] = to_int8(row[c], inverse[c]);
        }
    }
}

/// Σ_j a[j] · x[j] over `n` int8 weights and float32 inputs, widened lane by lane.
__attribute__((always_inline)) static inline float dot_int8(const int8_t *restrict a, const float *restrict x,
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

/// dot_int8 of four rows `a`, `a + n`, `a + 2n`, `a + 3n` with `x` into `out`, each row's sum formed exactly as
/// dot_int8 forms it, the four interleaved so that four chains of additions are in flight instead of one.
__attribute__((always_inline)) static inline void dot4_int8(const int8_t *restrict a, const float *restrict x,
                                                            int64_t n, float *out) {
    float acc[4][LANES] = {{0}};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int r = 0; r < 4; r++)
            for (int l = 0; l < LANES; l++) acc[r][l] += (float)a[r * n + j + l] * x[j + l];
    for (int r = 0; r < 4; r++) {
        float sum = 0;
        for (int64_t t = j; t < n; t++) sum += (float)a[r * n + t] * x[t];
        for (int l = 0; l < LANES; l++) sum += acc[r][l];
        out[r] = sum;
    }
}

CLONES void cgraft_lora_down_int8(const float *x, int64_t in, const int8_t *a, const float *scales, int64_t rank,
                                  float *h) {
    int64_t k = 0;
    for (; k + 4 <= rank; k += 4) {
        float sums[4];
        dot4_int8(a + k * in, x, in, sums);
        for (int r = 0; r < 4; r++) h[k + r] = scales[k + r] * sums[r];
    }
    for (; k < rank; k++) h[k] = scales[k] * dot_int8(a + k * in, x, in);
}

// Each output's sum runs over k in order, as separate multiplies and adds (no fused multiply-add), so the value of
// y[o] is the same whichever range [begin, end) holds it: in a block of 128 or 32 lanes or in the scalar tail.
#pragma clang fp contract(off)

/// Outputs `o ..< o + width` of the up projection (`width` ≤ 128, a constant where it is inlined), from `hs` = h
/// times B's scales when given, else from h and the scales per use.
__attribute__((always_inline)) static inline void up_int8_lanes(const float *hs, const float *h, const float *scales,
                                                                int64_t rank, const int8_t *bt, int64_t out, int64_t o,
                                                                int width, float scale, float *y) {
    float acc[128] = {0};
    for (int64_t k = 0; k < rank; k++) {
        const int8_t *row = bt + k * out + o;
        float hk = hs ? hs[k] : h[k] * scales[k];
        for (int l = 0; l < width; l++) acc[l] += hk * (float)row[l];
    }
    for (int l = 0; l < width; l++) y[o + l] += scale * acc[l];
}

CLONES void cgraft_lora_up_int8(const float *h, int64_t rank, const int8_t *bt, const float *scales, int64_t out,
                                int64_t begin, int64_t end, float scale, float *y) {
    // h times B's scales, kept on the stack for ranks up to 1024 (the usual), else multiplied per use.
    float stack[1024];
    const float *hs = rank <= 1024 ? stack : NULL;
    if (hs)
        for (int64_t k = 0; k < rank; k++) stack[k] = h[k] * scales[k];
    int64_t o = begin;
    // 128 outputs at a time (eight vectors of sums in flight), then 32, then one by one: the same sums each way.
    for (; o + 128 <= end; o += 128) up_int8_lanes(hs, h, scales, rank, bt, out, o, 128, scale, y);
    for (; o + 32 <= end; o += 32) up_int8_lanes(hs, h, scales, rank, bt, out, o, 32, scale, y);
    for (; o < end; o++) up_int8_lanes(hs, h, scales, rank, bt, out, o, 1, scale, y);
}
#pragma clang fp contract(on)
