/* System libraries Graft's Swift modules call directly. */
#ifndef CGRAFT_SYSTEM_H
#define CGRAFT_SYSTEM_H

#include <cblas.h>
#include <stdio.h>

/* OpenBLAS extensions (declared in OpenBLAS's cblas.h; repeated so the shim builds against any cblas.h). */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);

/* Line-buffers stdout (a command-line tool's reports then interleave in order with progress on stderr). */
static inline void cgraft_line_buffer_stdout(void) { setvbuf(stdout, NULL, _IOLBF, 0); }

#endif
