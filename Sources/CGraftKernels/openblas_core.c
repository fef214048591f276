// OpenBLAS picks its kernels by CPU model. A model newer than the OpenBLAS build (Debian 12's 0.3.21 does not know
// Emerald Rapids, family 6 model 207) falls back to the SSE3 "Prescott" kernels, measured 4x slower on a training
// step than its AVX-512 kernels on the same CPU. When that happens and the user has not chosen a core with
// OPENBLAS_CORETYPE, this picks one by the CPU's features instead, through OpenBLAS's own switch (the variable read
// by gotoblas_dynamic_init), before any BLAS call is made.

#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "CGraftKernels.h"

extern void cblas_sgemm(void);

static char selected_core[32];

#if defined(__x86_64__)
static unsigned long long read_xcr0(void) {
    unsigned int eax, edx;
    __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
    return ((unsigned long long)edx << 32) | eax;
}

/// The widest OpenBLAS core the CPU and the OS's saved register state support, or NULL.
static const char *core_for_features(void) {
    unsigned int eax, ebx, ecx, edx;
    if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return NULL;
    const int osxsave = (ecx >> 27) & 1, avx = (ecx >> 28) & 1, fma = (ecx >> 12) & 1;
    if (!osxsave || !avx) return NULL;
    const unsigned long long xcr0 = read_xcr0();
    if ((xcr0 & 0x6) != 0x6) return NULL;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return "Sandybridge";
    const int avx2 = (ebx >> 5) & 1;
    const int avx512 = ((ebx >> 16) & 1) && ((ebx >> 17) & 1) && ((ebx >> 30) & 1) && ((ebx >> 31) & 1);
    if (avx512 && (xcr0 & 0xE6) == 0xE6) return "SkylakeX";
    if (avx2 && fma) return "Haswell";
    return "Sandybridge";
}
#endif

/// OpenBLAS's fallback cores: no AVX kernels at all.
static int is_fallback_core(const char *name) {
    static const char *const fallbacks[] = {"Unknown", "Katmai", "Coppermine", "Northwood", "Prescott", "Banias",
                                            "Atom", "Core2", "Penryn", "Dunnington", "Nehalem"};
    for (size_t i = 0; i < sizeof fallbacks / sizeof fallbacks[0]; i++) {
        if (strcmp(name, fallbacks[i]) == 0) return 1;
    }
    return 0;
}

__attribute__((constructor)) static void cgraft_openblas_select_core(void) {
#if defined(__x86_64__)
    if (getenv("OPENBLAS_CORETYPE") != NULL) return;
    // The library that defines cblas_sgemm, found whether the host loaded Graft globally or not (ctypes: local).
    Dl_info info;
    if (dladdr((void *)cblas_sgemm, &info) == 0 || info.dli_fname == NULL) return;
    void *blas = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
    if (blas == NULL) return;
    const char *(*corename)(void) = (const char *(*)(void))dlsym(blas, "openblas_get_corename");
    void (*quit)(void) = (void (*)(void))dlsym(blas, "gotoblas_dynamic_quit");
    void (*init)(void) = (void (*)(void))dlsym(blas, "gotoblas_dynamic_init");
    const char *current = corename ? corename() : NULL;
    const char *wanted = core_for_features();
    // Only a DYNAMIC_ARCH build that fell back below what the CPU can do is switched.
    if (quit && init && current && wanted && is_fallback_core(current)) {
        setenv("OPENBLAS_CORETYPE", wanted, 1);
        quit();
        init();
        unsetenv("OPENBLAS_CORETYPE");
        snprintf(selected_core, sizeof selected_core, "%s", corename());
    }
    dlclose(blas);
#endif
}

const char *cgraft_blas_core(void) {
    return selected_core[0] ? selected_core : NULL;
}
