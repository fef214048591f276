-- Tests of the Lua host (bindings/lua/graft.so) against the real models. Run by `make test-lua`:
--   LUA_CPATH=".build/lua/?.so;;" lua5.4 bindings/lua/test.lua
local graft = require "graft"

local home = os.getenv("GRAFT_HOME") or (os.getenv("HOME") .. "/.cache/graft")
local MINILM = home .. "/all-MiniLM-L6-v2"
local SMOLLM = home .. "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
local tmp = os.tmpname()
os.remove(tmp)

local passed = 0
local function test(name, fn)
  local ok, err = xpcall(fn, debug.traceback)
  if not ok then
    io.stderr:write("FAIL ", name, ": ", tostring(err), "\n")
    os.exit(1)
  end
  passed = passed + 1
  print("ok   " .. name)
end

local function raises(pattern, fn, ...)
  local ok, err = pcall(fn, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "'")
  assert(tostring(err):find(pattern), "error '" .. tostring(err) .. "' does not match '" .. pattern .. "'")
  return err
end

local function same(a, b, tol)
  if #a ~= #b then return false end
  for i = 1, #a do
    if math.abs(a[i] - b[i]) > (tol or 0) then return false end
  end
  return true
end

local LORA = '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]}'
local LORA_HEAD = '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],'
  .. ' "modules_to_save": ["classifier"]}'
local SENTENCES = {"I love this, it is wonderful", "this is terrible and I hate it", "the meeting is at noon",
                   "what a great day", "awful service, never again", "the report has ten pages"}
local LABELS = {0, 1, 2, 0, 1, 2}

test("version", function()
  local text, number = graft.version()
  assert(text:match("^%d+%.%d+%.%d+$") and number >= 100 and graft._VERSION == text)
end)

test("info, tokenize, decode", function()
  local m <close> = graft.load(MINILM)
  local info = m:info()
  assert(info:find('"architecture"%s*:%s*"bert"') and info:find('"hidden_size"%s*:%s*384'))
  local ids = m:tokenize("hello world")
  assert(#ids == 4 and ids[1] == 101 and ids[4] == 102)
  assert(#m:tokenize("hello world", false) == 2)
  assert(m:decode(ids, true) == "hello world")
  assert(m:decode(ids):find("%[CLS%]"))
  assert(m:decode({}) == "")
end)

test("forward shapes, padding and determinism", function()
  local m <close> = graft.load(MINILM)
  local a, b = m:tokenize("hello world"), m:tokenize("a longer sentence than the first")
  local h, n = m:forward({a, b})
  assert(n == 2 * #b * 384 and #h == n)
  for i = #a * 384 + 1, #b * 384 do assert(h[i] == 0, "padding must be 0") end
  local h2 = m:forward({a, b}, {output = "hidden"})
  assert(same(h, h2), "two forward calls differ")
  local single = m:forward({a})
  for i = 1, #single do assert(math.abs(single[i] - h[i]) < 1e-5) end
  raises("unsupported", m.forward, m, {a}, {output = "logits"})
  raises("'output'", m.forward, m, {a}, {output = "probabilities"})
  raises("unknown option 'outptu'", m.forward, m, {a}, {outptu = "hidden"})
  raises("row 1 is empty", m.forward, m, {{}})
  raises("batch%[1%]%[2%] must be an int32", m.forward, m, {{101, "x"}})
  raises("invalid argument", m.forward, m, {{101, 999999}})
  raises("1 or more rows", m.forward, m, {})
end)

test("adapters: add changes output, disable restores, save/load round trip", function()
  local m <close> = graft.load(MINILM)
  local ids = {m:tokenize("adapters change the output")}
  local base = m:forward(ids)
  m:add_adapter("a", '{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],'
    .. ' "init_lora_weights": false}')
  local adapted = m:forward(ids)
  assert(not same(adapted, base, 1e-4), "the adapter changed nothing")
  m:disable_adapters()
  assert(same(m:forward(ids), base), "disabling did not restore the base output")
  m:enable_adapters()
  assert(same(m:forward(ids), adapted))
  local rows = m:forward({ids[1], ids[1]}, {adapter_ids = {-1, 0}})
  for i = 1, #base do
    assert(math.abs(rows[i] - base[i]) < 1e-5 and math.abs(rows[#base + i] - adapted[i]) < 1e-5)
  end
  assert(m:list_adapters():find('"name"%s*:%s*"a"'))
  m:save_adapter(tmp .. "/a", "a")
  m:load_adapter(tmp .. "/a", "b")
  assert(m:list_adapters():find('"active"%s*:%s*"b"'))
  assert(same(m:forward(ids), adapted), "the reloaded adapter differs")
  m:merge_adapter("b")
  assert(same(m:forward(ids), adapted, 1e-4))
  m:unmerge_adapter("b")
  m:set_adapter("a")
  m:delete_adapter("b")
  raises("not found", m.delete_adapter, m, "b")
  m:delete_adapter("a")
  assert(same(m:forward(ids), base, 1e-4))
end)

test("methods beyond LoRA: wave-2 tuners and Graft's own methods build from their JSON configs", function()
  local m <close> = graft.load(MINILM)
  local configs = {
    '{"peft_type": "GLORA", "r": 4, "target_modules": ["query", "value"]}',
    '{"peft_type": "PSOFT", "r": 8, "target_modules": ["query", "value"]}',
    '{"peft_type": "WAVEFT", "n_frequency": 64, "target_modules": ["query", "value"]}',
    '{"peft_type": "ADAMSS", "r": 8, "num_subspaces": 5, "target_modules": ["query", "value"]}',
    '{"peft_type": "ETHER", "nb": 4, "target_modules": ["query", "value"]}',
    '{"peft_type": "SEQ_BN", "reduction_factor": 16}',
    '{"peft_type": "LORA_MOE", "r": 2, "num_experts": 2, "target_modules": ["query", "value"]}',
    '{"peft_type": "BITFIT", "target_modules": ["query", "value"]}',
    '{"peft_type": "SPIEL", "density": 0.01, "update_interval": 5, "target_modules": ["query", "value"]}',
    '{"peft_type": "NEUROADA", "k": 2, "target_modules": ["query", "value"]}',
    '{"peft_type": "DSEE", "r": 4, "num_sparse": 16, "prune_ratio": 0.1, "target_modules": ["query", "value"]}',
    '{"peft_type": "ID3", "density": 0.01, "unmask_steps": 10, "target_modules": ["query", "value"]}',
    '{"peft_type": "SPT", "budget_density": 0.01, "r": 4, "target_modules": ["query", "value"]}',
    '{"peft_type": "SPARSE_ADAPTER", "reduction_factor": 16, "sparsity": 0.5, "large_sparse": true}',
    '{"peft_type": "INCRELORA", "init_r": 2, "target_r": 4, "target_modules": ["query", "value"]}',
    '{"peft_type": "TRIADAPTLORA", "init_r": 1, "target_r": 4, "target_modules": ["query", "value"]}',
    '{"peft_type": "TAPS", "target_modules": ["query", "value"]}',
    '{"peft_type": "SELECTIVE_LORA", "r": 4, "target_modules": ["query", "value"]}',
    '{"peft_type": "LOSIA", "rank_factor": 0.125, "target_modules": ["query", "value"]}',
    '{"peft_type": "TR_PTS", "density": 0.005, "fisher_steps": 2, "token_keep_ratio": 0.5, "target_modules": ["query", "value"]}',
  }
  for _, config in ipairs(configs) do
    m:add_adapter("probe", config)
    local list = m:list_adapters()
    local peft_type = config:match('"peft_type": "([%w_]+)"')
    assert(list:find('"peft_type"%s*:%s*"' .. peft_type .. '"'), peft_type .. " missing from " .. list)
    m:delete_adapter("probe")
  end
  -- X-LoRA mixes LoRA experts read from their directories: one saved here first.
  m:add_adapter("expert", '{"peft_type": "LORA", "r": 2, "init_lora_weights": false, "target_modules": ["query", "value"]}')
  m:save_adapter(tmp .. "/xlora-expert", "expert")
  m:delete_adapter("expert")
  m:add_adapter("probe", '{"peft_type": "XLORA", "hidden_size": 384, "layerwise_scalings": true, "adapters": {"0": "'
    .. tmp .. '/xlora-expert"}}')
  assert(m:list_adapters():find('"peft_type"%s*:%s*"XLORA"'))
  m:delete_adapter("probe")
end)

test("adapter and load errors", function()
  local m <close> = graft.load(MINILM)
  raises("unsupported %(%-4%).*NOT_A_METHOD", m.add_adapter, m, "x", '{"peft_type": "NOT_A_METHOD", "target_modules": ["q"]}')
  raises("invalid JSON", m.add_adapter, m, "x", "{not json")
  raises("not found", m.load_adapter, m, "/nonexistent/adapter")
  raises("not found", m.set_adapter, m, "nope")
  raises("not found %(%-5%)", graft.load, "/nonexistent/model")
  raises("unknown value 'translation'", graft.load, MINILM, {task = "translation"})
  raises("unknown option", graft.load, MINILM, {tsak = "base"})
end)

test("load options: compute_dtype and moe_base (graft.h 0.6.0) reach graft_model_params", function()
  local m <close> = graft.load(MINILM, {compute_dtype = "float32"})
  assert(m:info():find('"compute_dtype":"float32"'))
  raises("unknown value 'float16'", graft.load, MINILM, {compute_dtype = "float16"})
  raises("'moe_base' must be a string", graft.load, SMOLLM, {moe_base = 3})
  raises("moe_base '/nonexistent/moe'", graft.load, SMOLLM, {task = "causal-lm", moe_base = "/nonexistent/moe"})
  raises("Llama decoder", graft.load, MINILM, {moe_base = home})
end)

test("close, __close and __gc", function()
  local outer
  do
    local m <close> = graft.load(MINILM)
    outer = m
    assert(tostring(m):find("open"))
  end
  assert(tostring(outer):find("closed"))
  raises("the model is closed", outer.tokenize, outer, "x")
  outer:close() -- idempotent
  for _ = 1, 3 do graft.load(MINILM) end -- dropped without close: freed by __gc
  collectgarbage()
  collectgarbage()
end)

test("training lowers the loss; checkpoints; train with callback and cancel", function()
  local m <close> = graft.load(MINILM, {task = "seq_cls", num_labels = 3})
  raises("state", m.trainer, m) -- no adapter yet
  m:add_adapter("default", LORA_HEAD)
  local batch = {}
  for i, s in ipairs(SENTENCES) do batch[i] = m:tokenize(s) end
  local logits, n = m:forward(batch, {output = "logits"})
  assert(n == #SENTENCES * 3 and #logits == n)
  raises("unknown value 'exponential'", m.trainer, m, {schedule = "exponential"})
  raises("unknown key", m.trainer, m, {extras = '{"bogus": 1}'})
  local t <close> = m:trainer{learning_rate = 5e-3, schedule = "constant"}
  local loss0, acc0 = t:evaluate(batch, LABELS)
  local world_rank, world_size = t:world()   -- not under mpirun: rank 0 of 1
  assert(world_rank == 0 and world_size == 1, "world " .. tostring(world_rank) .. "/" .. tostring(world_size))
  local first = t:step(batch, LABELS)
  assert(math.abs(first - loss0) < 1e-4)
  for _ = 1, 7 do t:step(batch, LABELS) end
  local loss1, acc1 = t:evaluate(batch, LABELS)
  assert(loss1 < 0.7 * loss0 and acc1 >= acc0, ("loss %f -> %f"):format(loss0, loss1))
  raises("labels need 6", t.step, t, batch, {0})
  raises("invalid argument", t.step, t, batch, {7, 7, 7, 7, 7, 7})
  t:save_checkpoint(tmp .. "/ckpt")
  local saved = m:forward(batch, {output = "logits"})
  local nxt = t:step(batch, LABELS)
  t:load_checkpoint(tmp .. "/ckpt")
  assert(same(m:forward(batch, {output = "logits"}), saved))
  assert(math.abs(t:step(batch, LABELS) - nxt) < 1e-6)
  raises("not found", t.load_checkpoint, t, tmp .. "/nope")
  t:close()
  raises("the trainer is closed", t.step, t, batch, LABELS)

  local t2 <close> = m:trainer{total_steps = 4, batch_size = 8, extras = '{"max_examples": 64}'}
  local steps = {}
  assert(t2:train("tweets", function(p) steps[#steps + 1] = p.step; return p.step >= 2 end) == false)
  assert(#steps == 2 and steps[2] == 2)
  raises("callback failed", t2.train, t2, "tweets", function() error("callback failed") end)
  raises("not found", t2.train, t2, "/nonexistent/data.jsonl")
end)

test("SmolLM2 greedy generation", function()
  local m <close> = graft.load(SMOLLM)
  local prompt = m:tokenize("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
  local pieces = {}
  local out = m:generate(prompt, {max_new_tokens = 24, callback = function(_, piece) pieces[#pieces + 1] = piece end})
  local text = m:decode(out, true)
  assert(text:find("Paris"), text)
  assert(table.concat(pieces) == m:decode(out))
  assert(#m:generate(prompt, {max_new_tokens = 10, callback = function() return true end}) == 1)
  raises("prompt is empty", m.generate, m, {})
  -- The int8 fast mode (graft.h 0.5.0) answers the same question.
  local fast = m:generate(prompt, {max_new_tokens = 24, fast_decode = true})
  assert(m:decode(fast, true):find("Paris"), m:decode(fast, true))
end)

test("one task vocabulary with the CLI; asset names; an unknown task lists the names", function()
  local expected = {base = "base", ["seq-cls"] = "sequence_classification", seq_cls = "sequence_classification",
                    sequence_classification = "sequence_classification", SEQ_CLS = "sequence_classification",
                    ["causal-lm"] = "causal_lm", causal_lm = "causal_lm", CAUSAL_LM = "causal_lm"}
  for spelling, task in pairs(expected) do
    local m <close> = graft.load(task == "causal_lm" and SMOLLM or MINILM, {task = spelling})
    assert(m:info():find('"task"%s*:%s*"' .. task .. '"'), spelling)
  end
  raises("unknown value 'classification' %(known: base, seq%-cls, seq_cls, sequence_classification, causal%-lm, causal_lm%)",
         graft.load, MINILM, {task = "classification"})
  raises("unknown value", graft.load, MINILM, {task = 1})
  local m <close> = graft.load("minilm", {task = "seq-cls"})
  assert(m:info():find('"path"%s*:%s*"[^"]*all%-MiniLM%-L6%-v2"'))
end)

test("the CLI's chat template", function()
  local m <close> = graft.load("smollm2")
  local prompt = m:chat_template("What is the capital of France?")
  assert(prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", prompt)
  local out = m:generate(m:tokenize(prompt, false), {max_new_tokens = 20})
  assert(m:decode(out, true):find("Paris"))
  local bert <close> = graft.load(MINILM)
  raises("unsupported.*chat template", bert.chat_template, bert, "hi")
end)

test("add_weighted_adapter reproduces PEFT's ties combination (Tests/Fixtures/peft-minilm-merge)", function()
  local FIXTURE = "Tests/Fixtures/peft-minilm-merge"
  local m <close> = graft.load(MINILM)
  m:load_adapter(FIXTURE .. "/a", "a")
  m:load_adapter(FIXTURE .. "/b4", "b4")
  local report = m:add_weighted_adapter({"a", "b4"}, {0.7, 0.5}, "ties", '{"combination_type": "ties", "density": 0.5}')
  assert(report:find('"r"%s*:%s*4') and report:find('"combination_type"%s*:%s*"ties"'), report)
  assert(m:list_adapters():find('"active"%s*:%s*"b4"'))
  m:save_adapter(tmp .. "/ties", "ties")
  local saved = io.open(tmp .. "/ties/adapter_config.json"):read("a")
  assert(saved:find('"r"%s*:%s*4') and saved:find('"lora_alpha"%s*:%s*4'), saved)
  -- the same combination loaded back from PEFT's own file gives the same output
  m:load_adapter(FIXTURE .. "/ties", "peft")
  local batch = {m:tokenize("Graft adapters onto a frozen model.")}
  local ours = m:forward(batch, {adapter_ids = {2}})
  local peft = m:forward(batch, {adapter_ids = {3}})
  for _, v in ipairs(ours) do assert(v == v and math.abs(v) < math.huge, "non-finite output") end
  assert(same(ours, peft, 1e-4))
  raises("weights: 1 weights for 2 adapters", m.add_weighted_adapter, m, {"a", "b4"}, {1}, "x")
  raises("weights%[2%] must be a number", m.add_weighted_adapter, m, {"a", "b4"}, {1, "x"}, "x")
  raises("adapters%[1%] must be a string", m.add_weighted_adapter, m, {1, "b4"}, {1, 1}, "x")
  raises("invalid argument.*density is required", m.add_weighted_adapter, m, {"a", "b4"}, {1, 1}, "x",
         '{"combination_type": "ties"}')
  raises("not found.*nope", m.add_weighted_adapter, m, {"a", "nope"}, {1, 1}, "x")
  m:save_merged_model(tmp .. "/merged", "ties")
  local plain <close> = graft.load(tmp .. "/merged")
  assert(same(plain:forward(batch), ours, 1e-4))
  raises("not found", m.save_merged_model, m, tmp .. "/again", "ties")
end)

test("compress_adapter writes ComPEFT and 1-bit directories that load back as working adapters", function()
  local FIXTURE = "Tests/Fixtures/peft-minilm-merge"
  local m <close> = graft.load(MINILM)
  m:load_adapter(FIXTURE .. "/a", "a")
  local batch = {m:tokenize("Graft adapters onto a frozen model.")}
  for i, method in ipairs({"compeft", "onebit"}) do
    local report = m:compress_adapter("a", tmp .. "/" .. method, method, method == "compeft" and '{"density": 0.2}' or nil)
    assert(report:find('"file_bytes"%s*:%s*%d+') and report:find(method), report)
    m:load_adapter(tmp .. "/" .. method, method)
    local out = m:forward(batch, {adapter_ids = {i}})
    for _, v in ipairs(out) do assert(v == v and math.abs(v) < math.huge, "non-finite output") end
  end
  raises("invalid argument.*zip", m.compress_adapter, m, "a", tmp .. "/zip", "zip")
  raises("not found.*nope", m.compress_adapter, m, "nope", tmp .. "/zip", "onebit")
end)

os.execute("rm -rf '" .. tmp .. "'")
print(("lua: %d tests passed"):format(passed))
