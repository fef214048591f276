// Work items that any thread of a job may run first, claimed once each (see CGraftThreads.h): a decoding step's
// adapter inputs, which the threads share out before the products that read them.
#include "CGraftThreads.h"

#include "cpu_relax.h"

int64_t cgraft_claim_next(int64_t *next, int64_t below) {
    if (__atomic_load_n(next, __ATOMIC_RELAXED) >= below) return -1;
    return __atomic_fetch_add(next, 1, __ATOMIC_ACQ_REL);
}

void cgraft_mark_finished(int32_t *flag) { __atomic_store_n(flag, 1, __ATOMIC_RELEASE); }

void cgraft_wait_finished(const int32_t *flag) {
    while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) != 1) CPU_RELAX();
}
