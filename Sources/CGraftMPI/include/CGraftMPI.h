/*
 * CGraftMPI: Open MPI loaded at run time.
 *
 * Graft does not link libmpi. libgraft.so and the `graft` CLI must start on machines without MPI, and a build
 * must not need MPI's headers, so this shim dlopen()s Open MPI's library (soname libmpi.so.40, Debian's
 * libopenmpi3 package; installed with openmpi-bin / libopenmpi-dev) only when a process was launched by
 * mpirun (OMPI_COMM_WORLD_SIZE is set) or the caller asks, and resolves the few MPI functions it calls with
 * dlsym(). MPI's predefined handles (MPI_COMM_WORLD, MPI_FLOAT, MPI_SUM, ...) are, in Open MPI's ABI, the
 * addresses of exported globals (mpi.h defines MPI_COMM_WORLD as &ompi_mpi_comm_world), so they are resolved by
 * those symbol names too. This binds Graft to Open MPI's ABI, stable across the 4.x and 5.x series (soname
 * libmpi.so.40); MPICH's ABI (integer handles) is a different one and is not supported.
 *
 * Every collective is started nonblocking and completed by polling with a deadline, so a peer that stops
 * responding becomes an error return (CGRAFT_MPI_TIMEOUT) instead of a hang.
 */
#ifndef CGRAFT_MPI_H
#define CGRAFT_MPI_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** Return codes. */
enum {
    CGRAFT_MPI_OK = 0,
    /** The collective did not complete before its deadline. */
    CGRAFT_MPI_TIMEOUT = 1,
    /** An MPI call failed, or MPI is not initialized; the message buffer says which. */
    CGRAFT_MPI_ERROR = 2,
};

/** Nonzero when this process was started by Open MPI's mpirun/mpiexec (OMPI_COMM_WORLD_SIZE is set). */
int cgraft_mpi_launched(void);

/**
 * Loads `library` (NULL = "libmpi.so.40") with RTLD_GLOBAL (Open MPI's plugins resolve libmpi's symbols from
 * the global scope), resolves the functions and handles, and calls MPI_Init_thread(MPI_THREAD_SERIALIZED) unless
 * MPI is already initialized (a host such as mpi4py did it). Registers an atexit handler that calls
 * MPI_Finalize. Idempotent. On failure returns CGRAFT_MPI_ERROR with a message in `message` (size `capacity`).
 */
int cgraft_mpi_init(const char *library, char *message, size_t capacity);

/** This process's rank in MPI_COMM_WORLD (0 before init). */
int cgraft_mpi_rank(void);
/** The number of processes in MPI_COMM_WORLD (1 before init). */
int cgraft_mpi_size(void);

/** In-place sum over all ranks of `count` floats; waits at most `timeout_seconds` (<= 0: forever). */
int cgraft_mpi_allreduce_float(float *buffer, int64_t count, double timeout_seconds, char *message, size_t capacity);
/** In-place sum over all ranks of `count` doubles; waits at most `timeout_seconds` (<= 0: forever). */
int cgraft_mpi_allreduce_double(double *buffer, int64_t count, double timeout_seconds, char *message, size_t capacity);
/** Gathers `count` uint64 values from every rank into `received` (size * count, rank-major). */
int cgraft_mpi_allgather_u64(const uint64_t *values, int count, uint64_t *received, double timeout_seconds,
                             char *message, size_t capacity);
/** MPI_Abort(MPI_COMM_WORLD, code): ends every rank of the job. Returns only if MPI is not initialized. */
void cgraft_mpi_abort(int code);

#ifdef __cplusplus
}
#endif

#endif
