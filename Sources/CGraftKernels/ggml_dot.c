// Products of a few activation rows with a matrix kept in a ggml block format (Q4_1, Q8_0), straight from the
// blocks: y[i, r] = Σ_k W[r, k] · x[i, k]. Decoding a token multiplies one row by every weight once, so decoding
// the weights to float32 first would cost more than the product itself. AVX-512 or AVX2 + FMA (with F16C for the
// block scales) where the CPU has them, a portable loop otherwise.
#include "CGraftKernels.h"
#include "ggml_internal.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CGRAFT_X86 1
#endif

/// Σ x over each block of 32 of `cols` values: the Q4_1 offset term m·Σx needs it once per block and row.
static void block_sums(const float *x, int64_t cols, float *sums) {
    for (int64_t b = 0; b < cols / 32; b++) {
        float s = 0;
        for (int j = 0; j < 32; j++) s += x[b * 32 + j];
        sums[b] = s;
    }
}

static float dot_q4_1_portable(const uint8_t *row, const float *x, const float *sums, int64_t blocks) {
    float total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 20, *qs = blk + 4;
        const float *xb = x + b * 32;
        float s = 0;
        for (int j = 0; j < 16; j++) s += (float)(qs[j] & 15) * xb[j] + (float)(qs[j] >> 4) * xb[j + 16];
        total += cgraft_half_to_float(blk) * s + cgraft_half_to_float(blk + 2) * sums[b];
    }
    return total;
}

static float dot_q8_0_portable(const uint8_t *row, const float *x, int64_t blocks) {
    float total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        const int8_t *qs = (const int8_t *)(blk + 2);
        const float *xb = x + b * 32;
        float s = 0;
        for (int j = 0; j < 32; j++) s += (float)qs[j] * xb[j];
        total += cgraft_half_to_float(blk) * s;
    }
    return total;
}

#ifdef CGRAFT_X86
/// The half at `p` (unaligned) through F16C.
__attribute__((target("f16c"))) static inline float half_f16c(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

__attribute__((target("avx512f,f16c,fma"))) static float dot_q4_1_avx512(const uint8_t *row, const float *x,
                                                                          const float *sums, int64_t blocks) {
    __m512 acc = _mm512_setzero_ps();
    float offsets = 0;
    const __m128i low4 = _mm_set1_epi8(15);
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 20;
        const float *xb = x + b * 32;
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
        __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
        __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), _mm512_loadu_ps(xb));
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), _mm512_loadu_ps(xb + 16), s);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(half_f16c(blk)), s, acc);
        offsets += half_f16c(blk + 2) * sums[b];
    }
    return _mm512_reduce_add_ps(acc) + offsets;
}

__attribute__((target("avx512f,f16c,fma"))) static float dot_q8_0_avx512(const uint8_t *row, const float *x,
                                                                          int64_t blocks) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        const float *xb = x + b * 32;
        __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))),
                                 _mm512_loadu_ps(xb));
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))),
                            _mm512_loadu_ps(xb + 16), s);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(half_f16c(blk)), s, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma,f16c"))) static float dot_q4_1_avx2(const uint8_t *row, const float *x, const float *sums,
                                                                int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0;
    const __m128i low4 = _mm_set1_epi8(15);
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 20;
        const float *xb = x + b * 32;
        __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
        __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
        __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xb));
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), _mm256_loadu_ps(xb + 8), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xb + 16), s);
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), _mm256_loadu_ps(xb + 24), s);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_f16c(blk)), s, acc);
        offsets += half_f16c(blk + 2) * sums[b];
    }
    return hsum256(acc) + offsets;
}

__attribute__((target("avx2,fma,f16c"))) static float dot_q8_0_avx2(const uint8_t *row, const float *x, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        const float *xb = x + b * 32;
        __m256 s = _mm256_setzero_ps();
        for (int part = 0; part < 4; part++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * part));
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(xb + 8 * part), s);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_f16c(blk)), s, acc);
    }
    return hsum256(acc);
}

/// Which kernels to use: 0 portable, 1 AVX2 + FMA + F16C, 2 AVX-512F (+ F16C, FMA); at most `kernel_limit`.
static int kernel_limit = 2;

static int kernel_level(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
        cached = avx2 ? (__builtin_cpu_supports("avx512f") ? 2 : 1) : 0;
    }
    return cached < kernel_limit ? cached : kernel_limit;
}
#endif

void cgraft_ggml_limit_kernels(int level) {
#ifdef CGRAFT_X86
    kernel_limit = level < 0 ? 0 : level;
#else
    (void)level;
#endif
}

int cgraft_ggml_kernel_limit(void) {
#ifdef CGRAFT_X86
    return kernel_limit;
#else
    return 0;
#endif
}

int cgraft_ggml_rows_product(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order, int64_t r0,
                             int64_t r1, int64_t cols, const float *x, int64_t ldx, int64_t m, float *y, int64_t ldy,
                             float *scratch) {
    if ((type != CGRAFT_GGML_Q4_1 && type != CGRAFT_GGML_Q8_0) || cols % 32 != 0 || m < 1) return -1;
    int64_t blocks = cols / 32;
#ifdef CGRAFT_X86
    int level = kernel_level();
#else
    int level = 0;
#endif
    if (type == CGRAFT_GGML_Q4_1) {
        for (int64_t i = 0; i < m; i++) block_sums(x + i * ldx, cols, scratch + i * blocks);
    }
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (row_order ? row_order[r] : r) * row_bytes;
        for (int64_t i = 0; i < m; i++) {
            const float *xi = x + i * ldx;
            float v;
#ifdef CGRAFT_X86
            if (level == 2) {
                v = type == CGRAFT_GGML_Q4_1 ? dot_q4_1_avx512(row, xi, scratch + i * blocks, blocks)
                                             : dot_q8_0_avx512(row, xi, blocks);
            } else if (level == 1) {
                v = type == CGRAFT_GGML_Q4_1 ? dot_q4_1_avx2(row, xi, scratch + i * blocks, blocks)
                                             : dot_q8_0_avx2(row, xi, blocks);
            } else
#endif
            {
                v = type == CGRAFT_GGML_Q4_1 ? dot_q4_1_portable(row, xi, scratch + i * blocks, blocks)
                                             : dot_q8_0_portable(row, xi, blocks);
            }
            y[i * ldy + r] += v;
        }
    }
    (void)level;
    return 0;
}
