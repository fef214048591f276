/* graft_client.c — the C client of graftd; see graft_client.h. */
#define _POSIX_C_SOURCE 200809L
#include "graft_client.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* The largest response frame accepted (forward results of big batches can be large). */
#define MAX_RESPONSE_FRAME (1u << 30)

struct graft_client {
    int fd;
    uint64_t next_id;
    uint64_t stream_id;
    char error[1024];
};

static int fail(graft_client *c, int code, const char *format, ...) {
    va_list args;
    va_start(args, format);
    vsnprintf(c->error, sizeof c->error, format, args);
    va_end(args);
    return code;
}

graft_client *graft_client_new(void) {
    graft_client *c = calloc(1, sizeof *c);
    if (c) c->fd = -1;
    return c;
}

void graft_client_free(graft_client *client) {
    if (!client) return;
    if (client->fd >= 0) close(client->fd);
    free(client);
}

const char *graft_client_last_error(const graft_client *client) { return client ? client->error : "client is NULL"; }

static int write_all(graft_client *c, const uint8_t *bytes, size_t n) {
    while (n > 0) {
        ssize_t w = send(c->fd, bytes, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return fail(c, GRAFT_CLIENT_ERR_CONNECTION, "send: %s", strerror(errno));
        bytes += w;
        n -= (size_t)w;
    }
    return GRAFT_CLIENT_OK;
}

static int read_all(graft_client *c, uint8_t *bytes, size_t n) {
    while (n > 0) {
        ssize_t r = recv(c->fd, bytes, n, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r == 0) return fail(c, GRAFT_CLIENT_ERR_CONNECTION, "the daemon closed the connection");
        if (r < 0) return fail(c, GRAFT_CLIENT_ERR_CONNECTION, "recv: %s", strerror(errno));
        bytes += r;
        n -= (size_t)r;
    }
    return GRAFT_CLIENT_OK;
}

static int send_request(graft_client *c, Graft__V1__Request *request) {
    if (c->fd < 0) return fail(c, GRAFT_CLIENT_ERR_CONNECTION, "not connected");
    request->id = ++c->next_id;
    size_t n = graft__v1__request__get_packed_size(request);
    if (n > UINT32_MAX) return fail(c, GRAFT_CLIENT_ERR_ARGUMENT, "request of %zu bytes is too large", n);
    uint8_t *frame = malloc(n + 4);
    if (!frame) return fail(c, GRAFT_CLIENT_ERR_CONNECTION, "out of memory for a %zu-byte request", n);
    frame[0] = (uint8_t)n;
    frame[1] = (uint8_t)(n >> 8);
    frame[2] = (uint8_t)(n >> 16);
    frame[3] = (uint8_t)(n >> 24);
    graft__v1__request__pack(request, frame + 4);
    int rc = write_all(c, frame, n + 4);
    free(frame);
    c->stream_id = request->id;
    return rc;
}

int graft_client_next(graft_client *client, Graft__V1__Response **response) {
    if (!client || !response) return GRAFT_CLIENT_ERR_ARGUMENT;
    *response = NULL;
    for (;;) {
        uint8_t header[4];
        int rc = read_all(client, header, 4);
        if (rc) return rc;
        uint32_t n = (uint32_t)header[0] | (uint32_t)header[1] << 8 | (uint32_t)header[2] << 16 | (uint32_t)header[3] << 24;
        if (n > MAX_RESPONSE_FRAME) return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "response frame of %u bytes exceeds %u", n, MAX_RESPONSE_FRAME);
        uint8_t *body = malloc(n ? n : 1);
        if (!body) return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "out of memory for a %u-byte response", n);
        rc = read_all(client, body, n);
        if (rc) {
            free(body);
            return rc;
        }
        Graft__V1__Response *r = graft__v1__response__unpack(NULL, n, body);
        free(body);
        if (!r) return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "undecodable response frame of %u bytes", n);
        if (r->id != client->stream_id && r->id != 0) {  /* a late reply to an abandoned stream */
            graft__v1__response__free_unpacked(r, NULL);
            continue;
        }
        *response = r;
        if (r->kind_case == GRAFT__V1__RESPONSE__KIND_ERROR) {
            int code = r->error->code > 0 ? (int)r->error->code : (int)GRAFT__V1__ERROR__CODE__INTERNAL;
            return fail(client, code, "%s", r->error->message);
        }
        client->error[0] = '\0';
        return GRAFT_CLIENT_OK;
    }
}

int graft_client_call(graft_client *client, Graft__V1__Request *request, Graft__V1__Response **response) {
    if (!client || !request || !response) return GRAFT_CLIENT_ERR_ARGUMENT;
    *response = NULL;
    int rc = send_request(client, request);
    return rc ? rc : graft_client_next(client, response);
}

/* A call whose successful response is discarded after `expect` is checked. */
static int simple_call(graft_client *c, Graft__V1__Request *request, Graft__V1__Response__KindCase expect,
                       Graft__V1__Response **keep) {
    Graft__V1__Response *r = NULL;
    int rc = graft_client_call(c, request, &r);
    if (rc == GRAFT_CLIENT_OK && r->kind_case != expect)
        rc = fail(c, GRAFT_CLIENT_ERR_CONNECTION, "unexpected response kind %d (expected %d)", (int)r->kind_case, (int)expect);
    if (keep && rc == GRAFT_CLIENT_OK) {
        *keep = r;
        return rc;
    }
    if (r) graft__v1__response__free_unpacked(r, NULL);
    return rc;
}

static int hello(graft_client *c, const char *token) {
    Graft__V1__Hello h = GRAFT__V1__HELLO__INIT;
    h.protocol_version = GRAFT_CLIENT_PROTOCOL_VERSION;
    h.token = (char *)(token ? token : "");
    h.client_name = (char *)"graft-c";
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_HELLO;
    request.hello = &h;
    return simple_call(c, &request, GRAFT__V1__RESPONSE__KIND_HELLO, NULL);
}

int graft_client_connect_unix(graft_client *client, const char *path, const char *token) {
    if (!client || !path) return client ? fail(client, GRAFT_CLIENT_ERR_ARGUMENT, "path is NULL") : GRAFT_CLIENT_ERR_ARGUMENT;
    struct sockaddr_un address;
    memset(&address, 0, sizeof address);
    address.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof address.sun_path)
        return fail(client, GRAFT_CLIENT_ERR_ARGUMENT, "%s: socket path longer than %zu bytes", path, sizeof address.sun_path - 1);
    strcpy(address.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0) return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "socket: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&address, sizeof address) != 0) {
        int e = errno;
        close(fd);
        return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "%s: cannot connect: %s", path, strerror(e));
    }
    if (client->fd >= 0) close(client->fd);
    client->fd = fd;
    return hello(client, token);
}

int graft_client_connect_tcp(graft_client *client, const char *host, int port, const char *token) {
    if (!client || !host || port <= 0 || port > 65535)
        return client ? fail(client, GRAFT_CLIENT_ERR_ARGUMENT, "host is NULL or port %d is outside 1...65535", port) : GRAFT_CLIENT_ERR_ARGUMENT;
    char service[16];
    snprintf(service, sizeof service, "%d", port);
    struct addrinfo hints, *found = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int g = getaddrinfo(host, service, &hints, &found);
    if (g != 0) return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "%s:%d: %s", host, port, gai_strerror(g));
    int fd = -1, e = 0;
    for (struct addrinfo *a = found; a && fd < 0; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype, a->ai_protocol);
        if (fd >= 0 && connect(fd, a->ai_addr, a->ai_addrlen) != 0) {
            e = errno;
            close(fd);
            fd = -1;
        }
    }
    freeaddrinfo(found);
    if (fd < 0) return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "%s:%d: cannot connect: %s", host, port, strerror(e));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (client->fd >= 0) close(client->fd);
    client->fd = fd;
    return hello(client, token);
}

static char *duplicate(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = malloc(n);
    if (d) memcpy(d, s, n);
    return d;
}

int graft_client_load_model(graft_client *client, const char *path, Graft__V1__Task task, uint32_t num_labels,
                            char **model_id) {
    if (!client || !path || !model_id) return client ? fail(client, GRAFT_CLIENT_ERR_ARGUMENT, "path or model_id is NULL") : GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__LoadModel m = GRAFT__V1__LOAD_MODEL__INIT;
    m.path = (char *)path;
    m.task = task;
    if (num_labels != 0) {  /* 0 = unset: the daemon's default (2) */
        m.num_labels_set_case = GRAFT__V1__LOAD_MODEL__NUM_LABELS_SET_NUM_LABELS;
        m.num_labels = num_labels;
    }
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_LOAD_MODEL;
    request.load_model = &m;
    Graft__V1__Response *r = NULL;
    int rc = simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_MODEL_LOADED, &r);
    if (rc) return rc;
    *model_id = duplicate(r->model_loaded->model_id);
    graft__v1__response__free_unpacked(r, NULL);
    return *model_id ? GRAFT_CLIENT_OK : fail(client, GRAFT_CLIENT_ERR_CONNECTION, "out of memory");
}

int graft_client_unload_model(graft_client *client, const char *model_id) {
    if (!client || !model_id) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__UnloadModel m = GRAFT__V1__UNLOAD_MODEL__INIT;
    m.model_id = (char *)model_id;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_UNLOAD_MODEL;
    request.unload_model = &m;
    return simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_OK, NULL);
}

int graft_client_add_adapter(graft_client *client, const char *model_id, const char *name, const char *config_json) {
    if (!client || !model_id || !name || !config_json) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__AddAdapter m = GRAFT__V1__ADD_ADAPTER__INIT;
    m.model_id = (char *)model_id;
    m.name = (char *)name;
    m.config_json = (char *)config_json;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_ADD_ADAPTER;
    request.add_adapter = &m;
    return simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_OK, NULL);
}

int graft_client_combine_adapters(graft_client *client, const char *model_id, const char *name,
                                  const char *const *adapters, const double *weights, size_t count,
                                  const char *options_json, char **report_json) {
    if (!client || !model_id || !name || !adapters || !weights || count == 0) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__CombineAdapters m = GRAFT__V1__COMBINE_ADAPTERS__INIT;
    m.model_id = (char *)model_id;
    m.name = (char *)name;
    m.n_adapters = m.n_weights = count;
    m.adapters = (char **)adapters; /* protobuf-c only reads them while packing */
    m.weights = (double *)weights;
    m.options_json = (char *)(options_json ? options_json : "");
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_COMBINE_ADAPTERS;
    request.combine_adapters = &m;
    Graft__V1__Response *r = NULL;
    int rc = simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_COMBINED, &r);
    if (rc) return rc;
    if (report_json) *report_json = duplicate(r->combined->report_json);
    graft__v1__response__free_unpacked(r, NULL);
    return !report_json || *report_json ? GRAFT_CLIENT_OK : fail(client, GRAFT_CLIENT_ERR_CONNECTION, "out of memory");
}

int graft_client_compress_adapter(graft_client *client, const char *model_id, const char *name, const char *method,
                                  const char *directory, const char *options_json, char **report_json) {
    if (!client || !model_id || !name || !method || !directory) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__CompressAdapter m = GRAFT__V1__COMPRESS_ADAPTER__INIT;
    m.model_id = (char *)model_id;
    m.name = (char *)name;
    m.method = (char *)method;
    m.directory = (char *)directory;
    m.options_json = (char *)(options_json ? options_json : "");
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_COMPRESS_ADAPTER;
    request.compress_adapter = &m;
    Graft__V1__Response *r = NULL;
    int rc = simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_COMPRESSED, &r);
    if (rc) return rc;
    if (report_json) *report_json = duplicate(r->compressed->report_json);
    graft__v1__response__free_unpacked(r, NULL);
    return !report_json || *report_json ? GRAFT_CLIENT_OK : fail(client, GRAFT_CLIENT_ERR_CONNECTION, "out of memory");
}

int graft_client_load_adapter(graft_client *client, const char *model_id, const char *name, const char *path) {
    if (!client || !model_id || !name || !path) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__LoadAdapter m = GRAFT__V1__LOAD_ADAPTER__INIT;
    m.model_id = (char *)model_id;
    m.name = (char *)name;
    m.path = (char *)path;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_LOAD_ADAPTER;
    request.load_adapter = &m;
    return simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_OK, NULL);
}

int graft_client_save_adapter(graft_client *client, const char *model_id, const char *name, const char *path) {
    if (!client || !model_id || !name || !path) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__SaveAdapter m = GRAFT__V1__SAVE_ADAPTER__INIT;
    m.model_id = (char *)model_id;
    m.name = (char *)name;
    m.path = (char *)path;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_SAVE_ADAPTER;
    request.save_adapter = &m;
    return simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_OK, NULL);
}

void graft_client_tensor_free(graft_client_tensor *tensor) {
    if (!tensor) return;
    free(tensor->values);
    memset(tensor, 0, sizeof *tensor);
}

int graft_client_forward_texts(graft_client *client, const char *model_id, const char *const *texts, size_t n,
                               Graft__V1__Output output, graft_client_tensor *out) {
    if (!client || !model_id || !texts || n == 0 || !out) return client ? fail(client, GRAFT_CLIENT_ERR_ARGUMENT, "model_id, texts or out is NULL, or n is 0") : GRAFT_CLIENT_ERR_ARGUMENT;
    memset(out, 0, sizeof *out);
    Graft__V1__Forward m = GRAFT__V1__FORWARD__INIT;
    m.model_id = (char *)model_id;
    m.n_texts = n;
    m.texts = (char **)texts;
    m.output = output;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_FORWARD;
    request.forward = &m;
    Graft__V1__Response *r = NULL;
    int rc = simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_FORWARD, &r);
    if (rc) return rc;
    Graft__V1__ForwardResult *f = r->forward;
    if (f->n_shape < 1 || f->n_shape > 3) {
        graft__v1__response__free_unpacked(r, NULL);
        return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "forward result has %zu dimensions", f->n_shape);
    }
    out->values = malloc((f->n_values ? f->n_values : 1) * sizeof(float));
    if (!out->values) {
        graft__v1__response__free_unpacked(r, NULL);
        return fail(client, GRAFT_CLIENT_ERR_CONNECTION, "out of memory for %zu floats", f->n_values);
    }
    memcpy(out->values, f->values, f->n_values * sizeof(float));
    out->count = f->n_values;
    out->ndim = f->n_shape;
    for (size_t i = 0; i < f->n_shape; i++) out->shape[i] = f->shape[i];
    graft__v1__response__free_unpacked(r, NULL);
    return GRAFT_CLIENT_OK;
}

int graft_client_train(graft_client *client, const Graft__V1__StartTraining *start,
                       graft_client_progress_fn progress, void *user, char **job_id, Graft__V1__JobState *finished) {
    if (!client || !start) return GRAFT_CLIENT_ERR_ARGUMENT;
    if (job_id) *job_id = NULL;
    if (finished) *finished = GRAFT__V1__JOB_STATE__JOB_UNSPECIFIED;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_START_TRAINING;
    request.start_training = (Graft__V1__StartTraining *)start;
    Graft__V1__Response *r = NULL;
    int rc = simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_JOB_STARTED, &r);
    if (rc) return rc;
    if (job_id) *job_id = duplicate(r->job_started->job_id);
    graft__v1__response__free_unpacked(r, NULL);
    for (;;) {
        rc = graft_client_next(client, &r);
        if (rc) {
            if (r) graft__v1__response__free_unpacked(r, NULL);
            return rc;
        }
        if (r->kind_case != GRAFT__V1__RESPONSE__KIND_EVENT) {
            graft__v1__response__free_unpacked(r, NULL);
            continue;
        }
        const Graft__V1__TrainingEvent *e = r->event;
        graft_client_event event = {
            .job_id = e->job_id, .step = e->step, .total_steps = e->total_steps, .epoch = e->epoch,
            .loss = e->loss, .mean_loss = e->mean_loss, .learning_rate = e->learning_rate, .grad_norm = e->grad_norm,
            .tokens_per_second = e->tokens_per_second, .elapsed_seconds = e->elapsed_seconds,
            .eta_seconds = e->eta_seconds, .has_eval = e->eval != NULL,
            .eval_loss = e->eval ? e->eval->loss : 0, .eval_accuracy = e->eval ? e->eval->accuracy : 0,
            .finished = e->finished, .error = e->error ? e->error->message : "",
        };
        int stop = progress ? progress(&event, user) : 0;
        Graft__V1__JobState state = e->finished;
        if (state != GRAFT__V1__JOB_STATE__JOB_UNSPECIFIED) {
            if (finished) *finished = state;
            if (state == GRAFT__V1__JOB_STATE__JOB_FAILED)
                rc = fail(client, e->error && e->error->code > 0 ? (int)e->error->code : GRAFT__V1__ERROR__CODE__INTERNAL,
                          "job %s failed: %s", e->job_id, e->error ? e->error->message : "");
            else if (state == GRAFT__V1__JOB_STATE__JOB_CANCELLED)
                rc = fail(client, GRAFT__V1__ERROR__CODE__CANCELLED, "job %s was cancelled", e->job_id);
            graft__v1__response__free_unpacked(r, NULL);
            return rc;
        }
        graft__v1__response__free_unpacked(r, NULL);
        if (stop) return GRAFT_CLIENT_OK;
    }
}

int graft_client_cancel_job(graft_client *client, const char *job_id) {
    if (!client || !job_id) return GRAFT_CLIENT_ERR_ARGUMENT;
    Graft__V1__CancelJob m = GRAFT__V1__CANCEL_JOB__INIT;
    m.job_id = (char *)job_id;
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    request.kind_case = GRAFT__V1__REQUEST__KIND_CANCEL_JOB;
    request.cancel_job = &m;
    return simple_call(client, &request, GRAFT__V1__RESPONSE__KIND_OK, NULL);
}
