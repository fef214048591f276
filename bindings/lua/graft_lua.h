/*
 * graft_lua.h — what the Lua module's files share (internal; not installed): the userdata types, argument
 * conversion (arguments.c) and the trainer class (trainer.c). Every name here is hidden from the module's exports.
 */
#ifndef GRAFT_LUA_H
#define GRAFT_LUA_H

#include <graft.h>

#include <lauxlib.h>
#include <lua.h>

#include <stdint.h>
#include <string.h>

#define MODEL_MT "graft.Model"
#define TRAINER_MT "graft.Trainer"

#define GRAFT_LUA_INTERNAL __attribute__((visibility("hidden")))

typedef struct {
    graft_model *handle;
} lmodel;

typedef struct {
    graft_trainer *handle;
} ltrainer;


/* A token batch: a sequence of non-empty sequences of ids at stack index idx -> padded ids + lengths.
 * Pushes two userdata (ids, lengths) that keep the memory alive until the caller returns. */
typedef struct {
    int32_t *ids, *lengths;
    int32_t batch, stride;
} batch_t;

GRAFT_LUA_INTERNAL void check(lua_State *L, graft_status s, const char *where);
GRAFT_LUA_INTERNAL void push_owned(lua_State *L, char *s);
GRAFT_LUA_INTERNAL graft_model *to_model(lua_State *L, int idx);
GRAFT_LUA_INTERNAL graft_trainer *to_trainer(lua_State *L, int idx);
GRAFT_LUA_INTERNAL int32_t to_int32(lua_State *L, int idx, const char *what, lua_Integer row, lua_Integer col);
GRAFT_LUA_INTERNAL void *scratch(lua_State *L, size_t bytes);
GRAFT_LUA_INTERNAL batch_t read_batch(lua_State *L, int idx);
GRAFT_LUA_INTERNAL int32_t *read_ints(lua_State *L, int idx, lua_Integer n, const char *what);
GRAFT_LUA_INTERNAL void opt_int(lua_State *L, int idx, const char *key, int32_t *out);
GRAFT_LUA_INTERNAL void opt_u64(lua_State *L, int idx, const char *key, uint64_t *out);
GRAFT_LUA_INTERNAL void opt_float(lua_State *L, int idx, const char *key, float *out);
GRAFT_LUA_INTERNAL void opt_enum(lua_State *L, int idx, const char *key, const char *const names[], int32_t *out);
GRAFT_LUA_INTERNAL void opt_task(lua_State *L, int idx, int32_t *out);
GRAFT_LUA_INTERNAL void check_options(lua_State *L, int idx, const char *const known[]);

/* What a generate or train callback needs: the state, the stack slot of the Lua function, and the slot where an
 * error it raised is kept. */
typedef struct {
    lua_State *L;
    int fn, err;
} cb_ctx;

/* model:add_weighted_adapter and model:save_merged_model (combine.c). */
GRAFT_LUA_INTERNAL int m_add_weighted_adapter(lua_State *L);
GRAFT_LUA_INTERNAL int m_save_merged_model(lua_State *L);
GRAFT_LUA_INTERNAL int m_compress_adapter(lua_State *L);

/* The trainer class (trainer.c): its methods, and the __gc/__close and __tostring metamethods. */
GRAFT_LUA_INTERNAL extern const luaL_Reg graft_lua_trainer_methods[];
GRAFT_LUA_INTERNAL int t_close(lua_State *L);
GRAFT_LUA_INTERNAL int t_tostring(lua_State *L);

#endif
