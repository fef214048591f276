/* System libraries Graft's Swift modules call directly, and small C shims (prefixed cgraft_). */
#ifndef CGRAFT_SYSTEM_H
#define CGRAFT_SYSTEM_H

#include <cblas.h>
#include <stdio.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

/* OpenBLAS extensions (declared in OpenBLAS's cblas.h; repeated so the shim builds against any cblas.h). */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);

/* Line-buffers stdout (a command-line tool's reports then interleave in order with progress on stderr). */
static inline void cgraft_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

/* Keeps large freed blocks in the heap for reuse rather than returning them to the kernel (glibc only):
   training allocates and frees the same activation sizes every step, and fresh pages cost faults + zeroing. */
static inline void cgraft_keep_freed_memory(void) {
#if defined(__GLIBC__)
    mallopt(M_MMAP_THRESHOLD, 1 << 30);
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
#endif
}

#endif
