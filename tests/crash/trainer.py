"""The process tests/crash/test_crash_saves.py kills: trains MiniLM LoRA on the demo tweets through the Python
binding, saving a checkpoint and then the adapter after every optimizer step, forever.

Usage: trainer.py WORKDIR   (PYTHONPATH must reach bindings/python, GRAFT_LIB name libgraft.so)

On start it resumes from WORKDIR/ckpt when that exists (a checkpoint that does not load is fatal: exit 3).
It prints one line per event, flushed at once, for the driver to read after the kill:
    ready STEP                    resumed (or fresh) at optimizer step STEP
    begin checkpoint STEP         a save starts
    end checkpoint STEP SHA256    it returned; SHA256 of the checkpoint's adapter_model.safetensors
    begin adapter STEP / end adapter STEP
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import graft

from common import LORA, examples, minilm_path

BATCH = 4


def say(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def main():
    work = Path(sys.argv[1])
    ckpt, adapter = work / "ckpt", work / "adapter"
    model = graft.load_model(minilm_path(), task="seq_cls", num_labels=3, threads=1, seed=7)
    data = examples(model)
    model.add_adapter("default", LORA)
    trainer = graft.Trainer(model, learning_rate=1e-3, schedule="constant", seed=11)
    step = 0
    if ckpt.exists():
        try:
            trainer.load_checkpoint(ckpt)
        except graft.GraftError as e:
            say("load-failed", str(e).replace("\n", " "))
            sys.exit(3)
        step = json.loads((ckpt / "trainer_state.json").read_text())["global_step"]
    say("ready", step)
    while True:
        start = (step * BATCH) % (len(data) - BATCH)
        batch = data[start:start + BATCH]
        trainer.step([ids for ids, _ in batch], labels=[label for _, label in batch])
        step += 1
        say("begin checkpoint", step)
        trainer.save_checkpoint(ckpt)
        digest = hashlib.sha256((ckpt / "adapter_model.safetensors").read_bytes()).hexdigest()
        say("end checkpoint", step, digest)
        say("begin adapter", step)
        model.save_adapter(adapter)
        say("end adapter", step)


if __name__ == "__main__":
    main()
