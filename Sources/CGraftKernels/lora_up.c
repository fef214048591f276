// The float32 up projection of a decoding step's LoRA update, y[o] += scale · Σ_k b[o·rank + k] · h[k] for o in a
// range of output rows. Each output is summed in eight lanes (lane l takes the components k ≡ l mod 8, by fused
// multiply-adds in order of k) and the lanes are then added as a tree, ((0+1)+(2+3))+((4+5)+(6+7)): with AVX2,
// eight outputs' lanes are reduced together by horizontal adds in that order, so a short rank costs a few
// instructions per output instead of a chain of dependent scalar adds. An output gets the same value whichever
// range computes it, on every path.
#include "CGraftKernels.h"
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

enum { LANES = 8 };

/// h padded with zeros to a whole number of lanes (ranks up to 1024 on the stack).
enum { MAX_RANK = 1024 };

/// Output `o`'s lanes, then their tree sum: the portable form of what the AVX2 path computes.
static float output_sum(const float *h, int64_t rank, const float *row) {
    float lane[LANES] = {0};
    for (int64_t k = 0; k < rank; k++) lane[k % LANES] = fmaf(row[k], h[k], lane[k % LANES]);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

static void up_portable(const float *h, int64_t rank, const float *b, int64_t begin, int64_t end, float scale,
                        float *y) {
    for (int64_t o = begin; o < end; o++) y[o] = fmaf(scale, output_sum(h, rank, b + o * rank), y[o]);
}

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define AVX2 __attribute__((target("avx2,fma")))

/// Output `o`'s eight lanes (the last chunk of B's row read under a mask, h already padded with zeros).
AVX2 static inline __m256 output_lanes(const float *hp, int64_t rank, const float *row, __m256i tail) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + LANES <= rank; k += LANES) acc = _mm256_fmadd_ps(_mm256_loadu_ps(row + k), _mm256_loadu_ps(hp + k), acc);
    if (k < rank) acc = _mm256_fmadd_ps(_mm256_maskload_ps(row + k, tail), _mm256_loadu_ps(hp + k), acc);
    return acc;
}

/// The tree sums of eight outputs' lanes, output i in lane i.
AVX2 static inline __m256 tree_sums(const __m256 v[8]) {
    __m256 t0 = _mm256_hadd_ps(v[0], v[1]), t1 = _mm256_hadd_ps(v[2], v[3]);
    __m256 t2 = _mm256_hadd_ps(v[4], v[5]), t3 = _mm256_hadd_ps(v[6], v[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

AVX2 static void up_avx2(const float *h, int64_t rank, const float *b, int64_t begin, int64_t end, float scale,
                         float *y) {
    float hp[MAX_RANK + LANES];
    int64_t padded = (rank + LANES - 1) / LANES * LANES;
    for (int64_t k = 0; k < padded; k++) hp[k] = k < rank ? h[k] : 0.0f;
    int left = (int)(rank % LANES);
    __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 scales = _mm256_set1_ps(scale);
    int64_t o = begin;
    for (; o + 8 <= end; o += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; i++) v[i] = output_lanes(hp, rank, b + (o + i) * rank, tail);
        _mm256_storeu_ps(y + o, _mm256_fmadd_ps(scales, tree_sums(v), _mm256_loadu_ps(y + o)));
    }
    for (; o < end; o++) {
        float lane[LANES];
        _mm256_storeu_ps(lane, output_lanes(hp, rank, b + o * rank, tail));
        float sum = ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
        y[o] = fmaf(scale, sum, y[o]);
    }
}

static int has_avx2(void) {
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return cached;
}
#endif

void cgraft_lora_up(const float *h, int64_t rank, const float *b, int64_t begin, int64_t end, float scale, float *y) {
#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
    if (rank <= MAX_RANK && has_avx2()) {
        up_avx2(h, rank, b, begin, end, scale, y);
        return;
    }
#endif
    up_portable(h, rank, b, begin, end, scale, y);
}
