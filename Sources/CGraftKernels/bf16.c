// bfloat16 conversion: AVX-512 BF16's vcvtne2ps2bf16 where the CPU has it, the same rounding in portable C otherwise.
#include "CGraftKernels.h"
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>

int cgraft_cpu_has_avx512_bf16(void) {
    static int cached = -1;
    if (cached >= 0) return cached;
    unsigned a, b, c, d;
    int has = 0;
    // Leaf 7 subleaf 1, EAX bit 5: AVX512_BF16. It implies AVX-512 F (leaf 7 subleaf 0, EBX bit 16).
    if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (b & (1u << 16)) && __get_cpuid_count(7, 1, &a, &b, &c, &d)) {
        has = (a & (1u << 5)) != 0;
    }
    // The OS must save the ZMM state (XCR0 bits 5-7 with 1-2).
    if (has) {
        unsigned lo, hi;
        __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
        has = (lo & 0xe6) == 0xe6;
    }
    cached = has;
    return has;
}

/// Converts the longest prefix of whole 16-float blocks; returns how many floats it converted.
__attribute__((target("avx512f,avx512bf16")))
static size_t convert_avx512(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
        _mm512_storeu_si512((void *)(dst + i), (__m512i)pair);
    }
    for (; i + 16 <= n; i += 16) {
        __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(src + i));
        _mm256_storeu_si256((__m256i *)(dst + i), (__m256i)half);
    }
    return i;
}
#else
int cgraft_cpu_has_avx512_bf16(void) { return 0; }
#endif

static inline uint16_t round_one(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // quiet NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

void cgraft_f32_to_bf16(const float *src, uint16_t *dst, size_t n) {
#if defined(__x86_64__)
    size_t done = cgraft_cpu_has_avx512_bf16() ? convert_avx512(src, dst, n) : 0;
#else
    size_t done = 0;
#endif
    for (size_t i = done; i < n; i++) dst[i] = round_one(src[i]);
}

void cgraft_bf16_to_f32(const uint16_t *src, float *dst, size_t n) {
    for (size_t i = 0; i < n; i++) {
        uint32_t bits = (uint32_t)src[i] << 16;
        memcpy(dst + i, &bits, 4);
    }
}
