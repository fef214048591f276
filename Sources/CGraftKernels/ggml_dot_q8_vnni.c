// The AVX-512 VNNI kernels of the fast mode's block products (see ggml_dot_q8.c, which picks them at run time):
// one Q4_1 or Q8_0 weight row against up to four int8 activation rows, and a decoding step's Q4_1 rows four at a
// time against one activation row. Q4_1 products regroup the activations once per call into the nibble order the
// weights unpack to, instead of once per weight row.
#include "CGraftKernels.h"
#include "ggml_internal.h"

#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/// The weight scale of each of up to 16 blocks times the activations' block scale, and (`offsets` given, Q4_1)
/// the blocks' minimum times the activations' block sum added to `offsets`; lanes from `n` on are zero. The halves
/// come from the row's contiguous scale table when there is one (`table`: the scales, then the minimums, see
/// cgraft_ggml_block_scales), else from the blocks themselves (`first`, `size`-byte blocks) with one gather. The
/// result stays in a register: kernels pick a block's scale with a lane permute, not a reload.
__attribute__((target(VNNI_TARGET))) static inline __m512 vnni_scales(const uint8_t *first, int size,
                                                                     const uint16_t *table, const uint16_t *minimums,
                                                                     int n, const float *d, const float *s,
                                                                     __m512 *offsets) {
    __mmask16 k = (__mmask16)((1u << n) - 1);
    __m512 scale, minimum = _mm512_setzero_ps();
    if (table) {
        scale = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, table));
        if (offsets) minimum = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, minimums));
    } else {
        const __m512i index = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(size));
        __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, index, first, 1);
        scale = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
        if (offsets) minimum = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(g, 16)));
    }
    if (offsets) *offsets = _mm512_fmadd_ps(minimum, _mm512_maskz_loadu_ps(k, s), *offsets);
    return _mm512_mul_ps(scale, _mm512_maskz_loadu_ps(k, d));
}

/// The sum of the sixteen lanes of `v`, folded to eight first.
__attribute__((target(VNNI_TARGET))) static inline float hsum512(__m512 v) {
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castsi256_ps(_mm512_extracti64x4_epi64(_mm512_castps_si512(v), 1))));
}

// The VNNI kernels run one weight row against up to four activation rows, unpacking each block once, on 512-bit
// vectors: Q4_1 four blocks per vpdpbusd pair (their low nibbles against the activations' first halves, then the
// high ones against the second halves, both summed into the same block lanes), Q8_0 two blocks per vpdpbusd. A
// block's int32 lanes are converted once and scaled by its lane of the window's scale register. Each activation row
// keeps its own accumulators (Q4_1: one, and the minimum offsets apart until the end; Q8_0: two), fed in the same
// order whatever `N` is, so a sequence gets the same result alone or batched. `out[i]` receives activation row i
// (`q`, `d`, `s` hold row i at `i * cols`, `i * blocks`).

/// Up to four Q4_1 blocks' nibbles (`present` of them, the rest zero): low nibbles in `lo`, high ones in `hi`,
/// block g in 128-bit lane g.
__attribute__((target(VNNI_TARGET), always_inline)) static inline void q4_1_group(const uint8_t *blk, int present,
                                                                                 __m512i *lo, __m512i *hi) {
    __m512i p;
    if (present == 4) {
        p = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(blk + 4)));
        p = _mm512_inserti32x4(p, _mm_loadu_si128((const __m128i *)(blk + 24)), 1);
        p = _mm512_inserti32x4(p, _mm_loadu_si128((const __m128i *)(blk + 44)), 2);
        p = _mm512_inserti32x4(p, _mm_loadu_si128((const __m128i *)(blk + 64)), 3);
    } else {
        p = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(blk + 4)));
        if (present > 1) p = _mm512_inserti32x4(p, _mm_loadu_si128((const __m128i *)(blk + 24)), 1);
        if (present > 2) p = _mm512_inserti32x4(p, _mm_loadu_si128((const __m128i *)(blk + 44)), 2);
        p = _mm512_maskz_mov_epi32((__mmask16)((1u << (4 * present)) - 1), p);
    }
    const __m512i nibble = _mm512_set1_epi8(15);
    *lo = _mm512_and_si512(p, nibble);
    *hi = _mm512_and_si512(_mm512_srli_epi16(p, 4), nibble);
}

/// The activations of up to four blocks (`present`, the rest zero) regrouped like q4_1_group's nibbles: each
/// block's first 16 values in `lo`'s lane g, its last 16 in `hi`'s.
__attribute__((target(VNNI_TARGET), always_inline)) static inline void q8_group(const int8_t *x, int present,
                                                                               __m512i *lo, __m512i *hi) {
    __m512i z0, z1;
    if (present == 4) {
        z0 = _mm512_loadu_si512(x);
        z1 = _mm512_loadu_si512(x + 64);
    } else {
        uint64_t bytes = (uint64_t)present * 32;
        z0 = _mm512_maskz_loadu_epi8(bytes >= 64 ? ~0ull : (1ull << bytes) - 1, x);
        z1 = bytes > 64 ? _mm512_maskz_loadu_epi8((1ull << (bytes - 64)) - 1, x + 64) : _mm512_setzero_si512();
    }
    *lo = _mm512_permutex2var_epi64(z0, _mm512_setr_epi64(0, 1, 4, 5, 8, 9, 12, 13), z1);
    *hi = _mm512_permutex2var_epi64(z0, _mm512_setr_epi64(2, 3, 6, 7, 10, 11, 14, 15), z1);
}

/// The activations of the group of blocks `4g ..< 4g + 4` (`present` of them) of one row, as q8_group gives them:
/// read from the row regrouped once (`grouped`, 128 bytes per group, see regroup) or, without it, from the row.
__attribute__((target(VNNI_TARGET), always_inline)) static inline void
activation_group(const int8_t *grouped, const int8_t *q, int64_t g, int present, __m512i *lo, __m512i *hi) {
    if (grouped) {
        *lo = _mm512_loadu_si512(grouped + g * 128);
        *hi = _mm512_loadu_si512(grouped + g * 128 + 64);
    } else {
        q8_group(q + g * 128, present, lo, hi);
    }
}

/// `m` int8 activation rows of `blocks` blocks regrouped into `grouped` (`⌈blocks / 4⌉ · 128` bytes per row) as
/// q8_group regroups them, so that the Q4_1 kernel does it once per call rather than once per weight row.
__attribute__((target(VNNI_TARGET))) static void regroup(const int8_t *q, int64_t m, int64_t blocks, int8_t *grouped) {
    int64_t groups = (blocks + 3) / 4;
    for (int64_t i = 0; i < m; i++) {
        for (int64_t g = 0; g < groups; g++) {
            int present = blocks - 4 * g < 4 ? (int)(blocks - 4 * g) : 4;
            __m512i lo, hi;
            q8_group(q + i * blocks * 32 + g * 128, present, &lo, &hi);
            _mm512_storeu_si512(grouped + (i * groups + g) * 128, lo);
            _mm512_storeu_si512(grouped + (i * groups + g) * 128 + 64, hi);
        }
    }
}

/// `W` Q4_1 weight rows (`rows[w]`, scale table `tables[w]` or NULL) against `N` activation rows, W · N ≤ 4, into
/// `out[w * N + i]`: a batch's step takes one weight row against up to four activation rows, a decoding step four
/// weight rows against its one. Activation row i is read from `grouped + i · ⌈blocks / 4⌉ · 128` when `grouped` is
/// given, else regrouped from `q + i · cols` as the kernel goes. Each pair's arithmetic is the same whatever `W`,
/// `N` and the activations' source are.
__attribute__((target(VNNI_TARGET), always_inline)) static inline void
rows_q4_1_q8_vnni(const uint8_t *const *rows, const uint16_t *const *tables, int W, const int8_t *q,
                  const int8_t *grouped, const float *d, const float *s, int64_t blocks, int N, float *out) {
    __m512 acc[4], offsets[4], sc[4];
    for (int k = 0; k < W * N; k++) acc[k] = offsets[k] = _mm512_setzero_ps();
    const int64_t cols = blocks * 32, stride = (blocks + 3) / 4 * 128;
    // Block g of a group in lanes 4g..4g+3.
    const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int n = blocks - b0 < 16 ? (int)(blocks - b0) : 16;
        for (int w = 0; w < W; w++) {
            const uint16_t *table = tables[w];
            for (int i = 0; i < N; i++) {
                sc[w * N + i] = vnni_scales(rows[w] + b0 * 20, 20, table ? table + b0 : NULL,
                                            table ? table + blocks + b0 : NULL, n, d + i * blocks + b0,
                                            s + i * blocks + b0, &offsets[w * N + i]);
            }
        }
        for (int j = 0; j < n; j += 4) {
            int present = n - j < 4 ? n - j : 4;
            __m512i xlo[4], xhi[4];
            for (int i = 0; i < N; i++) {
                activation_group(grouped ? grouped + i * stride : NULL, q + i * cols, (b0 + j) / 4, present, &xlo[i],
                                 &xhi[i]);
            }
            __m512i lanes = _mm512_add_epi32(quads, _mm512_set1_epi32(j));
            for (int w = 0; w < W; w++) {
                __m512i wlo, whi;
                q4_1_group(rows[w] + (b0 + j) * 20, present, &wlo, &whi);
                for (int i = 0; i < N; i++) {
                    int k = w * N + i;
                    __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wlo, xlo[i]), whi,
                                                      xhi[i]);
                    __m512 scaled = _mm512_permutexvar_ps(lanes, sc[k]);
                    acc[k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scaled, acc[k]);
                }
            }
        }
    }
    for (int k = 0; k < W * N; k++) out[k] = hsum512(_mm512_add_ps(acc[k], offsets[k]));
}

__attribute__((target(VNNI_TARGET), always_inline)) static inline void
rows_q8_0_q8_vnni(const uint8_t *row, const uint16_t *table, const int8_t *q, const float *d, int64_t blocks, int N,
                  float *out) {
    __m512 acc0[4], acc1[4], sc[4];
    for (int i = 0; i < N; i++) acc0[i] = acc1[i] = _mm512_setzero_ps();
    const int64_t cols = blocks * 32;
    // Block g of a pair in lanes 8g..8g+7.
    const __m512i octets = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
        int n = blocks - b0 < 16 ? (int)(blocks - b0) : 16;
        const uint8_t *blk = row + b0 * 34;
        for (int i = 0; i < N; i++) {
            sc[i] = vnni_scales(blk, 34, table ? table + b0 : NULL, NULL, n, d + i * blocks + b0, NULL, NULL);
        }
        for (int j = 0; j < n; j += 2) {
            int pair = n - j >= 2;
            __m512i w = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(blk + j * 34 + 2)));
            if (pair) w = _mm512_inserti64x4(w, _mm256_loadu_si256((const __m256i *)(blk + j * 34 + 36)), 1);
            else w = _mm512_zextsi256_si512(_mm512_castsi512_si256(w));
            // The weight's sign moves onto the activation (|w| · ±x), vpdpbusd taking the unsigned operand first.
            __mmask64 negative = _mm512_movepi8_mask(w);
            __m512i magnitude = _mm512_abs_epi8(w), lanes = _mm512_add_epi32(octets, _mm512_set1_epi32(j));
            for (int i = 0; i < N; i++) {
                const int8_t *xp = q + i * cols + (b0 + j) * 32;
                __m512i x = pair ? _mm512_loadu_si512(xp) : _mm512_maskz_loadu_epi8(0xffffffffull, xp);
                x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, x);
                __m512 scaled = _mm512_permutexvar_ps(lanes, sc[i]);
                if (j & 2) acc1[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scaled, acc1[i]);
                else acc0[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scaled, acc0[i]);
            }
        }
    }
    for (int i = 0; i < N; i++) out[i] = hsum512(_mm512_add_ps(acc0[i], acc1[i]));
}

/// One Q4_1 weight row against activation rows `0 ..< n` (n ≤ 4), with `n` a constant in each call.
__attribute__((target(VNNI_TARGET))) static void q4_1_rows(const uint8_t *row, const uint16_t *table, const int8_t *q,
                                                           const int8_t *grouped, const float *d, const float *s,
                                                           int64_t blocks, int n, float *out) {
    switch (n) {
    case 1: rows_q4_1_q8_vnni(&row, &table, 1, q, grouped, d, s, blocks, 1, out); break;
    case 2: rows_q4_1_q8_vnni(&row, &table, 1, q, grouped, d, s, blocks, 2, out); break;
    case 3: rows_q4_1_q8_vnni(&row, &table, 1, q, grouped, d, s, blocks, 3, out); break;
    default: rows_q4_1_q8_vnni(&row, &table, 1, q, grouped, d, s, blocks, 4, out); break;
    }
}

/// One Q8_0 weight row against activation rows `0 ..< n` (n ≤ 4), with `n` a constant in each call.
__attribute__((target(VNNI_TARGET))) static void q8_0_rows(const uint8_t *row, const uint16_t *table, const int8_t *q,
                                                           const float *d, int64_t blocks, int n, float *out) {
    switch (n) {
    case 1: rows_q8_0_q8_vnni(row, table, q, d, blocks, 1, out); break;
    case 2: rows_q8_0_q8_vnni(row, table, q, d, blocks, 2, out); break;
    case 3: rows_q8_0_q8_vnni(row, table, q, d, blocks, 3, out); break;
    default: rows_q8_0_q8_vnni(row, table, q, d, blocks, 4, out); break;
    }
}

__attribute__((target(VNNI_TARGET))) void cgraft_q8_product_vnni(int type, const uint8_t *w, int64_t row_bytes,
                                                                  const int64_t *row_order,
                                                                  const uint16_t *block_scales, int64_t per, int64_t r0,
                                                                  int64_t r1, int64_t blocks, const int8_t *q,
                                                                  const float *d, const float *s, int64_t m, float *y,
                                                                  int64_t ldy) {
    const int64_t cols = blocks * 32, stride = (blocks + 3) / 4 * 128;
    int8_t stack[16384], *heap = NULL, *grouped = NULL;
    if (type == CGRAFT_GGML_Q4_1) {
        size_t bytes = (size_t)(m * stride);
        grouped = bytes <= sizeof stack ? stack : (heap = malloc(bytes));
        // Without memory for the copy, the kernel regroups as it goes: same result, more work.
        if (grouped) regroup(q, m, blocks, grouped);
    }
    if (type == CGRAFT_GGML_Q4_1 && m == 1) {
        for (int64_t r = r0; r < r1; r += 4) {
            int count = (int)(r1 - r < 4 ? r1 - r : 4);
            const uint8_t *rows[4];
            const uint16_t *tables[4];
            cgraft_ggml_gather_rows(w, row_bytes, row_order, block_scales, per, r, count, rows, tables);
            float out[4];
            if (count == 4) rows_q4_1_q8_vnni(rows, tables, 4, q, grouped, d, s, blocks, 1, out);
            else rows_q4_1_q8_vnni(rows, tables, count, q, grouped, d, s, blocks, 1, out);
            for (int k = 0; k < count; k++) y[r + k] += out[k];
        }
    } else {
        for (int64_t r = r0; r < r1; r++) {
            const uint8_t *row;
            const uint16_t *table;
            cgraft_ggml_gather_rows(w, row_bytes, row_order, block_scales, per, r, 1, &row, &table);
            for (int64_t i = 0; i < m; i += 4) {
                int n = (int)(m - i < 4 ? m - i : 4);
                float out[4];
                if (type == CGRAFT_GGML_Q4_1) {
                    q4_1_rows(row, table, q + i * cols, grouped ? grouped + i * stride : NULL, d + i * blocks,
                              s + i * blocks, blocks, n, out);
                } else {
                    q8_0_rows(row, table, q + i * cols, d + i * blocks, blocks, n, out);
                }
                for (int j = 0; j < n; j++) y[(i + j) * ldy + r] += out[j];
            }
        }
    }
    free(heap);
}
#endif
