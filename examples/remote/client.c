/*
 * examples/remote/client.c — fine-tune through graftd from C: load MiniLM with a 3-class head, add LoRA, train
 * 20 steps on the demo tweets (printing each progress event), save the adapter, and classify two sentences.
 *
 *   client unix SOCKET_PATH OUTPUT_DIR
 *   client tcp HOST PORT TOKEN_FILE OUTPUT_DIR
 *
 * Build: cc -Ibindings/c examples/remote/client.c bindings/c/graft_client.c bindings/c/graft.pb-c.c -lprotobuf-c
 * Exits 0 only if every step worked, 20 progress events arrived and the job completed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graft_client.h"

static int events_seen;

static int on_event(const graft_client_event *e, void *user) {
    (void)user;
    if (e->finished == GRAFT__V1__JOB_STATE__JOB_UNSPECIFIED) {
        events_seen++;
        printf("job %s step %u/%u loss %.4f lr %.2e %.0f tokens/s\n", e->job_id, e->step, e->total_steps,
               (double)e->loss, (double)e->learning_rate, e->tokens_per_second);
    }
    return 0;
}

static int check(graft_client *c, int rc, const char *what) {
    if (rc != GRAFT_CLIENT_OK) fprintf(stderr, "%s failed (%d): %s\n", what, rc, graft_client_last_error(c));
    return rc;
}

static char *read_token(const char *path) {
    static char token[256];
    FILE *f = fopen(path, "r");
    if (!f || !fgets(token, sizeof token, f)) {
        if (f) fclose(f);
        return NULL;
    }
    fclose(f);
    token[strcspn(token, "\r\n")] = '\0';
    return token;
}

int main(int argc, char **argv) {
    int tcp = argc == 6 && strcmp(argv[1], "tcp") == 0;
    if (!tcp && !(argc == 4 && strcmp(argv[1], "unix") == 0)) {
        fprintf(stderr, "usage: %s unix SOCKET_PATH OUTPUT_DIR | tcp HOST PORT TOKEN_FILE OUTPUT_DIR\n", argv[0]);
        return 2;
    }
    const char *output = argv[argc - 1];
    graft_client *c = graft_client_new();
    if (!c) return 1;
    int rc;
    if (tcp) {
        const char *token = read_token(argv[4]);
        if (!token) {
            fprintf(stderr, "%s: cannot read the token\n", argv[4]);
            graft_client_free(c);
            return 1;
        }
        rc = graft_client_connect_tcp(c, argv[2], atoi(argv[3]), token);
    } else {
        rc = graft_client_connect_unix(c, argv[2], NULL);
    }
    if (check(c, rc, "connect")) {
        graft_client_free(c);
        return 1;
    }

    char *model = NULL, *job = NULL;
    int status = 1;
    graft_client_tensor logits = {0};
    if (check(c, graft_client_load_model(c, "minilm", GRAFT__V1__TASK__TASK_SEQUENCE_CLASSIFICATION, 3, &model), "load_model"))
        goto done;
    if (check(c, graft_client_add_adapter(c, model, "default",
                                          "{\"peft_type\":\"LORA\",\"r\":8,\"lora_alpha\":16,"
                                          "\"target_modules\":[\"query\",\"value\"],\"modules_to_save\":[\"classifier\"]}"),
              "add_adapter"))
        goto done;

    Graft__V1__TrainingConfig config = GRAFT__V1__TRAINING_CONFIG__INIT;
    /* Fields with a non-zero default sit in one-field oneofs: set the case to say the value is given. */
    config.learning_rate_set_case = GRAFT__V1__TRAINING_CONFIG__LEARNING_RATE_SET_LEARNING_RATE;
    config.learning_rate = 2e-3f;
    config.total_steps = 20;
    config.batch_size_set_case = GRAFT__V1__TRAINING_CONFIG__BATCH_SIZE_SET_BATCH_SIZE;
    config.batch_size = 16;
    Graft__V1__StartTraining start = GRAFT__V1__START_TRAINING__INIT;
    start.model_id = model;
    start.data = (char *)"tweets";
    start.config = &config;
    Graft__V1__JobState finished;
    if (check(c, graft_client_train(c, &start, on_event, NULL, &job, &finished), "train")) goto done;
    if (events_seen != 20 || finished != GRAFT__V1__JOB_STATE__JOB_COMPLETED) {
        fprintf(stderr, "expected 20 progress events and a completed job, got %d events, state %d\n", events_seen, (int)finished);
        goto done;
    }
    if (check(c, graft_client_save_adapter(c, model, "default", output), "save_adapter")) goto done;
    printf("saved the adapter of job %s to %s\n", job, output);

    /* Task arithmetic on the daemon: the trained adapter at half strength (PEFT's add_weighted_adapter). */
    const char *sources[] = {"default"};
    const double half[] = {0.5};
    char *report = NULL;
    if (check(c, graft_client_combine_adapters(c, model, "half", sources, half, 1, NULL, &report), "combine_adapters"))
        goto done;
    printf("combined: %s\n", report);
    free(report);

    const char *texts[] = {"what a great day, I love it", "awful service, never again"};
    if (check(c, graft_client_forward_texts(c, model, texts, 2, GRAFT__V1__OUTPUT__OUTPUT_DEFAULT, &logits), "forward"))
        goto done;
    if (logits.ndim != 2 || logits.shape[0] != 2 || logits.shape[1] != 3) {
        fprintf(stderr, "unexpected logits shape (ndim %zu)\n", logits.ndim);
        goto done;
    }
    for (uint32_t i = 0; i < 2; i++)
        printf("\"%s\" -> logits %.4f %.4f %.4f\n", texts[i], (double)logits.values[i * 3], (double)logits.values[i * 3 + 1],
               (double)logits.values[i * 3 + 2]);
    if (check(c, graft_client_unload_model(c, model), "unload_model")) goto done;
    status = 0;
done:
    graft_client_tensor_free(&logits);
    free(model);
    free(job);
    graft_client_free(c);
    return status;
}
