/* System libraries Graft's Swift modules call directly, and small C shims (prefixed cgraft_). */
#ifndef CGRAFT_SYSTEM_H
#define CGRAFT_SYSTEM_H

#include <cblas.h>
#include <stdio.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#if defined(__linux__)
#include <errno.h>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* OpenBLAS extensions (declared in OpenBLAS's cblas.h; repeated so the shim builds against any cblas.h). */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
char *openblas_get_corename(void);

/* LAPACK (shipped in OpenBLAS): divide-and-conquer SVD of a column-major m×n matrix, Fortran calling convention
   (every argument by pointer; the trailing length is gfortran's hidden length of the `jobz` string). */
void sgesdd_(const char *jobz, const int *m, const int *n, float *a, const int *lda, float *s, float *u,
             const int *ldu, float *vt, const int *ldvt, float *work, const int *lwork, int *iwork, int *info,
             size_t jobz_len);

/* Thin SVD (jobz = 'S') of a column-major m×n matrix `a` (overwritten); lwork = -1 queries the work size into
   work[0]. Returns LAPACK's info (0 on success, > 0 when the iteration did not converge). */
static inline int cgraft_sgesdd_thin(int m, int n, float *a, int lda, float *s, float *u, int ldu, float *vt, int ldvt,
                                     float *work, int lwork, int *iwork) {
    int info = 0;
    sgesdd_("S", &m, &n, a, &lda, s, u, &ldu, vt, &ldvt, work, &lwork, iwork, &info, 1);
    return info;
}

/* The same in Float64 (dgesdd). */
void dgesdd_(const char *jobz, const int *m, const int *n, double *a, const int *lda, double *s, double *u,
             const int *ldu, double *vt, const int *ldvt, double *work, const int *lwork, int *iwork, int *info,
             size_t jobz_len);

static inline int cgraft_dgesdd_thin(int m, int n, double *a, int lda, double *s, double *u, int ldu, double *vt,
                                     int ldvt, double *work, int lwork, int *iwork) {
    int info = 0;
    dgesdd_("S", &m, &n, a, &lda, s, u, &ldu, vt, &ldvt, work, &lwork, iwork, &info, 1);
    return info;
}

/* LAPACK: Householder QR of a column-major m×n matrix (sgeqrf: R in the upper triangle, reflectors below), and
   the explicit first k columns of Q from those reflectors (sorgqr). lwork = -1 queries the work size. */
void sgeqrf_(const int *m, const int *n, float *a, const int *lda, float *tau, float *work, const int *lwork, int *info);
void sorgqr_(const int *m, const int *n, const int *k, float *a, const int *lda, const float *tau, float *work,
             const int *lwork, int *info);

static inline int cgraft_sgeqrf(int m, int n, float *a, int lda, float *tau, float *work, int lwork) {
    int info = 0;
    sgeqrf_(&m, &n, a, &lda, tau, work, &lwork, &info);
    return info;
}

static inline int cgraft_sorgqr(int m, int n, int k, float *a, int lda, const float *tau, float *work, int lwork) {
    int info = 0;
    sorgqr_(&m, &n, &k, a, &lda, tau, work, &lwork, &info);
    return info;
}

/* Line-buffers stdout (a command-line tool's reports then interleave in order with progress on stderr). */
static inline void cgraft_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

/* Fixes glibc's mmap threshold at 1 MiB (glibc only). Tensors of 64 KiB and more come from Graft's own block
   cache (BufferPool); left dynamic, glibc's threshold rises with every large free and moves the remaining large
   blocks into per-thread heaps that fragment and grow step after step. */
static inline void cgraft_tune_malloc(void) {
#if defined(__GLIBC__)
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
#endif
}

/* Atomically exchanges two existing paths (directories included): Linux renameat2(RENAME_EXCHANGE), called
   through syscall(2) because older glibc headers do not declare it. Returns 0, or -1 with errno set (EINVAL or
   ENOSYS where the kernel or file system cannot exchange; the caller then falls back). */
static inline int cgraft_exchange_paths(const char *a, const char *b) {
#if defined(__linux__) && defined(SYS_renameat2)
    return (int)syscall(SYS_renameat2, AT_FDCWD, a, AT_FDCWD, b, 2 /* RENAME_EXCHANGE */);
#else
    (void)a;
    (void)b;
    errno = ENOSYS;
    return -1;
#endif
}

#endif
