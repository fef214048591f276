"""Overhead of one graft_trainer_step through Python ctypes versus the same step from Swift.

Runs the same LoRA training step (MiniLM, r8 on query,value + classifier, seq-cls) from Python via the ctypes
binding and from Swift via `graft bench train-step`, for a tiny batch (where call overhead shows) and the
benchmark batch, and prints the medians side by side. Prints figures; asserts nothing.
"""
import os
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
os.environ.setdefault("GRAFT_LIB", os.path.join(ROOT, ".build", "release", "libgraft.so"))
import graft  # noqa: E402

HOME = os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft"))
MODEL = os.path.join(HOME, "all-MiniLM-L6-v2")
RUNS, WARMUP = 7, 2


def python_step_median(batch, length):
    with graft.load_model(MODEL, task="seq_cls", num_labels=3, threads=2) as model:
        model.add_adapter("default", graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
        rng = np.random.default_rng(3)
        ids = rng.integers(1000, 29000, size=(batch, length), dtype=np.int32)
        labels = (np.arange(batch) % 3).astype(np.int32)
        with graft.Trainer(model, max_grad_norm=0) as trainer:
            times = []
            for i in range(WARMUP + RUNS):
                t = time.perf_counter()
                trainer.step(ids, labels=labels)
                if i >= WARMUP:
                    times.append(time.perf_counter() - t)
    return statistics.median(times)


def swift_step_median(batch, length):
    out = subprocess.run([os.path.join(ROOT, ".build", "release", "graft"), "bench", "train-step", "--model", "minilm",
                          "--batch", str(batch), "--length", str(length), "--runs", str(RUNS), "--warmup", str(WARMUP),
                          "--threads", "2"], check=True, capture_output=True, text=True).stdout
    return float(out.split("median ")[1].split(" s/step")[0])


for batch, length in [(1, 8), (32, 64)]:
    py = python_step_median(batch, length)
    sw = swift_step_median(batch, length)
    print(f"train step B{batch}×T{length}: Python ctypes {py * 1e3:.2f} ms, Swift {sw * 1e3:.2f} ms, "
          f"difference {(py - sw) * 1e3:+.2f} ms (median of {RUNS} after {WARMUP} warm-up)")
