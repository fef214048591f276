// The fast mode's weights repacked into tiles of sixteen rows, interleaved block by block, for the int8 products of
// Q4_1 and Q8_0 matrices (as llama.cpp's CPU "repack" buffers interleave rows). In a tile, one vpdpbusd multiplies
// four columns of a block in all sixteen rows by the same four activation bytes (a broadcast), so a block's sum
// builds up in one int32 lane per row: no horizontal sums and no shuffles, and each weight vector serves every
// activation row of the batch. AVX2 does the same eight rows at a time with vpmaddubsw. A tile holds exactly the
// bytes of its sixteen rows, moved.
//
// Layout, per block of a tile:
// - Q4_1, 320 bytes: 4 × 16 dwords of packed nibbles (dword g·16 + r holds bytes 4g ..< 4g + 4 of row r's sixteen
//   nibble bytes: low nibbles are columns 4g ..< 4g + 4, high ones 16 + 4g ..< 20 + 4g), then the sixteen rows'
//   scales and their sixteen minimums as halves.
// - Q8_0, 544 bytes: 8 × 16 dwords (dword g·16 + r holds columns 4g ..< 4g + 4 of row r plus 128, as unsigned
//   bytes), then the sixteen scales. vpdpbusd multiplies unsigned by signed bytes, so the kernel subtracts
//   128 · Σx per block, which keeps the integer sum exact.
// Rows past the matrix's end are zero.
//
// Arithmetic per (weight row, activation row), the same in every kernel and for any batch: per block the exact
// int32 dot, then f = fma(dot, d_w · d_x, f) in block order; Q4_1 adds o = fma(m_w, s_x, o) in block order after,
// and the row gets y += f + o.
#include "CGraftKernels.h"
#include "ggml_internal.h"

#include <math.h>

/// Bytes per block of a tile (sixteen rows), or 0 for a type without tiles.
static int64_t tile_block_bytes(int type) {
    return type == CGRAFT_GGML_Q4_1 ? 320 : type == CGRAFT_GGML_Q8_0 ? 544 : 0;
}

int64_t cgraft_ggml_tiles_size(int type, int64_t rows, int64_t cols) {
    int64_t size = tile_block_bytes(type);
    if (!size || rows < 1 || cols < 32 || cols % 32) return -1;
    return (rows + 15) / 16 * (cols / 32) * size;
}

int cgraft_ggml_tiles(int type, const uint8_t *w, int64_t row_bytes, const int64_t *row_order, int64_t rows,
                      int64_t cols, uint8_t *tiles) {
    if (cgraft_ggml_tiles_size(type, rows, cols) < 0) return -1;
    const int64_t blocks = cols / 32, size = tile_block_bytes(type), tile_count = (rows + 15) / 16;
    const int q4 = type == CGRAFT_GGML_Q4_1;
    memset(tiles, 0, (size_t)(tile_count * blocks * size));
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *row = w + (row_order ? row_order[r] : r) * row_bytes;
        const int lane = (int)(r % 16);
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *o = tiles + ((r / 16) * blocks + b) * size;
            if (q4) {
                const uint8_t *blk = row + b * 20;
                for (int g = 0; g < 4; g++) memcpy(o + (g * 16 + lane) * 4, blk + 4 + 4 * g, 4);
                memcpy(o + 256 + 2 * lane, blk, 2);
                memcpy(o + 288 + 2 * lane, blk + 2, 2);
            } else {
                const uint8_t *blk = row + b * 34;
                for (int g = 0; g < 8; g++) {
                    for (int j = 0; j < 4; j++) o[(g * 16 + lane) * 4 + j] = (uint8_t)(blk[2 + 4 * g + j] ^ 0x80);
                }
                memcpy(o + 512 + 2 * lane, blk, 2);
            }
        }
    }
    return 0;
}

/// Lanes `lo ..< hi` of one tile against activation rows `0 ..< n`, one value at a time (the portable kernel).
static void tile_rows_portable(int q4, const uint8_t *tile, int64_t blocks, const int8_t *q, const float *d,
                               const float *s, int64_t n, float *y, int64_t ldy, int lo, int hi) {
    const int64_t size = q4 ? 320 : 544, cols = blocks * 32;
    for (int64_t i = 0; i < n; i++) {
        for (int r = lo; r < hi; r++) {
            float f = 0, o = 0;
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *t = tile + b * size;
                const int8_t *x = q + i * cols + b * 32;
                int32_t dot = 0;
                for (int g = 0; g < (q4 ? 4 : 8); g++) {
                    const uint8_t *p = t + (g * 16 + r) * 4;
                    for (int j = 0; j < 4; j++) {
                        if (q4) dot += (int32_t)(p[j] & 15) * x[4 * g + j] + (int32_t)(p[j] >> 4) * x[16 + 4 * g + j];
                        else dot += ((int32_t)p[j] - 128) * x[4 * g + j];
                    }
                }
                f = fmaf((float)dot, cgraft_half_to_float(t + (q4 ? 256 : 512) + 2 * r) * d[i * blocks + b], f);
            }
            if (q4) {
                for (int64_t b = 0; b < blocks; b++) {
                    o = fmaf(cgraft_half_to_float(tile + b * size + 288 + 2 * r), s[i * blocks + b], o);
                }
            }
            y[i * ldy + r] += f + o;
        }
    }
}

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

/// `case N:` of a switch over activation-row counts: `CALL(1, N)` for Q4_1, `CALL(0, N)` for Q8_0, so that each
/// kernel instance sees both as compiled constants.
#define CGRAFT_TILE_CASE(N, CALL)                                                                                      \
    case N:                                                                                                            \
        if (q4) CALL(1, N);                                                                                            \
        else CALL(0, N);                                                                                               \
        break;

/// Four activation bytes (`x`, unaligned) in every int32 lane.
__attribute__((target(VNNI_TARGET), always_inline)) static inline __m512i broadcast4(const int8_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return _mm512_set1_epi32(v);
}

/// One tile against activation rows `0 ..< N` (N ≤ 8, a constant in each instance), lanes `keep` stored.
/// `bias[i · blocks + b]` is 128 · Σx of block b of row i (Q8_0).
__attribute__((target(VNNI_TARGET), always_inline)) static inline void
tile_rows_vnni(int q4, const uint8_t *tile, int64_t blocks, const int8_t *q, const float *d, const float *s,
               const int32_t *bias, int N, float *y, int64_t ldy, __mmask16 keep) {
    const int64_t size = q4 ? 320 : 544, cols = blocks * 32;
    const __m512i nibble = _mm512_set1_epi8(15);
    __m512 f[8];
    for (int i = 0; i < N; i++) f[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *t = tile + b * size;
        // w[g] multiplies columns 4g ..< 4g + 4 of the block.
        __m512i w[8];
        if (q4) {
            for (int g = 0; g < 4; g++) {
                __m512i p = _mm512_loadu_si512(t + 64 * g);
                w[g] = _mm512_and_si512(p, nibble);
                w[4 + g] = _mm512_and_si512(_mm512_srli_epi16(p, 4), nibble);
            }
        } else {
            for (int g = 0; g < 8; g++) w[g] = _mm512_loadu_si512(t + 64 * g);
        }
        const __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(t + (q4 ? 256 : 512))));
        for (int i = 0; i < N; i++) {
            const int8_t *x = q + i * cols + b * 32;
            __m512i even = _mm512_setzero_si512(), odd = _mm512_setzero_si512();
            for (int g = 0; g < 8; g += 2) {
                even = _mm512_dpbusd_epi32(even, w[g], broadcast4(x + 4 * g));
                odd = _mm512_dpbusd_epi32(odd, w[g + 1], broadcast4(x + 4 * g + 4));
            }
            __m512i dot = _mm512_add_epi32(even, odd);
            if (!q4) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(bias[i * blocks + b]));
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scale, _mm512_set1_ps(d[i * blocks + b])), f[i]);
        }
    }
    for (int i = 0; i < N; i++) {
        if (q4) {
            __m512 o = _mm512_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                __m512 minimum = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(tile + b * size + 288)));
                o = _mm512_fmadd_ps(minimum, _mm512_set1_ps(s[i * blocks + b]), o);
            }
            f[i] = _mm512_add_ps(f[i], o);
        }
        float *out = y + i * ldy;
        _mm512_mask_storeu_ps(out, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, out), f[i]));
    }
}

/// One half of a tile's block (`half` 0: rows 0–7, 1: rows 8–15) as AVX2 operands: `w[g]` holds columns
/// 4g ..< 4g + 4 of eight rows. Q4_1's are its nibbles; Q8_0's are the magnitudes |w| (its bytes signed again by
/// xor 128), with the signed bytes in `sign[g]` to move onto the activations.
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
half_operands_avx2(int q4, const uint8_t *t, int half, __m256i w[8], __m256i sign[8]) {
    if (q4) {
        const __m256i nibble = _mm256_set1_epi8(15);
        for (int g = 0; g < 4; g++) {
            __m256i p = _mm256_loadu_si256((const __m256i *)(t + 64 * g + 32 * half));
            w[g] = _mm256_and_si256(p, nibble);
            w[4 + g] = _mm256_and_si256(_mm256_srli_epi16(p, 4), nibble);
        }
        return;
    }
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    for (int g = 0; g < 8; g++) {
        sign[g] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(t + 64 * g + 32 * half)), flip);
        w[g] = _mm256_abs_epi8(sign[g]);
    }
}

/// Eight rows' exact int32 block dots against activation block `x` with vpmaddubsw (unsigned × signed byte pairs
/// summed into int16). Q4_1's nibbles (≤ 15) against |x| ≤ 127 keep all eight groups' pair sums within int16
/// (≤ 30480); Q8_0's |w| ≤ 128 against x carrying w's sign give pair sums ≤ 32512, widened group by group.
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256i
half_dot_avx2(int q4, const __m256i w[8], const __m256i sign[8], const int8_t *x) {
    const __m256i ones = _mm256_set1_epi16(1);
    if (q4) {
        __m256i sum16 = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            int32_t a;
            memcpy(&a, x + (g < 4 ? 4 * g : 16 + 4 * (g - 4)), 4);
            sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(a)));
        }
        return _mm256_madd_epi16(sum16, ones);
    }
    __m256i sum = _mm256_setzero_si256();
    for (int g = 0; g < 8; g++) {
        int32_t a;
        memcpy(&a, x + 4 * g, 4);
        __m256i signed_x = _mm256_sign_epi8(_mm256_set1_epi32(a), sign[g]);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w[g], signed_x), ones));
    }
    return sum;
}

/// One half of a tile (eight rows) against activation rows `0 ..< N` (N ≤ 4, a constant in each instance), lanes
/// `keep` (a bit per row of the half) stored. The same arithmetic as the other kernels, eight rows per vector.
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void
tile_half_avx2(int q4, const uint8_t *tile, int half, int64_t blocks, const int8_t *q, const float *d,
               const float *s, int N, float *y, int64_t ldy, unsigned keep) {
    const int64_t size = q4 ? 320 : 544, cols = blocks * 32;
    __m256 f[4];
    for (int i = 0; i < N; i++) f[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *t = tile + b * size;
        const __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + (q4 ? 256 : 512) + 16 * half)));
        __m256i w[8], sign[8];
        half_operands_avx2(q4, t, half, w, sign);
        for (int i = 0; i < N; i++) {
            __m256i dot = half_dot_avx2(q4, w, sign, q + i * cols + b * 32);
            const __m256 both = _mm256_mul_ps(scale, _mm256_set1_ps(d[i * blocks + b]));
            f[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), both, f[i]);
        }
    }
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i mask = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)keep), lane), lane);
    for (int i = 0; i < N; i++) {
        if (q4) {
            __m256 o = _mm256_setzero_ps();
            for (int64_t b = 0; b < blocks; b++) {
                __m256 minimum = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tile + b * size + 288 + 16 * half)));
                o = _mm256_fmadd_ps(minimum, _mm256_set1_ps(s[i * blocks + b]), o);
            }
            f[i] = _mm256_add_ps(f[i], o);
        }
        float *out = y + i * ldy + 8 * half;
        _mm256_maskstore_ps(out, mask, _mm256_add_ps(_mm256_maskload_ps(out, mask), f[i]));
    }
}

/// One tile against activation rows `0 ..< n`, four at a time, each count a compiled constant; rows `lo ..< hi`
/// of the tile stored.
__attribute__((target("avx2,fma,f16c"))) static void tile_avx2(int q4, const uint8_t *tile, int64_t blocks,
                                                               const int8_t *q, const float *d, const float *s,
                                                               int64_t n, float *y, int64_t ldy, int lo, int hi) {
    const int64_t cols = blocks * 32;
    const unsigned keep = ((1u << hi) - 1) & ~((1u << lo) - 1);
    for (int half = 0; half < 2; half++) {
        const unsigned half_keep = (keep >> (8 * half)) & 0xff;
        if (!half_keep) continue;
        for (int64_t i = 0; i < n; i += 4) {
            const int8_t *qi = q + i * cols;
            const float *di = d + i * blocks, *si = s ? s + i * blocks : NULL;
            float *yi = y + i * ldy;
#define CGRAFT_HALF(Q4, N) tile_half_avx2(Q4, tile, half, blocks, qi, di, si, N, yi, ldy, half_keep)
            switch (n - i < 4 ? n - i : 4) {
                CGRAFT_TILE_CASE(1, CGRAFT_HALF) CGRAFT_TILE_CASE(2, CGRAFT_HALF) CGRAFT_TILE_CASE(3, CGRAFT_HALF)
                default: CGRAFT_TILE_CASE(4, CGRAFT_HALF)
            }
#undef CGRAFT_HALF
        }
    }
}

/// One tile against activation rows `0 ..< n`, eight at a time, each count a compiled constant.
__attribute__((target(VNNI_TARGET))) static void tile_vnni(int q4, const uint8_t *tile, int64_t blocks,
                                                           const int8_t *q, const float *d, const float *s,
                                                           const int32_t *bias, int64_t n, float *y, int64_t ldy,
                                                           __mmask16 keep) {
    const int64_t cols = blocks * 32;
    for (int64_t i = 0; i < n; i += 8) {
        const int8_t *qi = q + i * cols;
        const float *di = d + i * blocks, *si = s ? s + i * blocks : NULL;
        const int32_t *bi = bias ? bias + i * blocks : NULL;
        float *yi = y + i * ldy;
#define CGRAFT_ROWS(Q4, N) tile_rows_vnni(Q4, tile, blocks, qi, di, si, bi, N, yi, ldy, keep)
        switch (n - i < 8 ? n - i : 8) {
            CGRAFT_TILE_CASE(1, CGRAFT_ROWS) CGRAFT_TILE_CASE(2, CGRAFT_ROWS) CGRAFT_TILE_CASE(3, CGRAFT_ROWS)
            CGRAFT_TILE_CASE(4, CGRAFT_ROWS) CGRAFT_TILE_CASE(5, CGRAFT_ROWS) CGRAFT_TILE_CASE(6, CGRAFT_ROWS)
            CGRAFT_TILE_CASE(7, CGRAFT_ROWS) default: CGRAFT_TILE_CASE(8, CGRAFT_ROWS)
        }
#undef CGRAFT_ROWS
    }
}
#endif

int cgraft_ggml_tiles_product_q8(int type, const uint8_t *tiles, int64_t rows, int64_t r0, int64_t r1, int64_t cols,
                                 const int8_t *q, const float *scales, const float *sums, int64_t m, float *y,
                                 int64_t ldy) {
    if (cgraft_ggml_tiles_size(type, rows, cols) < 0 || m < 1 || r0 < 0 || r1 > rows || r0 >= r1) return -1;
    const int64_t blocks = cols / 32, tile_bytes = blocks * tile_block_bytes(type);
    const int q4 = type == CGRAFT_GGML_Q4_1;
    const int level = cgraft_ggml_int8_kernel_level();
    // Q8_0's 128 · Σx per block, for as many activation rows at a time as the buffer holds.
    int32_t bias[4096];
    const int64_t chunk = q4 ? m : (blocks <= 4096 ? 4096 / blocks : 0);
    if (!chunk) return -1;
    for (int64_t i0 = 0; i0 < m; i0 += chunk) {
        const int64_t n = m - i0 < chunk ? m - i0 : chunk;
        const int8_t *qi = q + i0 * cols;
        if (!q4 && level >= 2) {
            for (int64_t k = 0; k < n * blocks; k++) {
                int32_t sum = 0;
                for (int j = 0; j < 32; j++) sum += qi[k * 32 + j];
                bias[k] = 128 * sum;
            }
        }
        for (int64_t t = r0 / 16; t * 16 < r1; t++) {
            const int lo = (int)((r0 > t * 16 ? r0 : t * 16) - t * 16), hi = (int)((r1 < t * 16 + 16 ? r1 : t * 16 + 16) - t * 16);
            const uint8_t *tile = tiles + t * tile_bytes;
            float *out = y + i0 * ldy + t * 16;
#if defined(__x86_64__) || defined(__i386__)
            if (level >= 2) {
                __mmask16 keep = (__mmask16)(((1u << hi) - 1) & ~((1u << lo) - 1));
                tile_vnni(q4, tile, blocks, qi, scales + i0 * blocks, q4 ? sums + i0 * blocks : NULL, q4 ? NULL : bias,
                          n, out, ldy, keep);
                continue;
            }
            if (level == 1) {
                tile_avx2(q4, tile, blocks, qi, scales + i0 * blocks, q4 ? sums + i0 * blocks : NULL, n, out, ldy, lo,
                          hi);
                continue;
            }
#endif
            (void)level;
            tile_rows_portable(q4, tile, blocks, qi, scales + i0 * blocks, q4 ? sums + i0 * blocks : NULL, n, out,
                               ldy, lo, hi);
        }
    }
    return 0;
}
