/* The machine's float32 GEMM ceiling through OpenBLAS: cblas_sgemm GFLOP/s for square and for the shapes of a
 * MiniLM (B32xT64: 2048 tokens x 384 hidden, FFN 1536) step, on as many threads as OPENBLAS_NUM_THREADS says.
 * Build: cc -O2 bench/compare/sgemm_probe.c -o sgemm_probe $(pkg-config --cflags --libs openblas) -lm
 * Run:   OPENBLAS_NUM_THREADS=1 ./sgemm_probe; OPENBLAS_NUM_THREADS=2 ./sgemm_probe
 * Prints figures; asserts nothing. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double clock_s(clockid_t id) {
    struct timespec ts;
    clock_gettime(id, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}
static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu_now(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

/* GFLOP per CPU-second of the last probe (all threads' CPU time, spinning included): on a shared machine wall
 * time shrinks with the share of the cores this process gets; CPU time much less. */
static double last_cpu_rate;

/* Median-of-5 GFLOP/s of C[m,n] = A[m,k] * B[k,n] (B transposed when tb, as a Linear's weight is stored). */
static double probe(int m, int n, int k, int tb) {
    float *a = malloc(sizeof(float) * (size_t)m * k), *b = malloc(sizeof(float) * (size_t)k * n);
    float *c = malloc(sizeof(float) * (size_t)m * n);
    for (size_t i = 0; i < (size_t)m * k; i++) a[i] = (float)(i % 17) * 0.01f;
    for (size_t i = 0; i < (size_t)k * n; i++) b[i] = (float)(i % 13) * 0.01f;
    double flop = 2.0 * m * n * k, best[5], cpu0, cpu_total = 0;
    int reps = (int)(2e9 / flop) + 1;
    for (int w = 0; w < 2; w++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1, a, k, b, tb ? k : n, 0, c, n);
    for (int r = 0; r < 5; r++) {
        double t = now();
        cpu0 = cpu_now();
        for (int i = 0; i < reps; i++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1, a, k, b, tb ? k : n, 0, c, n);
        best[r] = flop * reps / (now() - t) / 1e9;
        cpu_total += cpu_now() - cpu0;
    }
    last_cpu_rate = flop * reps * 5 / cpu_total / 1e9;
    for (int i = 0; i < 5; i++)
        for (int j = i + 1; j < 5; j++)
            if (best[j] < best[i]) { double x = best[i]; best[i] = best[j]; best[j] = x; }
    free(a); free(b); free(c);
    return best[2];
}

int main(void) {
    const char *threads = getenv("OPENBLAS_NUM_THREADS");
    printf("OpenBLAS %s, core %s, %s thread(s)\n", openblas_get_config(), openblas_get_corename(),
           threads ? threads : "default");
    static const struct { const char *name; int m, n, k, tb; } shapes[] = {
        {"1024x1024x1024", 1024, 1024, 1024, 0}, {"2048x384x384   (MiniLM q/v)", 2048, 384, 384, 1},
        {"2048x1536x384  (MiniLM FFN up)", 2048, 1536, 384, 1}, {"2048x384x1536  (MiniLM FFN down)", 2048, 384, 1536, 1},
        {"512x576x576    (SmolLM2 q/o)", 512, 576, 576, 1}, {"512x1536x576   (SmolLM2 gate/up)", 512, 1536, 576, 1},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) {
        double wall = probe(shapes[i].m, shapes[i].n, shapes[i].k, shapes[i].tb);
        printf("sgemm %-32s %7.1f GFLOP/s wall, %7.1f GFLOP per CPU-second\n", shapes[i].name, wall, last_cpu_rate);
    }
    return 0;
}
