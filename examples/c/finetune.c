/*
 * Fine-tunes MiniLM with LoRA on tweet sentiment through the C ABI, evaluates, and saves the adapter.
 *
 *   cc -std=c11 finetune.c $(pkg-config --cflags --libs graft) -o finetune
 *   ./finetune [model-dir] [output-dir]
 *
 * model-dir defaults to ${GRAFT_HOME:-$HOME/.cache/graft}/all-MiniLM-L6-v2, output-dir to out/c-adapter.
 */
#include <graft.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Prints the failing call with the library's explanation and exits. */
static void check(graft_status status, const char *what) {
    if (status != GRAFT_OK) {
        fprintf(stderr, "%s: %s: %s\n", what, graft_status_string(status), graft_last_error());
        exit(1);
    }
}

static int on_progress(const graft_progress *p, void *user_data) {
    (void)user_data;
    if (p->step % 5 == 0 || p->step == p->total_steps)
        printf("step %2d/%d  loss %.4f  lr %.2e  %.0f tok/s\n", p->step, p->total_steps, p->loss, p->learning_rate,
               p->tokens_per_second);
    return 0; /* nonzero would stop training */
}

int main(int argc, char **argv) {
    char model_path[1024];
    const char *home = getenv("GRAFT_HOME");
    if (argc > 1 && argv[1][0]) snprintf(model_path, sizeof model_path, "%s", argv[1]);
    else if (home && home[0]) snprintf(model_path, sizeof model_path, "%s/all-MiniLM-L6-v2", home);
    else snprintf(model_path, sizeof model_path, "%s/.cache/graft/all-MiniLM-L6-v2", getenv("HOME") ? getenv("HOME") : ".");
    const char *output = argc > 2 ? argv[2] : "out/c-adapter";

    /* MiniLM with a 3-class head. */
    graft_model_params mp;
    graft_model_params_init(&mp);
    mp.task = GRAFT_TASK_SEQUENCE_CLASSIFICATION;
    mp.num_labels = 3;
    graft_model *model = NULL;
    check(graft_model_load(model_path, &mp, &model), "load model");

    /* LoRA r8 on query/value; the classifier head is trained in full and saved with the adapter. */
    check(graft_adapter_add(model, "sentiment",
                            "{\"peft_type\": \"LORA\", \"r\": 8, \"lora_alpha\": 16, \"lora_dropout\": 0.1,"
                            " \"target_modules\": [\"query\", \"value\"], \"modules_to_save\": [\"classifier\"]}"),
          "add adapter");

    /* 20 AdamW steps of 32 tweets, 5 warm-up steps, then linear decay. */
    graft_trainer_params tp;
    graft_trainer_params_init(&tp);
    tp.learning_rate = 5e-3f;
    tp.batch_size = 32;
    tp.warmup_steps = 5;
    tp.total_steps = 20;
    graft_trainer *trainer = NULL;
    check(graft_trainer_create(model, "sentiment", &tp, NULL, &trainer), "create trainer");
    check(graft_trainer_train_file(trainer, "tweets", on_progress, NULL), "train");

    /* Evaluate on a few hand-written examples (0 negative, 1 neutral, 2 positive). */
    const char *texts[] = {"I absolutely love this, best day ever!", "This is awful, I hate it so much.",
                           "The train leaves at 9 tomorrow.", "What a fantastic surprise, thank you!"};
    const int32_t labels[] = {2, 0, 1, 2};
    enum { N = 4, STRIDE = 32 };
    int32_t ids[N * STRIDE] = {0}, lengths[N];
    for (int i = 0; i < N; i++) {
        size_t n = 0;
        check(graft_tokenize(model, texts[i], 1, ids + i * STRIDE, STRIDE, &n), "tokenize");
        lengths[i] = (int32_t)n;
    }
    float loss = 0, accuracy = 0;
    check(graft_trainer_evaluate(trainer, ids, lengths, N, STRIDE, labels, &loss, &accuracy), "evaluate");
    printf("eval       loss %.4f, accuracy %.2f on %d examples\n", loss, accuracy, N);

    float logits[N * 3];
    size_t count = 0;
    check(graft_model_forward(model, ids, lengths, N, STRIDE, NULL, GRAFT_OUTPUT_LOGITS, logits, N * 3, &count),
          "forward");
    for (int i = 0; i < N; i++)
        printf("%-42s logits % .3f % .3f % .3f\n", texts[i], logits[i * 3], logits[i * 3 + 1], logits[i * 3 + 2]);

    check(graft_adapter_save(model, "sentiment", output), "save adapter");
    printf("saved      %s (PEFT format)\n", output);

    graft_trainer_free(trainer);
    graft_model_free(model);
    return 0;
}
