#!/usr/bin/env python3
"""Graft's decoder-only tuners (LLaMA-Adapter, multitask prompt tuning, CPT, Cartridges) read back by real PEFT.

The fixture test checks that Graft reproduces adapters PEFT saved; this checks the other direction: adapters
Graft trained and saved load in PEFT 0.21.2 (PeftModel.from_pretrained accepts the config and the tensors) and
PEFT's logits on the fixture sentence equal the logits Graft computed for the same adapter.

  GRAFT_DECODER_EXPORT=$PWD/.build/decoder-export swift test ... --filter DecoderMethodFineTuneTests
  ${GRAFT_HOME:-~/.cache/graft}/bench-venv/bin/python bench/decoder-peft/check.py .build/decoder-export

Needs the bench venv (torch, transformers, peft, gguf: bench/compare/setup-venv). Prints one line per method and
exits 1 when any differs by more than 1e-3 (1e-4 of the logits' scale where that is larger).
"""
import os
import sys

import numpy as np
import torch
from safetensors.numpy import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOME = os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft"))
GGUF = os.path.join(HOME, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
FIXTURE = os.path.join(ROOT, "Tests", "Fixtures", "peft-smollm2-decoder", "base_expected.safetensors")


def main():
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    export = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, ".build", "decoder-export")
    ids = torch.tensor(load_file(FIXTURE)["input_ids"])
    worst_ok = True
    for method in sorted(os.listdir(export)):
        d = os.path.join(export, method)
        base = AutoModelForCausalLM.from_pretrained(os.path.dirname(GGUF), gguf_file=os.path.basename(GGUF),
                                                    torch_dtype=torch.float32)
        model = PeftModel.from_pretrained(base, os.path.join(d, "adapter")).eval()
        kwargs = {"task_ids": torch.zeros(ids.shape[0], dtype=torch.long)} if method == "multitask_prompt_tuning" else {}
        with torch.no_grad():
            peft = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits.numpy()
        graft = load_file(os.path.join(d, "graft_logits.safetensors"))["logits"]
        if peft.shape != graft.shape:
            print(f"{method}: PEFT's logits {peft.shape} vs Graft's {graft.shape}")
            worst_ok = False
            continue
        err = float(np.abs(peft - graft).max())
        tol = max(1e-3, 1e-4 * float(np.abs(peft).max()))
        ok = err <= tol
        worst_ok &= ok
        print(f"{method}: PEFT loads Graft's adapter; logits {peft.shape}, max-abs difference {err:.3g} "
              f"(tolerance {tol:.3g}) {'ok' if ok else 'FAIL'}")
    sys.exit(0 if worst_ok else 1)


if __name__ == "__main__":
    main()
