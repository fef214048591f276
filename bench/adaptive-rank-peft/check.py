#!/usr/bin/env python3
"""IncreLoRA and TriAdaptLoRA adapters Graft trained and saved, read back by real PEFT as LoRA with rank_pattern.

AdaptiveRankTrainingTests checks that Graft reloads its own save; this checks the other direction (issue 15,
item 1): PEFT 0.21.2's PeftModel.from_pretrained accepts the saved `LORA` config with its `rank_pattern` and
`alpha_pattern`, builds every module at the rank Graft grew it to, and PEFT's logits of MiniLM's sequence
classifier on the exported token ids equal the logits Graft computed for the same adapter.

  GRAFT_ADAPTIVE_RANK_EXPORT=$PWD/.build/adaptive-rank-export swift test ... --filter AdaptiveRankTrainingTests
  ${GRAFT_HOME:-~/.cache/graft}/bench-venv/bin/python bench/adaptive-rank-peft/check.py .build/adaptive-rank-export

Needs the bench venv (torch, transformers, peft: bench/compare/setup-venv). Prints one line per method and exits
1 when a rank differs, a logit differs by more than 1e-4, or the adapter barely moves the logits.
"""
import json
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOME = os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft"))
MINILM = os.path.join(HOME, "all-MiniLM-L6-v2")


def check(method, directory):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    adapter = os.path.join(directory, "adapter")
    with open(os.path.join(adapter, "adapter_config.json")) as f:
        config = json.load(f)
    pattern = config.get("rank_pattern") or {}
    base = AutoModelForSequenceClassification.from_pretrained(MINILM, num_labels=3)
    data = load_file(os.path.join(directory, "graft_logits.safetensors"))
    with torch.no_grad():  # the classifier head Graft used (not part of the adapter: the test fixes it by seed)
        base.classifier.weight.copy_(torch.from_numpy(data["classifier.weight"]))
        base.classifier.bias.copy_(torch.from_numpy(data["classifier.bias"]))
    model = PeftModel.from_pretrained(base, adapter).eval()
    built = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            built[name] = module.lora_A["default"].weight.shape[0]
    wrong = [(key, rank) for key, rank in pattern.items()
             if not any(name.endswith(key) and r == rank for name, r in built.items())]
    ids = torch.tensor(data["input_ids"].astype(np.int64))
    lengths = data["lengths"].astype(np.int64)
    mask = torch.tensor((np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64))
    with torch.no_grad():
        peft = model(input_ids=ids, attention_mask=mask).logits.numpy()
        with model.disable_adapter():
            plain = model(input_ids=ids, attention_mask=mask).logits.numpy()
    graft = data["logits"]
    err = float(np.abs(peft - graft).max())
    effect = float(np.abs(peft - plain).max())
    ok = not wrong and peft.shape == graft.shape and err <= 1e-4 and effect > 10 * err
    ranks = sorted(pattern.values())
    print(f"{method}: PEFT loads Graft's {config['peft_type']} adapter with rank_pattern over {len(pattern)} modules "
          f"(ranks {ranks}, {len(built)} LoRA modules built, {len(wrong)} at a different rank); "
          f"logits {peft.shape}, max-abs difference {err:.3g} (tolerance 1e-4; the adapter itself moves them by "
          f"{effect:.3g}) {'ok' if ok else 'FAIL'}")
    return ok


def main():
    export = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".build", "adaptive-rank-export")
    methods = sorted(os.listdir(export))
    if not methods:
        sys.exit(f"{export}: no exported adapters (run AdaptiveRankTrainingTests with GRAFT_ADAPTIVE_RANK_EXPORT)")
    results = [check(m, os.path.join(export, m)) for m in methods]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
