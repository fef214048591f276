// The worker pool behind Graft's parallelFor (see CGraftThreads.h).
//
// One job runs at a time. Its chunks are handed out through one 64-bit ticket, `generation << 32 | next chunk`:
// a thread takes a chunk by a compare-and-swap that also checks the generation, so a worker still holding an
// older job can never take a chunk of a newer one. The job's fields sit in one of two slots (generation & 1);
// the caller rewrites a slot only two generations later, after every chunk of the job in between has finished.
#define _GNU_SOURCE
#include "CGraftThreads.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "cpu_relax.h"

enum { MAX_WORKERS = 63 };

typedef struct {
    _Atomic(cgraft_pool_task) task;
    _Atomic(void *) context;
    _Atomic int64_t chunks;
    _Atomic int wanted; // workers 0 ..< wanted take part
} job_slot;

static struct {
    pthread_mutex_t lock; // guards starting workers and sleeping
    pthread_cond_t wake;
    _Atomic uint64_t ticket;
    _Atomic int64_t done;
    _Atomic int sleepers;
    _Atomic int busy;
    _Atomic int64_t spin_ns;
    _Atomic int spin_set;
    int workers;
    job_slot slot[2];
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static uint32_t generation_of(uint64_t ticket) { return (uint32_t)(ticket >> 32); }

static void spin_from_environment(void) {
    if (atomic_load(&pool.spin_set)) return;
    int64_t microseconds = 200;
    const char *text = getenv("GRAFT_SPIN_US");
    if (text != NULL && *text != '\0') {
        char *end = NULL;
        long long value = strtoll(text, &end, 10);
        if (end != NULL && *end == '\0' && value >= 0 && value <= 1000000) microseconds = value;
    }
    int expected = 0;
    if (atomic_compare_exchange_strong(&pool.spin_set, &expected, 1)) atomic_store(&pool.spin_ns, microseconds * 1000);
}

void cgraft_pool_set_spin_microseconds(int64_t microseconds) {
    if (microseconds < 0) microseconds = 0;
    if (microseconds > 1000000) microseconds = 1000000;
    atomic_store(&pool.spin_ns, microseconds * 1000);
    atomic_store(&pool.spin_set, 1);
}

int cgraft_pool_workers(void) {
    pthread_mutex_lock(&pool.lock);
    int n = pool.workers;
    pthread_mutex_unlock(&pool.lock);
    return n;
}

/// Takes and runs chunks of job `generation` until none is left or a newer job has replaced it.
static void run_chunks(uint32_t generation) {
    const job_slot *slot = &pool.slot[generation & 1];
    cgraft_pool_task task = atomic_load(&slot->task);
    void *context = atomic_load(&slot->context);
    int64_t chunks = atomic_load(&slot->chunks);
    uint64_t ticket = atomic_load(&pool.ticket);
    while (generation_of(ticket) == generation && (int64_t)(uint32_t)ticket < chunks) {
        if (atomic_compare_exchange_weak(&pool.ticket, &ticket, ticket + 1)) {
            task(context, (int64_t)(uint32_t)ticket);
            atomic_fetch_add(&pool.done, 1);
            ticket = atomic_load(&pool.ticket);
        }
    }
}

/// Polls for a generation other than `seen` for the spin time, then sleeps until one is published.
static uint32_t wait_for_job(uint32_t seen) {
    int64_t spin = atomic_load(&pool.spin_ns);
    int64_t start = spin > 0 ? now_ns() : 0;
    for (unsigned i = 1; spin > 0; i++) {
        uint32_t generation = generation_of(atomic_load(&pool.ticket));
        if (generation != seen) return generation;
        CPU_RELAX();
        if ((i & 63) == 0 && now_ns() - start >= spin) break;
    }
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add(&pool.sleepers, 1);
    uint32_t generation;
    while ((generation = generation_of(atomic_load(&pool.ticket))) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
    atomic_fetch_sub(&pool.sleepers, 1);
    pthread_mutex_unlock(&pool.lock);
    return generation;
}

typedef struct {
    int index;
    uint32_t seen;
} worker_start;

static void *worker_main(void *argument) {
    worker_start start = *(worker_start *)argument;
    free(argument);
    uint32_t seen = start.seen;
    for (;;) {
        seen = wait_for_job(seen);
        if (start.index < atomic_load(&pool.slot[seen & 1].wanted)) run_chunks(seen);
    }
    return NULL;
}

/// Starts workers up to `wanted` (under the lock); returns how many exist.
static int start_workers(int wanted) {
    pthread_mutex_lock(&pool.lock);
    pthread_attr_t attributes;
    int ready = pthread_attr_init(&attributes) == 0;
    if (ready) pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    if (ready) pthread_attr_setstacksize(&attributes, (size_t)8 << 20);
    // Workers block every signal: handlers run on the process's own threads.
    sigset_t all, previous;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &previous);
    while (ready && pool.workers < wanted) {
        worker_start *start = malloc(sizeof *start);
        if (start == NULL) break;
        start->index = pool.workers;
        start->seen = generation_of(atomic_load(&pool.ticket));
        pthread_t thread;
        if (pthread_create(&thread, &attributes, worker_main, start) != 0) {
            free(start);
            break;
        }
        pool.workers += 1;
    }
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    if (ready) pthread_attr_destroy(&attributes);
    int workers = pool.workers;
    pthread_mutex_unlock(&pool.lock);
    return workers;
}

int cgraft_pool_run(int threads, int64_t chunks, cgraft_pool_task task, void *context) {
    if (chunks <= 0) return 0;
    if (task == NULL || chunks > INT32_MAX) return -1;
    int idle = 0;
    if (!atomic_compare_exchange_strong(&pool.busy, &idle, 1)) return -1;
    spin_from_environment();
    int64_t helpers = (int64_t)threads - 1;
    if (helpers > chunks - 1) helpers = chunks - 1;
    if (helpers > MAX_WORKERS) helpers = MAX_WORKERS;
    if (helpers < 0) helpers = 0;
    int wanted = (int)helpers;
    if (pool.workers < wanted) {
        int workers = start_workers(wanted);
        if (workers < wanted) wanted = workers;
    }
    uint32_t generation = generation_of(atomic_load(&pool.ticket)) + 1;
    job_slot *slot = &pool.slot[generation & 1];
    atomic_store(&slot->task, task);
    atomic_store(&slot->context, context);
    atomic_store(&slot->chunks, chunks);
    atomic_store(&slot->wanted, wanted);
    atomic_store(&pool.done, 0);
    atomic_store(&pool.ticket, (uint64_t)generation << 32);
    if (wanted > 0 && atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
    }
    run_chunks(generation);
    for (unsigned i = 1; atomic_load(&pool.done) < chunks; i++) {
        if (i < (1u << 16)) CPU_RELAX();
        else sched_yield();
    }
    atomic_store(&pool.busy, 0);
    return 0;
}
