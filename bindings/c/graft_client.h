/*
 * graft_client.h — a C client for graftd, the Graft daemon (protocol graft.v1, proto/graft.proto).
 *
 * Blocking calls over a Unix socket or TCP. One graft_client is one connection: use it from one thread at a
 * time (open one per thread). Every call returns GRAFT_CLIENT_OK (0), GRAFT_CLIENT_ERR_CONNECTION (-1) when the
 * socket or a frame failed (the connection is then unusable), GRAFT_CLIENT_ERR_ARGUMENT (-2) for a bad argument
 * caught before sending, or a positive Graft__V1__Error__Code the daemon answered with; graft_client_last_error
 * then holds the message.
 *
 * Build: compile graft_client.c and graft.pb-c.c (protobuf-c generated code, committed) and link -lprotobuf-c.
 *
 *     graft_client *c = graft_client_new();
 *     if (graft_client_connect_unix(c, "/run/user/1000/graftd.sock", NULL) != GRAFT_CLIENT_OK)
 *         fprintf(stderr, "%s\n", graft_client_last_error(c));
 *     ...
 *     graft_client_free(c);
 */
#ifndef GRAFT_CLIENT_H
#define GRAFT_CLIENT_H

#include <stddef.h>
#include <stdint.h>

#include "graft.pb-c.h"

#ifdef __cplusplus
extern "C" {
#endif

/** The protocol version this client speaks. */
#define GRAFT_CLIENT_PROTOCOL_VERSION 1

/** Success. */
#define GRAFT_CLIENT_OK 0
/** The connection or a frame failed; the client must be freed. */
#define GRAFT_CLIENT_ERR_CONNECTION (-1)
/** An argument was rejected before anything was sent (NULL, out of range). */
#define GRAFT_CLIENT_ERR_ARGUMENT (-2)

/** A connection to graftd. */
typedef struct graft_client graft_client;

/** A new, unconnected client (NULL only when out of memory). Free with graft_client_free. */
graft_client *graft_client_new(void);

/** Closes the connection and frees the client. NULL is ignored. */
void graft_client_free(graft_client *client);

/** The message of the last failed call ("" after a success); valid until the next call on this client. */
const char *graft_client_last_error(const graft_client *client);

/** Connects to the Unix socket at `path` and says hello (`token` may be NULL; needed only if the daemon asks). */
int graft_client_connect_unix(graft_client *client, const char *path, const char *token);

/** Connects to host:port over TCP (TCP_NODELAY) and says hello with `token` (required by the daemon). */
int graft_client_connect_tcp(graft_client *client, const char *host, int port, const char *token);

/**
 * Loads a model on the daemon: `path` on the daemon's machine or an asset name ("minilm", "smollm2"); `task`
 * a Graft__V1__Task; `num_labels` for classification (0 = unset: the default, 2). On success *model_id receives the daemon's
 * handle (malloc'd; free() it).
 */
int graft_client_load_model(graft_client *client, const char *path, Graft__V1__Task task, uint32_t num_labels,
                            char **model_id);

/** Frees a model on the daemon. */
int graft_client_unload_model(graft_client *client, const char *model_id);

/** Adds adapter `name` from a PEFT adapter_config.json object (e.g. {"peft_type":"LORA","r":8,...}); active. */
int graft_client_add_adapter(graft_client *client, const char *model_id, const char *name, const char *config_json);

/** Loads a PEFT adapter directory (on the daemon's machine) as `name`, active. */
int graft_client_load_adapter(graft_client *client, const char *model_id, const char *name, const char *path);

/** Saves adapter `name` in PEFT's format to directory `path` on the daemon's machine. */
int graft_client_save_adapter(graft_client *client, const char *model_id, const char *name, const char *path);

/**
 * Combines adapters `adapters[0..count)` with `weights` into a new adapter `name` as PEFT's add_weighted_adapter
 * (graftd's combine_adapters; `options_json` as graft_adapter_combine's in graft.h, NULL = PEFT's defaults). On
 * success *report_json, when not NULL, receives {"name", "combination_type", "r", "kept_fraction"} (free() it).
 */
int graft_client_combine_adapters(graft_client *client, const char *model_id, const char *name,
                                  const char *const *adapters, const double *weights, size_t count,
                                  const char *options_json, char **report_json);

/**
 * Writes adapter `name` compressed to `directory` on the daemon's machine (graftd's compress_adapter; `method`
 * "compeft" or "onebit", `options_json` as graft_adapter_compress's in graft.h, NULL = defaults). On success
 * *report_json, when not NULL, receives {"method", "file_bytes", "float32_bytes", "packed_bytes", "kept_fraction"}
 * (free() it). graft_client_load_adapter reads the directory back.
 */
int graft_client_compress_adapter(graft_client *client, const char *model_id, const char *name, const char *method,
                                  const char *directory, const char *options_json, char **report_json);

/** A forward pass's result: `count` floats of shape[0..ndim). */
typedef struct graft_client_tensor {
    float *values;
    size_t count;
    uint32_t shape[3];
    size_t ndim;
} graft_client_tensor;

/** Releases a tensor's values (NULL-safe) and zeroes it. */
void graft_client_tensor_free(graft_client_tensor *tensor);

/**
 * A forward pass over `n` texts (tokenized by the daemon). `output` is a Graft__V1__Output (DEFAULT = logits
 * where the model has them). On success `out` holds the values (release with graft_client_tensor_free).
 */
int graft_client_forward_texts(graft_client *client, const char *model_id, const char *const *texts, size_t n,
                               Graft__V1__Output output, graft_client_tensor *out);

/** A progress event of a training job (strings valid during the callback only). */
typedef struct graft_client_event {
    const char *job_id;
    uint32_t step, total_steps, epoch;
    float loss, mean_loss, learning_rate, grad_norm;
    double tokens_per_second, elapsed_seconds, eta_seconds;
    /** Nonzero when eval_* hold an evaluation's metrics. */
    int has_eval;
    double eval_loss, eval_accuracy;
    /** GRAFT__V1__JOB_STATE__JOB_UNSPECIFIED while running; COMPLETED, CANCELLED or FAILED on the last event. */
    Graft__V1__JobState finished;
    /** Why the job failed (finished = FAILED), else "". */
    const char *error;
} graft_client_event;

/** Receives each progress event; return nonzero to stop waiting (the job keeps running on the daemon). */
typedef int (*graft_client_progress_fn)(const graft_client_event *event, void *user);

/**
 * Starts a training job (`request`: model_id, adapter, data, config, ...; its defaults as in proto/graft.proto)
 * and waits for it, passing each event to `progress` (may be NULL). On return *job_id (if not NULL) receives the
 * job's id (malloc'd; free() it) and *finished (if not NULL) the final state. A job that fails returns
 * GRAFT__V1__ERROR__CODE__CANCELLED or the failure's code with its message.
 */
int graft_client_train(graft_client *client, const Graft__V1__StartTraining *request,
                       graft_client_progress_fn progress, void *user, char **job_id, Graft__V1__JobState *finished);

/** Asks job `job_id` to stop after its current step. */
int graft_client_cancel_job(graft_client *client, const char *job_id);

/**
 * Sends any request (its `id` is set here) and receives the first response to it in *response (free with
 * graft__v1__response__free_unpacked(*response, NULL)). Streams (generate, training) continue with
 * graft_client_next. A daemon error is returned as its code, with *response set as well.
 */
int graft_client_call(graft_client *client, Graft__V1__Request *request, Graft__V1__Response **response);

/** The next response frame on the connection (after graft_client_call of a streaming request). */
int graft_client_next(graft_client *client, Graft__V1__Response **response);

#ifdef __cplusplus
}
#endif

#endif /* GRAFT_CLIENT_H */
