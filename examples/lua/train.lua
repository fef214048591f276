-- Fine-tunes MiniLM with LoRA on a few hard-coded sentences from Lua and prints the loss.
--   make lib && make test-lua    (or: LUA_CPATH=".build/lua/?.so;;" lua5.4 examples/lua/train.lua [model-dir])
local graft = require "graft"

local home = os.getenv("GRAFT_HOME") or (os.getenv("HOME") .. "/.cache/graft")
local path = arg[1] or (home .. "/all-MiniLM-L6-v2")

local examples = {
  {"I love this phone, the battery lasts forever", 2},
  {"what a wonderful surprise, thank you", 2},
  {"the update broke everything, I am furious", 0},
  {"worst customer service I have ever had", 0},
  {"the store opens at nine tomorrow", 1},
  {"the package contains two cables", 1},
}

local model <close> = graft.load(path, {task = "seq_cls", num_labels = 3})
model:add_adapter("sentiment", [[{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
  "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}]])

local batch, labels = {}, {}
for i, e in ipairs(examples) do
  batch[i] = model:tokenize(e[1])
  labels[i] = e[2]
end

local trainer <close> = model:trainer{adapter = "sentiment", learning_rate = 5e-3, warmup_steps = 2,
                                      total_steps = 10, schedule = "linear"}
local loss, accuracy = trainer:evaluate(batch, labels)
print(("before: loss %.4f  accuracy %.2f"):format(loss, accuracy))
for step = 1, 10 do
  print(("step %2d  loss %.4f"):format(step, trainer:step(batch, labels)))
end
loss, accuracy = trainer:evaluate(batch, labels)
print(("after:  loss %.4f  accuracy %.2f"):format(loss, accuracy))
assert(loss < 1.0, "training did not lower the loss")
