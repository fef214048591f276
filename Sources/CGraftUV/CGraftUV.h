/* libuv for graftd (a module of its own so libgraft and the CLI do not link libuv), and C shims (cgraft_). */
#ifndef CGRAFT_UV_H
#define CGRAFT_UV_H

#include <uv.h>
#include <signal.h>
#include <sys/stat.h>

/* Handles viewed as their base types (C's struct "inheritance", which Swift cannot cast by itself). */
static inline uv_handle_t *cgraft_uv_handle(void *handle) { return (uv_handle_t *)handle; }
static inline uv_stream_t *cgraft_uv_stream(void *stream) { return (uv_stream_t *)stream; }

/* Ignores SIGPIPE: a peer that disconnects mid-write must give EPIPE, not kill the daemon. */
static inline void cgraft_ignore_sigpipe(void) { signal(SIGPIPE, SIG_IGN); }

#endif
