/* The Lua module's argument conversion: handles, integers, token batches and option tables, with errors that
 * name the argument at fault. */
#include "graft_lua.h"

/* Raises a Lua error for a failed status, naming the call, the status and the library's message. */
void check(lua_State *L, graft_status s, const char *where) {
    if (s != GRAFT_OK) luaL_error(L, "graft: %s: %s (%d): %s", where, graft_status_string(s), (int)s, graft_last_error());
}

/* Pushes a library-owned string and releases it. */
void push_owned(lua_State *L, char *s) {
    lua_pushstring(L, s ? s : "");
    graft_string_free(s);
}

graft_model *to_model(lua_State *L, int idx) {
    lmodel *m = luaL_checkudata(L, idx, MODEL_MT);
    if (!m->handle) luaL_error(L, "graft: the model is closed");
    return m->handle;
}

graft_trainer *to_trainer(lua_State *L, int idx) {
    ltrainer *t = luaL_checkudata(L, idx, TRAINER_MT);
    if (!t->handle) luaL_error(L, "graft: the trainer is closed");
    return t->handle;
}

/* An int32 from a Lua value, with an error naming `what` when it is not an integer in range. */
int32_t to_int32(lua_State *L, int idx, const char *what, lua_Integer row, lua_Integer col) {
    int ok = 0;
    lua_Integer v = lua_tointegerx(L, idx, &ok);
    if (!ok || v < INT32_MIN || v > INT32_MAX) {
        if (col > 0) luaL_error(L, "graft: %s[%d][%d] must be an int32 integer, got %s", what, (int)row, (int)col,
                                luaL_typename(L, idx));
        luaL_error(L, "graft: %s[%d] must be an int32 integer, got %s", what, (int)row, luaL_typename(L, idx));
    }
    return (int32_t)v;
}

/* Temporary memory owned by the Lua stack (a full userdata pushed there). */
void *scratch(lua_State *L, size_t bytes) {
    return lua_newuserdatauv(L, bytes ? bytes : 1, 0);
}


batch_t read_batch(lua_State *L, int idx) {
    batch_t b = {NULL, NULL, 0, 0};
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer rows = luaL_len(L, idx);
    if (rows < 1 || rows > INT32_MAX) luaL_error(L, "graft: the batch must hold 1 or more rows, got %d", (int)rows);
    lua_Integer width = 0;
    for (lua_Integer r = 1; r <= rows; r++) {
        if (lua_geti(L, idx, r) != LUA_TTABLE)
            luaL_error(L, "graft: batch row %d must be a table of token ids, got %s", (int)r, luaL_typename(L, -1));
        lua_Integer n = luaL_len(L, -1);
        if (n < 1) luaL_error(L, "graft: batch row %d is empty", (int)r);
        if (n > width) width = n;
        lua_pop(L, 1);
    }
    if ((size_t)width > SIZE_MAX / sizeof(int32_t) / (size_t)rows || width > INT32_MAX)
        luaL_error(L, "graft: the batch is too large");
    b.batch = (int32_t)rows;
    b.stride = (int32_t)width;
    b.ids = scratch(L, (size_t)rows * (size_t)width * sizeof(int32_t));
    b.lengths = scratch(L, (size_t)rows * sizeof(int32_t));
    memset(b.ids, 0, (size_t)rows * (size_t)width * sizeof(int32_t));
    for (lua_Integer r = 1; r <= rows; r++) {
        lua_geti(L, idx, r);
        lua_Integer n = luaL_len(L, -1);
        for (lua_Integer c = 1; c <= n; c++) {
            lua_geti(L, -1, c);
            b.ids[(r - 1) * width + (c - 1)] = to_int32(L, -1, "batch", r, c);
            lua_pop(L, 1);
        }
        b.lengths[r - 1] = (int32_t)n;
        lua_pop(L, 1);
    }
    return b;
}

/* An optional sequence of `n` int32 at idx (nil -> NULL); pushes its buffer. */
int32_t *read_ints(lua_State *L, int idx, lua_Integer n, const char *what) {
    if (lua_isnoneornil(L, idx)) return NULL;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer len = luaL_len(L, idx);
    if (len != n) luaL_error(L, "graft: %s needs %d entries, got %d", what, (int)n, (int)len);
    int32_t *out = scratch(L, (size_t)n * sizeof(int32_t));
    for (lua_Integer i = 1; i <= n; i++) {
        lua_geti(L, idx, i);
        out[i - 1] = to_int32(L, -1, what, i, 0);
        lua_pop(L, 1);
    }
    return out;
}

/* Option readers for a table at idx (absent keys keep *out). */
void opt_int(lua_State *L, int idx, const char *key, int32_t *out) {
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        int ok = 0;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < INT32_MIN || v > INT32_MAX) luaL_error(L, "graft: option '%s' must be an integer", key);
        *out = (int32_t)v;
    }
    lua_pop(L, 1);
}

void opt_u64(lua_State *L, int idx, const char *key, uint64_t *out) {
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        int ok = 0;
        lua_Integer v = lua_tointegerx(L, -1, &ok);
        if (!ok || v < 0) luaL_error(L, "graft: option '%s' must be a non-negative integer", key);
        *out = (uint64_t)v;
    }
    lua_pop(L, 1);
}

void opt_float(lua_State *L, int idx, const char *key, float *out) {
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        int ok = 0;
        lua_Number v = lua_tonumberx(L, -1, &ok);
        if (!ok) luaL_error(L, "graft: option '%s' must be a number", key);
        *out = (float)v;
    }
    lua_pop(L, 1);
}

/* A string option mapped through names[] to its index (absent keeps *out). */
void opt_enum(lua_State *L, int idx, const char *key, const char *const names[], int32_t *out) {
    if (lua_getfield(L, idx, key) != LUA_TNIL) {
        const char *s = lua_tostring(L, -1);
        int found = -1;
        for (int i = 0; s && names[i]; i++)
            if (strcmp(s, names[i]) == 0) found = i;
        if (found < 0) luaL_error(L, "graft: option '%s' has an unknown value '%s'", key, s ? s : "?");
        *out = (int32_t)found;
    }
    lua_pop(L, 1);
}

/* The task names every front door accepts (SessionTask.aliases in Sources/Graft/GraftSession.swift), any case. */
static const struct {
    const char *name;
    int32_t task;
} task_names[] = {
    {"base", GRAFT_TASK_BASE},
    {"seq-cls", GRAFT_TASK_SEQUENCE_CLASSIFICATION},
    {"seq_cls", GRAFT_TASK_SEQUENCE_CLASSIFICATION},
    {"sequence_classification", GRAFT_TASK_SEQUENCE_CLASSIFICATION},
    {"causal-lm", GRAFT_TASK_CAUSAL_LM},
    {"causal_lm", GRAFT_TASK_CAUSAL_LM},
};

/* The option `task` at idx mapped through task_names (absent keeps *out). */
void opt_task(lua_State *L, int idx, int32_t *out) {
    if (lua_getfield(L, idx, "task") != LUA_TNIL) {
        const char *s = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        char key[32];
        size_t len = s ? strlen(s) : sizeof key;
        int found = -1;
        if (len < sizeof key) {
            for (size_t i = 0; i <= len; i++) key[i] = (s[i] >= 'A' && s[i] <= 'Z') ? (char)(s[i] - 'A' + 'a') : s[i];
            for (size_t i = 0; i < sizeof task_names / sizeof task_names[0]; i++)
                if (strcmp(key, task_names[i].name) == 0) found = (int)i;
        }
        if (found < 0)
            luaL_error(L, "graft: option 'task' has an unknown value '%s' (known: base, seq-cls, seq_cls, "
                          "sequence_classification, causal-lm, causal_lm)", s ? s : luaL_typename(L, -1));
        *out = task_names[found].task;
    }
    lua_pop(L, 1);
}

void check_options(lua_State *L, int idx, const char *const known[]) {
    if (lua_isnoneornil(L, idx)) return;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        const char *k = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
        int ok = 0;
        for (int i = 0; k && known[i]; i++)
            if (strcmp(k, known[i]) == 0) ok = 1;
        if (!ok) luaL_error(L, "graft: unknown option '%s'", k ? k : luaL_typename(L, -1));
    }
}
