// The fast mode of the block products: activation rows quantized to int8 per block of 32 (one float scale per
// block, as ggml's Q8_0/Q8_1 activations), then integer dot products against the weight's Q4_1 / Q8_0 blocks,
// scaled once per block. AVX-512 VNNI (vpdpbusd on 512-bit vectors, two to four blocks each), AVX2 (vpmaddubsw)
// or a portable loop, picked at run time and capped by cgraft_ggml_limit_kernels like the float32 kernels.
//
// Both dot instructions multiply unsigned by signed bytes: Q4_1 nibbles are unsigned already; for Q8_0 the
// weight's sign moves onto the activation (|w| · sign(x, w)), which never overflows since x stays in ±127.
#include "CGraftKernels.h"
#include "ggml_internal.h"

#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CGRAFT_X86 1
#endif

void cgraft_q8_quantize_rows(const float *x, int64_t ldx, int64_t m, int64_t cols, int8_t *q, float *scales,
                             float *sums) {
    int64_t blocks = cols / 32;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float *xb = x + i * ldx + b * 32;
            int8_t *qb = q + i * cols + b * 32;
            float amax = 0;
            for (int j = 0; j < 32; j++) {
                float a = fabsf(xb[j]);
                amax = a > amax ? a : amax;
            }
            float d = amax / 127, inverse = d > 0 ? 1 / d : 0;
            // Round to nearest even by adding and removing 1.5·2²³ (|x / d| ≤ 127): vectorises, unlike lrintf.
            int sum = 0;
            for (int j = 0; j < 32; j++) {
                qb[j] = (int8_t)(int)((xb[j] * inverse + 12582912.0f) - 12582912.0f);
                sum += qb[j];
            }
            scales[i * blocks + b] = d;
            // The sum of the quantized values, not of x: the Q4_1 offset term m·Σx̂ then cancels the nibbles'
            // shared error (the nibbles are w − m, larger than w); the float sum measured 1.5× the deviation.
            sums[i * blocks + b] = d * (float)sum;
        }
    }
}

static float dot_q4_1_q8_portable(const uint8_t *row, const int8_t *q, const float *d, const float *s, int64_t blocks) {
    float total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 20, *qs = blk + 4;
        const int8_t *qb = q + b * 32;
        int32_t dot = 0;
        for (int j = 0; j < 16; j++) dot += (int32_t)(qs[j] & 15) * qb[j] + (int32_t)(qs[j] >> 4) * qb[j + 16];
        total += cgraft_half_to_float(blk) * d[b] * (float)dot + cgraft_half_to_float(blk + 2) * s[b];
    }
    return total;
}

static float dot_q8_0_q8_portable(const uint8_t *row, const int8_t *q, const float *d, int64_t blocks) {
    float total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        const int8_t *ws = (const int8_t *)(blk + 2), *qb = q + b * 32;
        int32_t dot = 0;
        for (int j = 0; j < 32; j++) dot += (int32_t)ws[j] * qb[j];
        total += cgraft_half_to_float(blk) * d[b] * (float)dot;
    }
    return total;
}

#ifdef CGRAFT_X86
/// A Q4_1 block's 32 nibbles as bytes in element order (low nibbles are elements 0–15, high ones 16–31).
__attribute__((target("avx2"))) static inline __m256i q4_1_bytes(const uint8_t *blk) {
    __m128i p = _mm_loadu_si128((const __m128i *)(blk + 4));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(p, 4), p), _mm256_set1_epi8(15));
}

/// Eight int32 partial sums of 32 unsigned × signed byte products.
__attribute__((target("avx2"))) static inline __m256i dot_u8s8_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

// The AVX2 kernels run one weight row against up to four activation rows, decoding each block once. The block
// scales (and Q4_1's minimums) come eight at a time from the row's scale table (cgraft_ggml_block_scales), so the
// per-block work is the integer product, one lane broadcast and one FMA; a row without a table, or the last few
// blocks, reads them from the blocks. A row's arithmetic is the same whatever `N` is, so a sequence gets the same
// result alone or batched. `out[i]` receives activation row i (`q`, `d`, `s` hold row i at `i * cols`,
// `i * blocks`).

/// Lane `j` of `v` in every lane.
#define CGRAFT_LANE(v, j) _mm256_permutevar8x32_ps((v), _mm256_set1_epi32(j))

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
rows_q4_1_q8_avx2(const uint8_t *row, const uint16_t *table, const int8_t *q, const float *d, const float *s,
                  int64_t blocks, int N, float *out) {
    __m256 acc[4], off[4];
    float offsets[4];
    for (int i = 0; i < N; i++) { acc[i] = _mm256_setzero_ps(); off[i] = _mm256_setzero_ps(); offsets[i] = 0; }
    int64_t b = 0;
    if (table) {
        for (; b + 8 <= blocks; b += 8) {
            __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(table + b)));
            __m256 minimum = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(table + blocks + b)));
            __m256 sc[4];
            for (int i = 0; i < N; i++) {
                sc[i] = _mm256_mul_ps(scale, _mm256_loadu_ps(d + i * blocks + b));
                off[i] = _mm256_fmadd_ps(minimum, _mm256_loadu_ps(s + i * blocks + b), off[i]);
            }
#define CGRAFT_BLOCK(j)                                                                                              \
    {                                                                                                                \
        __m256i w = q4_1_bytes(row + (b + j) * 20);                                                                  \
        for (int i = 0; i < N; i++) {                                                                                \
            __m256i dot = dot_u8s8_avx2(w, _mm256_loadu_si256((const __m256i *)(q + i * blocks * 32 + (b + j) * 32))); \
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), CGRAFT_LANE(sc[i], j), acc[i]);                          \
        }                                                                                                            \
    }
            CGRAFT_BLOCK(0) CGRAFT_BLOCK(1) CGRAFT_BLOCK(2) CGRAFT_BLOCK(3)
            CGRAFT_BLOCK(4) CGRAFT_BLOCK(5) CGRAFT_BLOCK(6) CGRAFT_BLOCK(7)
#undef CGRAFT_BLOCK
        }
    }
    for (; b < blocks; b++) {
        const uint8_t *blk = row + b * 20;
        __m256i w = q4_1_bytes(blk);
        float scale = half_f16c(blk), minimum = half_f16c(blk + 2);
        for (int i = 0; i < N; i++) {
            __m256i dot = dot_u8s8_avx2(w, _mm256_loadu_si256((const __m256i *)(q + i * blocks * 32 + b * 32)));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale * d[i * blocks + b]), acc[i]);
            offsets[i] = fmaf(minimum, s[i * blocks + b], offsets[i]);
        }
    }
    for (int i = 0; i < N; i++) out[i] = hsum256(acc[i]) + (hsum256(off[i]) + offsets[i]);
}

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
rows_q8_0_q8_avx2(const uint8_t *row, const uint16_t *table, const int8_t *q, const float *d, int64_t blocks, int N,
                  float *out) {
    __m256 acc[4];
    for (int i = 0; i < N; i++) acc[i] = _mm256_setzero_ps();
    int64_t b = 0;
    if (table) {
        for (; b + 8 <= blocks; b += 8) {
            __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(table + b)));
            __m256 sc[4];
            for (int i = 0; i < N; i++) sc[i] = _mm256_mul_ps(scale, _mm256_loadu_ps(d + i * blocks + b));
#define CGRAFT_BLOCK(j)                                                                                              \
    {                                                                                                                \
        __m256i w = _mm256_loadu_si256((const __m256i *)(row + (b + j) * 34 + 2)), magnitude = _mm256_sign_epi8(w, w); \
        for (int i = 0; i < N; i++) {                                                                                \
            __m256i x = _mm256_loadu_si256((const __m256i *)(q + i * blocks * 32 + (b + j) * 32));                    \
            __m256i dot = dot_u8s8_avx2(magnitude, _mm256_sign_epi8(x, w));                                          \
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), CGRAFT_LANE(sc[i], j), acc[i]);                          \
        }                                                                                                            \
    }
            CGRAFT_BLOCK(0) CGRAFT_BLOCK(1) CGRAFT_BLOCK(2) CGRAFT_BLOCK(3)
            CGRAFT_BLOCK(4) CGRAFT_BLOCK(5) CGRAFT_BLOCK(6) CGRAFT_BLOCK(7)
#undef CGRAFT_BLOCK
        }
    }
    for (; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 2)), magnitude = _mm256_sign_epi8(w, w);
        float scale = half_f16c(blk);
        for (int i = 0; i < N; i++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(q + i * blocks * 32 + b * 32));
            __m256i dot = dot_u8s8_avx2(magnitude, _mm256_sign_epi8(x, w));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(scale * d[i * blocks + b]), acc[i]);
        }
    }
    for (int i = 0; i < N; i++) out[i] = hsum256(acc[i]);
}
#undef CGRAFT_LANE

/// One weight row against activation rows `0..<n` (n ≤ 4) with the AVX2 kernels.
__attribute__((target("avx2,fma,f16c"))) static void rows_q8_avx2(int type, const uint8_t *row, const uint16_t *table,
                                                                  const int8_t *q, const float *d, const float *s,
                                                                  int64_t blocks, int n, float *out) {
#define CGRAFT_ROWS(N)                                                                                               \
    case N:                                                                                                          \
        if (type == CGRAFT_GGML_Q4_1) rows_q4_1_q8_avx2(row, table, q, d, s, blocks, N, out);                         \
        else rows_q8_0_q8_avx2(row, table, q, d, blocks, N, out);                                                     \
        break;
    switch (n) { CGRAFT_ROWS(1) CGRAFT_ROWS(2) CGRAFT_ROWS(3) CGRAFT_ROWS(4) default: break; }
#undef CGRAFT_ROWS
}

/// 0 portable, 1 AVX2 (+ FMA, F16C), 2 AVX-512 VNNI (+ VL); at most cgraft_ggml_kernel_limit().
static int int8_level(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        int vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                   __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
        cached = avx2 ? (vnni ? 2 : 1) : 0;
    }
    int limit = cgraft_ggml_kernel_limit();
    return cached < limit ? cached : limit;
}
#endif

int cgraft_ggml_int8_kernel_level(void) {
#ifdef CGRAFT_X86
    return int8_level();
#else
    return 0;
#endif
}

int64_t cgraft_ggml_block_scales_count(int type, int64_t rows, int64_t cols) {
    if ((type != CGRAFT_GGML_Q4_1 && type != CGRAFT_GGML_Q8_0) || cols % 32 != 0 || rows < 0) return -1;
    return rows * (cols / 32) * (type == CGRAFT_GGML_Q4_1 ? 2 : 1);
}

int cgraft_ggml_block_scales(int type, const uint8_t *w, int64_t rows, int64_t row_bytes, int64_t cols, uint16_t *table) {
    int64_t count = cgraft_ggml_block_scales_count(type, rows, cols);
    if (count < 0) return -1;
    int64_t blocks = cols / 32, size = type == CGRAFT_GGML_Q4_1 ? 20 : 34, per = count / (rows > 0 ? rows : 1);
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *blk = w + r * row_bytes + b * size;
            table[r * per + b] = (uint16_t)(blk[0] | (blk[1] << 8));
            if (type == CGRAFT_GGML_Q4_1) table[r * per + blocks + b] = (uint16_t)(blk[2] | (blk[3] << 8));
        }
    }
    return 0;
}

int cgraft_ggml_rows_product_q8(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order,
                                const uint16_t *block_scales, int64_t r0, int64_t r1, int64_t cols, const int8_t *q,
                                const float *scales, const float *sums, int64_t m, float *y, int64_t ldy) {
    if ((type != CGRAFT_GGML_Q4_1 && type != CGRAFT_GGML_Q8_0) || cols % 32 != 0 || m < 1) return -1;
    int64_t blocks = cols / 32;
    int level = cgraft_ggml_int8_kernel_level();
    int64_t per = type == CGRAFT_GGML_Q4_1 ? 2 * blocks : blocks;
#ifdef CGRAFT_X86
    if (level == 2) {
        cgraft_q8_product_vnni(type, w, row_bytes, row_order, block_scales, per, r0, r1, blocks, q, scales, sums, m, y,
                               ldy);
        return 0;
    }
    // One weight row against up to four activation rows at a time.
    void (*rows_kernel)(int, const uint8_t *, const uint16_t *, const int8_t *, const float *, const float *, int64_t,
                        int, float *) = level == 1 ? rows_q8_avx2 : NULL;
#endif
    for (int64_t r = r0; r < r1; r++) {
        int64_t source = row_order ? row_order[r] : r;
        const uint8_t *row = w + source * row_bytes;
        const uint16_t *table = block_scales ? block_scales + source * per : NULL;
#ifdef CGRAFT_X86
        if (rows_kernel) {
            float out[4];
            for (int64_t i = 0; i < m; i += 4) {
                int n = (int)(m - i < 4 ? m - i : 4);
                rows_kernel(type, row, table, q + i * cols, scales + i * blocks, sums + i * blocks, blocks, n, out);
                for (int j = 0; j < n; j++) y[(i + j) * ldy + r] += out[j];
            }
            continue;
        }
#endif
        for (int64_t i = 0; i < m; i++) {
            const int8_t *qi = q + i * cols;
            const float *di = scales + i * blocks, *si = sums + i * blocks;
            y[i * ldy + r] += type == CGRAFT_GGML_Q4_1 ? dot_q4_1_q8_portable(row, qi, di, si, blocks)
                                                       : dot_q8_0_q8_portable(row, qi, di, blocks);
        }
    }
    (void)level;
    return 0;
}
