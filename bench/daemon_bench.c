/*
 * bench/daemon_bench.c — graftd round-trip latency (p50/p99) of small requests over the Unix socket and TCP, and
 * requests/s with 16 concurrent clients. Driven by bench/daemon, which starts the daemon.
 *
 *   daemon_bench SOCKET_PATH PORT TOKEN
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "graft_client.h"

static const char *socket_path, *token;
static int port;
static char *model_id;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int compare(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static graft_client *connect_client(int tcp) {
    graft_client *c = graft_client_new();
    int rc = tcp ? graft_client_connect_tcp(c, "127.0.0.1", port, token) : graft_client_connect_unix(c, socket_path, NULL);
    if (rc) {
        fprintf(stderr, "connect: %s\n", graft_client_last_error(c));
        exit(1);
    }
    return c;
}

/* One small request: set_active_adapter (a round trip through the engine worker, trivial work there) or
 * server_stats (answered on the loop thread). */
static void small_request(graft_client *c, int through_worker) {
    Graft__V1__Request request = GRAFT__V1__REQUEST__INIT;
    Graft__V1__SetActiveAdapter set = GRAFT__V1__SET_ACTIVE_ADAPTER__INIT;
    Graft__V1__ServerStatsRequest stats = GRAFT__V1__SERVER_STATS_REQUEST__INIT;
    if (through_worker) {
        set.model_id = model_id;
        set.name = (char *)"default";
        request.kind_case = GRAFT__V1__REQUEST__KIND_SET_ACTIVE_ADAPTER;
        request.set_active_adapter = &set;
    } else {
        request.kind_case = GRAFT__V1__REQUEST__KIND_SERVER_STATS;
        request.server_stats = &stats;
    }
    Graft__V1__Response *r = NULL;
    if (graft_client_call(c, &request, &r)) {
        fprintf(stderr, "request: %s\n", graft_client_last_error(c));
        exit(1);
    }
    graft__v1__response__free_unpacked(r, NULL);
}

static void latency(const char *transport, int tcp, int through_worker, int n) {
    graft_client *c = connect_client(tcp);
    double *t = malloc(sizeof(double) * (size_t)n);
    for (int i = 0; i < 200; i++) small_request(c, through_worker);
    for (int i = 0; i < n; i++) {
        double s = now();
        small_request(c, through_worker);
        t[i] = now() - s;
    }
    qsort(t, (size_t)n, sizeof(double), compare);
    printf("%-5s %-28s p50 %6.1f us   p99 %6.1f us   (%d requests)\n", transport,
           through_worker ? "set_active_adapter (worker)" : "server_stats (loop only)", t[n / 2] * 1e6,
           t[(int)(n * 0.99)] * 1e6, n);
    free(t);
    graft_client_free(c);
}

typedef struct {
    int tcp, kind;
    double seconds;
    long done;
} worker_args;

static void forward_request(graft_client *c) {
    const char *texts[] = {"the flight was delayed again"};
    graft_client_tensor out;
    if (graft_client_forward_texts(c, model_id, texts, 1, GRAFT__V1__OUTPUT__OUTPUT_DEFAULT, &out)) {
        fprintf(stderr, "forward: %s\n", graft_client_last_error(c));
        exit(1);
    }
    graft_client_tensor_free(&out);
}

static void *worker(void *p) {
    worker_args *a = p;
    graft_client *c = connect_client(a->tcp);
    double end = now() + a->seconds;
    while (now() < end) {
        if (a->kind == 2) forward_request(c);
        else small_request(c, a->kind);
        a->done++;
    }
    graft_client_free(c);
    return NULL;
}

static void throughput(const char *transport, int tcp, int kind, int clients, double seconds) {
    pthread_t threads[64];
    worker_args args[64];
    double start = now();
    for (int i = 0; i < clients; i++) {
        args[i] = (worker_args){.tcp = tcp, .kind = kind, .seconds = seconds, .done = 0};
        pthread_create(&threads[i], NULL, worker, &args[i]);
    }
    long total = 0;
    for (int i = 0; i < clients; i++) {
        pthread_join(threads[i], NULL);
        total += args[i].done;
    }
    double elapsed = now() - start;
    const char *what = kind == 2 ? "forward (MiniLM, 1 x 8 tokens)" : kind ? "set_active_adapter" : "server_stats";
    printf("%-5s %-32s %2d clients: %9.0f requests/s\n", transport, what, clients, (double)total / elapsed);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET_PATH PORT TOKEN\n", argv[0]);
        return 2;
    }
    socket_path = argv[1];
    port = atoi(argv[2]);
    token = argv[3];
    graft_client *c = connect_client(0);
    if (graft_client_load_model(c, "minilm", GRAFT__V1__TASK__TASK_SEQUENCE_CLASSIFICATION, 2, &model_id) ||
        graft_client_add_adapter(c, model_id, "default",
                                 "{\"peft_type\":\"LORA\",\"r\":8,\"target_modules\":[\"query\",\"value\"]}")) {
        fprintf(stderr, "setup: %s\n", graft_client_last_error(c));
        return 1;
    }
    for (int tcp = 0; tcp <= 1; tcp++) {
        latency(tcp ? "tcp" : "unix", tcp, 1, 20000);
        latency(tcp ? "tcp" : "unix", tcp, 0, 20000);
    }
    for (int tcp = 0; tcp <= 1; tcp++) throughput(tcp ? "tcp" : "unix", tcp, 1, 16, 3.0);
    throughput("unix", 0, 0, 16, 3.0);
    throughput("unix", 0, 2, 16, 5.0);
    graft_client_free(c);
    free(model_id);
    return 0;
}
