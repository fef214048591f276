/* The machine's float32 GEMM ceiling through OpenBLAS: cblas_sgemm GFLOP/s for square and for the shapes of a
 * MiniLM (B32xT64: 2048 tokens x 384 hidden, FFN 1536) step, on as many threads as OPENBLAS_NUM_THREADS says.
 * Build: cc -O2 bench/compare/sgemm_probe.c -o sgemm_probe $(pkg-config --cflags --libs openblas) -lm
 * Run:   OPENBLAS_NUM_THREADS=1 ./sgemm_probe; OPENBLAS_NUM_THREADS=2 ./sgemm_probe
 * Prints figures; asserts nothing. */
#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* Median-of-5 GFLOP/s of C[m,n] = A[m,k] * B[k,n] (B transposed when tb, as a Linear's weight is stored). */
static double probe(int m, int n, int k, int tb) {
    float *a = malloc(sizeof(float) * (size_t)m * k), *b = malloc(sizeof(float) * (size_t)k * n);
    float *c = malloc(sizeof(float) * (size_t)m * n);
    for (size_t i = 0; i < (size_t)m * k; i++) a[i] = (float)(i % 17) * 0.01f;
    for (size_t i = 0; i < (size_t)k * n; i++) b[i] = (float)(i % 13) * 0.01f;
    double flop = 2.0 * m * n * k, best[5];
    int reps = (int)(2e9 / flop) + 1;
    for (int w = 0; w < 2; w++)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1, a, k, b, tb ? k : n, 0, c, n);
    for (int r = 0; r < 5; r++) {
        double t = now();
        for (int i = 0; i < reps; i++)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n, k, 1, a, k, b, tb ? k : n, 0, c, n);
        best[r] = flop * reps / (now() - t) / 1e9;
    }
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
    printf("sgemm 1024x1024x1024          %7.1f GFLOP/s\n", probe(1024, 1024, 1024, 0));
    printf("sgemm 2048x384x384   (q/v)    %7.1f GFLOP/s\n", probe(2048, 384, 384, 1));
    printf("sgemm 2048x1536x384  (FFN up) %7.1f GFLOP/s\n", probe(2048, 1536, 384, 1));
    printf("sgemm 2048x384x1536  (FFN dn) %7.1f GFLOP/s\n", probe(2048, 384, 1536, 1));
    printf("sgemm 512x576x576    (Smol)   %7.1f GFLOP/s\n", probe(512, 576, 576, 1));
    printf("sgemm 512x1536x576   (Smol up)%7.1f GFLOP/s\n", probe(512, 1536, 576, 1));
    return 0;
}
