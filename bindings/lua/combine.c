/* The Lua module's adapter combination: model:add_weighted_adapter over graft_adapter_combine. */
#include "graft_lua.h"

/* model:add_weighted_adapter(adapters, weights, adapter_name [, options_json]) -> report JSON text
 * PEFT's add_weighted_adapter: `adapters` a sequence of adapter names, `weights` a sequence of numbers (one each),
 * `options_json` nil or a JSON object of PEFT's keyword arguments ({"combination_type": "ties", "density": 0.5,
 * ...}, see graft_adapter_combine in graft.h). The new adapter is attached, not activated. */
int m_add_weighted_adapter(lua_State *L) {
    lua_settop(L, 5); /* fixed argument slots: scratch buffers go above them */
    graft_model *m = to_model(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaL_checktype(L, 3, LUA_TTABLE);
    const char *name = luaL_checkstring(L, 4);
    const char *options = luaL_optstring(L, 5, NULL);
    lua_Integer n = luaL_len(L, 2), nw = luaL_len(L, 3);
    if (n < 1 || n > 65536) return luaL_error(L, "graft: adapters must hold 1 to 65536 names, got %d", (int)n);
    if (nw != n) return luaL_error(L, "graft: weights: %d weights for %d adapters", (int)nw, (int)n);
    const char **names = scratch(L, (size_t)n * sizeof *names);
    double *weights = scratch(L, (size_t)n * sizeof *weights);
    for (lua_Integer i = 1; i <= n; i++) {
        if (lua_geti(L, 2, i) != LUA_TSTRING)
            return luaL_error(L, "graft: adapters[%d] must be a string, got %s", (int)i, luaL_typename(L, -1));
        names[i - 1] = lua_tostring(L, -1); /* the adapters table keeps the string alive */
        lua_pop(L, 1);
        int ok = 0;
        lua_geti(L, 3, i);
        weights[i - 1] = (double)lua_tonumberx(L, -1, &ok);
        if (!ok || lua_type(L, -1) != LUA_TNUMBER)
            return luaL_error(L, "graft: weights[%d] must be a number, got %s", (int)i, luaL_typename(L, -1));
        lua_pop(L, 1);
    }
    char *report = NULL;
    check(L, graft_adapter_combine(m, name, names, weights, (size_t)n, options, &report), "add_weighted_adapter");
    push_owned(L, report);
    return 1;
}

/* model:save_merged_model(directory [, adapter = the active one]): PEFT's merge_and_unload then save_pretrained
 * (graft_model_save_merged): the adapter is merged into the base weights, removed, and the plain model written. */
int m_save_merged_model(lua_State *L) {
    graft_model *m = to_model(L, 1);
    const char *directory = luaL_checkstring(L, 2);
    const char *adapter = luaL_optstring(L, 3, NULL);
    if (!adapter) return luaL_error(L, "graft: save_merged_model: name the adapter to merge");
    check(L, graft_model_save_merged(m, adapter, directory), "save_merged_model");
    return 0;
}

/* model:compress_adapter(name, directory [, method = "compeft" [, options_json]]) -> report JSON text
 * graft_adapter_compress: "compeft" (options {"density", "alpha"}) or "onebit"; model:load_adapter(directory, name)
 * reads the directory back as a working adapter. */
int m_compress_adapter(lua_State *L) {
    graft_model *m = to_model(L, 1);
    const char *name = luaL_checkstring(L, 2);
    const char *directory = luaL_checkstring(L, 3);
    const char *method = luaL_optstring(L, 4, "compeft");
    const char *options = luaL_optstring(L, 5, NULL);
    char *report = NULL;
    check(L, graft_adapter_compress(m, name, method, directory, options, &report), "compress_adapter");
    push_owned(L, report);
    return 1;
}
