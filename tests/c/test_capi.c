/*
 * C ABI tests for libgraft: every function in include/graft.h, every documented error path (each must return
 * its status with a non-empty graft_last_error()), and real round trips on MiniLM (load, LoRA, forward, train,
 * evaluate, save, reload, identical output) and SmolLM2 (generate with a callback, a causal-LM step).
 *
 * Built with -std=c11 -Wall -Wextra -Werror -pedantic, and again with -fsanitize=address,undefined.
 * Usage: test_capi [GRAFT_HOME]   (default ${GRAFT_HOME:-$HOME/.cache/graft})
 */
#define _POSIX_C_SOURCE 200809L
#include "graft.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The ABI layout, frozen: fields are only ever appended (0.3.0 appended compute_dtype, 0.6.0 moe_base). */
_Static_assert(sizeof(graft_model_params) == 40, "graft_model_params layout");
_Static_assert(offsetof(graft_model_params, num_threads) == 4, "num_threads");
_Static_assert(offsetof(graft_model_params, task) == 8, "task");
_Static_assert(offsetof(graft_model_params, num_labels) == 12, "num_labels");
_Static_assert(offsetof(graft_model_params, seed) == 16, "seed");
_Static_assert(offsetof(graft_model_params, compute_dtype) == 24, "compute_dtype");
_Static_assert(offsetof(graft_model_params, moe_base) == 32, "moe_base (0.6.0)");
_Static_assert(sizeof(graft_sampling_params) == 40, "graft_sampling_params layout");
_Static_assert(offsetof(graft_sampling_params, max_new_tokens) == 4, "max_new_tokens");
_Static_assert(offsetof(graft_sampling_params, temperature) == 8, "temperature");
_Static_assert(offsetof(graft_sampling_params, top_p) == 12, "top_p");
_Static_assert(offsetof(graft_sampling_params, top_k) == 16, "top_k");
_Static_assert(offsetof(graft_sampling_params, stop_at_eos) == 20, "stop_at_eos");
_Static_assert(offsetof(graft_sampling_params, seed) == 24, "sampling seed");
_Static_assert(offsetof(graft_sampling_params, fast_decode) == 32, "fast_decode (0.5.0)");
_Static_assert(sizeof(graft_trainer_params) == 56, "graft_trainer_params layout");
_Static_assert(offsetof(graft_trainer_params, learning_rate) == 4, "learning_rate");
_Static_assert(offsetof(graft_trainer_params, weight_decay) == 8, "weight_decay");
_Static_assert(offsetof(graft_trainer_params, warmup_steps) == 12, "warmup_steps");
_Static_assert(offsetof(graft_trainer_params, total_steps) == 16, "total_steps");
_Static_assert(offsetof(graft_trainer_params, schedule) == 20, "schedule");
_Static_assert(offsetof(graft_trainer_params, optimizer) == 24, "optimizer");
_Static_assert(offsetof(graft_trainer_params, max_grad_norm) == 28, "max_grad_norm");
_Static_assert(offsetof(graft_trainer_params, gradient_accumulation_steps) == 32, "gradient_accumulation_steps");
_Static_assert(offsetof(graft_trainer_params, batch_size) == 36, "batch_size");
_Static_assert(offsetof(graft_trainer_params, seed) == 40, "trainer seed");
_Static_assert(offsetof(graft_trainer_params, epochs) == 48, "epochs");
_Static_assert(offsetof(graft_trainer_params, max_length) == 52, "max_length");
_Static_assert(sizeof(graft_progress) == 56, "graft_progress layout");
_Static_assert(offsetof(graft_progress, mean_loss) == 28, "mean_loss");
_Static_assert(offsetof(graft_progress, tokens_per_second) == 32, "tokens_per_second");
_Static_assert(offsetof(graft_progress, eta_seconds) == 48, "eta_seconds");

static int passed, failed;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL line %d: %s (last error: %s)\n", line, what, graft_last_error());
    }
}
#define CHECK(cond) check((cond) != 0, #cond, __LINE__)

/* The call returns `code`, and when it is an error, graft_last_error() explains it. */
static void expect(graft_status got, graft_status want, const char *call, int line) {
    const char *msg = graft_last_error();
    int ok = got == want && (want == GRAFT_OK ? msg[0] == '\0' : msg[0] != '\0');
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL line %d: %s returned %d (%s), expected %d (%s); last error: \"%s\"\n", line, call,
                (int)got, graft_status_string(got), (int)want, graft_status_string(want), msg);
    }
}
#define EXPECT(call, want) expect((call), (want), #call, __LINE__)

static char home[1024], minilm[1200], smollm[1200], tmpdir[256];

static void path_in_tmp(char *out, size_t size, const char *name) { snprintf(out, size, "%s/%s", tmpdir, name); }

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (!f) { perror(path); exit(2); }
    fputs(text, f);
    fclose(f);
}

static graft_model *load(const char *path, int32_t task, int32_t num_labels) {
    graft_model_params p;
    graft_model_params_init(&p);
    p.task = task;
    p.num_labels = num_labels;
    graft_model *m = NULL;
    EXPECT(graft_model_load(path, &p, &m), GRAFT_OK);
    if (!m) { fprintf(stderr, "cannot load %s: %s\n", path, graft_last_error()); exit(2); }
    return m;
}

/* ---------------------------------------------------------------------------------------------------------- */

static void test_version_and_status(void) {
    CHECK(graft_version() == GRAFT_VERSION_NUMBER);
    CHECK(strlen(graft_version_string()) >= 5);
    const graft_status codes[] = {GRAFT_OK, GRAFT_ERR_INVALID_ARGUMENT, GRAFT_ERR_IO, GRAFT_ERR_FORMAT,
                                  GRAFT_ERR_UNSUPPORTED, GRAFT_ERR_NOT_FOUND, GRAFT_ERR_OUT_OF_MEMORY,
                                  GRAFT_ERR_STATE, GRAFT_ERR_CANCELLED, GRAFT_ERR_INTERNAL};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        const char *s = graft_status_string(codes[i]);
        CHECK(s && s[0] && strcmp(s, "unknown status") != 0);
    }
    CHECK(strcmp(graft_status_string(42), "unknown status") == 0);
    CHECK(strcmp(graft_status_string(GRAFT_OK), "ok") == 0);
    /* The library's status texts and names are the header's table, row by row. */
    size_t rows = 0;
#define TABLE_ROW(name, code, description) \
    CHECK(strcmp(graft_status_string(code), description) == 0); \
    CHECK(graft_status_name(code) != NULL && strcmp(graft_status_name(code), #name) == 0); \
    rows++;
    GRAFT_STATUS_MAP(TABLE_ROW)
#undef TABLE_ROW
    CHECK(rows == 14);
    CHECK(graft_status_name(42) == NULL && graft_status_name(-14) == NULL);
    CHECK(graft_last_error()[0] == '\0');
    graft_string_free(NULL);
    graft_model_free(NULL);
    graft_trainer_free(NULL);
    graft_model_params_init(NULL);
    graft_sampling_params_init(NULL);
    graft_trainer_params_init(NULL);
    passed++;
}

static void test_params_init(void) {
    graft_model_params mp;
    memset(&mp, 0xAB, sizeof mp);
    graft_model_params_init(&mp);
    CHECK(mp.struct_size == sizeof mp && mp.num_threads == 0 && mp.task == GRAFT_TASK_BASE && mp.num_labels == 2 &&
          mp.seed == 0 && mp.compute_dtype == GRAFT_COMPUTE_FLOAT32 && mp.moe_base == NULL);
    graft_sampling_params sp;
    graft_sampling_params_init(&sp);
    CHECK(sp.struct_size == sizeof sp && sp.max_new_tokens == 128 && sp.temperature == 0.0f && sp.top_p == 1.0f &&
          sp.top_k == 0 && sp.stop_at_eos == 1 && sp.seed == 0 && sp.fast_decode == 0);
    graft_trainer_params tp;
    graft_trainer_params_init(&tp);
    CHECK(tp.struct_size == sizeof tp && fabsf(tp.learning_rate - 1e-3f) < 1e-9f && fabsf(tp.weight_decay - 0.01f) < 1e-9f &&
          tp.warmup_steps == 0 && tp.total_steps == 0 && tp.schedule == GRAFT_SCHEDULE_LINEAR &&
          tp.optimizer == GRAFT_OPTIMIZER_ADAMW && tp.max_grad_norm == 1.0f && tp.gradient_accumulation_steps == 1 &&
          tp.batch_size == 32 && tp.seed == 42 && tp.epochs == 1 && tp.max_length == 64);
    /* An older caller's smaller struct is never overrun: only the first `size` bytes are written. */
    unsigned char buf[64];
    memset(buf, 0xCD, sizeof buf);
    graft_trainer_params_init_sized((graft_trainer_params *)(void *)buf, 16);
    uint32_t size;
    memcpy(&size, buf, sizeof size);
    CHECK(size == 16 && buf[16] == 0xCD && buf[63] == 0xCD);
    /* A newer caller's larger struct gets its unknown tail zeroed. */
    memset(buf, 0xCD, sizeof buf);
    graft_model_params_init_sized((graft_model_params *)(void *)buf, 40);
    memcpy(&size, buf, sizeof size);
    CHECK(size == 40 && buf[24] == 0 && buf[39] == 0 && buf[40] == 0xCD);
    memset(buf, 0xCD, sizeof buf);
    graft_sampling_params_init_sized((graft_sampling_params *)(void *)buf, 4); /* too small: ignored */
    CHECK(buf[0] == 0xCD);
}

static void test_model_load_errors(void) {
    graft_model *m = NULL;
    graft_model_params p;
    char path[512];

    EXPECT(graft_model_load(NULL, NULL, &m), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_load(minilm, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_load("/nonexistent/graft-model", NULL, &m), GRAFT_ERR_NOT_FOUND);
    CHECK(strstr(graft_last_error(), "/nonexistent/graft-model") != NULL);
    EXPECT(graft_model_load(tmpdir, NULL, &m), GRAFT_ERR_NOT_FOUND); /* a directory without config.json */
    path_in_tmp(path, sizeof path, "garbage.gguf");
    write_file(path, "this is not a GGUF file at all, just text");
    EXPECT(graft_model_load(path, NULL, &m), GRAFT_ERR_FORMAT);
    CHECK(m == NULL);

    graft_model_params_init(&p);
    p.struct_size = 0;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "struct_size") != NULL);
    p.struct_size = 4;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    graft_model_params_init(&p);
    p.task = 7;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "task") != NULL);
    p.task = GRAFT_TASK_SEQUENCE_CLASSIFICATION;
    p.num_labels = 0;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "num_labels") != NULL);
    p.num_labels = 2;
    p.num_threads = -1;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    graft_model_params_init(&p);
    CHECK(p.compute_dtype == GRAFT_COMPUTE_FLOAT32);
    p.compute_dtype = 9;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "compute_dtype") != NULL);
    p.compute_dtype = GRAFT_COMPUTE_AUTO; /* bfloat16 where the CPU has it: the model says which it got */
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_OK);
    char *info = NULL;
    EXPECT(graft_model_info(m, &info), GRAFT_OK);
    CHECK(info && (strstr(info, "\"compute_dtype\":\"bfloat16\"") || strstr(info, "\"compute_dtype\":\"float32\"")));
    graft_string_free(info);
    graft_model_free(m);
    m = NULL;
    graft_model_params_init(&p);
    p.task = GRAFT_TASK_CAUSAL_LM;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_UNSUPPORTED);
    p.task = GRAFT_TASK_SEQUENCE_CLASSIFICATION;
    EXPECT(graft_model_load(smollm, &p, &m), GRAFT_ERR_UNSUPPORTED);

    /* A newer caller: a larger struct with a non-zero unknown tail is rejected, a zero tail accepted. */
    struct { graft_model_params p; int32_t future_field; int32_t pad; } bigger;
    memset(&bigger, 0, sizeof bigger);
    graft_model_params_init_sized(&bigger.p, sizeof bigger);
    bigger.future_field = 5;
    EXPECT(graft_model_load(minilm, &bigger.p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    bigger.future_field = 0;
    bigger.p.task = GRAFT_TASK_SEQUENCE_CLASSIFICATION;
    bigger.p.num_labels = 4;
    EXPECT(graft_model_load(minilm, &bigger.p, &m), GRAFT_OK);
    char *json = NULL;
    EXPECT(graft_model_info(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"num_labels\":4"));
    graft_string_free(json);
    graft_model_free(m);
    m = NULL;

    /* moe_base (0.6.0): a missing directory, an empty string and a model that is not a Llama decoder are refused by
     * name; a 0.5.0 caller's struct (ending before moe_base) never reads the field. */
    graft_model_params_init(&p);
    p.task = GRAFT_TASK_CAUSAL_LM;
    p.moe_base = "/nonexistent/graft-moe-base";
    EXPECT(graft_model_load(smollm, &p, &m), GRAFT_ERR_NOT_FOUND);
    CHECK(strstr(graft_last_error(), "/nonexistent/graft-moe-base") != NULL && strstr(graft_last_error(), "moe_base") != NULL);
    p.moe_base = "";
    EXPECT(graft_model_load(smollm, &p, &m), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "moe_base") != NULL);
    p.task = GRAFT_TASK_BASE;
    p.moe_base = tmpdir;
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_ERR_UNSUPPORTED);
    CHECK(strstr(graft_last_error(), "Llama") != NULL && m == NULL);
    p.moe_base = "/nonexistent/graft-moe-base";
    p.struct_size = offsetof(graft_model_params, moe_base);
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_OK);
    graft_model_free(m);
    m = NULL;

    /* An older caller: a struct_size that ends before num_labels gets num_labels' default (2). */
    graft_model_params_init(&p);
    p.task = GRAFT_TASK_SEQUENCE_CLASSIFICATION;
    p.num_labels = 3;
    p.struct_size = offsetof(graft_model_params, num_labels);
    EXPECT(graft_model_load(minilm, &p, &m), GRAFT_OK);
    json = NULL;
    EXPECT(graft_model_info(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"num_labels\":2"));
    graft_string_free(json);
    graft_model_free(m);
}

static void test_model_basics(graft_model *bert) {
    char *json = NULL;
    EXPECT(graft_model_info(NULL, &json), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_info(bert, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_info(bert, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"architecture\":\"bert\"") && strstr(json, "\"hidden_size\":384") &&
          strstr(json, "\"path\":\"encoder.layer.0.attention.self.query\"") && strstr(json, "\"shape\":[384,384]"));
    graft_string_free(json);

    int32_t ids[64];
    size_t n = 0;
    EXPECT(graft_tokenize(bert, "Hello, world!", 1, NULL, 0, &n), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(n == 6); /* [CLS] hello , world ! [SEP] */
    n = 0;
    EXPECT(graft_tokenize(bert, "Hello, world!", 1, ids, 3, &n), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(n == 6);
    EXPECT(graft_tokenize(bert, "Hello, world!", 1, ids, 64, &n), GRAFT_OK);
    CHECK(n == 6 && ids[0] == 101 && ids[5] == 102 && ids[1] == 7592);
    EXPECT(graft_tokenize(bert, "Hello, world!", 0, ids, 64, &n), GRAFT_OK);
    CHECK(n == 4 && ids[0] == 7592);
    EXPECT(graft_tokenize(NULL, "x", 1, ids, 64, &n), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_tokenize(bert, NULL, 1, ids, 64, &n), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_tokenize(bert, "x", 1, ids, 64, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_tokenize(bert, "\xff\xfe", 1, ids, 64, &n), GRAFT_ERR_INVALID_ARGUMENT); /* not UTF-8 */
    EXPECT(graft_tokenize(bert, "", 1, ids, 64, &n), GRAFT_OK);
    CHECK(n == 2);

    char *text = NULL;
    EXPECT(graft_tokenize(bert, "Hello, world!", 1, ids, 64, &n), GRAFT_OK);
    EXPECT(graft_detokenize(bert, ids, n, 1, &text), GRAFT_OK);
    CHECK(text && strcmp(text, "hello, world!") == 0);
    graft_string_free(text);
    text = NULL;
    EXPECT(graft_detokenize(bert, ids, n, 0, &text), GRAFT_OK);
    CHECK(text && strstr(text, "[CLS]") != NULL);
    graft_string_free(text);
    text = NULL;
    EXPECT(graft_detokenize(bert, NULL, 0, 1, &text), GRAFT_OK);
    CHECK(text && text[0] == '\0');
    graft_string_free(text);
    EXPECT(graft_detokenize(bert, NULL, 3, 1, &text), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_detokenize(bert, ids, n, 1, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_detokenize(NULL, ids, n, 1, &text), GRAFT_ERR_INVALID_ARGUMENT);

    /* Hidden states of a bare BERT; logits are unsupported without a head. */
    size_t count = 0;
    float *out = malloc(2 * 8 * 384 * sizeof(float));
    int32_t batch_ids[16] = {101, 7592, 1010, 2088, 999, 102, 0, 0, 101, 7592, 102, 0, 0, 0, 0, 0};
    int32_t lengths[2] = {6, 3};
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, NULL, 0, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(count == 2 * 8 * 384);
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count), GRAFT_OK);
    CHECK(out[0] != 0.0f && out[(6 * 384)] == 0.0f && out[(8 + 3) * 384] == 0.0f); /* padding is zero */
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_LOGITS, out, count, &count),
           GRAFT_ERR_UNSUPPORTED);
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, 3, out, count, &count), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 0, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 0, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_forward(NULL, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_forward(bert, NULL, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, NULL),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, NULL, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    int32_t bad_lengths[2] = {6, 9};
    EXPECT(graft_model_forward(bert, batch_ids, bad_lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "lengths[1]") != NULL);
    batch_ids[1] = 999999;
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, NULL, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "vocabulary") != NULL);
    batch_ids[1] = 7592;
    int32_t adapter_ids[2] = {0, -1};
    EXPECT(graft_model_forward(bert, batch_ids, lengths, 2, 8, adapter_ids, GRAFT_OUTPUT_HIDDEN, out, count, &count),
           GRAFT_ERR_INVALID_ARGUMENT); /* no adapter 0 yet */
    free(out);

    EXPECT(graft_generate(bert, ids, n, NULL, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_UNSUPPORTED);
    char *chat = NULL;
    EXPECT(graft_chat_template_apply(bert, "hello", &chat), GRAFT_ERR_UNSUPPORTED); /* an encoder has no template */
    CHECK(chat == NULL && strstr(graft_last_error(), "chat template") != NULL);

    /* Training a bare BERT: first wrong call order (no adapter), then no objective. */
    graft_trainer *t = NULL;
    EXPECT(graft_trainer_create(bert, NULL, NULL, NULL, &t), GRAFT_ERR_STATE);
    EXPECT(graft_adapter_add(bert, "a", "{\"peft_type\": \"LORA\", \"target_modules\": [\"query\"]}"), GRAFT_OK);
    EXPECT(graft_trainer_create(bert, NULL, NULL, NULL, &t), GRAFT_ERR_UNSUPPORTED);
    CHECK(t == NULL);
    EXPECT(graft_adapter_delete(bert, "a"), GRAFT_OK);

    /* The selective, sparse, gated and adaptive-rank methods build from their JSON configs; a bad value is named. */
    static const char *sparse[] = {
        "{\"peft_type\": \"BITFIT\", \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"SPIEL\", \"density\": 0.01, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"NEUROADA\", \"k\": 2, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"DSEE\", \"r\": 2, \"num_sparse\": 8, \"prune_ratio\": 0.1, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"ID3\", \"density\": 0.01, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"SPT\", \"budget_density\": 0.01, \"r\": 2, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"SPARSE_ADAPTER\", \"sparsity\": 0.5, \"large_sparse\": true}",
        "{\"peft_type\": \"TR_PTS\", \"density\": 0.005, \"token_keep_ratio\": 0.5, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"LOSIA\", \"rank_factor\": 0.125, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"TAPS\", \"l1_weight\": 0.001, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"SELECTIVE_LORA\", \"r\": 4, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"INCRELORA\", \"init_r\": 2, \"target_r\": 4, \"target_modules\": [\"query\"]}",
        "{\"peft_type\": \"TRIADAPTLORA\", \"init_r\": 1, \"target_r\": 4, \"target_modules\": [\"query\"]}",
    };
    for (size_t i = 0; i < sizeof sparse / sizeof sparse[0]; i++) {
        EXPECT(graft_adapter_add(bert, "s", sparse[i]), GRAFT_OK);
        EXPECT(graft_adapter_delete(bert, "s"), GRAFT_OK);
    }
    EXPECT(graft_adapter_add(bert, "s", "{\"peft_type\": \"SPIEL\", \"density\": 2, \"target_modules\": [\"query\"]}"),
           GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "density") != NULL);
}

static const char *lora = "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"target_modules\": [\"query\", \"value\"],"
                          " \"modules_to_save\": [\"classifier\"]}";

static void test_adapter_errors(graft_model *m) {
    char *json = NULL;
    EXPECT(graft_adapter_add(NULL, "x", lora), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_add(m, NULL, lora), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_add(m, "x", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_add(m, "x", "{not json"), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "JSON") != NULL);
    EXPECT(graft_adapter_add(m, "x", "[1, 2]"), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_add(m, "x", "{\"peft_type\": \"NOPE\", \"target_modules\": [\"query\"]}"), GRAFT_ERR_UNSUPPORTED);
    CHECK(strstr(graft_last_error(), "NOPE") != NULL);
    EXPECT(graft_adapter_add(m, "x", "{\"peft_type\": \"LORA\"}"), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "target_modules") != NULL);
    EXPECT(graft_adapter_add(m, "x", "{\"peft_type\": \"LORA\", \"target_modules\": [\"nothing_here\"]}"),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_add(m, "x", "{\"peft_type\": \"LORA\", \"r\": 0, \"target_modules\": [\"query\"]}"),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_add(m, "x.y", lora), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_list(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"adapters\":[]") && strstr(json, "\"active\":null"));
    graft_string_free(json);
    EXPECT(graft_adapter_list(NULL, &json), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_list(m, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_set_active(m, "missing"), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_set_active(m, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_set_enabled(NULL, 1), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_delete(m, "missing"), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_delete(NULL, "missing"), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_merge(m, "missing"), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_merge(NULL, "x"), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_unmerge(m, "missing"), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_unmerge(m, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_save(m, "missing", tmpdir), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_save(m, NULL, tmpdir), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_save(m, "x", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_load(m, "/nonexistent/adapter", NULL), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_load(m, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_load(NULL, tmpdir, NULL), GRAFT_ERR_INVALID_ARGUMENT);
}

/* The vendored peft-minilm-merge fixture (PEFT's add_weighted_adapter), relative to the checkout; make runs the
   tests from there. */
#define MERGE_FIXTURE "Tests/Fixtures/peft-minilm-merge"

/* Reads tensor `name` of a safetensors file into a malloc'd buffer of its raw bytes; *size receives the length. */
static void *safetensors_read(const char *path, const char *name, size_t *size) {
    FILE *f = fopen(path, "rb");
    if (!f) { perror(path); exit(2); }
    unsigned char len_bytes[8];
    if (fread(len_bytes, 1, 8, f) != 8) { fprintf(stderr, "%s: short file\n", path); exit(2); }
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = header_len << 8 | len_bytes[i];
    char *header = calloc(header_len + 1, 1);
    if (!header || fread(header, 1, header_len, f) != header_len) { fprintf(stderr, "%s: bad header\n", path); exit(2); }
    char key[128];
    snprintf(key, sizeof key, "\"%s\"", name);
    const char *entry = strstr(header, key);
    const char *offsets = entry ? strstr(entry, "\"data_offsets\"") : NULL;
    unsigned long long begin = 0, end = 0;
    if (!offsets || sscanf(strchr(offsets, '['), "[%llu,%llu]", &begin, &end) != 2 || end < begin) {
        fprintf(stderr, "%s: no tensor %s\n", path, name);
        exit(2);
    }
    void *data = malloc(end - begin);
    if (!data || fseek(f, (long)(8 + header_len + begin), SEEK_SET) != 0 || fread(data, 1, end - begin, f) != end - begin) {
        fprintf(stderr, "%s: cannot read %s\n", path, name);
        exit(2);
    }
    free(header);
    fclose(f);
    *size = end - begin;
    return data;
}

/* graft_adapter_combine reproduces PEFT's "ties" combination of adapters a and b4 (weights 0.7, 0.5, density 0.5)
   on the fixture's two texts, and rejects bad calls naming what is wrong. */
static void test_adapter_combine(void) {
    graft_model *m = load(minilm, GRAFT_TASK_BASE, 0);
    EXPECT(graft_adapter_load(m, MERGE_FIXTURE "/a", "a"), GRAFT_OK);
    EXPECT(graft_adapter_load(m, MERGE_FIXTURE "/b4", "b4"), GRAFT_OK);
    const char *names[] = {"a", "b4"};
    const double weights[] = {0.7, 0.5};
    char *report = NULL;
    EXPECT(graft_adapter_combine(m, "ties", names, weights, 2,
                                 "{\"combination_type\": \"ties\", \"density\": 0.5, \"majority_sign_method\": \"total\"}",
                                 &report), GRAFT_OK);
    CHECK(report && strstr(report, "\"r\":4") && strstr(report, "\"combination_type\":\"ties\""));
    graft_string_free(report);
    char *json = NULL;
    EXPECT(graft_adapter_list(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"active\":\"b4\"")); /* PEFT leaves the active adapter as it was */
    graft_string_free(json);
    EXPECT(graft_adapter_set_active(m, "ties"), GRAFT_OK);

    size_t ids_size = 0, mask_size = 0, expected_size = 0;
    int64_t *ids64 = safetensors_read(MERGE_FIXTURE "/inputs.safetensors", "input_ids", &ids_size);
    int64_t *mask = safetensors_read(MERGE_FIXTURE "/inputs.safetensors", "attention_mask", &mask_size);
    float *expected = safetensors_read(MERGE_FIXTURE "/ties/expected.safetensors", "last_hidden_state", &expected_size);
    enum { ROWS = 2, STRIDE = 12, HIDDEN = 384 };
    CHECK(ids_size == ROWS * STRIDE * sizeof(int64_t) && expected_size == ROWS * STRIDE * HIDDEN * sizeof(float));
    int32_t ids[ROWS * STRIDE], lengths[ROWS] = {0, 0};
    for (int i = 0; i < ROWS * STRIDE; i++) {
        ids[i] = (int32_t)ids64[i];
        lengths[i / STRIDE] += (int32_t)mask[i];
    }
    static float out[ROWS * STRIDE * HIDDEN];
    size_t count = 0;
    EXPECT(graft_model_forward(m, ids, lengths, ROWS, STRIDE, NULL, GRAFT_OUTPUT_HIDDEN, out, ROWS * STRIDE * HIDDEN, &count),
           GRAFT_OK);
    float worst = 0;
    for (int b = 0; b < ROWS; b++)
        for (int t = 0; t < lengths[b]; t++)
            for (int k = 0; k < HIDDEN; k++) {
                size_t i = ((size_t)b * STRIDE + t) * HIDDEN + k;
                float d = fabsf(out[i] - expected[i]);
                if (!(d <= worst)) worst = d; /* a NaN becomes the worst and fails below */
            }
    printf("graft_adapter_combine ties: max-abs vs PEFT %g\n", (double)worst);
    CHECK(worst <= 1e-4f);
    free(ids64);
    free(mask);
    free(expected);

    /* merge_and_unload + save: the saved directory loads as a plain model with the same output. */
    char merged_dir[512];
    path_in_tmp(merged_dir, sizeof merged_dir, "merged-ties");
    EXPECT(graft_model_save_merged(m, "ties", merged_dir), GRAFT_OK);
    EXPECT(graft_model_save_merged(m, "ties", merged_dir), GRAFT_ERR_NOT_FOUND); /* it was unloaded */
    EXPECT(graft_model_save_merged(NULL, "a", merged_dir), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_model_save_merged(m, "a", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    graft_model *plain = load(merged_dir, GRAFT_TASK_BASE, 0);
    static float merged_out[ROWS * STRIDE * HIDDEN];
    EXPECT(graft_model_forward(plain, ids, lengths, ROWS, STRIDE, NULL, GRAFT_OUTPUT_HIDDEN, merged_out,
                               ROWS * STRIDE * HIDDEN, &count), GRAFT_OK);
    float merged_worst = 0;
    for (size_t i = 0; i < (size_t)ROWS * STRIDE * HIDDEN; i++) {
        float d = fabsf(merged_out[i] - out[i]);
        if (!(d <= merged_worst)) merged_worst = d;
    }
    printf("graft_model_save_merged: reloaded model max-abs vs the adapter %g\n", (double)merged_worst);
    CHECK(merged_worst <= 1e-4f);
    graft_model_free(plain);

    /* graft_adapter_compress: ComPEFT and 1-bit directories load back as working adapters of the same shape. */
    char compressed_dir[512];
    const char *methods[] = {"compeft", "onebit"};
    for (int k = 0; k < 2; k++) {
        path_in_tmp(compressed_dir, sizeof compressed_dir, methods[k]);
        char *creport = NULL;
        EXPECT(graft_adapter_compress(m, "a", methods[k], compressed_dir, k == 0 ? "{\"density\": 0.2}" : NULL, &creport),
               GRAFT_OK);
        CHECK(creport && strstr(creport, "\"file_bytes\":") && strstr(creport, methods[k]));
        printf("graft_adapter_compress %s: %s\n", methods[k], creport ? creport : "(null)");
        graft_string_free(creport);
        EXPECT(graft_adapter_load(m, compressed_dir, methods[k]), GRAFT_OK);
        EXPECT(graft_adapter_set_active(m, methods[k]), GRAFT_OK);
        EXPECT(graft_model_forward(m, ids, lengths, ROWS, STRIDE, NULL, GRAFT_OUTPUT_HIDDEN, merged_out,
                                   ROWS * STRIDE * HIDDEN, &count), GRAFT_OK);
        CHECK(count == (size_t)ROWS * STRIDE * HIDDEN);
        for (size_t i = 0; i < count; i++) CHECK(isfinite(merged_out[i]));
    }
    EXPECT(graft_adapter_compress(m, "a", "zip", compressed_dir, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "zip") != NULL);
    EXPECT(graft_adapter_compress(m, "a", "compeft", compressed_dir, "{\"density\": 2}", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_compress(m, "a", "onebit", compressed_dir, "{\"density\": 0.5}", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_compress(m, "nope", "onebit", compressed_dir, NULL, NULL), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_adapter_compress(NULL, "a", "onebit", compressed_dir, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_compress(m, "a", NULL, compressed_dir, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_compress(m, "a", "onebit", NULL, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);

    const char *bad_names[] = {"a", NULL};
    const double bad_weights[] = {1.0, NAN};
    EXPECT(graft_adapter_combine(NULL, "x", names, weights, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_combine(m, NULL, names, weights, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_combine(m, "x", NULL, weights, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_combine(m, "x", names, NULL, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_combine(m, "x", names, weights, 0, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_combine(m, "x", bad_names, weights, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "adapters[1]") != NULL);
    EXPECT(graft_adapter_combine(m, "x", names, bad_weights, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "b4") != NULL);
    EXPECT(graft_adapter_combine(m, "b4", names, weights, 2, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_combine(m, "x", names, weights, 2, "{\"combination_type\": \"average\"}", NULL),
           GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "average") != NULL);
    EXPECT(graft_adapter_combine(m, "x", names, weights, 2, "{\"combination_type\": \"ties\"}", NULL),
           GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "density") != NULL);
    EXPECT(graft_adapter_combine(m, "x", names, weights, 2, "{\"densty\": 0.5}", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "densty") != NULL);
    EXPECT(graft_adapter_combine(m, "x", names, weights, 2, "{not json", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    const char *missing[] = {"a", "nope"};
    EXPECT(graft_adapter_combine(m, "x", missing, weights, 2, NULL, NULL), GRAFT_ERR_NOT_FOUND);
    CHECK(strstr(graft_last_error(), "nope") != NULL);
    graft_model_free(m);
}

/* Four short texts of three classes, padded to a stride of 16. */
#define B 4
#define S 16
static int32_t train_ids[B * S], train_lengths[B];
static const int32_t train_labels[B] = {2, 0, 1, 2};

static void make_batch(graft_model *m) {
    const char *texts[B] = {"I love this, what a wonderful day", "This is terrible and I hate it",
                            "The meeting is at noon on Tuesday", "Best concert ever, amazing!"};
    memset(train_ids, 0, sizeof train_ids);
    for (int b = 0; b < B; b++) {
        size_t n = 0;
        EXPECT(graft_tokenize(m, texts[b], 1, train_ids + b * S, S, &n), GRAFT_OK);
        train_lengths[b] = (int32_t)n;
    }
}

static int progress_calls;
static int on_progress(const graft_progress *p, void *user_data) {
    int stop_at = *(const int *)user_data;
    progress_calls++;
    if (!(p->struct_size >= sizeof(graft_progress) && p->step >= 1 && p->total_steps >= p->step && isfinite(p->loss) &&
          p->learning_rate >= 0 && p->elapsed_seconds >= 0)) {
        progress_calls += 1000; /* flag a malformed record */
    }
    return stop_at > 0 && p->step >= stop_at;
}

static void test_minilm_round_trip(void) {
    graft_model *m = load(minilm, GRAFT_TASK_SEQUENCE_CLASSIFICATION, 3);
    test_adapter_errors(m);
    make_batch(m);

    float base[B * 3], adapted[B * 3], again[B * 3];
    size_t count = 0;
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, NULL, GRAFT_OUTPUT_LOGITS, base, B * 3, &count), GRAFT_OK);
    CHECK(count == B * 3);

    EXPECT(graft_adapter_add(m, "lora", lora), GRAFT_OK);
    EXPECT(graft_adapter_add(m, "lora", lora), GRAFT_ERR_INVALID_ARGUMENT); /* name in use */
    char *json = NULL;
    EXPECT(graft_adapter_list(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"name\":\"lora\"") && strstr(json, "\"active\":\"lora\"") && strstr(json, "\"id\":0") &&
          strstr(json, "\"layers\":12"));
    graft_string_free(json);

    graft_trainer_params tp;
    graft_trainer_params_init(&tp);
    tp.learning_rate = 1e-2f;
    tp.schedule = GRAFT_SCHEDULE_CONSTANT;
    tp.batch_size = 8;
    graft_trainer *t = NULL;

    /* Trainer argument errors. */
    EXPECT(graft_trainer_create(NULL, NULL, &tp, NULL, &t), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_create(m, NULL, &tp, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_create(m, "missing", &tp, NULL, &t), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_trainer_create(m, NULL, &tp, "{bad json", &t), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_create(m, NULL, &tp, "{\"nope\": 1}", &t), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "nope") != NULL);
    EXPECT(graft_trainer_create(m, NULL, &tp, "{\"beta1\": 2}", &t), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_create(m, NULL, &tp, "[]", &t), GRAFT_ERR_INVALID_ARGUMENT);
    tp.struct_size = 0;
    EXPECT(graft_trainer_create(m, NULL, &tp, NULL, &t), GRAFT_ERR_INVALID_ARGUMENT);
    tp.struct_size = sizeof tp;
    tp.learning_rate = -1.0f;
    EXPECT(graft_trainer_create(m, NULL, &tp, NULL, &t), GRAFT_ERR_INVALID_ARGUMENT);
    tp.learning_rate = 1e-2f;
    tp.schedule = 9;
    EXPECT(graft_trainer_create(m, NULL, &tp, NULL, &t), GRAFT_ERR_INVALID_ARGUMENT);
    tp.schedule = GRAFT_SCHEDULE_CONSTANT;
    tp.optimizer = 9;
    EXPECT(graft_trainer_create(m, NULL, &tp, NULL, &t), GRAFT_ERR_INVALID_ARGUMENT);
    tp.optimizer = GRAFT_OPTIMIZER_ADAMW;
    tp.max_grad_norm = -1.0f;
    EXPECT(graft_trainer_create(m, NULL, &tp, NULL, &t), GRAFT_ERR_INVALID_ARGUMENT);
    tp.max_grad_norm = 1.0f;
    CHECK(t == NULL);
    EXPECT(graft_trainer_create(m, "lora", &tp, "{\"shuffle\": false, \"beta2\": 0.99}", &t), GRAFT_OK);

    /* Not under mpirun: rank 0 of 1 (graft_trainer_world, 0.4.0). */
    int32_t world_rank = -1, world_size = -1;
    EXPECT(graft_trainer_world(t, &world_rank, &world_size), GRAFT_OK);
    CHECK(world_rank == 0 && world_size == 1);
    EXPECT(graft_trainer_world(NULL, &world_rank, &world_size), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_world(t, NULL, NULL), GRAFT_OK);

    /* Step errors. */
    float loss = 0, first = 0, last = 0, accuracy = -1;
    EXPECT(graft_trainer_step(NULL, train_ids, train_lengths, B, S, train_labels, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_step(t, train_ids, train_lengths, B, S, NULL, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "labels") != NULL);
    int32_t bad_labels[B] = {0, 1, 5, 2};
    EXPECT(graft_trainer_step(t, train_ids, train_lengths, B, S, bad_labels, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "labels[2]") != NULL);
    EXPECT(graft_trainer_step(t, NULL, train_lengths, B, S, train_labels, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_step(t, train_ids, train_lengths, -1, S, train_labels, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_evaluate(NULL, train_ids, train_lengths, B, S, train_labels, &loss, &accuracy),
           GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_adapter_delete(m, "lora"), GRAFT_ERR_STATE); /* being trained */

    /* Training drives the loss down on this batch. */
    for (int i = 0; i < 8; i++) {
        EXPECT(graft_trainer_step(t, train_ids, train_lengths, B, S, train_labels, &loss), GRAFT_OK);
        if (i == 0) first = loss;
        last = loss;
    }
    CHECK(isfinite(first) && last < first * 0.8f);
    EXPECT(graft_trainer_evaluate(t, train_ids, train_lengths, B, S, train_labels, &loss, &accuracy), GRAFT_OK);
    CHECK(isfinite(loss) && loss < first && accuracy >= 0.0f && accuracy <= 1.0f);

    /* Forward with the trained adapter differs from the base; per-row adapter ids pick adapter or base. */
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, NULL, GRAFT_OUTPUT_LOGITS, adapted, B * 3, &count), GRAFT_OK);
    CHECK(memcmp(adapted, base, sizeof base) != 0);
    int32_t rows[B] = {0, -1, 0, -1};
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, rows, GRAFT_OUTPUT_LOGITS, again, B * 3, &count), GRAFT_OK);
    int mixed_ok = 1;
    for (int b = 0; b < B; b++) {
        const float *want = rows[b] < 0 ? base : adapted;
        for (int c = 0; c < 3; c++) mixed_ok &= fabsf(again[b * 3 + c] - want[b * 3 + c]) < 1e-5f;
    }
    CHECK(mixed_ok);
    int32_t bad_rows[B] = {0, 1, 0, -1};
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, bad_rows, GRAFT_OUTPUT_LOGITS, again, B * 3, &count),
           GRAFT_ERR_INVALID_ARGUMENT);

    /* Disable / enable. */
    EXPECT(graft_adapter_set_enabled(m, 0), GRAFT_OK);
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, NULL, GRAFT_OUTPUT_LOGITS, again, B * 3, &count), GRAFT_OK);
    CHECK(memcmp(again, base, sizeof base) == 0);
    EXPECT(graft_adapter_set_enabled(m, 1), GRAFT_OK);
    EXPECT(graft_adapter_set_active(m, "lora"), GRAFT_OK);

    /* Merge: same output from the merged weights; wrong-order calls are state errors. */
    EXPECT(graft_adapter_unmerge(m, "lora"), GRAFT_ERR_STATE);
    EXPECT(graft_adapter_merge(m, "lora"), GRAFT_OK);
    EXPECT(graft_adapter_merge(m, "lora"), GRAFT_ERR_STATE);
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, NULL, GRAFT_OUTPUT_LOGITS, again, B * 3, &count), GRAFT_OK);
    int merged_ok = 1;
    for (int i = 0; i < B * 3; i++) merged_ok &= fabsf(again[i] - adapted[i]) < 1e-4f;
    CHECK(merged_ok);
    EXPECT(graft_model_forward(m, train_ids, train_lengths, B, S, rows, GRAFT_OUTPUT_LOGITS, again, B * 3, &count),
           GRAFT_ERR_STATE);
    EXPECT(graft_trainer_step(t, train_ids, train_lengths, B, S, train_labels, &loss), GRAFT_ERR_STATE);
    EXPECT(graft_adapter_unmerge(m, "lora"), GRAFT_OK);

    /* Checkpoints. */
    char ckpt[512], adapter_dir[512], path[512];
    path_in_tmp(ckpt, sizeof ckpt, "ckpt");
    path_in_tmp(adapter_dir, sizeof adapter_dir, "adapter");
    EXPECT(graft_trainer_save_checkpoint(t, ckpt), GRAFT_OK);
    EXPECT(graft_trainer_save_checkpoint(t, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_save_checkpoint(NULL, ckpt), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_load_checkpoint(t, "/nonexistent/ckpt"), GRAFT_ERR_NOT_FOUND);
    EXPECT(graft_trainer_load_checkpoint(NULL, ckpt), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_load_checkpoint(t, ckpt), GRAFT_OK);

    /* Save the adapter; a fresh model with it loaded gives identical logits. */
    EXPECT(graft_adapter_save(m, "lora", adapter_dir), GRAFT_OK);
    graft_model *fresh = load(minilm, GRAFT_TASK_SEQUENCE_CLASSIFICATION, 3);
    EXPECT(graft_adapter_load(fresh, adapter_dir, "restored"), GRAFT_OK);
    EXPECT(graft_adapter_load(fresh, adapter_dir, "restored"), GRAFT_ERR_INVALID_ARGUMENT); /* name in use */
    EXPECT(graft_model_forward(fresh, train_ids, train_lengths, B, S, NULL, GRAFT_OUTPUT_LOGITS, again, B * 3, &count), GRAFT_OK);
    CHECK(memcmp(again, adapted, sizeof adapted) == 0);
    /* A checkpoint of another optimizer is refused; a malformed adapter file is a format error. */
    graft_trainer *sgd = NULL;
    tp.optimizer = GRAFT_OPTIMIZER_SGD;
    EXPECT(graft_trainer_create(fresh, "restored", &tp, NULL, &sgd), GRAFT_OK);
    EXPECT(graft_trainer_load_checkpoint(sgd, ckpt), GRAFT_ERR_INVALID_ARGUMENT);
    graft_trainer_free(sgd);
    path_in_tmp(path, sizeof path, "adapter/adapter_model.safetensors");
    write_file(path, "garbage");
    EXPECT(graft_adapter_load(fresh, adapter_dir, "broken"), GRAFT_ERR_FORMAT);
    graft_model_free(fresh);

    /* train_file: tweets with a step limit and a progress callback; cancellation; bad data files. */
    graft_trainer *t2 = NULL;
    EXPECT(graft_adapter_add(m, "second", lora), GRAFT_OK);
    tp.optimizer = GRAFT_OPTIMIZER_ADAMW;
    tp.total_steps = 3;
    tp.schedule = GRAFT_SCHEDULE_LINEAR;
    EXPECT(graft_trainer_create(m, "second", &tp, "{\"max_examples\": 64}", &t2), GRAFT_OK);
    int stop_at = 0;
    progress_calls = 0;
    EXPECT(graft_trainer_train_file(t2, "tweets", on_progress, &stop_at), GRAFT_OK);
    CHECK(progress_calls == 3);
    EXPECT(graft_trainer_train_file(t2, "tweets", on_progress, &stop_at), GRAFT_ERR_STATE); /* run finished */
    graft_trainer_free(t2);
    t2 = NULL;
    tp.total_steps = 0;
    EXPECT(graft_trainer_create(m, "second", &tp, "{\"max_examples\": 64}", &t2), GRAFT_OK);
    stop_at = 2;
    progress_calls = 0;
    EXPECT(graft_trainer_train_file(t2, "tweets", on_progress, &stop_at), GRAFT_ERR_CANCELLED);
    CHECK(progress_calls == 2);
    EXPECT(graft_trainer_train_file(t2, "/nonexistent/data.jsonl", NULL, NULL), GRAFT_ERR_NOT_FOUND);
    path_in_tmp(path, sizeof path, "bad.jsonl");
    write_file(path, "{\"text\": \"fine\", \"label\": 1}\n{broken\n");
    EXPECT(graft_trainer_train_file(t2, path, NULL, NULL), GRAFT_ERR_FORMAT);
    CHECK(strstr(graft_last_error(), "bad.jsonl:2") != NULL);
    path_in_tmp(path, sizeof path, "labels.jsonl");
    write_file(path, "{\"text\": \"fine\", \"label\": 7}\n");
    EXPECT(graft_trainer_train_file(t2, path, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    /* Step counters continue across calls: this run (8 batches) stopped at 2, so 2 examples are "finished". */
    path_in_tmp(path, sizeof path, "good.jsonl");
    write_file(path, "{\"text\": \"great\", \"label\": \"positive\"}\n{\"text\": \"awful\", \"label\": \"negative\"}\n");
    EXPECT(graft_trainer_train_file(t2, path, NULL, NULL), GRAFT_ERR_STATE);
    graft_trainer *t3 = NULL;
    EXPECT(graft_trainer_create(m, "second", &tp, NULL, &t3), GRAFT_OK);
    EXPECT(graft_trainer_train_file(t3, path, NULL, NULL), GRAFT_OK);
    graft_trainer_free(t3);
    EXPECT(graft_trainer_train_file(t2, NULL, NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_trainer_train_file(NULL, "tweets", NULL, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    graft_trainer_free(t2);
    EXPECT(graft_adapter_delete(m, "second"), GRAFT_OK);

    /* The trainer outlives its model handle. */
    graft_model_free(m);
    EXPECT(graft_trainer_step(t, train_ids, train_lengths, B, S, train_labels, &loss), GRAFT_OK);
    graft_trainer_free(t);
}

static int token_calls;
static char generated_text[4096];
static int on_token(int32_t token, const char *piece, void *user_data) {
    int stop_after = *(const int *)user_data;
    (void)token;
    token_calls++;
    if (strlen(generated_text) + strlen(piece) < sizeof generated_text) strcat(generated_text, piece);
    return stop_after > 0 && token_calls >= stop_after;
}

static void test_smollm(void) {
    graft_model *m = load(smollm, GRAFT_TASK_CAUSAL_LM, 0);
    char *json = NULL;
    EXPECT(graft_model_info(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "\"architecture\":\"llama\"") && strstr(json, "\"task\":\"causal_lm\""));
    graft_string_free(json);

    int32_t prompt[64];
    size_t n = 0;
    EXPECT(graft_tokenize(m, "The capital of France is", 0, prompt, 64, &n), GRAFT_OK);
    CHECK(n >= 4);
    graft_sampling_params sp;
    graft_sampling_params_init(&sp);
    sp.max_new_tokens = 8;
    int32_t out[8];
    size_t n_out = 0;
    int stop_after = 0;
    token_calls = 0;
    generated_text[0] = '\0';
    EXPECT(graft_generate(m, prompt, n, &sp, on_token, &stop_after, out, 8, &n_out), GRAFT_OK);
    CHECK(n_out >= 1 && n_out <= 8 && (size_t)token_calls == n_out);
    CHECK(strstr(generated_text, "Paris") != NULL);
    char *text = NULL;
    EXPECT(graft_detokenize(m, out, n_out, 1, &text), GRAFT_OK);
    CHECK(text && strcmp(text, generated_text) == 0);
    graft_string_free(text);

    /* The chat template the CLI applies by default, then generation from it. */
    char *chat = NULL;
    EXPECT(graft_chat_template_apply(m, "What is the capital of France?", &chat), GRAFT_OK);
    CHECK(chat && strcmp(chat, "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n") == 0);
    int32_t chat_ids[64];
    size_t chat_n = 0;
    EXPECT(graft_tokenize(m, chat, 0, chat_ids, 64, &chat_n), GRAFT_OK);
    graft_string_free(chat);
    generated_text[0] = '\0';
    stop_after = 0;
    token_calls = 0;
    EXPECT(graft_generate(m, chat_ids, chat_n, &sp, on_token, &stop_after, out, 8, &n_out), GRAFT_OK);
    CHECK(strstr(generated_text, "Paris") != NULL);
    EXPECT(graft_chat_template_apply(m, "", &chat), GRAFT_OK);
    CHECK(chat && strstr(chat, "<|im_start|>assistant") != NULL);
    graft_string_free(chat);
    chat = NULL;
    EXPECT(graft_chat_template_apply(m, NULL, &chat), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "user_message") != NULL);
    EXPECT(graft_chat_template_apply(m, "hi", NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_chat_template_apply(NULL, "hi", &chat), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(chat == NULL);

    stop_after = 2;
    token_calls = 0;
    generated_text[0] = '\0';
    sp.temperature = 0.8f;
    sp.top_p = 0.9f;
    sp.top_k = 40;
    sp.seed = 7;
    EXPECT(graft_generate(m, prompt, n, &sp, on_token, &stop_after, NULL, 0, &n_out), GRAFT_OK);
    CHECK(n_out == 2 && token_calls == 2);
    EXPECT(graft_generate(m, prompt, n, &sp, NULL, NULL, out, 4, &n_out), GRAFT_ERR_INVALID_ARGUMENT); /* capacity */
    sp.top_p = 0.0f;
    EXPECT(graft_generate(m, prompt, n, &sp, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "top_p") != NULL);
    sp.top_p = 1.0f;
    sp.struct_size = 3;
    EXPECT(graft_generate(m, prompt, n, &sp, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    sp.struct_size = sizeof sp;
    EXPECT(graft_generate(m, prompt, 0, &sp, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_generate(m, NULL, n, &sp, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    EXPECT(graft_generate(NULL, prompt, n, &sp, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);
    sp.max_new_tokens = 100000;
    EXPECT(graft_generate(m, prompt, n, &sp, NULL, NULL, NULL, 0, NULL), GRAFT_ERR_INVALID_ARGUMENT);

    /* Logits layout: [batch, stride, vocab]. */
    size_t count = 0;
    EXPECT(graft_model_forward(m, prompt, NULL, 1, 4, NULL, GRAFT_OUTPUT_LOGITS, NULL, 0, &count), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(count == 4 * 49152);
    float *logits = malloc(count * sizeof(float));
    EXPECT(graft_model_forward(m, prompt, NULL, 1, 4, NULL, GRAFT_OUTPUT_LOGITS, logits, count, &count), GRAFT_OK);
    CHECK(isfinite(logits[0]) && isfinite(logits[count - 1]));
    free(logits);

    /* A causal-LM LoRA step: next-token on every token, then Hugging Face-style labels with -100. */
    EXPECT(graft_adapter_add(m, "lm", "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"q_proj\", \"v_proj\"]}"), GRAFT_OK);
    graft_trainer *t = NULL;
    EXPECT(graft_trainer_create(m, NULL, NULL, NULL, &t), GRAFT_OK);
    float loss = 0, accuracy = 0;
    int32_t ids[2 * 8] = {0};
    int32_t lengths[2] = {(int32_t)(n < 8 ? n : 8), 3};
    memcpy(ids, prompt, (size_t)lengths[0] * sizeof(int32_t));
    memcpy(ids + 8, prompt, 3 * sizeof(int32_t));
    EXPECT(graft_trainer_step(t, ids, lengths, 2, 8, NULL, &loss), GRAFT_OK);
    CHECK(isfinite(loss) && loss > 0);
    int32_t labels[2 * 8];
    for (int i = 0; i < 16; i++) labels[i] = i % 8 < 2 ? -100 : ids[i];
    EXPECT(graft_trainer_step(t, ids, lengths, 2, 8, labels, &loss), GRAFT_OK);
    labels[2] = -7;
    EXPECT(graft_trainer_step(t, ids, lengths, 2, 8, labels, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    for (int i = 0; i < 16; i++) labels[i] = -100;
    EXPECT(graft_trainer_step(t, ids, lengths, 2, 8, labels, &loss), GRAFT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(graft_last_error(), "scored") != NULL);
    EXPECT(graft_trainer_evaluate(t, ids, lengths, 2, 8, NULL, &loss, &accuracy), GRAFT_OK);
    CHECK(isfinite(loss) && accuracy >= 0 && accuracy <= 1);
    /* NULL labels mean "labels = ids" (Hugging Face's convention; the library shifts). */
    float loss_ids = 0;
    EXPECT(graft_trainer_evaluate(t, ids, lengths, 2, 8, ids, &loss_ids, NULL), GRAFT_OK);
    CHECK(loss_ids == loss);
    graft_trainer_free(t);

    /* train_file on the tweets as prompt/completion pairs, one step. */
    graft_trainer_params tp;
    graft_trainer_params_init(&tp);
    tp.total_steps = 1;
    tp.batch_size = 4;
    int stop_at = 0;
    progress_calls = 0;
    EXPECT(graft_trainer_create(m, "lm", &tp, "{\"max_examples\": 8}", &t), GRAFT_OK);
    EXPECT(graft_trainer_train_file(t, "tweets", on_progress, &stop_at), GRAFT_OK);
    CHECK(progress_calls == 1);
    graft_trainer_free(t);
    graft_model_free(m);
}

/* graft_last_error() is per thread: a failure on another thread leaves this thread's message alone. */
static void *fail_on_thread(void *arg) {
    graft_model *m = NULL;
    graft_status s = graft_model_load(NULL, NULL, &m);
    int *ok = arg;
    *ok = s == GRAFT_ERR_INVALID_ARGUMENT && strstr(graft_last_error(), "path") != NULL;
    return NULL;
}

/* The asset names the CLI and graftd accept load through graft_model_load too (resolved in the cache). */
static void test_asset_names(void) {
    graft_model *m = NULL;
    EXPECT(graft_model_load("MiniLM", NULL, &m), GRAFT_OK);
    char *json = NULL;
    EXPECT(graft_model_info(m, &json), GRAFT_OK);
    CHECK(json && strstr(json, "all-MiniLM-L6-v2") != NULL && strstr(json, "\"architecture\":\"bert\""));
    graft_string_free(json);
    graft_model_free(m);
    m = NULL;
    EXPECT(graft_model_load("no-such-asset", NULL, &m), GRAFT_ERR_NOT_FOUND);
    CHECK(m == NULL && strstr(graft_last_error(), "no-such-asset") != NULL);
}

static void test_thread_local_error(void) {
    EXPECT(graft_model_load("/nonexistent/main-thread", NULL, &(graft_model *){NULL}), GRAFT_ERR_NOT_FOUND);
    int ok = 0;
    pthread_t thread;
    CHECK(pthread_create(&thread, NULL, fail_on_thread, &ok) == 0);
    pthread_join(thread, NULL);
    CHECK(ok);
    CHECK(strstr(graft_last_error(), "/nonexistent/main-thread") != NULL);
}

int main(int argc, char **argv) {
    const char *env = getenv("GRAFT_HOME");
    const char *h = getenv("HOME");
    if (argc > 1) snprintf(home, sizeof home, "%s", argv[1]);
    else if (env && env[0]) snprintf(home, sizeof home, "%s", env);
    else snprintf(home, sizeof home, "%s/.cache/graft", h ? h : ".");
    snprintf(minilm, sizeof minilm, "%s/all-MiniLM-L6-v2", home);
    snprintf(smollm, sizeof smollm, "%s/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", home);
    const char *tmp = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/graft-capi-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 2; }

    test_version_and_status();
    test_thread_local_error();
    test_params_init();
    test_model_load_errors();
    graft_model *bert = load(minilm, GRAFT_TASK_BASE, 0);
    test_model_basics(bert);
    graft_model_free(bert);
    test_minilm_round_trip();
    test_adapter_combine();
    if (argc <= 1) test_asset_names(); /* asset names resolve in $GRAFT_HOME, which argv[1] may not be */
    test_smollm();

    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "warning: could not remove %s\n", tmpdir);
    printf("C tests: %d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
