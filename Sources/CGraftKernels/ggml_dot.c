// Products of a few activation rows with a matrix kept in a ggml block format (Q4_1, Q8_0), straight from the
// blocks: y[i, r] = Σ_k W[r, k] · x[i, k]. Decoding a token multiplies one row by every weight once, so decoding
// the weights to float32 first would cost more than the product itself. AVX2 + FMA where the CPU has them, a
// portable loop otherwise.
#include "CGraftKernels.h"

#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CGRAFT_X86 1
#endif

/// IEEE half to float (exact), from the two little-endian bytes at `p`.
static inline float half_to_float(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {  // subnormal: normalise
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400)) { mantissa <<= 1; exponent--; }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

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
        total += half_to_float(blk) * s + half_to_float(blk + 2) * sums[b];
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
        total += half_to_float(blk) * s;
    }
    return total;
}

#ifdef CGRAFT_X86
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static float dot_q4_1_avx2(const uint8_t *row, const float *x, const float *sums,
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
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(blk)), s, acc);
        offsets += half_to_float(blk + 2) * sums[b];
    }
    return hsum256(acc) + offsets;
}

__attribute__((target("avx2,fma"))) static float dot_q8_0_avx2(const uint8_t *row, const float *x, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        const float *xb = x + b * 32;
        __m256 s = _mm256_setzero_ps();
        for (int part = 0; part < 4; part++) {
            __m128i q = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * part));
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_loadu_ps(xb + 8 * part), s);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(blk)), s, acc);
    }
    return hsum256(acc);
}

static int portable_only = 0;

static int has_avx2_fma(void) {
    if (portable_only) return 0;
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return cached;
}
#endif

void cgraft_ggml_use_portable_kernels(int portable) {
#ifdef CGRAFT_X86
    portable_only = portable != 0;
#else
    (void)portable;
#endif
}

int cgraft_ggml_rows_product(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order, int64_t r0,
                             int64_t r1, int64_t cols, const float *x, int64_t ldx, int64_t m, float *y, int64_t ldy,
                             float *scratch) {
    if ((type != CGRAFT_GGML_Q4_1 && type != CGRAFT_GGML_Q8_0) || cols % 32 != 0 || m < 1) return -1;
    int64_t blocks = cols / 32;
#ifdef CGRAFT_X86
    int fast = has_avx2_fma();
#else
    int fast = 0;
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
            if (fast) {
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
    (void)fast;
    return 0;
}
