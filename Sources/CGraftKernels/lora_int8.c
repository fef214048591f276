// The fast mode's LoRA update for one decoding row, y += scale · B (A x), from int8 copies of A and B rounded once
// per generation (a scale per rank component). The down projection h = A x widens A's bytes to float against the
// float row x, in independent partial sums (compiled three times by target_clones: AVX-512, AVX2, baseline x86-64).
// The up projection rounds g = h ⊙ scales to int16 with one scale and sums integers: vpmaddwd multiplies two rank
// components of eight outputs by the same two int16 values and adds the pairs, eight int32 lanes an instruction.
// Integer sums are exact, so every path (AVX2, portable, the scalar ends of a range) gives each output the same
// bits, and the int16 rounding (a relative 1.5e-5 of the largest component) is far below the int8 factors' own.
//
// Layout of B's copy (cgraft_int8_columns_blocked): blocks of 16 output rows, each holding the rank components in
// pairs, `[rank / 2][16 rows][2]` (rank padded to even with zeros), so one 32-byte load is two components of
// sixteen outputs, which is what vpmaddwd pairs up.
#include "CGraftKernels.h"
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define LORA_INT8_X86 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2")))
#endif

#if defined(__x86_64__) && defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

enum {
    BLOCK = CGRAFT_LORA_UP_BLOCK,
    /// Rank components summed in int32 per output before the sum is added to y: at most 128 pairs of products of
    /// at most 127 · 32767 each, below 2^31.
    UP_CHUNK = 256,
};

/// The int8 scale of values whose largest magnitude is `max_abs`, or NaN when one of them is not finite (the row
/// then decodes to NaN, as the float32 factors would propagate it).
static float int8_scale(float max_abs, int finite) { return finite ? max_abs / 127.0f : NAN; }

static int8_t to_int8(float v, float inverse) {
    float q = roundf(v * inverse);
    return (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q == q ? q : 0.0f);
}

static int is_finite(float v) { return fabsf(v) <= 3.4028235e38f; }

/// max |x[j]| and whether every x[j] is finite (in eight independent lanes, so that it vectorizes).
static float max_magnitude(const float *x, int64_t n, int *finite) {
    float lane[8] = {0};
    int all = 1;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lane[l] = fmaxf(lane[l], fabsf(x[j + l]));
    for (; j < n; j++) lane[0] = fmaxf(lane[0], fabsf(x[j]));
    float max_abs = 0;
    for (int l = 0; l < 8; l++) max_abs = fmaxf(max_abs, lane[l]);
    // fmaxf drops NaN, so test the values themselves: NaN or ±inf anywhere fails.
    for (j = 0; j < n; j++) all &= is_finite(x[j]);
    *finite = all;
    return max_abs;
}

CLONES void cgraft_int8_rows(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales) {
    for (int64_t r = 0; r < rows; r++) {
        const float *row = src + r * cols;
        int finite;
        float max_abs = max_magnitude(row, cols, &finite);
        float inverse = finite && max_abs > 0 ? 127.0f / max_abs : 0.0f;
        scales[r] = int8_scale(max_abs, finite);
        for (int64_t c = 0; c < cols; c++) dst[r * cols + c] = to_int8(row[c], inverse);
    }
}

/// Components per block row, padded to even.
static int64_t paired(int64_t cols) { return cols + (cols & 1); }

int64_t cgraft_int8_blocked_count(int64_t rows, int64_t cols) {
    return (rows + BLOCK - 1) / BLOCK * BLOCK * paired(cols);
}

int64_t cgraft_int8_blocked_index(int64_t row, int64_t col, int64_t cols) {
    return row / BLOCK * BLOCK * paired(cols) + col / 2 * 2 * BLOCK + row % BLOCK * 2 + col % 2;
}

// Row by row over the source for a group of up to 256 columns at a time (contiguous reads; the column maxima and
// inverses are vectors across columns), writing each value into its row's block.
CLONES void cgraft_int8_columns_blocked(const float *src, int64_t rows, int64_t cols, int8_t *dst, float *scales) {
    enum { GROUP = 256 };
    float max_abs[GROUP], inverse[GROUP];
    int finite[GROUP];
    int64_t count = cgraft_int8_blocked_count(rows, cols), stride = 2 * BLOCK;
    for (int64_t i = 0; i < count; i++) dst[i] = 0;
    for (int64_t c0 = 0; c0 < cols; c0 += GROUP) {
        int64_t width = cols - c0 < GROUP ? cols - c0 : GROUP;
        for (int64_t c = 0; c < width; c++) max_abs[c] = 0, finite[c] = 1;
        for (int64_t r = 0; r < rows; r++) {
            const float *row = src + r * cols + c0;
            for (int64_t c = 0; c < width; c++) {
                finite[c] &= is_finite(row[c]);
                max_abs[c] = fmaxf(max_abs[c], fabsf(row[c]));
            }
        }
        for (int64_t c = 0; c < width; c++) {
            inverse[c] = finite[c] && max_abs[c] > 0 ? 127.0f / max_abs[c] : 0.0f;
            scales[c0 + c] = int8_scale(max_abs[c], finite[c]);
        }
        int8_t rounded[GROUP];
        for (int64_t r = 0; r < rows; r++) {
            const float *row = src + r * cols + c0;
            int8_t *block = dst + cgraft_int8_blocked_index(r, 0, cols);
            // Rounded contiguously (so it vectorizes), then placed: components pair up 2 * BLOCK bytes apart.
            for (int64_t c = 0; c < width; c++) rounded[c] = to_int8(row[c], inverse[c]);
            for (int64_t c = 0; c < width; c++) {
                int64_t col = c0 + c;
                block[col / 2 * stride + col % 2] = rounded[c];
            }
        }
    }
}

#ifdef LORA_INT8_X86
static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2");
    return cached;
}

#endif

enum { LANES = 16 };

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

// The float steps below are written out one operation at a time; no fused multiply-adds, so the AVX2 and portable
// paths round alike.
#pragma clang fp contract(off)

/// `n` values of g = h ⊙ scales rounded to int16 by `inverse` (|g| · inverse ≤ 32767), as pairs (k, k + 1) packed
/// into one int32 each (an odd end paired with 0), the form vpmaddwd broadcasts.
static void packed_pairs(const float *g, int64_t n, float inverse, int32_t *pairs) {
    for (int64_t k = 0; k < n; k += 2) {
        int16_t lo = (int16_t)rintf(g[k] * inverse), hi = k + 1 < n ? (int16_t)rintf(g[k + 1] * inverse) : 0;
        pairs[k / 2] = (int32_t)((uint32_t)(uint16_t)lo | (uint32_t)(uint16_t)hi << 16);
    }
}

/// Output `o`'s int32 sum over the pairs of one chunk (`first`: the chunk's first component, even).
static int32_t up_output_portable(const int8_t *bt, int64_t rank, int64_t o, int64_t first, const int32_t *pairs,
                                  int64_t count) {
    int32_t s = 0;
    for (int64_t p = 0; p < count; p++) {
        int16_t lo = (int16_t)(pairs[p] & 0xffff), hi = (int16_t)((uint32_t)pairs[p] >> 16);
        int64_t k = first + 2 * p;
        s += bt[cgraft_int8_blocked_index(o, k, rank)] * lo;
        if (k + 1 < rank) s += bt[cgraft_int8_blocked_index(o, k + 1, rank)] * hi;
    }
    return s;
}

#ifdef LORA_INT8_X86
/// Outputs `o ..< o + 16` (a whole block) over one chunk's pairs: y[o] += f · (float)sum.
AVX2 static void up_block_avx2(const int8_t *bt, int64_t rank, int64_t o, int64_t first, const int32_t *pairs,
                               int64_t count, float f, float *y) {
    const int8_t *w = bt + o * paired(rank) + first * BLOCK;
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    for (int64_t p = 0; p < count; p++) {
        __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + p * 2 * BLOCK)), x = _mm256_set1_epi32(pairs[p]);
        s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes)), x));
        s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1)), x));
    }
    __m256 scale = _mm256_set1_ps(f);
    _mm256_storeu_ps(y + o, _mm256_add_ps(_mm256_loadu_ps(y + o), _mm256_mul_ps(scale, _mm256_cvtepi32_ps(s0))));
    _mm256_storeu_ps(y + o + 8,
                     _mm256_add_ps(_mm256_loadu_ps(y + o + 8), _mm256_mul_ps(scale, _mm256_cvtepi32_ps(s1))));
}
#endif

void cgraft_lora_up_int8(const float *h, int64_t rank, const int8_t *bt, const float *scales, int64_t begin,
                         int64_t end, float scale, float *y) {
    if (end <= begin || rank < 1) return;
    float g[UP_CHUNK], max_abs = 0;
    int finite = 1;
    for (int64_t k0 = 0; k0 < rank; k0 += UP_CHUNK) {
        int64_t k1 = k0 + UP_CHUNK < rank ? k0 + UP_CHUNK : rank;
        int chunk_finite;
        for (int64_t k = k0; k < k1; k++) g[k - k0] = h[k] * scales[k];
        float m = max_magnitude(g, k1 - k0, &chunk_finite);
        finite &= chunk_finite;
        max_abs = fmaxf(max_abs, m);
    }
    if (!finite) {
        for (int64_t o = begin; o < end; o++) y[o] += NAN;
        return;
    }
    if (max_abs == 0) return;
    float inverse = 32767.0f / max_abs, f = scale * (max_abs / 32767.0f);
    int32_t pairs[UP_CHUNK / 2];
    for (int64_t k0 = 0; k0 < rank; k0 += UP_CHUNK) {
        int64_t k1 = k0 + UP_CHUNK < rank ? k0 + UP_CHUNK : rank, count = (k1 - k0 + 1) / 2;
        for (int64_t k = k0; k < k1; k++) g[k - k0] = h[k] * scales[k];
        packed_pairs(g, k1 - k0, inverse, pairs);
        int64_t o = begin;
#ifdef LORA_INT8_X86
        if (has_avx2()) {
            for (; o < end && o % BLOCK != 0; o++) y[o] += f * (float)up_output_portable(bt, rank, o, k0, pairs, count);
            for (; o + BLOCK <= end; o += BLOCK) up_block_avx2(bt, rank, o, k0, pairs, count, f, y);
        }
#endif
        for (; o < end; o++) y[o] += f * (float)up_output_portable(bt, rank, o, k0, pairs, count);
    }
}
#pragma clang fp contract(on)
