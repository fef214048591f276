// The float32 down projection of a decoding step's low-rank update, h = A x for one activation row (A is
// [rank, in]; the up projection is in lora_up.c, the fast mode's int8 forms in lora_int8.c). It streams A once;
// compiled three times by target_clones (AVX-512, AVX2, baseline x86-64) and picked at load time, with independent
// partial sums so every width vectorizes without reassociating a single sum.
#include "CGraftKernels.h"
#include <stdint.h>

#if defined(__x86_64__) && defined(__clang__) && defined(__linux__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#define LANES 16

/// Σ_j a[j] · x[j] over `n` floats, in LANES independent partial sums.
__attribute__((always_inline)) static inline float dot(const float *restrict a, const float *restrict x, int64_t n) {
    float acc[LANES] = {0};
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[j + l] * x[j + l];
    float sum = 0;
    for (; j < n; j++) sum += a[j] * x[j];
    for (int l = 0; l < LANES; l++) sum += acc[l];
    return sum;
}

CLONES void cgraft_lora_down(const float *x, int64_t in, const float *a, int64_t rank, float *h) {
    for (int64_t k = 0; k < rank; k++) h[k] = dot(a + k * in, x, in);
}
