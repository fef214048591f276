// The fast mode's LoRA down projection against the activations the base product already quantized
// (cgraft_q8_quantize_rows: int8 per block of 32, one scale d[b] per block) and A's int8 copy (cgraft_int8_rows, one
// scale per rank component): h[k] = scales[k] · Σ_b d[b] · Σ_{j in block b} a[k·in + j] · q[j].
//
// Within a block, eight lanes each sum four products in integers (exact); each lane is then scaled by d[b] and
// accumulated in float with a fused multiply-add, and the eight lanes are added in a fixed tree. The AVX2 path
// (vpmaddubsw, vpmaddwd, vfmadd) and the portable loop do the same operations in the same order, so they give the
// same bits.
#include "CGraftKernels.h"
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define LORA_DOWN_Q8_X86 1
#include <immintrin.h>
#define AVX2_FMA __attribute__((target("avx2,fma")))
#endif

enum { QBLOCK = 32, LANES = 8 };

/// The lanes' total, added as the AVX2 reduction adds them: (0+4, 1+5, 2+6, 3+7), then pairs, then the two halves.
static float lane_total(const float *v) {
    float s0 = v[0] + v[4], s1 = v[1] + v[5], s2 = v[2] + v[6], s3 = v[3] + v[7];
    float t0 = s0 + s2, t1 = s1 + s3;
    return t0 + t1;
}

/// Σ_b d[b] · Σ_{j in b} a[j] · q[j] over `blocks` blocks, lane by lane as the AVX2 path computes it.
static float dot_portable(const int8_t *a, const int8_t *q, const float *d, int64_t blocks) {
    float lane[LANES] = {0};
    for (int64_t b = 0; b < blocks; b++)
        for (int l = 0; l < LANES; l++) {
            int32_t s = 0;
            for (int t = 0; t < 4; t++) s += (int32_t)a[b * QBLOCK + 4 * l + t] * q[b * QBLOCK + 4 * l + t];
            lane[l] = fmaf((float)s, d[b], lane[l]);
        }
    return lane_total(lane);
}

#ifdef LORA_DOWN_Q8_X86
static int has_avx2_fma(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return cached;
}

AVX2_FMA static float total_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

/// Eight lanes of four products each of one block: |a| · (q · sign a) pairwise (vpmaddubsw; |a|, |q| ≤ 127, so a
/// pair stays below 2^15), then pairs of pairs (vpmaddwd).
AVX2_FMA static inline __m256i block_lanes(__m256i a, __m256i q) {
    __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(a, a), _mm256_sign_epi8(q, a));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/// Four components `a`, `a + in`, `a + 2·in`, `a + 3·in` at once, sharing each block of q.
AVX2_FMA static void dot4_avx2(const int8_t *a, int64_t in, const int8_t *q, const float *d, int64_t blocks,
                               float *out) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < blocks; b++) {
        __m256i qb = _mm256_loadu_si256((const __m256i *)(q + b * QBLOCK));
        __m256 db = _mm256_set1_ps(d[b]);
        for (int r = 0; r < 4; r++) {
            __m256i ab = _mm256_loadu_si256((const __m256i *)(a + r * in + b * QBLOCK));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes(ab, qb)), db, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = total_avx2(acc[r]);
}

AVX2_FMA static float dot_avx2(const int8_t *a, const int8_t *q, const float *d, int64_t blocks) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i ab = _mm256_loadu_si256((const __m256i *)(a + b * QBLOCK));
        __m256i qb = _mm256_loadu_si256((const __m256i *)(q + b * QBLOCK));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(block_lanes(ab, qb)), _mm256_set1_ps(d[b]), acc);
    }
    return total_avx2(acc);
}
#endif

void cgraft_lora_down_q8(const int8_t *q, const float *d, int64_t in, const int8_t *a, const float *scales,
                         int64_t rank, float *h) {
    if (in % QBLOCK != 0 || rank < 1) return;
    int64_t blocks = in / QBLOCK, k = 0;
    for (int64_t i = 0; i < rank * in; i += 64) __builtin_prefetch(a + i);
#ifdef LORA_DOWN_Q8_X86
    if (has_avx2_fma()) {
        for (; k + 4 <= rank; k += 4) {
            float sums[4];
            dot4_avx2(a + k * in, in, q, d, blocks, sums);
            for (int r = 0; r < 4; r++) h[k + r] = scales[k + r] * sums[r];
        }
        for (; k < rank; k++) h[k] = scales[k] * dot_avx2(a + k * in, q, d, blocks);
        return;
    }
#endif
    for (; k < rank; k++) h[k] = scales[k] * dot_portable(a + k * in, q, d, blocks);
}

float cgraft_lora_down_q8_portable_dot(const int8_t *q, const float *d, int64_t in, const int8_t *a) {
    return in % QBLOCK == 0 ? dot_portable(a, q, d, in / QBLOCK) : NAN;
}
