/*
 * graft.h — the C interface of Graft, a parameter-efficient fine-tuning (PEFT) engine.
 *
 * Link with -lgraft (pkg-config: `pkg-config --cflags --libs graft`). libgraft.so carries the Swift runtime
 * statically; a C host needs nothing from the Swift toolchain.
 *
 * VERSIONING AND STABILITY
 *   The ABI is stable within a major version: no declared function changes its signature or meaning, no
 *   enumerated value changes its number, no status code is reused. A changed function gets a new name
 *   (`graft_x_v2`); the old one stays. Parameter structs begin with `uint32_t struct_size` and only ever grow
 *   at the end: the caller sets struct_size = sizeof(struct) (the *_params_init functions do), and
 *     - a caller compiled against an older header (smaller struct_size) is accepted; every field that lies
 *       beyond its struct_size takes its documented default;
 *     - a caller compiled against a newer header (larger struct_size) is accepted when the bytes this library
 *       does not know are all zero, and rejected with GRAFT_ERR_INVALID_ARGUMENT otherwise;
 *     - a struct_size below GRAFT_PARAMS_MIN_SIZE (8: struct_size plus the first field) is rejected.
 *   Structs the library fills for the caller (graft_progress) carry the library's struct_size; read an
 *   appended field only when struct_size covers it.
 *   Compare GRAFT_VERSION_NUMBER (the header you compiled against) with graft_version() (the library loaded).
 *
 * ERRORS
 *   Every fallible function returns a graft_status: GRAFT_OK (0) or a negative GRAFT_ERR_* code. On failure
 *   graft_last_error() describes what was wrong and where (the argument, file, field or value at fault). The
 *   library never exits or aborts on bad input: NULL handles and pointers, wrong sizes, malformed files and
 *   JSON, and calls in the wrong order all return a status. Out-parameters are left untouched on failure unless
 *   stated otherwise (the size queries below report the needed count even when they fail).
 *
 * OWNERSHIP
 *   Handles (graft_model, graft_trainer) are created by the library and released with their free function,
 *   which accepts NULL. Strings returned through `char **` are owned by the caller and released with
 *   graft_string_free. Every other pointer argument is borrowed for the duration of the call only.
 *
 * THREAD SAFETY
 *   A handle may be used by one thread at a time; different handles on different threads are fine. A trainer
 *   uses its model: do not use a model and a trainer created from it on two threads at once.
 *   graft_last_error() is per thread. Work inside one call runs on the library's own worker threads (see
 *   graft_model_params.num_threads).
 *
 * ARRAYS
 *   Token batches cross as a row-major int32 matrix `ids[batch * stride]` plus `lengths[batch]`: row b holds
 *   lengths[b] real tokens (1 <= lengths[b] <= stride) followed by padding the library never reads.
 *   `lengths` may be NULL, meaning every row is full (lengths[b] = stride).
 */
#ifndef GRAFT_H
#define GRAFT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define GRAFT_API __declspec(dllimport)
#else
#define GRAFT_API __attribute__((visibility("default")))
#endif

/* ------------------------------------------------------------------------------------------------------------
 * Versions
 * ------------------------------------------------------------------------------------------------------------ */

/** Major version: the ABI is stable while it stays the same. */
#define GRAFT_VERSION_MAJOR 0
/** Minor version: grows when functions, enum values or struct fields are added. */
#define GRAFT_VERSION_MINOR 6
/** Patch version: fixes only. */
#define GRAFT_VERSION_PATCH 0
/** MAJOR * 10000 + MINOR * 100 + PATCH, the value graft_version() returns for this header's library. */
#define GRAFT_VERSION_NUMBER (GRAFT_VERSION_MAJOR * 10000 + GRAFT_VERSION_MINOR * 100 + GRAFT_VERSION_PATCH)

/** The smallest struct_size any parameter struct accepts (struct_size itself plus the first field). */
#define GRAFT_PARAMS_MIN_SIZE 8

/**
 * The version of the loaded library as MAJOR * 10000 + MINOR * 100 + PATCH.
 * Thread-safe; never fails.
 */
GRAFT_API uint32_t graft_version(void);

/**
 * The version of the loaded library as static text, e.g. "0.1.0". Never NULL; do not free.
 * Thread-safe; never fails.
 */
GRAFT_API const char *graft_version_string(void);

/* ------------------------------------------------------------------------------------------------------------
 * Status codes and errors
 * ------------------------------------------------------------------------------------------------------------ */

/** The result of a fallible call: GRAFT_OK or one of the negative GRAFT_ERR_* codes. */
typedef int32_t graft_status;

/**
 * The status table, one row per code: X(NAME, code, description), where GRAFT_<NAME> is the code's macro and
 * description the text graft_status_string returns. It is the one definition every door uses: Swift's GraftError,
 * graftd's wire codes (graft.v1.Error.Code = -code) and the Python exceptions are generated from it or checked
 * against it. Codes -10 to -13 are graftd's: the daemon and its clients report them, library functions never
 * return them. Rows are only ever appended.
 */
#define GRAFT_STATUS_MAP(X) \
    X(OK, 0, "ok") \
    X(ERR_INVALID_ARGUMENT, -1, "invalid argument") \
    X(ERR_IO, -2, "i/o error") \
    X(ERR_FORMAT, -3, "malformed data") \
    X(ERR_UNSUPPORTED, -4, "unsupported") \
    X(ERR_NOT_FOUND, -5, "not found") \
    X(ERR_OUT_OF_MEMORY, -6, "out of memory") \
    X(ERR_STATE, -7, "invalid state (wrong call order)") \
    X(ERR_CANCELLED, -8, "cancelled") \
    X(ERR_INTERNAL, -9, "internal error") \
    X(ERR_PROTOCOL, -10, "protocol error") \
    X(ERR_UNAUTHENTICATED, -11, "unauthenticated") \
    X(ERR_UNKNOWN_REQUEST, -12, "unknown request") \
    X(ERR_SHUTTING_DOWN, -13, "shutting down")

/** Success. */
#define GRAFT_OK 0
/** An argument, configuration value, size or shape is invalid (including NULL handles and pointers). */
#define GRAFT_ERR_INVALID_ARGUMENT (-1)
/** A file could not be read or written. */
#define GRAFT_ERR_IO (-2)
/** A file's or string's contents are malformed. */
#define GRAFT_ERR_FORMAT (-3)
/** The request is valid but not supported (e.g. generation on an encoder, an unknown peft_type). */
#define GRAFT_ERR_UNSUPPORTED (-4)
/** A named thing (file, adapter, module) does not exist. */
#define GRAFT_ERR_NOT_FOUND (-5)
/** An allocation failed. */
#define GRAFT_ERR_OUT_OF_MEMORY (-6)
/** The call is not allowed in the object's current state (wrong call order). */
#define GRAFT_ERR_STATE (-7)
/** A callback asked the library to stop. */
#define GRAFT_ERR_CANCELLED (-8)
/** A bug in Graft: an internal invariant did not hold. Please report it with graft_last_error(). */
#define GRAFT_ERR_INTERNAL (-9)
/** graftd: an undecodable frame, a frame above the maximum, a request before hello, a timed-out frame. */
#define GRAFT_ERR_PROTOCOL (-10)
/** graftd: a missing or wrong token. */
#define GRAFT_ERR_UNAUTHENTICATED (-11)
/** graftd: a request kind this daemon does not know. */
#define GRAFT_ERR_UNKNOWN_REQUEST (-12)
/** graftd: the daemon is shutting down and takes no new work. */
#define GRAFT_ERR_SHUTTING_DOWN (-13)

/* Every GRAFT_* status macro equals its row of GRAFT_STATUS_MAP (a compile error otherwise). */
#define GRAFT_STATUS_CHECK_(name, code, description) \
    typedef char graft_status_check_##name##_[(GRAFT_##name == (code)) ? 1 : -1];
GRAFT_STATUS_MAP(GRAFT_STATUS_CHECK_)
#undef GRAFT_STATUS_CHECK_

/**
 * A short static description of `status` (its GRAFT_STATUS_MAP row: "ok", "invalid argument", ...; "unknown
 * status" for values that are not codes). Never NULL; do not free. Thread-safe; never fails; does not touch
 * graft_last_error().
 */
GRAFT_API const char *graft_status_string(graft_status status);

/**
 * The macro name of `status` without its prefix ("OK", "ERR_INVALID_ARGUMENT", ...; NULL for values that are not
 * codes). Static text; do not free. Thread-safe; never fails; does not touch graft_last_error().
 * Since 0.2.
 */
GRAFT_API const char *graft_status_name(graft_status status);

/**
 * The message of the most recent failed call on the calling thread, or "" when the most recent call succeeded
 * (every fallible call clears it on entry). Never NULL; owned by the library and valid until the next graft_*
 * call on this thread. Thread-safe (one message per thread).
 */
GRAFT_API const char *graft_last_error(void);

/**
 * Releases a string the library returned through a `char **` out-parameter. NULL is ignored.
 * Thread-safe.
 */
GRAFT_API void graft_string_free(char *str);

/* ------------------------------------------------------------------------------------------------------------
 * Models
 * ------------------------------------------------------------------------------------------------------------ */

/** A loaded model: base weights, tokenizer, task head and attached adapters. Opaque. */
typedef struct graft_model graft_model;

/** What a model is loaded for (graft_model_params.task). */
typedef enum graft_task {
    /** The bare model: BERT hidden states, or Llama logits (a Llama loaded as base also trains as causal LM). */
    GRAFT_TASK_BASE = 0,
    /** BERT with a freshly initialised classification head `classifier` of num_labels outputs (module paths
     *  then start with `bert.`; list `classifier` in modules_to_save to train and save the head). */
    GRAFT_TASK_SEQUENCE_CLASSIFICATION = 1,
    /** A Llama decoder trained on next-token prediction. */
    GRAFT_TASK_CAUSAL_LM = 2
} graft_task;

/** The number format frozen weights are multiplied in (graft_model_params.compute_dtype). (Since 0.3.0.) */
typedef enum graft_compute_dtype {
    /** float32 products: the exact mode, the one the parity tests check. */
    GRAFT_COMPUTE_FLOAT32 = 0,
    /** bfloat16 products of frozen Linear weights with float32 accumulation (oneDNN; about twice as fast on
     *  CPUs with AVX-512 BF16). Trainable weights, adapters, attention and norms stay float32. */
    GRAFT_COMPUTE_BFLOAT16 = 1,
    /** GRAFT_COMPUTE_BFLOAT16 where the CPU has AVX-512 BF16, else GRAFT_COMPUTE_FLOAT32. */
    GRAFT_COMPUTE_AUTO = 2
} graft_compute_dtype;

/** How graft_model_load loads a model. Fill with graft_model_params_init, then change fields. */
typedef struct graft_model_params {
    /** sizeof(graft_model_params) as the caller knows it (see VERSIONING). */
    uint32_t struct_size;
    /** Threads for all Graft work in this process (process-wide setting); 0 = keep the current setting
     *  (default: $GRAFT_NUM_THREADS, else all cores). Default 0. */
    int32_t num_threads;
    /** A graft_task value. Default GRAFT_TASK_BASE. */
    int32_t task;
    /** Number of classes for GRAFT_TASK_SEQUENCE_CLASSIFICATION (>= 1); ignored otherwise. Default 2. */
    int32_t num_labels;
    /** Seed of the classification head's initialisation. Default 0. */
    uint64_t seed;
    /** A graft_compute_dtype value. Default GRAFT_COMPUTE_FLOAT32. (Since 0.3.0.) */
    int32_t compute_dtype;
    /** An MoE base (added in 0.6.0): a directory `graft moefy --output` wrote (moe_config.json +
     *  moe_routers.safetensors), UTF-8, borrowed for the call. The Llama decoder is made that MoE base at load,
     *  for the adapters that tune an MoE base's experts (peft_type "ESFT", "PERFT", "MOE_PLORA"); graft_model_info
     *  then reports it under "moe_base". NULL = the dense model. Default NULL. */
    const char *moe_base;
} graft_model_params;

/**
 * Fills the first `size` bytes of `params` with the defaults and sets struct_size = size (fields this library
 * does not know are zeroed). Call it through graft_model_params_init, which passes sizeof(*params) as the
 * caller was compiled, so an older or newer caller's struct is never overrun. NULL or size < 8 is ignored.
 * Thread-safe.
 */
GRAFT_API void graft_model_params_init_sized(graft_model_params *params, size_t size);

/** Fills `params` with the defaults (see graft_model_params_init_sized). NULL is ignored. Thread-safe. */
static inline void graft_model_params_init(graft_model_params *params) {
    graft_model_params_init_sized(params, sizeof *params);
}

/**
 * Loads a model, detecting the format from `path`: a transformers BERT directory (config.json,
 * model.safetensors, vocab.txt) or a Llama GGUF file.
 *
 * `path` may also be one of the asset names the graft CLI and graftd accept, for the models scripts/fetch-assets
 * caches under ${GRAFT_HOME:-$HOME/.cache/graft}: "minilm" (or "all-minilm-l6-v2") for all-MiniLM-L6-v2/ and
 * "smollm2" (or "smollm2-135m") for smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, ignoring case. An existing file
 * or directory of that name wins over the asset. (Since 0.2.0; before, only paths.)
 *
 * @param path    model directory or .gguf file, or an asset name (UTF-8); borrowed.
 * @param params  NULL for the defaults, or a struct filled by graft_model_params_init.
 * @param out     receives the new model on success; the caller owns it and releases it with graft_model_free.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND (no such path, no config.json), GRAFT_ERR_FORMAT / GRAFT_ERR_IO (bad
 *         files), GRAFT_ERR_UNSUPPORTED (unknown model_type, or a task the architecture cannot do: sequence
 *         classification needs BERT, causal LM needs Llama; a moe_base for a model that is not a Llama decoder),
 *         GRAFT_ERR_INVALID_ARGUMENT (NULL path/out, bad struct_size, task, num_labels, num_threads or an empty
 *         moe_base). A moe_base directory without moe_config.json is GRAFT_ERR_NOT_FOUND; one that does not fit
 *         the model (layers, sizes, tensor shapes) is GRAFT_ERR_FORMAT, naming the file and field.
 * Thread safety: may run concurrently with any call on other handles.
 */
GRAFT_API graft_status graft_model_load(const char *path, const graft_model_params *params, graft_model **out);

/**
 * Releases a model and its adapters. NULL is ignored. A trainer created from the model keeps what it needs
 * alive, so the model and its trainers may be freed in any order; after this call the handle is invalid.
 */
GRAFT_API void graft_model_free(graft_model *model);

/**
 * Describes the model as a JSON object:
 *   {"architecture": "bert"|"llama", "path": ..., "task": "base"|"sequence_classification"|"causal_lm",
 *    "num_labels": n (classification only), "vocab_size", "hidden_size", "num_layers", "num_heads",
 *    "intermediate_size", "max_positions", "parameters": total parameter count (head included),
 *    "modules": {"name": "", "type": ..., "parameter_count": n,
 *                "parameters": [{"name": "weight", "shape": [rows, cols]}, ...],
 *                "children": [{"name": "encoder", "path": "encoder", ...}, ...]}}
 * Module paths are the Hugging Face names PEFT's target_modules match.
 *
 * @param json  receives a NUL-terminated UTF-8 string; release it with graft_string_free.
 * @return GRAFT_OK or GRAFT_ERR_INVALID_ARGUMENT (NULL model or json).
 * Thread safety: one thread at a time per model.
 */
GRAFT_API graft_status graft_model_info(const graft_model *model, char **json);

/**
 * Tokenizes UTF-8 `text` with the model's tokenizer.
 *
 * @param add_special  nonzero adds the model's template tokens (BERT: [CLS] ... [SEP]; SmolLM2 adds none).
 * @param ids          where to store the ids; may be NULL when capacity is 0 (to query the count).
 * @param capacity     number of int32 slots at ids.
 * @param n_needed     receives the number of ids (always set when the text tokenizes, also on the
 *                     too-small error, like snprintf). Must not be NULL.
 * @return GRAFT_OK (ids[0 .. *n_needed) written); GRAFT_ERR_INVALID_ARGUMENT when capacity < *n_needed
 *         (nothing written, *n_needed set), for NULL model, text or n_needed, or text that is not UTF-8.
 * Thread safety: one thread at a time per model.
 */
GRAFT_API graft_status graft_tokenize(const graft_model *model, const char *text, int add_special, int32_t *ids,
                                      size_t capacity, size_t *n_needed);

/**
 * Turns token ids back into UTF-8 text. Ids outside the vocabulary are skipped.
 *
 * @param ids           n token ids; may be NULL when n is 0.
 * @param skip_special  nonzero leaves special tokens ([CLS], <|im_end|>, ...) out.
 * @param text          receives a NUL-terminated string; release it with graft_string_free.
 * @return GRAFT_OK or GRAFT_ERR_INVALID_ARGUMENT (NULL model/text, or NULL ids with n > 0).
 * Thread safety: one thread at a time per model.
 */
GRAFT_API graft_status graft_detokenize(const graft_model *model, const int32_t *ids, size_t n, int skip_special,
                                        char **text);

/* ------------------------------------------------------------------------------------------------------------
 * Adapters
 *
 * A model holds any number of named adapters (names: non-empty, no '.'). Adding or loading one makes it the
 * active adapter; forward passes, generation and training use the active adapter unless adapters are disabled.
 * Adapter configs are JSON objects in the shape of PEFT's adapter_config.json, e.g.
 *   {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
 *    "modules_to_save": ["classifier"]}
 * All adapter functions: one thread at a time per model.
 * ------------------------------------------------------------------------------------------------------------ */

/**
 * Attaches a new adapter called `name` configured by `config_json` and makes it active. "task_type" and
 * "base_model_name_or_path" are filled in from the model when the JSON lacks them (they are saved with it).
 * Adapters start as PEFT initialises them (LoRA: B = 0, so outputs equal the base model's until trained).
 * @return GRAFT_OK; GRAFT_ERR_INVALID_ARGUMENT (NULL arguments, invalid JSON, a bad or missing field, a name
 *         in use, target_modules matching nothing); GRAFT_ERR_UNSUPPORTED (unknown peft_type).
 */
GRAFT_API graft_status graft_adapter_add(graft_model *model, const char *name, const char *config_json);

/**
 * Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) as adapter `name`
 * (NULL = "default") and makes it active. A directory Graft saved is first checked against its manifest.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND (missing directory or files); GRAFT_ERR_FORMAT (tensors that do not
 *         fit this model; files that do not match graft_manifest.json, i.e. a mix of two saves); the codes of
 *         graft_adapter_add for the config.
 */
GRAFT_API graft_status graft_adapter_load(graft_model *model, const char *directory, const char *name);

/**
 * Saves adapter `name` in PEFT's format to `directory` (created if missing), so `PeftModel.from_pretrained` and
 * graft_adapter_load read it, plus Graft's graft_manifest.json (each file's size and SHA-256). Crash-safe: a
 * directory of its own is replaced as a whole (staged beside it, fsynced, swapped in atomically), so a killed
 * process leaves the previous adapter or the new one; see the README's "Crash-safe saves".
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND (no such adapter); GRAFT_ERR_IO; GRAFT_ERR_INVALID_ARGUMENT (NULLs).
 */
GRAFT_API graft_status graft_adapter_save(const graft_model *model, const char *name, const char *directory);

/**
 * Lists the adapters as JSON:
 *   {"active": "name" | null, "enabled": true|false,
 *    "adapters": [{"id": 0, "name": ..., "peft_type": ..., "active": bool, "merged": bool,
 *                  "layers": adapted layer count, "trainable_parameters": n, "config": {...}}, ...]}
 * "id" is the position in this list (the order adapters were added); graft_model_forward's adapter_ids index
 * it. Deleting an adapter shifts the ids after it.
 * @param json  receives a string to release with graft_string_free.
 */
GRAFT_API graft_status graft_adapter_list(const graft_model *model, char **json);

/**
 * Makes adapter `name` the one forward passes use.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND; GRAFT_ERR_INVALID_ARGUMENT (NULLs).
 */
GRAFT_API graft_status graft_adapter_set_active(graft_model *model, const char *name);

/**
 * Turns all adapters off (enabled = 0: forward passes see the base model) or back on (nonzero: the active
 * adapter takes part again), like PEFT's disable_adapter(). Merged adapters stay in the weights.
 * @return GRAFT_OK or GRAFT_ERR_INVALID_ARGUMENT (NULL model).
 */
GRAFT_API graft_status graft_adapter_set_enabled(graft_model *model, int enabled);

/**
 * Detaches and forgets adapter `name` (unmerging it first if merged). The next added adapter becomes active
 * if the deleted one was.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND; GRAFT_ERR_STATE (a live trainer trains this adapter).
 */
GRAFT_API graft_status graft_adapter_delete(graft_model *model, const char *name);

/**
 * Adds adapter `name`'s weight delta into the base weights, so inference pays nothing for it. Reversible.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND; GRAFT_ERR_STATE (already merged); GRAFT_ERR_UNSUPPORTED (a method
 *         without a weight delta).
 */
GRAFT_API graft_status graft_adapter_merge(graft_model *model, const char *name);

/**
 * Subtracts a merged adapter's delta from the base weights again.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND; GRAFT_ERR_STATE (not merged).
 */
GRAFT_API graft_status graft_adapter_unmerge(graft_model *model, const char *name);

/**
 * Combines LoRA adapters into a new adapter `name` as PEFT's LoraModel.add_weighted_adapter does (added in 0.3.0).
 * The new adapter takes the first source's config with r = lora_alpha = the new rank and target_modules the
 * union of the sources'; it is attached but not activated (the active adapter stays as it was, as in PEFT).
 * IA3 adapters combine as PEFT's IA3Model.add_weighted_adapter: the weighted sum of their vectors (no options).
 * @param adapters      `count` names of attached LoRA (no DoRA) or IA3 adapters, each listed once.
 * @param weights       `count` weights, one per adapter; negative weights subtract (task arithmetic).
 * @param count         number of adapters (>= 1; with 1 the combination is always "linear", as in PEFT).
 * @param options_json  NULL, or a JSON object with PEFT's keyword arguments (absent or null = PEFT's default):
 *                        "combination_type": "svd" (default), "linear", "cat", "ties", "ties_svd", "dare_linear",
 *                          "dare_ties", "dare_linear_svd", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd",
 *                          or Graft's "copa" (CoPA-Merging, needs density; an svd-type result);
 *                        "svd_rank": rank of an svd-type result (default: the largest source rank);
 *                        "svd_clamp": quantile in [0, 1] at which the SVD factors are clamped (default: none);
 *                        "density": fraction of entries kept, required by ties, dare_*, magnitude_prune* and copa;
 *                        "majority_sign_method": "total" (default) or "frequency";
 *                        "seed": seed of DARE's random masks (Graft's; default 0, the same seed gives the same
 *                          adapter); "svd_full_matrices", "svd_driver": accepted, no effect on the result.
 * @param report_json   NULL, or receives {"name", "combination_type" (as applied), "r", "kept_fraction" (DARE's
 *                      kept share of entries, else null)}; release it with graft_string_free.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND (no adapter of that name); GRAFT_ERR_INVALID_ARGUMENT (NULLs, count 0,
 *         a name in use, a non-finite weight, unknown or ill-typed options, a missing density, unequal ranks for
 *         linear, ties, dare_linear, dare_ties, magnitude_prune, svd_rank above a layer's size);
 *         GRAFT_ERR_UNSUPPORTED (a source that is neither plain LoRA nor IA3, or sources of two methods).
 */
GRAFT_API graft_status graft_adapter_combine(graft_model *model, const char *name, const char *const *adapters,
                                             const double *weights, size_t count, const char *options_json,
                                             char **report_json);

/**
 * Writes adapter `name` compressed to `directory` (added in 0.4.0): PEFT's adapter_config.json beside one packed
 * safetensors file, written crash-safely (the directory is created if missing). graft_adapter_load reads such a
 * directory back as a working adapter holding the decoded values.
 * @param method        "compeft": ComPEFT, each tensor's top `density` entries by magnitude stored as alpha*sigma*sign
 *                        (sigma: the tensor's standard deviation) with a mask bit per entry and a sign bit per kept
 *                        entry (adapter_compeft.safetensors);
 *                      "onebit": a sign bit per value and an error-minimizing float32 scale per row group
 *                        (adapter_1bit.safetensors).
 * @param options_json  NULL, or a JSON object: "density" (compeft; fraction in (0, 1], default 0.1), "alpha"
 *                      (compeft; positive, default 1); onebit takes no options.
 * @param report_json   NULL, or receives {"method", "file_bytes" (the packed file's size), "float32_bytes" (the
 *                      tensors as float32), "packed_bytes" (bits and scales), "kept_fraction" (compeft, else null)};
 *                      release it with graft_string_free.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND (no adapter `name`); GRAFT_ERR_INVALID_ARGUMENT (NULLs, an unknown method
 *         or option, density or alpha out of range); GRAFT_ERR_UNSUPPORTED (an adapter with modules_to_save copies,
 *         shared tensors or frozen buffers); GRAFT_ERR_IO (the directory cannot be written).
 */
GRAFT_API graft_status graft_adapter_compress(graft_model *model, const char *name, const char *method,
                                              const char *directory, const char *options_json, char **report_json);

/**
 * PEFT's merge_and_unload() then transformers' save_pretrained (added in 0.3.0): merges adapter `adapter` into the
 * base weights, removes it from the model, and writes the plain model to `directory` (created if missing; replaced
 * as a whole, crash-safely, as graft_adapter_save does). BERT: model.safetensors (F32, transformers' tensor names)
 * plus the source directory's config and tokenizer files. Llama: a copy of the source .gguf (same file name,
 * metadata and tensor types) with the merged tensors re-encoded in their type (F32, F16, BF16, Q8_0 or Q4_1).
 * graft_model_load, transformers and llama.cpp load the result.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND (no such adapter); GRAFT_ERR_STATE (a live trainer trains it);
 *         GRAFT_ERR_UNSUPPORTED (an adapter without a weight delta; a GGUF tensor of another type, or a module
 *         adapter on a GGUF model, refused before anything is merged); GRAFT_ERR_IO; GRAFT_ERR_INVALID_ARGUMENT.
 */
GRAFT_API graft_status graft_model_save_merged(graft_model *model, const char *adapter, const char *directory);

/* ------------------------------------------------------------------------------------------------------------
 * Inference
 * ------------------------------------------------------------------------------------------------------------ */

/** graft_model_forward output: final hidden states, [batch, stride, hidden_size]. */
#define GRAFT_OUTPUT_HIDDEN 1
/** graft_model_forward output: logits — [batch, stride, vocab_size] for Llama, or [batch, num_labels] for a
 *  model loaded with GRAFT_TASK_SEQUENCE_CLASSIFICATION. */
#define GRAFT_OUTPUT_LOGITS 2

/**
 * Runs a batch through the model without recording gradients.
 *
 * Output layout (row-major float32, written to out[0 .. *out_count)):
 *   GRAFT_OUTPUT_HIDDEN  BERT: last_hidden_state; Llama: the hidden states after the final norm.
 *                        out[(b * stride + t) * hidden_size + k]; positions t >= lengths[b] are 0.
 *   GRAFT_OUTPUT_LOGITS  Llama: out[(b * stride + t) * vocab_size + v]; positions t >= lengths[b] are 0.
 *                        Sequence classification: out[b * num_labels + c] (the head on each row's first
 *                        token, as BertForSequenceClassification). BERT loaded as base: unsupported.
 *
 * @param ids          batch * stride token ids (see ARRAYS).
 * @param lengths      batch lengths in 1..stride, or NULL for full rows.
 * @param batch        rows (>= 1).
 * @param stride       row length of ids (>= 1).
 * @param adapter_ids  NULL (every row uses the current adapter state), or batch entries: -1 = the base model
 *                     (adapters disabled), otherwise an id from graft_adapter_list. Rows are grouped by adapter
 *                     and each group runs with that adapter active; the model's active adapter and enabled
 *                     state are restored afterwards. Not allowed while an adapter is merged (GRAFT_ERR_STATE).
 * @param output       GRAFT_OUTPUT_HIDDEN or GRAFT_OUTPUT_LOGITS.
 * @param out          where to write; may be NULL when out_capacity is 0 (to query *out_count).
 * @param out_capacity floats available at out.
 * @param out_count    receives the number of floats the output has (also on the too-small error). Not NULL.
 * @return GRAFT_OK; GRAFT_ERR_INVALID_ARGUMENT (NULLs, sizes, token ids outside the vocabulary, unknown
 *         adapter id, out_capacity < *out_count); GRAFT_ERR_UNSUPPORTED (logits of a bare BERT);
 *         GRAFT_ERR_STATE (adapter_ids with a merged adapter).
 * Thread safety: one thread at a time per model.
 */
GRAFT_API graft_status graft_model_forward(graft_model *model, const int32_t *ids, const int32_t *lengths,
                                           int32_t batch, int32_t stride, const int32_t *adapter_ids,
                                           int32_t output, float *out, size_t out_capacity, size_t *out_count);

/** How graft_generate picks tokens. Fill with graft_sampling_params_init, then change fields. */
typedef struct graft_sampling_params {
    /** sizeof(graft_sampling_params) as the caller knows it (see VERSIONING). */
    uint32_t struct_size;
    /** Stop after this many new tokens (>= 0). Default 128. */
    int32_t max_new_tokens;
    /** 0 = greedy (argmax); otherwise logits are divided by it before sampling (>= 0). Default 0. */
    float temperature;
    /** Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1].
     *  Default 1. */
    float top_p;
    /** Keep only the top_k most likely tokens (0 = all). Default 0. */
    int32_t top_k;
    /** Nonzero stops at the model's end-of-sequence / end-of-turn tokens (<|im_end|>, <|endoftext|>, EOS),
     *  which are then neither reported nor stored. Default 1. */
    int32_t stop_at_eos;
    /** Seed of the sampling random number generator. Default 0. */
    uint64_t seed;
    /** Nonzero selects the fast mode (added in 0.5.0): decoding steps multiply activations quantized to int8 per
     *  block of 32 with a GGUF base's Q4_1 / Q8_0 weights (integer dot products, as llama.cpp does). Logits
     *  deviate slightly from the exact mode, which 0 (the default) keeps. */
    int32_t fast_decode;
} graft_sampling_params;

/**
 * Fills the first `size` bytes of `params` with the defaults and sets struct_size = size (fields this library
 * does not know are zeroed). Call it through graft_sampling_params_init, which passes sizeof(*params) as the
 * caller was compiled, so an older or newer caller's struct is never overrun. NULL or size < 8 is ignored.
 * Thread-safe.
 */
GRAFT_API void graft_sampling_params_init_sized(graft_sampling_params *params, size_t size);

/** Fills `params` with the defaults (see graft_sampling_params_init_sized). NULL is ignored. Thread-safe. */
static inline void graft_sampling_params_init(graft_sampling_params *params) {
    graft_sampling_params_init_sized(params, sizeof *params);
}

/**
 * Called once per generated token. `text_piece` is the NUL-terminated UTF-8 text the token completes (may be
 * "" while a multi-byte character is still incomplete); it is valid during the call only. Return 0 to go on,
 * nonzero to stop generating.
 */
typedef int (*graft_token_callback)(int32_t token, const char *text_piece, void *user_data);

/**
 * Generates a continuation of `prompt` with a KV cache, using the active adapter (Llama models only).
 *
 * @param prompt     n >= 1 token ids (e.g. from graft_tokenize).
 * @param params     NULL for the defaults (greedy, 128 tokens, stop at EOS).
 * @param cb         NULL, or called for every new token; a nonzero return stops generation (the call still
 *                   returns GRAFT_OK with the tokens so far).
 * @param user_data  passed to cb unchanged.
 * @param out        NULL (with capacity 0), or room for at least max_new_tokens ids.
 * @param capacity   int32 slots at out.
 * @param n_out      NULL, or receives the number of tokens generated (stored in out when out is given).
 * @return GRAFT_OK; GRAFT_ERR_UNSUPPORTED (not a decoder); GRAFT_ERR_INVALID_ARGUMENT (NULL model/prompt,
 *         empty prompt, bad sampling values or struct_size, capacity < max_new_tokens, prompt + max_new_tokens
 *         beyond the context length, token ids outside the vocabulary).
 * Thread safety: one thread at a time per model; cb runs on the calling thread.
 */
GRAFT_API graft_status graft_generate(graft_model *model, const int32_t *prompt, size_t n,
                                      const graft_sampling_params *params, graft_token_callback cb, void *user_data,
                                      int32_t *out, size_t capacity, size_t *n_out);

/**
 * Wraps one user message in the model's chat template, giving the prompt text an instruct decoder expects
 * (the template `graft generate` applies unless --raw, and graftd applies to a Generate request with `chat`).
 * For the supported decoders that is ChatML:
 *   "<|im_start|>user\n" user_message "<|im_end|>\n<|im_start|>assistant\n"
 * Tokenize the result with add_special = 0 (the template's markers are special tokens) and pass the ids to
 * graft_generate. Since 0.2.0.
 *
 * @param user_message  the user's turn (UTF-8, may be ""); borrowed.
 * @param prompt        receives the templated text; release it with graft_string_free.
 * @return GRAFT_OK; GRAFT_ERR_UNSUPPORTED (an encoder, which has no chat template); GRAFT_ERR_INVALID_ARGUMENT
 *         (NULL model, user_message or prompt, or a user_message that is not UTF-8).
 * Thread safety: one thread at a time per model.
 */
GRAFT_API graft_status graft_chat_template_apply(const graft_model *model, const char *user_message, char **prompt);

/* ------------------------------------------------------------------------------------------------------------
 * Training
 * ------------------------------------------------------------------------------------------------------------ */

/** A trainer for one adapter of a model: optimizer state, schedule, step counters. Opaque. */
typedef struct graft_trainer graft_trainer;

/** Learning-rate schedule after warm-up (graft_trainer_params.schedule). */
typedef enum graft_schedule {
    /** Constant. */
    GRAFT_SCHEDULE_CONSTANT = 0,
    /** Linear decay to 0 at total_steps. */
    GRAFT_SCHEDULE_LINEAR = 1,
    /** Half-cosine decay to 0 at total_steps. */
    GRAFT_SCHEDULE_COSINE = 2
} graft_schedule;

/** Optimizer (graft_trainer_params.optimizer). */
typedef enum graft_optimizer {
    /** AdamW (betas 0.9, 0.999, eps 1e-8; change with extras_json) with decoupled weight decay. */
    GRAFT_OPTIMIZER_ADAMW = 0,
    /** SGD with momentum 0.9 (extras_json "momentum") and L2 weight decay. */
    GRAFT_OPTIMIZER_SGD = 1
} graft_optimizer;

/** How a trainer runs. Fill with graft_trainer_params_init, then change fields. */
typedef struct graft_trainer_params {
    /** sizeof(graft_trainer_params) as the caller knows it (see VERSIONING). */
    uint32_t struct_size;
    /** Peak learning rate (> 0). Default 1e-3. */
    float learning_rate;
    /** AdamW's decoupled decay or SGD's L2 penalty (>= 0). Default 0.01. */
    float weight_decay;
    /** Steps of linear warm-up from 0 (>= 0). Default 0. */
    int32_t warmup_steps;
    /** Optimizer steps the schedule spans. graft_trainer_train_file: 0 = epochs over the data, > 0 = stop after
     *  this many steps. graft_trainer_step: 0 = no decay after warm-up. Default 0. */
    int32_t total_steps;
    /** A graft_schedule value. Default GRAFT_SCHEDULE_LINEAR. */
    int32_t schedule;
    /** A graft_optimizer value. Default GRAFT_OPTIMIZER_ADAMW. */
    int32_t optimizer;
    /** Clip the global gradient norm to this; 0 = no clipping (>= 0). Default 1.0. */
    float max_grad_norm;
    /** Micro-batches whose gradients are averaged into one optimizer step (>= 1). Default 1. */
    int32_t gradient_accumulation_steps;
    /** Sequences per micro-batch in graft_trainer_train_file and graft_trainer_evaluate (>= 1). Default 32. */
    int32_t batch_size;
    /** Seed of shuffling and dropout. Default 42. */
    uint64_t seed;
    /** Passes over the data in graft_trainer_train_file (>= 1). Default 1. */
    int32_t epochs;
    /** Longest example in tokens in graft_trainer_train_file; longer ones are truncated (>= 3). Default 64. */
    int32_t max_length;
} graft_trainer_params;

/**
 * Fills the first `size` bytes of `params` with the defaults and sets struct_size = size (fields this library
 * does not know are zeroed). Call it through graft_trainer_params_init, which passes sizeof(*params) as the
 * caller was compiled, so an older or newer caller's struct is never overrun. NULL or size < 8 is ignored.
 * Thread-safe.
 */
GRAFT_API void graft_trainer_params_init_sized(graft_trainer_params *params, size_t size);

/** Fills `params` with the defaults (see graft_trainer_params_init_sized). NULL is ignored. Thread-safe. */
static inline void graft_trainer_params_init(graft_trainer_params *params) {
    graft_trainer_params_init_sized(params, sizeof *params);
}

/**
 * Creates a trainer for adapter `adapter_name` of `model` (made active, adapters enabled). The objective follows
 * the model's task: cross entropy over classes for GRAFT_TASK_SEQUENCE_CLASSIFICATION, next-token cross
 * entropy for a Llama (GRAFT_TASK_CAUSAL_LM or GRAFT_TASK_BASE).
 *
 * @param adapter_name  an existing adapter; NULL = the active adapter.
 * @param params        NULL for the defaults.
 * @param extras_json   NULL, or a JSON object of further settings: "beta1", "beta2", "eps" (AdamW),
 *                      "momentum" (SGD), "shuffle" (bool, default true), "eval_batch_size" (default 64),
 *                      "max_examples" (train_file: use this many examples spread over the data),
 *                      "init_batches" (default 8: the training batches an adapter added with init_lora_weights
 *                      "eva", "lora_ga" or "corda" is initialized from before its first step; step() uses its
 *                      own batch; a loaded adapter is never initialized again).
 *                      Unknown keys are rejected.
 * @param out           receives the trainer; release it with graft_trainer_free. The trainer keeps the model
 *                      alive.
 * @return GRAFT_OK; GRAFT_ERR_STATE (the model has no adapter, or the adapter is merged); GRAFT_ERR_NOT_FOUND
 *         (no such adapter); GRAFT_ERR_UNSUPPORTED (a bare BERT has no training objective);
 *         GRAFT_ERR_INVALID_ARGUMENT (NULLs, struct_size, a field out of range, bad extras JSON).
 * Thread safety: one thread at a time per model.
 */
GRAFT_API graft_status graft_trainer_create(graft_model *model, const char *adapter_name,
                                            const graft_trainer_params *params, const char *extras_json,
                                            graft_trainer **out);

/**
 * Releases a trainer (the adapter and its trained weights stay on the model). NULL is ignored.
 */
GRAFT_API void graft_trainer_free(graft_trainer *trainer);

/**
 * The options the trainer runs with — its graft_trainer_params and extras_json after defaults — as a JSON object
 * with one key per option ("learning_rate", "weight_decay", "warmup_steps", "total_steps", "schedule",
 * "optimizer", "max_grad_norm", "gradient_accumulation_steps", "batch_size", "seed", "epochs", "max_length",
 * "beta1", "beta2", "eps", "momentum", "shuffle", "eval_batch_size", "max_examples", "init_batches"); the same object graftd's
 * JobStarted and `graft train` report. Since 0.2.0.
 * @param json  receives the text; release it with graft_string_free.
 * @return GRAFT_OK or GRAFT_ERR_INVALID_ARGUMENT (NULL trainer or json).
 * Thread safety: one thread at a time per trainer.
 */
GRAFT_API graft_status graft_trainer_options(const graft_trainer *trainer, char **json);

/**
 * The trainer's place among data-parallel processes (added in 0.4.0). In a process started by Open MPI's mpirun
 * (or with GRAFT_MPI=1) every trainer trains data-parallel over MPI_COMM_WORLD: libgraft loads libmpi.so.40 at
 * run time (it does not link it), each process passes its own batch-size share of every global batch to
 * graft_trainer_step (graft_trainer_train shards its data itself), gradients are summed over the processes, each
 * weighted by its share of the counted items, before an optimizer step identical everywhere, and the processes
 * check at the first step that they got the same options and model. Only rank 0 should save or report. Outside
 * mpirun: rank 0 of 1.
 * @param rank  receives this process's rank, 0..size-1 (may be NULL).
 * @param size  receives the number of processes (may be NULL).
 * @return GRAFT_OK or GRAFT_ERR_INVALID_ARGUMENT (NULL trainer).
 * Thread safety: any thread.
 */
GRAFT_API graft_status graft_trainer_world(const graft_trainer *trainer, int32_t *rank, int32_t *size);

/**
 * One training micro-batch: forward, backward, and an optimizer update (every gradient_accumulation_steps-th
 * call; every call with the default 1). The rows are packed end to end internally (no compute on padding).
 *
 * @param ids, lengths, batch, stride  the token batch (see ARRAYS).
 * @param labels  sequence classification: batch class indices in 0..num_labels-1 (required).
 *                Causal LM: NULL = next-token loss on every token; or batch * stride per-token labels in
 *                Hugging Face's convention — labels[b * stride + t] is the token expected at position t (the
 *                library shifts: the prediction made at t-1 is scored against it), -100 = not scored.
 * @param loss    NULL, or receives the micro-batch's mean loss (before the update).
 * @return GRAFT_OK; GRAFT_ERR_INVALID_ARGUMENT (NULLs, sizes, ids or labels out of range);
 *         GRAFT_ERR_STATE (the adapter was merged or deleted).
 * Thread safety: one thread at a time per trainer, and not concurrently with its model.
 */
GRAFT_API graft_status graft_trainer_step(graft_trainer *trainer, const int32_t *ids, const int32_t *lengths,
                                          int32_t batch, int32_t stride, const int32_t *labels, float *loss);

/**
 * Mean loss and accuracy over a batch without training (labels as for graft_trainer_step). Accuracy is the
 * fraction of sequences classified correctly, or of scored tokens predicted exactly (causal LM).
 * @param loss, accuracy  NULL, or receive the results.
 * @return as graft_trainer_step.
 */
GRAFT_API graft_status graft_trainer_evaluate(graft_trainer *trainer, const int32_t *ids, const int32_t *lengths,
                                              int32_t batch, int32_t stride, const int32_t *labels, float *loss,
                                              float *accuracy);

/** What a graft_progress_callback sees after each optimizer step. Filled by the library. */
typedef struct graft_progress {
    /** sizeof(graft_progress) as the library knows it: read an appended field only when this covers it. */
    uint32_t struct_size;
    /** Optimizer steps taken so far (1 after the first). */
    int32_t step;
    /** Optimizer steps in the run. */
    int32_t total_steps;
    /** Current epoch, 0-based. */
    int32_t epoch;
    /** This step's training loss. */
    float loss;
    /** Learning rate this step used. */
    float learning_rate;
    /** Global gradient norm before clipping. */
    float grad_norm;
    /** Mean training loss of this run's steps so far. */
    float mean_loss;
    /** Real (unpadded) training tokens per second so far. */
    double tokens_per_second;
    /** Seconds since the run started. */
    double elapsed_seconds;
    /** Estimated seconds remaining. */
    double eta_seconds;
} graft_progress;

/**
 * Called after each optimizer step of graft_trainer_train_file; `p` is valid during the call only. Return 0
 * to go on, nonzero to stop (the call then returns GRAFT_ERR_CANCELLED; the trainer stays usable).
 */
typedef int (*graft_progress_callback)(const graft_progress *p, void *user_data);

/**
 * Trains over a dataset for `epochs` (or `total_steps`) with shuffling, packing and the schedule.
 *
 * @param data  a JSON Lines file — {"text", "label"} per line for sequence classification (integer labels, or
 *              strings numbered in order of first appearance); {"prompt", "completion"} (loss on the
 *              completion) or {"text"} for causal LM — or "tweets": the sentiment corpus's demo training split
 *              from ${GRAFT_HOME:-$HOME/.cache/graft}/tweets (causal LM: "Tweet: ...\nSentiment:" prompts).
 * @param cb    NULL, or the progress callback.
 * @return GRAFT_OK; GRAFT_ERR_CANCELLED (cb returned nonzero); GRAFT_ERR_NOT_FOUND / GRAFT_ERR_IO /
 *         GRAFT_ERR_FORMAT (data); GRAFT_ERR_INVALID_ARGUMENT (labels outside num_labels, empty data);
 *         GRAFT_ERR_STATE (the adapter was merged or deleted, or this trainer already finished its epochs —
 *         step counters continue across calls and from a loaded checkpoint).
 * Thread safety: one thread at a time per trainer, and not concurrently with its model; cb runs on the
 * calling thread.
 */
GRAFT_API graft_status graft_trainer_train_file(graft_trainer *trainer, const char *data, graft_progress_callback cb,
                                                void *user_data);

/**
 * Writes a checkpoint directory: the adapter in PEFT format, the optimizer state, the trainer state (step
 * counters, RNG) and graft_manifest.json (each file's size and SHA-256). Crash-safe: a directory of its own is
 * replaced as a whole (staged beside it, fsynced, swapped in atomically), so a process killed mid-save leaves
 * the previous checkpoint or the new one, never a mix.
 * @return GRAFT_OK; GRAFT_ERR_IO; GRAFT_ERR_INVALID_ARGUMENT (NULLs); GRAFT_ERR_STATE (adapter gone).
 */
GRAFT_API graft_status graft_trainer_save_checkpoint(graft_trainer *trainer, const char *directory);

/**
 * Restores a checkpoint written by graft_trainer_save_checkpoint into this trainer (same adapter config and
 * optimizer), so training continues exactly where it stopped.
 * Every file is checked against the manifest first; nothing is restored from a directory that fails.
 * @return GRAFT_OK; GRAFT_ERR_NOT_FOUND / GRAFT_ERR_IO / GRAFT_ERR_FORMAT (files; no manifest, or files that do
 *         not match it: an interrupted or mixed save); GRAFT_ERR_INVALID_ARGUMENT (NULLs, a checkpoint of
 *         another optimizer).
 */
GRAFT_API graft_status graft_trainer_load_checkpoint(graft_trainer *trainer, const char *directory);

#ifdef __cplusplus
}
#endif

#endif /* GRAFT_H */
