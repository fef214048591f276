/*
 * graft.so — a Lua 5.4 module over Graft's C ABI (include/graft.h).
 *
 *   local graft = require "graft"
 *   local model <close> = graft.load(path, {task = "seq-cls", num_labels = 3})
 *   model:add_adapter("default", '{"peft_type": "LORA", "r": 8, "target_modules": ["query", "value"]}')
 *   local trainer <close> = model:trainer{learning_rate = 1e-3}
 *   print(trainer:step({model:tokenize("great"), model:tokenize("awful")}, {0, 1}))
 *
 * Models and trainers are userdata freed by close(), by a to-be-closed variable (__close) or by the garbage
 * collector (__gc). Failures raise Lua errors "graft: <call>: <status>: <graft_last_error()>". Token batches are
 * Lua sequences of sequences of integers (rows may differ in length; they are padded). Temporary C buffers
 * are Lua userdata, so an error raised halfway never leaks them.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -pedantic -shared -fPIC $(pkg-config --cflags lua5.4) -Iinclude \
 *           bindings/lua/graft.c bindings/lua/arguments.c bindings/lua/trainer.c bindings/lua/combine.c -o graft.so -Lpath/to/lib -lgraft
 */
#include "graft_lua.h"

/* ---------------------------------------------------------------------------------------------------------- */
/* Module functions                                                                                            */

static int l_version(lua_State *L) {
    lua_pushstring(L, graft_version_string());
    lua_pushinteger(L, (lua_Integer)graft_version());
    return 2;
}

/* graft.load(path [, {task = "base"|"seq-cls"|"causal-lm" (or seq_cls, sequence_classification, causal_lm),
 *                      num_labels = n, threads = n, seed = n, compute_dtype = "float32"|"bfloat16"|"auto",
 *                      moe_base = directory}]) -> model.
 * path: a model directory or .gguf file, or an asset name ("minilm", "smollm2"; see graft_model_load).
 * moe_base: a directory `graft moefy --output` wrote (graft_model_params.moe_base, graft.h 0.6.0). */
static int l_load(lua_State *L) {
    static const char *const known[] = {"task", "num_labels", "threads", "seed", "compute_dtype", "moe_base", NULL};
    static const char *const dtypes[] = {"float32", "bfloat16", "auto", NULL};
    const char *path = luaL_checkstring(L, 1);
    check_options(L, 2, known);
    graft_model_params mp;
    graft_model_params_init(&mp);
    if (lua_istable(L, 2)) {
        opt_task(L, 2, &mp.task);
        opt_int(L, 2, "num_labels", &mp.num_labels);
        opt_int(L, 2, "threads", &mp.num_threads);
        opt_u64(L, 2, "seed", &mp.seed);
        opt_enum(L, 2, "compute_dtype", dtypes, &mp.compute_dtype);
        /* Stays on the stack (index 3) until the load returns, so the string outlives the call. */
        if (lua_getfield(L, 2, "moe_base") != LUA_TNIL) {
            if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "graft: option 'moe_base' must be a string (a directory)");
            mp.moe_base = lua_tostring(L, -1);
        }
    }
    lmodel *m = lua_newuserdatauv(L, sizeof *m, 0);
    m->handle = NULL;
    luaL_setmetatable(L, MODEL_MT);
    check(L, graft_model_load(path, &mp, &m->handle), path);
    return 1;
}

/* ---------------------------------------------------------------------------------------------------------- */
/* Model methods                                                                                               */

static int m_close(lua_State *L) {
    lmodel *m = luaL_checkudata(L, 1, MODEL_MT);
    graft_model_free(m->handle);
    m->handle = NULL;
    return 0;
}

static int m_tostring(lua_State *L) {
    lmodel *m = luaL_checkudata(L, 1, MODEL_MT);
    lua_pushfstring(L, "graft.Model (%s)", m->handle ? "open" : "closed");
    return 1;
}

/* model:info() -> JSON text (graft_model_info) */
static int m_info(lua_State *L) {
    char *json = NULL;
    check(L, graft_model_info(to_model(L, 1), &json), "info");
    push_owned(L, json);
    return 1;
}

/* model:tokenize(text [, add_special = true]) -> {ids} */
static int m_tokenize(lua_State *L) {
    lua_settop(L, 3); /* fixed argument slots: scratch buffers go above them */
    graft_model *m = to_model(L, 1);
    size_t len = 0;
    const char *text = luaL_checklstring(L, 2, &len);
    if (strlen(text) != len) return luaL_error(L, "graft: tokenize: text contains a NUL byte");
    int add = lua_isnoneornil(L, 3) ? 1 : lua_toboolean(L, 3);
    size_t n = 0;
    graft_status s = graft_tokenize(m, text, add, NULL, 0, &n);
    if (s != GRAFT_OK && n == 0) check(L, s, "tokenize");
    int32_t *ids = scratch(L, n * sizeof(int32_t));
    check(L, graft_tokenize(m, text, add, ids, n, &n), "tokenize");
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        lua_pushinteger(L, ids[i]);
        lua_seti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* model:decode({ids} [, skip_special = false]) -> text */
static int m_decode(lua_State *L) {
    lua_settop(L, 3); /* fixed argument slots: scratch buffers go above them */
    graft_model *m = to_model(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    lua_Integer n = luaL_len(L, 2);
    int32_t *ids = n > 0 ? read_ints(L, 2, n, "ids") : NULL;
    char *text = NULL;
    check(L, graft_detokenize(m, ids, (size_t)n, lua_toboolean(L, 3), &text), "decode");
    push_owned(L, text);
    return 1;
}

/* model:chat_template(user_message) -> the prompt text in the model's chat template (graft_chat_template_apply);
 * tokenize it with add_special = false before model:generate. */
static int m_chat_template(lua_State *L) {
    graft_model *m = to_model(L, 1);
    size_t len = 0;
    const char *text = luaL_checklstring(L, 2, &len);
    if (strlen(text) != len) return luaL_error(L, "graft: chat_template: the message contains a NUL byte");
    char *prompt = NULL;
    check(L, graft_chat_template_apply(m, text, &prompt), "chat_template");
    push_owned(L, prompt);
    return 1;
}

/* model:add_adapter(name, config_json) */
static int m_add_adapter(lua_State *L) {
    check(L, graft_adapter_add(to_model(L, 1), luaL_checkstring(L, 2), luaL_checkstring(L, 3)), "add_adapter");
    return 0;
}

/* model:load_adapter(directory [, name = "default"]) */
static int m_load_adapter(lua_State *L) {
    check(L, graft_adapter_load(to_model(L, 1), luaL_checkstring(L, 2), luaL_optstring(L, 3, "default")),
          "load_adapter");
    return 0;
}

/* model:save_adapter(directory [, name = "default"]) */
static int m_save_adapter(lua_State *L) {
    check(L, graft_adapter_save(to_model(L, 1), luaL_optstring(L, 3, "default"), luaL_checkstring(L, 2)),
          "save_adapter");
    return 0;
}

/* model:list_adapters() -> JSON text */
static int m_list_adapters(lua_State *L) {
    char *json = NULL;
    check(L, graft_adapter_list(to_model(L, 1), &json), "list_adapters");
    push_owned(L, json);
    return 1;
}

static int m_set_adapter(lua_State *L) {
    check(L, graft_adapter_set_active(to_model(L, 1), luaL_checkstring(L, 2)), "set_adapter");
    return 0;
}

/* model:enable_adapters([on = true]) */
static int m_enable_adapters(lua_State *L) {
    check(L, graft_adapter_set_enabled(to_model(L, 1), lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2)),
          "enable_adapters");
    return 0;
}

static int m_disable_adapters(lua_State *L) {
    check(L, graft_adapter_set_enabled(to_model(L, 1), 0), "disable_adapters");
    return 0;
}

static int m_delete_adapter(lua_State *L) {
    check(L, graft_adapter_delete(to_model(L, 1), luaL_checkstring(L, 2)), "delete_adapter");
    return 0;
}

static int m_merge_adapter(lua_State *L) {
    check(L, graft_adapter_merge(to_model(L, 1), luaL_checkstring(L, 2)), "merge_adapter");
    return 0;
}

static int m_unmerge_adapter(lua_State *L) {
    check(L, graft_adapter_unmerge(to_model(L, 1), luaL_checkstring(L, 2)), "unmerge_adapter");
    return 0;
}

/* model:forward(batch [, {output = "hidden"|"logits", adapter_ids = {...}}]) -> {floats}, count
 * The floats are row-major as graft_model_forward documents them, 1-based. */
static int m_forward(lua_State *L) {
    static const char *const known[] = {"output", "adapter_ids", NULL};
    static const char *const outputs[] = {"none", "hidden", "logits", NULL};
    lua_settop(L, 3); /* fixed argument slots: scratch buffers go above them */
    graft_model *m = to_model(L, 1);
    check_options(L, 3, known);
    batch_t b = read_batch(L, 2);
    int32_t output = GRAFT_OUTPUT_HIDDEN;
    int32_t *adapter_ids = NULL;
    if (lua_istable(L, 3)) {
        opt_enum(L, 3, "output", outputs, &output);
        if (output == 0) return luaL_error(L, "graft: option 'output' must be 'hidden' or 'logits'");
        lua_getfield(L, 3, "adapter_ids");
        adapter_ids = read_ints(L, lua_gettop(L), b.batch, "adapter_ids");
    }
    size_t count = 0;
    graft_status s = graft_model_forward(m, b.ids, b.lengths, b.batch, b.stride, adapter_ids, output, NULL, 0, &count);
    if (s != GRAFT_OK && count == 0) check(L, s, "forward");
    float *out = scratch(L, count * sizeof(float));
    check(L, graft_model_forward(m, b.ids, b.lengths, b.batch, b.stride, adapter_ids, output, out, count, &count),
          "forward");
    lua_createtable(L, (int)count, 0);
    for (size_t i = 0; i < count; i++) {
        lua_pushnumber(L, (lua_Number)out[i]);
        lua_seti(L, -2, (lua_Integer)i + 1);
    }
    lua_pushinteger(L, (lua_Integer)count);
    return 2;
}

/* Token callback of generate: calls the Lua function at stack slot ctx->fn; an error stops and is kept. */
static int on_token(int32_t token, const char *piece, void *user_data) {
    cb_ctx *c = user_data;
    lua_State *L = c->L;
    lua_pushvalue(L, c->fn);
    lua_pushinteger(L, token);
    lua_pushstring(L, piece);
    if (lua_pcall(L, 2, 1, 0) != LUA_OK) {
        lua_replace(L, c->err);
        return 1;
    }
    int stop = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stop;
}

/* model:generate({prompt ids} [, {max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, fast_decode,
 * callback}]) -> {new ids}. callback(token, text_piece) may return true to stop; fast_decode = true selects the
 * int8 fast mode (graft.h 0.5.0). */
static int m_generate(lua_State *L) {
    static const char *const known[] = {"max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop_at_eos",
                                        "fast_decode", "callback", NULL};
    lua_settop(L, 3); /* fixed argument slots: scratch buffers go above them */
    graft_model *m = to_model(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    check_options(L, 3, known);
    lua_Integer n = luaL_len(L, 2);
    if (n < 1) return luaL_error(L, "graft: generate: the prompt is empty");
    int32_t *prompt = read_ints(L, 2, n, "prompt");
    graft_sampling_params sp;
    graft_sampling_params_init(&sp);
    cb_ctx ctx = {L, 0, 0};
    lua_pushnil(L); /* error slot */
    ctx.err = lua_gettop(L);
    if (lua_istable(L, 3)) {
        opt_int(L, 3, "max_new_tokens", &sp.max_new_tokens);
        opt_float(L, 3, "temperature", &sp.temperature);
        opt_float(L, 3, "top_p", &sp.top_p);
        opt_int(L, 3, "top_k", &sp.top_k);
        opt_u64(L, 3, "seed", &sp.seed);
        if (lua_getfield(L, 3, "stop_at_eos") != LUA_TNIL) sp.stop_at_eos = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (lua_getfield(L, 3, "fast_decode") != LUA_TNIL) sp.fast_decode = lua_toboolean(L, -1);
        lua_pop(L, 1);
        if (lua_getfield(L, 3, "callback") != LUA_TNIL) {
            luaL_checktype(L, -1, LUA_TFUNCTION);
            ctx.fn = lua_gettop(L);
        } else {
            lua_pop(L, 1);
        }
    }
    if (sp.max_new_tokens < 0) return luaL_error(L, "graft: generate: max_new_tokens must be >= 0");
    size_t cap = sp.max_new_tokens > 0 ? (size_t)sp.max_new_tokens : 1;
    int32_t *out = scratch(L, cap * sizeof(int32_t));
    size_t n_out = 0;
    graft_status s = graft_generate(m, prompt, (size_t)n, &sp, ctx.fn ? on_token : NULL, &ctx, out, cap, &n_out);
    if (!lua_isnil(L, ctx.err)) {
        lua_pushvalue(L, ctx.err);
        return lua_error(L);
    }
    check(L, s, "generate");
    lua_createtable(L, (int)n_out, 0);
    for (size_t i = 0; i < n_out; i++) {
        lua_pushinteger(L, out[i]);
        lua_seti(L, -2, (lua_Integer)i + 1);
    }
    return 1;
}

/* model:trainer([{adapter, learning_rate, weight_decay, warmup_steps, total_steps, schedule, optimizer,
 *                 max_grad_norm, gradient_accumulation_steps, batch_size, epochs, max_length, seed, extras}])
 * -> trainer. schedule: "constant"|"linear"|"cosine"; optimizer: "adamw"|"sgd"; extras: JSON text. */
static int m_trainer(lua_State *L) {
    static const char *const known[] = {"adapter", "learning_rate", "weight_decay", "warmup_steps", "total_steps",
                                        "schedule", "optimizer", "max_grad_norm", "gradient_accumulation_steps",
                                        "batch_size", "epochs", "max_length", "seed", "extras", NULL};
    static const char *const schedules[] = {"constant", "linear", "cosine", NULL};
    static const char *const optimizers[] = {"adamw", "sgd", NULL};
    graft_model *m = to_model(L, 1);
    check_options(L, 2, known);
    graft_trainer_params tp;
    graft_trainer_params_init(&tp);
    const char *adapter = NULL, *extras = NULL;
    if (lua_istable(L, 2)) {
        opt_float(L, 2, "learning_rate", &tp.learning_rate);
        opt_float(L, 2, "weight_decay", &tp.weight_decay);
        opt_int(L, 2, "warmup_steps", &tp.warmup_steps);
        opt_int(L, 2, "total_steps", &tp.total_steps);
        opt_enum(L, 2, "schedule", schedules, &tp.schedule);
        opt_enum(L, 2, "optimizer", optimizers, &tp.optimizer);
        opt_float(L, 2, "max_grad_norm", &tp.max_grad_norm);
        opt_int(L, 2, "gradient_accumulation_steps", &tp.gradient_accumulation_steps);
        opt_int(L, 2, "batch_size", &tp.batch_size);
        opt_int(L, 2, "epochs", &tp.epochs);
        opt_int(L, 2, "max_length", &tp.max_length);
        opt_u64(L, 2, "seed", &tp.seed);
        lua_getfield(L, 2, "adapter"); /* strings stay referenced by the options table */
        adapter = lua_tostring(L, -1);
        lua_pop(L, 1);
        lua_getfield(L, 2, "extras");
        extras = lua_tostring(L, -1);
        lua_pop(L, 1);
    }
    ltrainer *t = lua_newuserdatauv(L, sizeof *t, 0);
    t->handle = NULL;
    luaL_setmetatable(L, TRAINER_MT);
    check(L, graft_trainer_create(m, adapter, &tp, extras, &t->handle), "trainer");
    return 1;
}

/* ---------------------------------------------------------------------------------------------------------- */

static const luaL_Reg model_methods[] = {
    {"close", m_close},
    {"info", m_info},
    {"tokenize", m_tokenize},
    {"decode", m_decode},
    {"add_adapter", m_add_adapter},
    {"load_adapter", m_load_adapter},
    {"save_adapter", m_save_adapter},
    {"list_adapters", m_list_adapters},
    {"set_adapter", m_set_adapter},
    {"enable_adapters", m_enable_adapters},
    {"disable_adapters", m_disable_adapters},
    {"delete_adapter", m_delete_adapter},
    {"merge_adapter", m_merge_adapter},
    {"unmerge_adapter", m_unmerge_adapter},
    {"add_weighted_adapter", m_add_weighted_adapter},
    {"save_merged_model", m_save_merged_model},
    {"compress_adapter", m_compress_adapter},
    {"forward", m_forward},
    {"generate", m_generate},
    {"chat_template", m_chat_template},
    {"trainer", m_trainer},
    {NULL, NULL},
};


static void new_class(lua_State *L, const char *name, const luaL_Reg *methods, lua_CFunction close,
                      lua_CFunction tostring) {
    luaL_newmetatable(L, name);
    lua_newtable(L); /* methods is a pointer, so not luaL_newlib (which sizes from an array) */
    luaL_setfuncs(L, methods, 0);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, close);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, close);
    lua_setfield(L, -2, "__close");
    lua_pushcfunction(L, tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
}

int luaopen_graft(lua_State *L) {
    static const luaL_Reg functions[] = {
        {"load", l_load},
        {"version", l_version},
        {NULL, NULL},
    };
    new_class(L, MODEL_MT, model_methods, m_close, m_tostring);
    new_class(L, TRAINER_MT, graft_lua_trainer_methods, t_close, t_tostring);
    luaL_newlib(L, functions);
    lua_pushstring(L, graft_version_string());
    lua_setfield(L, -2, "_VERSION");
    return 1;
}
