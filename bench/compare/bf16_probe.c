/* The machine's bfloat16 ceilings beside its float32 ones, for issue 12 item 3 ("state the GFLOP/s each reaches
 * against the machine's float32 and bf16 peaks"):
 *   - the instruction peaks of one core: a register-resident loop of AVX-512 `vfmadd231ps` (float32 FMA, 32 FLOP
 *     per instruction) and of `vdpbf16ps` (bfloat16 pair dot products into float32, 64 FLOP per instruction),
 *     twelve independent accumulators kept in registers, so latency never limits;
 *   - oneDNN's bfloat16 matmul (the kernel Graft's bfloat16 mode calls) on the shapes of workloads a and b, on one
 *     OpenMP thread and on two.
 * Build: cc -O2 -fopenmp bench/compare/bf16_probe.c -o bf16_probe -ldnnl
 * Run:   ./bf16_probe        (bench/compare/profile builds and runs it). Prints figures; asserts nothing. */
#include <dnnl.h>
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

#define ACC 12
#define ITERS 20000000L

__attribute__((target("avx512f"))) static double fma_peak(void) {
    __m512 acc[ACC], x = _mm512_set1_ps(1e-7f), y = _mm512_set1_ps(0.999f);
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
    double t = now();
    for (long it = 0; it < ITERS; it++)
#pragma GCC unroll 12
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_fmadd_ps(acc[i], y, x);
    double s = now() - t;
    float sink = 0;
    for (int i = 0; i < ACC; i++) sink += _mm512_reduce_add_ps(acc[i]);
    if (sink == 12345.0f) puts("");
    return 32.0 * ACC * ITERS / s / 1e9;
}

__attribute__((target("avx512f,avx512bf16"))) static double bf16_peak(void) {
    __m512 acc[ACC];
    __m512bh x = (__m512bh)_mm512_set1_epi16(0x3380), y = (__m512bh)_mm512_set1_epi16(0x3f80);
    for (int i = 0; i < ACC; i++) acc[i] = _mm512_set1_ps((float)i);
    double t = now();
    for (long it = 0; it < ITERS; it++)
#pragma GCC unroll 12
        for (int i = 0; i < ACC; i++) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
    double s = now() - t;
    float sink = 0;
    for (int i = 0; i < ACC; i++) sink += _mm512_reduce_add_ps(acc[i]);
    if (sink == 12345.0f) puts("");
    return 64.0 * ACC * ITERS / s / 1e9;
}

/* Median-of-5 GFLOP/s of C[m,n] (float32) = A[m,k] · Bᵀ (bfloat16, B stored [n,k] like a Linear weight). */
static double matmul(dnnl_engine_t engine, dnnl_stream_t stream, int64_t m, int64_t n, int64_t k) {
    dnnl_memory_desc_t ad, bd, cd;
    dnnl_dims_t adims = {m, k}, bdims = {k, n}, cdims = {m, n};
    dnnl_memory_desc_init_by_tag(&ad, 2, adims, dnnl_bf16, dnnl_ab);
    dnnl_memory_desc_init_by_tag(&bd, 2, bdims, dnnl_bf16, dnnl_ba);
    dnnl_memory_desc_init_by_tag(&cd, 2, cdims, dnnl_f32, dnnl_ab);
    dnnl_matmul_desc_t md;
    dnnl_primitive_desc_t pd;
    dnnl_primitive_t prim;
    if (dnnl_matmul_desc_init(&md, &ad, &bd, NULL, &cd) || dnnl_primitive_desc_create(&pd, &md, NULL, engine, NULL)
        || dnnl_primitive_create(&prim, pd))
        return 0;
    uint16_t *a = malloc(2 * (size_t)(m * k)), *b = malloc(2 * (size_t)(n * k));
    float *c = malloc(4 * (size_t)(m * n));
    for (int64_t i = 0; i < m * k; i++) a[i] = 0x3c00 + (uint16_t)(i % 7);
    for (int64_t i = 0; i < n * k; i++) b[i] = 0x3c00 + (uint16_t)(i % 5);
    dnnl_memory_t am, bm, cm;
    dnnl_memory_create(&am, &ad, engine, a);
    dnnl_memory_create(&bm, &bd, engine, b);
    dnnl_memory_create(&cm, &cd, engine, c);
    dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
    double flop = 2.0 * m * n * k, best[5];
    int reps = (int)(2e9 / flop) + 1;
    for (int w = 0; w < 2; w++) dnnl_primitive_execute(prim, stream, 3, args), dnnl_stream_wait(stream);
    for (int r = 0; r < 5; r++) {
        double t = now();
        for (int i = 0; i < reps; i++) dnnl_primitive_execute(prim, stream, 3, args);
        dnnl_stream_wait(stream);
        best[r] = flop * reps / (now() - t) / 1e9;
    }
    for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++)
            if (best[j] < best[i]) { double x = best[i]; best[i] = best[j]; best[j] = x; }
    dnnl_memory_destroy(am), dnnl_memory_destroy(bm), dnnl_memory_destroy(cm);
    dnnl_primitive_destroy(prim), dnnl_primitive_desc_destroy(pd);
    free(a), free(b), free(c);
    return best[2];
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f")) {
        puts("bf16_probe: this CPU has no AVX-512; nothing to measure");
        return 0;
    }
    printf("float32 FMA peak, 1 core:    %7.1f GFLOP/s (vfmadd231ps zmm)\n", fma_peak());
    if (__builtin_cpu_supports("avx512bf16"))
        printf("bfloat16 dot peak, 1 core:   %7.1f GFLOP/s (vdpbf16ps zmm)\n", bf16_peak());
    else
        puts("bfloat16 dot peak: this CPU has no AVX-512 BF16");
    dnnl_engine_t engine;
    dnnl_stream_t stream;
    if (dnnl_engine_create(&engine, dnnl_cpu, 0) || dnnl_stream_create(&stream, engine, dnnl_stream_default_flags)) {
        puts("bf16_probe: oneDNN has no CPU engine");
        return 0;
    }
    static const struct { const char *name; int64_t m, n, k; } shapes[] = {
        {"1024x1024x1024", 1024, 1024, 1024},          {"2048x384x384   (MiniLM q/v)", 2048, 384, 384},
        {"2048x1536x384  (MiniLM FFN up)", 2048, 1536, 384}, {"2048x384x1536  (MiniLM FFN down)", 2048, 384, 1536},
        {"512x576x576    (SmolLM2 q/o)", 512, 576, 576}, {"512x1536x576   (SmolLM2 gate/up)", 512, 1536, 576},
    };
    for (int threads = 1; threads <= 2; threads++) {
        omp_set_num_threads(threads);
        for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
            printf("oneDNN bf16 matmul %-32s %d thread(s): %7.1f GFLOP/s\n", shapes[i].name, threads,
                   matmul(engine, stream, shapes[i].m, shapes[i].n, shapes[i].k));
    }
    dnnl_stream_destroy(stream);
    dnnl_engine_destroy(engine);
    return 0;
}
