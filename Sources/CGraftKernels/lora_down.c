// A decoding step's low-rank update, y += scale · B (A x), for one activation row: the down projection h = A x
// (A is [rank, in]) and the up projection into a range of output rows (B is [out, rank]; its float32 form is in
// lora_up.c). Both stream a small matrix once, float32 row-major or (fast mode) int8 with a scale per rank
// component, B's int8 copy in blocks of output rows so a range reads one contiguous stream; compiled three times by
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

int64_t cgraft_int8_blocked_count(int64_t rows, int64_t cols) {
    return (rows + CGRAFT_LORA_UP_BLOCK - 1) / CGRAFT_LORA_UP_BLOCK * CGRAFT_LORA_UP_BLOCK * cols;
}

// Row by row over the source for a group of up to 256 columns at a time (contiguous reads; the column maxima and
// inverses are vectors across columns), writing each value into its row's block.
CLONES void cgraft_int8_columns_blocked(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales) {
    enum { GROUP = 256, BLOCK = CGRAFT_LORA_UP_BLOCK };
    float max_abs[GROUP], inverse[GROUP];
    int finite[GROUP];
    int64_t count = cgraft_int8_blocked_count(rows, cols);
    for (int64_t i = 0; i < count; i++) dst[i] = 0;
    for (int64_t c0 = 0; c0 < cols; c0 += GROUP) {
        int64_t width = cols - c0 < GROUP ? cols - c0 : GROUP;
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
            int8_t *block = dst + r / BLOCK * BLOCK * cols + r % BLOCK;
            for (int64_t c = 0; c < width; c++) block[(c0 + c) * BLOCK] = to_int8(row[c], inverse[c]);
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

/// Asks for the `bytes` bytes at `p` (a factor's rows, read once per token and long evicted by the base weights)
/// all at once, so their cache misses overlap instead of arriving one stream at a time.
static inline void prefetch_bytes(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i);
}

CLONES void cgraft_lora_down_int8(const float *x, int64_t in, const int8_t *a, const float *scales, int64_t rank,
                                  float *h) {
    prefetch_bytes(a, rank * in);
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

/// Outputs `o ..< o + blocks · BLOCK` of the up projection (`o` a block's first output, `blocks` ≤ 4 and a constant
/// where it is inlined): up to four blocks, eight vectors of sums in flight on AVX2.
__attribute__((always_inline)) static inline void up_int8_blocks(const float *h, const float *scales, int64_t rank,
                                                                 const int8_t *bt, int64_t o, int blocks, float scale,
                                                                 float *y) {
    enum { BLOCK = CGRAFT_LORA_UP_BLOCK };
    float acc[4 * BLOCK] = {0};
    const int8_t *first = bt + o * rank;
    for (int64_t k = 0; k < rank; k++) {
        float hk = h[k] * scales[k];
        for (int b = 0; b < blocks; b++)
            for (int l = 0; l < BLOCK; l++) acc[b * BLOCK + l] += hk * (float)first[(b * rank + k) * BLOCK + l];
    }
    for (int l = 0; l < blocks * BLOCK; l++) y[o + l] += scale * acc[l];
}

/// Output `o` alone (a range that starts or ends inside a block), summed as up_int8_blocks sums it.
static void up_int8_one(const float *h, const float *scales, int64_t rank, const int8_t *bt, int64_t o, float scale,
                        float *y) {
    enum { BLOCK = CGRAFT_LORA_UP_BLOCK };
    const int8_t *column = bt + o / BLOCK * BLOCK * rank + o % BLOCK;
    float acc = 0;
    for (int64_t k = 0; k < rank; k++) acc += h[k] * scales[k] * (float)column[k * BLOCK];
    y[o] += scale * acc;
}

CLONES void cgraft_lora_up_int8(const float *h, int64_t rank, const int8_t *bt, const float *scales, int64_t begin,
                                int64_t end, float scale, float *y) {
    enum { BLOCK = CGRAFT_LORA_UP_BLOCK };
    if (end > begin) {
        int64_t first = begin / BLOCK * BLOCK * rank, last = (end + BLOCK - 1) / BLOCK * BLOCK * rank;
        prefetch_bytes(bt + first, last - first);
    }
    int64_t o = begin;
    for (; o < end && o % BLOCK != 0; o++) up_int8_one(h, scales, rank, bt, o, scale, y);
    for (; o + 4 * BLOCK <= end; o += 4 * BLOCK) up_int8_blocks(h, scales, rank, bt, o, 4, scale, y);
    for (; o + BLOCK <= end; o += BLOCK) up_int8_blocks(h, scales, rank, bt, o, 1, scale, y);
    for (; o < end; o++) up_int8_one(h, scales, rank, bt, o, scale, y);
}
#pragma clang fp contract(on)
