// Graft's worker threads: a persistent pool that runs one parallel-for at a time, with workers that spin briefly
// between jobs before they sleep. Decoding issues about sixty short products per token; waking a sleeping thread
// for each (what a general-purpose queue does) costs as much as the product itself.
#ifndef CGRAFT_THREADS_H
#define CGRAFT_THREADS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// One chunk of a job: called with the job's `context` and a chunk index in `0 ..< chunks`.
typedef void (*cgraft_pool_task)(void *context, int64_t chunk);

/// Runs `task(context, c)` for every `c` in `0 ..< chunks` on the calling thread and up to `threads − 1` pool
/// workers (started on first use, at most 63), and returns when every chunk has finished. Chunks are handed out
/// one at a time, so a thread that finishes early takes the next.
///
/// Returns 0 when the job ran, or -1 without running anything when the pool is busy (another thread's job, or
/// a call from inside a chunk) or could not start a worker; the caller then runs the chunks another way.
int cgraft_pool_run(int threads, int64_t chunks, cgraft_pool_task task, void *context);

/// How long an idle worker keeps polling for the next job before it sleeps, in microseconds (default 200, or
/// `GRAFT_SPIN_US` from the environment; 0 sleeps at once). Polling costs CPU time while the process is idle
/// between jobs and saves a thread wake-up (tens of microseconds) when jobs come back to back.
void cgraft_pool_set_spin_microseconds(int64_t microseconds);

/// Workers started so far (for tests and diagnostics).
int cgraft_pool_workers(void);

/// Claims the next of a list of shared work items, which threads claim in index order through the counter `*next`
/// (zero before the first claim): returns the claimed index, or -1 when every index below `below` is claimed. Two
/// threads racing for the last index below `below` may get one at or past it; it is still theirs to run (or to
/// drop, past the end of the list).
int64_t cgraft_claim_next(int64_t *next, int64_t below);

/// Marks an item finished: `*flag` becomes 1, and writes the item made before it are visible to a thread that then
/// sees the flag in cgraft_wait_finished.
void cgraft_mark_finished(int32_t *flag);

/// Waits (polling) until `*flag` is 1. Only for an item another running thread has claimed: that thread finishes it.
void cgraft_wait_finished(const int32_t *flag);

#ifdef __cplusplus
}
#endif

#endif
