// The float32 product of three or more activation rows (a decoding step of a batch of sequences) with Q4_1 / Q8_0
// weight rows, AVX2 + FMA. The row-at-a-time kernels of ggml_dot.c (one or two activation rows) decode a block for
// every use and load an activation vector for every multiply-add; here each weight row is decoded to float32 once,
// into a tile of up to four rows, and the tile multiplies the activation rows three at a time with twelve
// accumulators in registers, a stretch of up to 768 columns at a time so the tile and the activations stay in L1.
//
// Each (weight row, activation row) pair is computed exactly as rows_q4_1_avx2 / rows_q8_0_avx2 compute it: the
// same decoded weights (d · q, one rounding), one eight-lane accumulator fed block by block and part by part in
// order, the same horizontal sum, and Q4_1's offset term Σ_b m_b · Σx_b as fused multiply-adds in block order. So a
// row's product has the same bits in a batch as alone (QuantizedMatrixTests), which is what gives every sequence of
// graftd's continuous batching its own tokens.
#include "CGraftKernels.h"
#include "ggml_internal.h"

#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/// Columns of a stretch: four tile rows and three activation rows of 768 floats take 21 KB of L1, and a width of
/// 576 (SmolLM2) runs in one stretch (short stretches cost more in loop entries and exits than they save).
enum { STRETCH = 768, TILE_ROWS = 4 };

/// Weight row `row` (`blocks` blocks of `type`) decoded into `out[0 ..< blocks·32]` as d · q (Q4_1 without its
/// minimums, which go to `minimums[0 ..< blocks]` for the offset term), the order and roundings of ggml_dot.c.
__attribute__((target("avx2,fma,f16c"))) static void decode_row(int type, const uint8_t *row, int64_t blocks,
                                                                float *out, float *minimums) {
    if (type == CGRAFT_GGML_Q4_1) {
        const __m128i low4 = _mm_set1_epi8(15);
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *blk = row + b * 20;
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
            __m128i lo = _mm_and_si128(q, low4), hi = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
            __m256 d = _mm256_set1_ps(half_f16c(blk));
            float *o = out + b * 32;
            _mm256_storeu_ps(o, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo))));
            _mm256_storeu_ps(o + 8, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)))));
            _mm256_storeu_ps(o + 16, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi))));
            _mm256_storeu_ps(o + 24, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))));
            minimums[b] = half_f16c(blk + 2);
        }
        return;
    }
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = row + b * 34;
        __m256 d = _mm256_set1_ps(half_f16c(blk));
        for (int part = 0; part < 4; part++) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * part));
            _mm256_storeu_ps(out + b * 32 + 8 * part, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes))));
        }
    }
}

/// Where a group of activation rows puts its products: `y` at its first activation row and tile row (activation
/// rows `ldy` apart), plus Q4_1's offset terms (`offsets` at its first activation row, tile rows `padded` apart;
/// NULL for Q8_0).
typedef struct {
    float *y;
    int64_t ldy;
    const float *offsets;
    int64_t padded;
} destination;

/// Columns `k0 ..< k1` of `W` tile rows (stride `cols`) against `N` activation rows (`x`, stride `ldx`): the
/// accumulators `acc[w·N + i]` (W·N ≤ 12) start at zero on the first stretch (`k0` = 0) and stay in memory between
/// stretches; the last one (`out` not NULL) adds each pair's product to `out`'s row straight from the registers:
/// y += Σ (+ offset), as ggml_dot.c adds it. `W` and `N` are constants after inlining.
__attribute__((target("avx2,fma"), always_inline)) static inline void
tile_stretch(const float *tile, int64_t cols, int W, const float *x, int64_t ldx, int N, int64_t k0, int64_t k1,
             __m256 *acc, const destination *out) {
    __m256 a[12];
    for (int k = 0; k < W * N; k++) a[k] = k0 == 0 ? _mm256_setzero_ps() : acc[k];
    for (int64_t k = k0; k < k1; k += 8) {
        __m256 xv[3];
        for (int i = 0; i < N; i++) xv[i] = _mm256_loadu_ps(x + i * ldx + k);
        for (int w = 0; w < W; w++) {
            __m256 wv = _mm256_loadu_ps(tile + w * cols + k);
            for (int i = 0; i < N; i++) a[w * N + i] = _mm256_fmadd_ps(wv, xv[i], a[w * N + i]);
        }
    }
    if (!out) {
        for (int k = 0; k < W * N; k++) acc[k] = a[k];
        return;
    }
    for (int w = 0; w < W; w++) {
        for (int i = 0; i < N; i++) {
            float v = hsum256(a[w * N + i]);
            out->y[i * out->ldy + w] += out->offsets ? v + out->offsets[w * out->padded + i] : v;
        }
    }
}

/// tile_stretch for `w` ∈ 1...4 tile rows and `n` ∈ 1...3 activation rows.
__attribute__((target("avx2,fma"))) static void stretch(const float *tile, int64_t cols, int w, const float *x,
                                                        int64_t ldx, int n, int64_t k0, int64_t k1, __m256 *acc,
                                                        const destination *out) {
#define CGRAFT_STRETCH(W, N)                                                                                         \
    case W * 4 + N:                                                                                                  \
        tile_stretch(tile, cols, W, x, ldx, N, k0, k1, acc, out);                                                    \
        break;
    switch (w * 4 + n) {
        CGRAFT_STRETCH(1, 1) CGRAFT_STRETCH(1, 2) CGRAFT_STRETCH(1, 3)
        CGRAFT_STRETCH(2, 1) CGRAFT_STRETCH(2, 2) CGRAFT_STRETCH(2, 3)
        CGRAFT_STRETCH(3, 1) CGRAFT_STRETCH(3, 2) CGRAFT_STRETCH(3, 3)
        CGRAFT_STRETCH(4, 1) CGRAFT_STRETCH(4, 2) CGRAFT_STRETCH(4, 3)
        default: break;
    }
#undef CGRAFT_STRETCH
}

/// How many activation rows the group starting with `left` rows to go takes: threes, with four left split two and
/// two so that no group of one keeps only four accumulator chains in flight.
static int group_size(int64_t left) { return left == 4 ? 2 : left >= 3 ? 3 : (int)left; }

__attribute__((target("avx2,fma,f16c"))) int cgraft_ggml_rows_product_batch(int type, const uint8_t *w,
                                                                             int64_t row_bytes,
                                                                             const int64_t *row_order, int64_t r0,
                                                                             int64_t r1, int64_t blocks, const float *x,
                                                                             int64_t ldx, const float *sums, int64_t m,
                                                                             float *y, int64_t ldy) {
    int64_t cols = blocks * 32, padded = (m + 7) / 8 * 8;
    // The tile, its minimums, the block sums transposed (block b's in `padded` lanes) and the offset terms, then
    // the accumulators.
    size_t floats = (size_t)(TILE_ROWS * cols + TILE_ROWS * blocks + blocks * padded + TILE_ROWS * padded);
    float *memory = aligned_alloc(32, ((floats + 7) / 8 + (size_t)(TILE_ROWS * m)) * 32);
    if (!memory) return -1;
    float *tile = memory, *minimums = tile + TILE_ROWS * cols, *lanes = minimums + TILE_ROWS * blocks;
    float *offsets = lanes + blocks * padded;
    __m256 *acc = (__m256 *)(memory + (floats + 7) / 8 * 8);
    memset(minimums, 0, sizeof(float) * (size_t)(TILE_ROWS * blocks));
    if (type == CGRAFT_GGML_Q4_1) {
        for (int64_t b = 0; b < blocks; b++) {
            for (int64_t i = 0; i < padded; i++) lanes[b * padded + i] = i < m ? sums[i * blocks + b] : 0;
        }
    }
    for (int64_t r = r0; r < r1; r += TILE_ROWS) {
        int count = r1 - r < TILE_ROWS ? (int)(r1 - r) : TILE_ROWS;
        for (int k = 0; k < count; k++) {
            const uint8_t *row = w + (row_order ? row_order[r + k] : r + k) * row_bytes;
            decode_row(type, row, blocks, tile + k * cols, minimums + k * blocks);
        }
        if (type == CGRAFT_GGML_Q4_1) {
            // The offset terms, eight activation rows a lane: ggml_dot.c's fmaf chain, block by block, the tile's
            // four rows as four chains in flight (rows past `count` hold zeros or an earlier tile's minimums,
            // and their offsets are not read).
            for (int64_t i = 0; i < padded; i += 8) {
                __m256 o[TILE_ROWS];
                for (int k = 0; k < TILE_ROWS; k++) o[k] = _mm256_setzero_ps();
                for (int64_t b = 0; b < blocks; b++) {
                    __m256 s = _mm256_loadu_ps(lanes + b * padded + i);
                    for (int k = 0; k < TILE_ROWS; k++) o[k] = _mm256_fmadd_ps(_mm256_set1_ps(minimums[k * blocks + b]), s, o[k]);
                }
                for (int k = 0; k < TILE_ROWS; k++) _mm256_storeu_ps(offsets + k * padded + i, o[k]);
            }
        }
        for (int64_t k0 = 0; k0 < cols; k0 += STRETCH) {
            int64_t k1 = cols - k0 < STRETCH ? cols : k0 + STRETCH;
            for (int64_t i = 0; i < m;) {
                int n = group_size(m - i);
                destination out = {y + i * ldy + r, ldy, type == CGRAFT_GGML_Q4_1 ? offsets + i : NULL, padded};
                stretch(tile, cols, count, x + i * ldx, ldx, n, k0, k1, acc + i * count, k1 == cols ? &out : NULL);
                i += n;
            }
        }
    }
    free(memory);
    return 0;
}
#endif
