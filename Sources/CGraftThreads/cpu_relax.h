// CPU_RELAX(): the pause hint of a polling loop (x86 `pause`, ARM `yield`), for the pool's and the claims' waits.
#ifndef CGRAFT_CPU_RELAX_H
#define CGRAFT_CPU_RELAX_H

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

#endif
