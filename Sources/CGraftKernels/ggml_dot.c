// Products of a few activation rows with a matrix kept in a ggml block format (Q4_1, Q8_0), straight from the
// blocks: y[i, r] = Σ_k W[r, k] · x[i, k]. Decoding a token multiplies one row by every weight once, so decoding
// the weights to float32 first would cost more than the product itself. AVX-512 or AVX2 + FMA (with F16C for the
// block scales) where the CPU has them, a portable loop otherwise.
#include "CGraftKernels.h"
#include "ggml_internal.h"

#include <math.h>
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
// `W` weight rows against `N` activation rows in one pass (W·N ≤ 8 accumulators): each block is decoded (and scaled)
// once and multiplied into every activation row (a decode step of a batch of sequences multiplies every weight by one
// row per sequence), and with one or two activation rows four weight rows keep four independent FMA chains in flight
// where a single chain would leave the units waiting. Each (weight row, activation row) pair has its own
// accumulators, fed in the same order whatever `W` and `N` are, so a sequence gets the same result alone or batched.
// `W` and `N` are compile-time constants after inlining; `out[w * N + i]` receives weight row w against row i.
//
// The block scales (and Q4_1's minimums) of sixteen blocks at a time come from the row's scale table (or one gather)
// and one half-to-float conversion, instead of a scalar conversion per block, which took a third of the decoding
// time; the Q4_1 offset term Σ_b m_b · Σx_b is then sixteen lanes of FMA per pair rather than a scalar FMA per block.

/// The scales of blocks `0 ..< n` (n ≤ 16) into `scales`, and (`minimums` given, Q4_1) the blocks' minimums as a
/// vector, lanes from `n` on zero: from the row's scale table when there is one (`table`: the scales; the minimums
/// `blocks` halves later, see cgraft_ggml_block_scales), else by one gather of the first four bytes of each of the
/// `size`-byte blocks from `first` (slower: a gather costs as much as several blocks' products on some CPUs).
__attribute__((target("avx512f,f16c,fma"), always_inline)) static inline void
load_scales(const uint8_t *first, int size, const uint16_t *table, int64_t blocks, int n, float *scales, __m512 *minimums) {
    if (table) {
        uint16_t part[2][16] = {{0}};
        const uint16_t *s = table, *m = table + blocks;
        if (n < 16) {
            memcpy(part[0], table, (size_t)n * 2);
            if (minimums) memcpy(part[1], table + blocks, (size_t)n * 2);
            s = part[0];
            m = part[1];
        }
        _mm512_storeu_ps(scales, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)s)));
        if (minimums) *minimums = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)m));
        return;
    }
    __mmask16 k = (__mmask16)((1u << n) - 1);
    const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(size));
    __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, index, first, 1);
    _mm512_storeu_ps(scales, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)));
    if (minimums) *minimums = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
}

__attribute__((target("avx512f,f16c,fma"), always_inline)) static inline void
rows_q4_1_avx512(const uint8_t *const *rows, const uint16_t *const *tables, int W, const float *x, int64_t ldx, const float *sums, int64_t blocks,
                 int N, float *out) {
    __m512 acc[8], offsets[8];
    for (int k = 0; k < W * N; k++) { acc[k] = _mm512_setzero_ps(); offsets[k] = _mm512_setzero_ps(); }
    const __m128i low4 = _mm_set1_epi8(15);
    float scales[4][16];
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int n = blocks - b0 < 16 ? (int)(blocks - b0) : 16;
        __mmask16 k = (__mmask16)((1u << n) - 1);
        for (int w = 0; w < W; w++) {
            __m512 minimum;
            load_scales(rows[w] + b0 * 20, 20, tables[w] ? tables[w] + b0 : NULL, blocks, n, scales[w], &minimum);
            for (int i = 0; i < N; i++) {
                offsets[w * N + i] = _mm512_fmadd_ps(minimum, _mm512_maskz_loadu_ps(k, sums + i * blocks + b0), offsets[w * N + i]);
            }
        }
        for (int j = 0; j < n; j++) {
            int64_t b = b0 + j;
            for (int w = 0; w < W; w++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(rows[w] + b * 20 + 4));
                __m512 d = _mm512_set1_ps(scales[w][j]);
                __m512 wl = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, low4))));
                __m512 wh = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), low4))));
                for (int i = 0; i < N; i++) {
                    const float *xb = x + i * ldx + b * 32;
                    acc[w * N + i] = _mm512_fmadd_ps(wl, _mm512_loadu_ps(xb), acc[w * N + i]);
                    acc[w * N + i] = _mm512_fmadd_ps(wh, _mm512_loadu_ps(xb + 16), acc[w * N + i]);
                }
            }
        }
    }
    for (int k = 0; k < W * N; k++) out[k] = _mm512_reduce_add_ps(acc[k]) + _mm512_reduce_add_ps(offsets[k]);
}

__attribute__((target("avx512f,f16c,fma"), always_inline)) static inline void
rows_q8_0_avx512(const uint8_t *const *rows, const uint16_t *const *tables, int W, const float *x, int64_t ldx, int64_t blocks, int N, float *out) {
    __m512 acc[8];
    for (int k = 0; k < W * N; k++) acc[k] = _mm512_setzero_ps();
    float scales[4][16];
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int n = blocks - b0 < 16 ? (int)(blocks - b0) : 16;
        for (int w = 0; w < W; w++) load_scales(rows[w] + b0 * 34, 34, tables[w] ? tables[w] + b0 : NULL, blocks, n, scales[w], NULL);
        for (int j = 0; j < n; j++) {
            int64_t b = b0 + j;
            for (int w = 0; w < W; w++) {
                const uint8_t *blk = rows[w] + b * 34;
                __m512 d = _mm512_set1_ps(scales[w][j]);
                __m512 w0 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2)))));
                __m512 w1 = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18)))));
                for (int i = 0; i < N; i++) {
                    const float *xb = x + i * ldx + b * 32;
                    acc[w * N + i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xb), acc[w * N + i]);
                    acc[w * N + i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), acc[w * N + i]);
                }
            }
        }
    }
    for (int k = 0; k < W * N; k++) out[k] = _mm512_reduce_add_ps(acc[k]);
}

// The AVX2 kernels take `W` weight rows at once as well: with one activation row, a single accumulator chain keeps
// one FMA in flight where the unit could run ten. Each (weight row, activation row) pair still has its own
// accumulator fed in the same order whatever `W` and `N` are, so results do not change with the grouping.
// `out[w * N + i]` receives weight row w against activation row i (W·N ≤ 8).

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
rows_q4_1_avx2(const uint8_t *const *rows, int W, const float *x, int64_t ldx, const float *sums, int64_t blocks,
               int N, float *out) {
    __m256 acc[8];
    float offsets[8];
    for (int k = 0; k < W * N; k++) { acc[k] = _mm256_setzero_ps(); offsets[k] = 0; }
    const __m128i low4 = _mm_set1_epi8(15);
    for (int64_t b = 0; b < blocks; b++) {
        __m128i lo[4], hi[4];
        __m256 d[4];
        for (int w = 0; w < W; w++) {
            const uint8_t *blk = rows[w] + b * 20;
            __m128i q = _mm_loadu_si128((const __m128i *)(blk + 4));
            lo[w] = _mm_and_si128(q, low4);
            hi[w] = _mm_and_si128(_mm_srli_epi16(q, 4), low4);
            d[w] = _mm256_set1_ps(half_f16c(blk));
        }
        for (int part = 0; part < 4; part++) {
            for (int w = 0; w < W; w++) {
                __m128i bytes = part == 0 ? lo[w] : part == 1 ? _mm_srli_si128(lo[w], 8) : part == 2 ? hi[w] : _mm_srli_si128(hi[w], 8);
                __m256 wv = _mm256_mul_ps(d[w], _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)));
                for (int i = 0; i < N; i++) {
                    acc[w * N + i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * ldx + b * 32 + 8 * part), acc[w * N + i]);
                }
            }
        }
        for (int w = 0; w < W; w++) {
            float mn = half_f16c(rows[w] + b * 20 + 2);
            for (int i = 0; i < N; i++) offsets[w * N + i] = fmaf(mn, sums[i * blocks + b], offsets[w * N + i]);
        }
    }
    for (int k = 0; k < W * N; k++) out[k] = hsum256(acc[k]) + offsets[k];
}

__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
rows_q8_0_avx2(const uint8_t *const *rows, int W, const float *x, int64_t ldx, int64_t blocks, int N, float *out) {
    __m256 acc[8];
    for (int k = 0; k < W * N; k++) acc[k] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256 d[4];
        for (int w = 0; w < W; w++) d[w] = _mm256_set1_ps(half_f16c(rows[w] + b * 34));
        for (int part = 0; part < 4; part++) {
            for (int w = 0; w < W; w++) {
                const uint8_t *blk = rows[w] + b * 34;
                __m256 wv = _mm256_mul_ps(d[w], _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * part)))));
                for (int i = 0; i < N; i++) {
                    acc[w * N + i] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * ldx + b * 32 + 8 * part), acc[w * N + i]);
                }
            }
        }
    }
    for (int k = 0; k < W * N; k++) out[k] = hsum256(acc[k]);
}

/// Weight rows `rows[0..<w]` (their scale tables `tables[0..<w]`, each NULL or a row's table) against rows
/// `x[0..<n]` (w ∈ {1, 4}, w·n ≤ 8), into `out`, with the AVX-512 kernels.
__attribute__((target("avx512f,fma,f16c"))) static void rows_avx512(int type, const uint8_t *const *rows,
                                                                    const uint16_t *const *tables, int w, const float *x, int64_t ldx, const float *sums,
                                                                    int64_t blocks, int n, float *out) {
#define CGRAFT_ROWS(W, N)                                                                                            \
    case W * 16 + N:                                                                                                 \
        if (type == CGRAFT_GGML_Q4_1) rows_q4_1_avx512(rows, tables, W, x, ldx, sums, blocks, N, out);                \
        else rows_q8_0_avx512(rows, tables, W, x, ldx, blocks, N, out);                                               \
        break;
    switch (w * 16 + n) {
        CGRAFT_ROWS(1, 1) CGRAFT_ROWS(1, 2) CGRAFT_ROWS(1, 3) CGRAFT_ROWS(1, 4)
        CGRAFT_ROWS(1, 5) CGRAFT_ROWS(1, 6) CGRAFT_ROWS(1, 7) CGRAFT_ROWS(1, 8)
        CGRAFT_ROWS(4, 1) CGRAFT_ROWS(4, 2)
        default: break;
    }
#undef CGRAFT_ROWS
}

/// Weight rows `rows[0..<w]` against rows `x[0..<n]` (w ∈ {1, 4}, n ≤ 2), into `out`, with the AVX2 kernels.
__attribute__((target("avx2,fma,f16c"))) static void rows_avx2(int type, const uint8_t *const *rows, int w, const float *x,
                                                               int64_t ldx, const float *sums, int64_t blocks, int n,
                                                               float *out) {
#define CGRAFT_ROWS(W, N)                                                                                            \
    case W * 16 + N:                                                                                                 \
        if (type == CGRAFT_GGML_Q4_1) rows_q4_1_avx2(rows, W, x, ldx, sums, blocks, N, out);                          \
        else rows_q8_0_avx2(rows, W, x, ldx, blocks, N, out);                                                         \
        break;
    switch (w * 16 + n) {
        CGRAFT_ROWS(1, 1) CGRAFT_ROWS(1, 2) CGRAFT_ROWS(4, 1) CGRAFT_ROWS(4, 2)
        default: break;
    }
#undef CGRAFT_ROWS
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

int cgraft_ggml_rows_product(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order,
                             const uint16_t *block_scales, int64_t r0, int64_t r1, int64_t cols, const float *x,
                             int64_t ldx, int64_t m, float *y, int64_t ldy, float *scratch) {
    if ((type != CGRAFT_GGML_Q4_1 && type != CGRAFT_GGML_Q8_0) || cols % 32 != 0 || m < 1) return -1;
    int64_t blocks = cols / 32;
#ifdef CGRAFT_X86
    int level = kernel_level();
#else
    int level = 0;
#endif
    int64_t table_stride = type == CGRAFT_GGML_Q4_1 ? 2 * blocks : blocks;
    (void)table_stride;
    if (type == CGRAFT_GGML_Q4_1) {
        for (int64_t i = 0; i < m; i++) block_sums(x + i * ldx, cols, scratch + i * blocks);
    }
#ifdef CGRAFT_X86
    if (level == 1) {
        // Three or more rows (a decoding step of a batch of sequences): each weight row decoded once into a float32
        // tile. One or two rows (a sequence's decoding step), or more without memory for the tile: weight rows in
        // fours against two activation rows at a time, each pair with its own accumulator chain in flight.
        if (m > 2 && cgraft_ggml_rows_product_batch(type, w, row_bytes, row_order, r0, r1, blocks, x, ldx, scratch,
                                                    m, y, ldy) == 0) {
            return 0;
        }
        for (int64_t i = 0; i < m; i += 2) {
            int n = m - i < 2 ? 1 : 2;
            for (int64_t r = r0; r < r1;) {
                int count = r1 - r >= 4 ? 4 : 1;
                const uint8_t *rows[4];
                for (int k = 0; k < count; k++) rows[k] = w + (row_order ? row_order[r + k] : r + k) * row_bytes;
                float out[8];
                rows_avx2(type, rows, count, x + i * ldx, ldx, scratch + i * blocks, blocks, n, out);
                for (int k = 0; k < count; k++) {
                    for (int j = 0; j < n; j++) y[(i + j) * ldy + r + k] += out[k * n + j];
                }
                r += count;
            }
        }
        return 0;
    }
    if (level == 2) {
        // Weight rows in fours for one or two activation rows (a decoding step), else one at a time against up to
        // eight activation rows.
        int wide = m <= 2 ? 4 : 1;
        for (int64_t r = r0; r < r1;) {
            int count = r1 - r >= wide ? wide : 1, per = 8 / count;
            const uint8_t *rows[4];
            const uint16_t *tables[4];
            cgraft_ggml_gather_rows(w, row_bytes, row_order, block_scales, table_stride, r, count, rows, tables);
            float out[8];
            for (int64_t i = 0; i < m; i += per) {
                int n = (int)(m - i < per ? m - i : per);
                rows_avx512(type, rows, tables, count, x + i * ldx, ldx, scratch + i * blocks, blocks, n, out);
                for (int k = 0; k < count; k++) {
                    for (int j = 0; j < n; j++) y[(i + j) * ldy + r + k] += out[k * n + j];
                }
            }
            r += count;
        }
        return 0;
    }
#endif
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (row_order ? row_order[r] : r) * row_bytes;
        for (int64_t i = 0; i < m; i++) {
            const float *xi = x + i * ldx;
            float v = type == CGRAFT_GGML_Q4_1 ? dot_q4_1_portable(row, xi, scratch + i * blocks, blocks)
                                               : dot_q8_0_portable(row, xi, blocks);
            y[i * ldy + r] += v;
        }
    }
    (void)level;
    return 0;
}
