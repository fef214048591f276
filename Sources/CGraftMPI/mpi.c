/* Open MPI through dlopen/dlsym: see include/CGraftMPI.h for why. */
#define _GNU_SOURCE
#include "CGraftMPI.h"

#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Open MPI's handle types are pointers to opaque structs; void * has the same representation. */
typedef void *mpi_handle;
typedef int (*init_thread_fn)(int *, char ***, int, int *);
typedef int (*initialized_fn)(int *);
typedef int (*comm_query_fn)(mpi_handle, int *);
typedef int (*iallreduce_fn)(const void *, void *, int, mpi_handle, mpi_handle, mpi_handle, mpi_handle *);
typedef int (*iallgather_fn)(const void *, int, mpi_handle, void *, int, mpi_handle, mpi_handle, mpi_handle *);
typedef int (*test_fn)(mpi_handle *, int *, void *);
typedef int (*abort_fn)(mpi_handle, int);
typedef int (*finalize_fn)(void);

/* Values fixed by Open MPI's mpi.h (4.x and 5.x). */
#define OMPI_THREAD_SERIALIZED 2
#define OMPI_IN_PLACE ((void *)1)
#define OMPI_STATUS_IGNORE NULL

static struct {
    void *library;
    int ready;
    int rank, size;
    init_thread_fn init_thread;
    initialized_fn initialized, finalized;
    comm_query_fn comm_rank, comm_size;
    iallreduce_fn iallreduce;
    iallgather_fn iallgather;
    test_fn test;
    abort_fn abort;
    finalize_fn finalize;
    mpi_handle comm_world, type_float, type_double, type_uint64, op_sum;
} mpi = {.rank = 0, .size = 1};

static void say(char *message, size_t capacity, const char *format, ...) {
    if (message == NULL || capacity == 0) return;
    va_list args;
    va_start(args, format);
    vsnprintf(message, capacity, format, args);
    va_end(args);
}

int cgraft_mpi_launched(void) { return getenv("OMPI_COMM_WORLD_SIZE") != NULL; }
int cgraft_mpi_rank(void) { return mpi.rank; }
int cgraft_mpi_size(void) { return mpi.size; }

static void finalize_at_exit(void) {
    int done = 0;
    if (!mpi.ready || mpi.finalized(&done) != 0 || done) return;
    mpi.finalize();
}

#define RESOLVE(field, name)                                                                         \
    do {                                                                                             \
        *(void **)(&mpi.field) = dlsym(mpi.library, name);                                           \
        if (mpi.field == NULL) {                                                                     \
            say(message, capacity, "%s has no symbol %s: not Open MPI's ABI (Graft needs Open MPI 4 " \
                "or 5, Debian's openmpi-bin and libopenmpi3)", path, name);                          \
            return CGRAFT_MPI_ERROR;                                                                 \
        }                                                                                            \
    } while (0)

int cgraft_mpi_init(const char *library, char *message, size_t capacity) {
    if (mpi.ready) return CGRAFT_MPI_OK;
    const char *path = library != NULL && library[0] != '\0' ? library : "libmpi.so.40";
    mpi.library = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (mpi.library == NULL) {
        const char *why = dlerror();
        say(message, capacity, "cannot load Open MPI's library %s (%s); install Debian's openmpi-bin and "
            "libopenmpi-dev (scripts/setup does), or set GRAFT_MPI_LIBRARY to its path", path,
            why != NULL ? why : "not found");
        return CGRAFT_MPI_ERROR;
    }
    RESOLVE(init_thread, "MPI_Init_thread");
    RESOLVE(initialized, "MPI_Initialized");
    RESOLVE(finalized, "MPI_Finalized");
    RESOLVE(comm_rank, "MPI_Comm_rank");
    RESOLVE(comm_size, "MPI_Comm_size");
    RESOLVE(iallreduce, "MPI_Iallreduce");
    RESOLVE(iallgather, "MPI_Iallgather");
    RESOLVE(test, "MPI_Test");
    RESOLVE(abort, "MPI_Abort");
    RESOLVE(finalize, "MPI_Finalize");
    RESOLVE(comm_world, "ompi_mpi_comm_world");
    RESOLVE(type_float, "ompi_mpi_float");
    RESOLVE(type_double, "ompi_mpi_double");
    RESOLVE(type_uint64, "ompi_mpi_uint64_t");
    RESOLVE(op_sum, "ompi_mpi_op_sum");
    int already = 0;
    if (mpi.initialized(&already) != 0) {
        say(message, capacity, "MPI_Initialized failed");
        return CGRAFT_MPI_ERROR;
    }
    if (!already) {
        int provided = 0;
        if (mpi.init_thread(NULL, NULL, OMPI_THREAD_SERIALIZED, &provided) != 0) {
            say(message, capacity, "MPI_Init_thread failed (is this process started by mpirun?)");
            return CGRAFT_MPI_ERROR;
        }
        atexit(finalize_at_exit);
    }
    if (mpi.comm_rank(mpi.comm_world, &mpi.rank) != 0 || mpi.comm_size(mpi.comm_world, &mpi.size) != 0) {
        say(message, capacity, "MPI_Comm_rank/MPI_Comm_size on MPI_COMM_WORLD failed");
        return CGRAFT_MPI_ERROR;
    }
    mpi.ready = 1;
    return CGRAFT_MPI_OK;
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

/* Polls `request` until it completes or the deadline passes: spins briefly, then sleeps 50 µs between tests. */
static int wait_for(mpi_handle *request, const char *what, double timeout_seconds, char *message, size_t capacity) {
    double deadline = timeout_seconds > 0 ? now() + timeout_seconds : 0;
    for (long polls = 0;; polls++) {
        int done = 0;
        if (mpi.test(request, &done, OMPI_STATUS_IGNORE) != 0) {
            say(message, capacity, "MPI_Test of %s failed on rank %d", what, mpi.rank);
            return CGRAFT_MPI_ERROR;
        }
        if (done) return CGRAFT_MPI_OK;
        if (polls > 1000) {
            struct timespec pause = {0, 50000};
            nanosleep(&pause, NULL);
            if (deadline > 0 && now() > deadline) {
                say(message, capacity, "rank %d: %s did not complete within %.0f s; a peer rank stopped "
                    "responding (GRAFT_MPI_TIMEOUT sets the limit)", mpi.rank, what, timeout_seconds);
                return CGRAFT_MPI_TIMEOUT;
            }
        }
    }
}

static int allreduce(void *buffer, int64_t count, mpi_handle type, size_t width, double timeout_seconds,
                     char *message, size_t capacity) {
    if (!mpi.ready) {
        say(message, capacity, "MPI is not initialized");
        return CGRAFT_MPI_ERROR;
    }
    /* MPI counts are int: reduce in pieces of at most 2^30 elements. */
    const int64_t piece = (int64_t)1 << 30;
    for (int64_t start = 0; start < count; start += piece) {
        int n = (int)(count - start < piece ? count - start : piece);
        mpi_handle request = NULL;
        char *base = (char *)buffer + (size_t)start * width;
        if (mpi.iallreduce(OMPI_IN_PLACE, base, n, type, mpi.op_sum, mpi.comm_world, &request) != 0) {
            say(message, capacity, "MPI_Iallreduce of %d elements failed on rank %d", n, mpi.rank);
            return CGRAFT_MPI_ERROR;
        }
        int status = wait_for(&request, "MPI_Iallreduce", timeout_seconds, message, capacity);
        if (status != CGRAFT_MPI_OK) return status;
    }
    return CGRAFT_MPI_OK;
}

int cgraft_mpi_allreduce_float(float *buffer, int64_t count, double timeout_seconds, char *message, size_t capacity) {
    return allreduce(buffer, count, mpi.type_float, sizeof(float), timeout_seconds, message, capacity);
}

int cgraft_mpi_allreduce_double(double *buffer, int64_t count, double timeout_seconds, char *message, size_t capacity) {
    return allreduce(buffer, count, mpi.type_double, sizeof(double), timeout_seconds, message, capacity);
}

int cgraft_mpi_allgather_u64(const uint64_t *values, int count, uint64_t *received, double timeout_seconds,
                             char *message, size_t capacity) {
    if (!mpi.ready) {
        say(message, capacity, "MPI is not initialized");
        return CGRAFT_MPI_ERROR;
    }
    mpi_handle request = NULL;
    if (mpi.iallgather(values, count, mpi.type_uint64, received, count, mpi.type_uint64, mpi.comm_world, &request) != 0) {
        say(message, capacity, "MPI_Iallgather failed on rank %d", mpi.rank);
        return CGRAFT_MPI_ERROR;
    }
    return wait_for(&request, "MPI_Iallgather", timeout_seconds, message, capacity);
}

void cgraft_mpi_abort(int code) {
    if (mpi.ready) mpi.abort(mpi.comm_world, code);
}
