// Shared between the float32 (ggml_dot.c) and int8 (ggml_dot_q8.c) block products; not part of the module's API.
#ifndef CGRAFT_GGML_INTERNAL_H
#define CGRAFT_GGML_INTERNAL_H

#include <stdint.h>
#include <string.h>

/// IEEE half to float (exact), from the two little-endian bytes at `p`.
static inline float cgraft_half_to_float(const uint8_t *p) {
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

/// The addresses of weight rows `r ..< r + count` of `w` (row `k` stored at `row_order[k]` when given, else at `k`)
/// into `rows`, and of their scale tables (`per` entries a row) into `tables` (NULL entries without `block_scales`).
static inline void cgraft_ggml_gather_rows(const uint8_t *w, int64_t row_bytes, const int64_t *row_order,
                                           const uint16_t *block_scales, int64_t per, int64_t r, int count,
                                           const uint8_t **rows, const uint16_t **tables) {
    for (int k = 0; k < count; k++) {
        int64_t source = row_order ? row_order[r + k] : r + k;
        rows[k] = w + source * row_bytes;
        tables[k] = block_scales ? block_scales + source * per : NULL;
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/// The half at `p` (unaligned) through F16C.
__attribute__((target("f16c"))) static inline float half_f16c(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h);
    return _cvtsh_ss(h);
}

/// The sum of the eight lanes of `v`.
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/// cgraft_ggml_rows_product's AVX2 path for three or more activation rows (`sums`: their Q4_1 block sums, `m`
/// rows of `blocks`), each weight row decoded once into a float32 tile (ggml_dot_batch.c). Returns 0, or -1 when
/// its working memory cannot be allocated (nothing touched).
__attribute__((target("avx2,fma,f16c"))) int cgraft_ggml_rows_product_batch(int type, const uint8_t *w,
                                                                             int64_t row_bytes,
                                                                             const int64_t *row_order, int64_t r0,
                                                                             int64_t r1, int64_t blocks, const float *x,
                                                                             int64_t ldx, const float *sums, int64_t m,
                                                                             float *y, int64_t ldy);

/// The target the AVX-512 VNNI kernels are compiled for.
#define VNNI_TARGET "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"

/// cgraft_ggml_rows_product_q8 with the AVX-512 VNNI kernels (`per` scale-table entries per weight row): Q4_1
/// regroups the activations once per call, and a decoding step (`m` = 1) takes four weight rows at a time; each
/// product is the same whichever way it runs (ggml_dot_q8_vnni.c).
__attribute__((target(VNNI_TARGET))) void cgraft_q8_product_vnni(int type, const uint8_t *w, int64_t row_bytes,
                                                                 const int64_t *row_order,
                                                                 const uint16_t *block_scales, int64_t per, int64_t r0,
                                                                 int64_t r1, int64_t blocks, const int8_t *q,
                                                                 const float *d, const float *s, int64_t m, float *y,
                                                                 int64_t ldy);
#endif

/// The highest kernel level cgraft_ggml_limit_kernels currently allows (2 by default).
int cgraft_ggml_kernel_limit(void);

#endif
