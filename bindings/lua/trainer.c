/* The Lua module's trainer class (graft.Trainer): step, evaluate, train over a file, checkpoints. */
#include "graft_lua.h"

int t_close(lua_State *L) {
    ltrainer *t = luaL_checkudata(L, 1, TRAINER_MT);
    graft_trainer_free(t->handle);
    t->handle = NULL;
    return 0;
}

int t_tostring(lua_State *L) {
    ltrainer *t = luaL_checkudata(L, 1, TRAINER_MT);
    lua_pushfstring(L, "graft.Trainer (%s)", t->handle ? "open" : "closed");
    return 1;
}

/* Labels for a batch: nil, one class per row, or batch * stride per-token labels (flat). */
static int32_t *read_labels(lua_State *L, int idx, const batch_t *b) {
    if (lua_isnoneornil(L, idx)) return NULL;
    luaL_checktype(L, idx, LUA_TTABLE);
    lua_Integer n = luaL_len(L, idx);
    lua_Integer per_token = (lua_Integer)b->batch * b->stride;
    if (n != b->batch && n != per_token)
        luaL_error(L, "graft: labels need %d entries (one class per row) or %d (per token), got %d", (int)b->batch,
                   (int)per_token, (int)n);
    return read_ints(L, idx, n, "labels");
}

/* trainer:step(batch [, labels]) -> loss */
static int t_step(lua_State *L) {
    lua_settop(L, 3); /* fixed argument slots: scratch buffers go above them */
    graft_trainer *t = to_trainer(L, 1);
    batch_t b = read_batch(L, 2);
    int32_t *labels = read_labels(L, 3, &b);
    float loss = 0;
    check(L, graft_trainer_step(t, b.ids, b.lengths, b.batch, b.stride, labels, &loss), "step");
    lua_pushnumber(L, loss);
    return 1;
}

/* trainer:evaluate(batch [, labels]) -> loss, accuracy */
static int t_evaluate(lua_State *L) {
    lua_settop(L, 3); /* fixed argument slots: scratch buffers go above them */
    graft_trainer *t = to_trainer(L, 1);
    batch_t b = read_batch(L, 2);
    int32_t *labels = read_labels(L, 3, &b);
    float loss = 0, accuracy = 0;
    check(L, graft_trainer_evaluate(t, b.ids, b.lengths, b.batch, b.stride, labels, &loss, &accuracy), "evaluate");
    lua_pushnumber(L, loss);
    lua_pushnumber(L, accuracy);
    return 2;
}

static int on_progress(const graft_progress *p, void *user_data) {
    cb_ctx *c = user_data;
    lua_State *L = c->L;
    lua_pushvalue(L, c->fn);
    lua_createtable(L, 0, 10);
    lua_pushinteger(L, p->step), lua_setfield(L, -2, "step");
    lua_pushinteger(L, p->total_steps), lua_setfield(L, -2, "total_steps");
    lua_pushinteger(L, p->epoch), lua_setfield(L, -2, "epoch");
    lua_pushnumber(L, p->loss), lua_setfield(L, -2, "loss");
    lua_pushnumber(L, p->learning_rate), lua_setfield(L, -2, "learning_rate");
    lua_pushnumber(L, p->grad_norm), lua_setfield(L, -2, "grad_norm");
    lua_pushnumber(L, p->mean_loss), lua_setfield(L, -2, "mean_loss");
    lua_pushnumber(L, p->tokens_per_second), lua_setfield(L, -2, "tokens_per_second");
    lua_pushnumber(L, p->elapsed_seconds), lua_setfield(L, -2, "elapsed_seconds");
    lua_pushnumber(L, p->eta_seconds), lua_setfield(L, -2, "eta_seconds");
    if (lua_pcall(L, 1, 1, 0) != LUA_OK) {
        lua_replace(L, c->err);
        return 1;
    }
    int stop = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return stop;
}

/* trainer:train(data [, callback]) -> true when finished, false when the callback stopped it.
 * data: a JSON Lines path or "tweets"; callback(progress table) may return true to stop. */
static int t_train(lua_State *L) {
    graft_trainer *t = to_trainer(L, 1);
    const char *data = luaL_checkstring(L, 2);
    cb_ctx ctx = {L, 0, 0};
    if (!lua_isnoneornil(L, 3)) {
        luaL_checktype(L, 3, LUA_TFUNCTION);
        ctx.fn = 3;
    }
    lua_settop(L, 3);
    lua_pushnil(L);
    ctx.err = 4;
    graft_status s = graft_trainer_train_file(t, data, ctx.fn ? on_progress : NULL, &ctx);
    if (!lua_isnil(L, ctx.err)) {
        lua_pushvalue(L, ctx.err);
        return lua_error(L);
    }
    if (s == GRAFT_ERR_CANCELLED) {
        lua_pushboolean(L, 0);
        return 1;
    }
    check(L, s, "train");
    lua_pushboolean(L, 1);
    return 1;
}

static int t_save_checkpoint(lua_State *L) {
    check(L, graft_trainer_save_checkpoint(to_trainer(L, 1), luaL_checkstring(L, 2)), "save_checkpoint");
    return 0;
}

static int t_load_checkpoint(lua_State *L) {
    check(L, graft_trainer_load_checkpoint(to_trainer(L, 1), luaL_checkstring(L, 2)), "load_checkpoint");
    return 0;
}

/* trainer:world() -> rank, size among data-parallel processes (graft_trainer_world; 0, 1 outside mpirun). */
static int t_world(lua_State *L) {
    int32_t rank = 0, size = 1;
    check(L, graft_trainer_world(to_trainer(L, 1), &rank, &size), "world");
    lua_pushinteger(L, rank);
    lua_pushinteger(L, size);
    return 2;
}

GRAFT_LUA_INTERNAL const luaL_Reg graft_lua_trainer_methods[] = {
    {"close", t_close},
    {"step", t_step},
    {"evaluate", t_evaluate},
    {"train", t_train},
    {"save_checkpoint", t_save_checkpoint},
    {"load_checkpoint", t_load_checkpoint},
    {"world", t_world},
    {NULL, NULL},
};

