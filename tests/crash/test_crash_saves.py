"""Crash-safe saves, shown: SIGKILL a training process at random moments, many of them inside checkpoint and
adapter saves, and check after every kill that what is on disk is one complete save.

The trainer (trainer.py) trains MiniLM LoRA on the demo tweets and saves a checkpoint and then the adapter after
every optimizer step; GRAFT_TEST_SAVE_PAUSE_MS (a test hook, see Sources/GraftIO/AtomicDirectory.swift) makes
each staged file and the final swap wait a few milliseconds, so saves take a good share of the time and random
kills land inside them (between the files of a checkpoint, before its swap). After each kill this driver:

- loads the checkpoint through the library (graft_trainer_load_checkpoint) into a fresh adapter and trainer, and
  the adapter directory (graft_adapter_load) — both must load;
- checks every file against the manifest with its own SHA-256 and parses the safetensors files itself: complete,
  and every weight finite;
- checks the checkpoint is the last one saved or the one being saved (its step), that the adapter directory is
  the checkpoint's adapter of that step or of the step before, and that a step always has the same weights
  (resume is exact);
- restarts the trainer, which resumes from the checkpoint (a checkpoint that does not load fails the test).

Settings: GRAFT_CRASH_KILLS (default 24), GRAFT_CRASH_SEED (default 20261130), GRAFT_CRASH_PAUSE_MS (default 25).
"""
import hashlib
import json
import math
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import graft
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import LORA, examples, minilm_path  # noqa: E402

KILLS = int(os.environ.get("GRAFT_CRASH_KILLS", "24"))
SEED = int(os.environ.get("GRAFT_CRASH_SEED", "20261130"))
PAUSE_MS = int(os.environ.get("GRAFT_CRASH_PAUSE_MS", "25"))
MANIFEST = "graft_manifest.json"


class Run:
    """One trainer process: its output lines (read on a thread) and when it printed `ready`."""

    def __init__(self, work):
        env = dict(os.environ, GRAFT_TEST_SAVE_PAUSE_MS=str(PAUSE_MS))
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen([sys.executable, str(HERE / "trainer.py"), str(work)], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.split())
            if line.startswith(("ready", "load-failed")):
                self.ready.set()
        self.ready.set()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.reader.join()
        return self.process.stderr.read()


def safetensors_arrays(path):
    """The tensors of a safetensors file, parsed here (not by Graft): {name: float32 array}."""
    raw = path.read_bytes()
    assert len(raw) >= 8, f"{path}: truncated"
    (n,) = struct.unpack("<Q", raw[:8])
    assert 8 + n <= len(raw), f"{path}: header runs past the end"
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        assert end <= len(data), f"{path}: {name} runs past the end"
        if entry["dtype"] == "F32":
            out[name] = np.frombuffer(data[begin:end], dtype="<f4")
    return out


def check_files(directory, kind):
    """The manifest's files exist with its sizes and SHA-256s; every float tensor is finite. Returns the manifest
    and the SHA-256 of adapter_model.safetensors."""
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["kind"] == kind, f"{directory}: manifest kind {manifest['kind']}"
    for name, entry in manifest["files"].items():
        raw = (directory / name).read_bytes()
        assert len(raw) == entry["size"] and hashlib.sha256(raw).hexdigest() == entry["sha256"], \
            f"{directory / name}: torn or mixed (does not match the manifest)"
        if name.endswith(".safetensors"):
            for key, values in safetensors_arrays(directory / name).items():
                assert np.isfinite(values).all(), f"{directory / name}: {key} is not finite"
    listed = sorted(manifest["files"]) + [MANIFEST]
    present = sorted(p.name for p in directory.iterdir())
    assert present == sorted(listed), f"{directory}: holds {present}, the manifest lists {listed}"
    return manifest, manifest["files"]["adapter_model.safetensors"]["sha256"]


def test_sigkill_during_saves_never_leaves_a_torn_or_mixed_save(tmp_path):
    rng = random.Random(SEED)
    work = tmp_path / "work"
    work.mkdir()
    ckpt, adapter = work / "ckpt", work / "adapter"
    model = graft.load_model(minilm_path(), task="seq_cls", num_labels=3, threads=1, seed=7)
    probe_ids = [ids for ids, _ in examples(model, count=4)]
    weights_of_step = {}  # step -> SHA-256 of the checkpoint's adapter_model.safetensors
    stats = {"kills": 0, "inside checkpoint save": 0, "inside adapter save": 0, "checkpoint loads": 0,
             "adapter loads": 0, "adapter at checkpoint step": 0, "resumes": 0}
    saved_step = 0  # the last checkpoint step the trainer reported complete
    started = time.monotonic()

    for kill in range(KILLS):
        run = Run(work)
        assert run.ready.wait(120), "the trainer did not start within 120 s"
        if run.lines and run.lines[-1][0] == "load-failed":
            run.kill()
            raise AssertionError(f"kill {kill}: the trainer could not resume: {' '.join(run.lines[-1][1:])}")
        ready_step = int(run.lines[-1][1])
        if kill > 0:
            stats["resumes"] += 1
        # A random moment: a step plus its two saves take a few hundred milliseconds.
        time.sleep(rng.uniform(0.3, 2.3))
        stderr = run.kill()
        stats["kills"] += 1
        events = [line for line in run.lines if line and line[0] in ("begin", "end")]
        begun = [e for e in events if e[0] == "begin"]
        ended = {(e[1], e[2]) for e in events if e[0] == "end"}
        inside = begun[-1][1] if begun and (begun[-1][1], begun[-1][2]) not in ended else None
        if inside:
            stats[f"inside {inside} save"] += 1
        for e in events:
            if e[0] == "end" and e[1] == "checkpoint":
                step, digest = int(e[2]), e[3]
                assert weights_of_step.setdefault(step, digest) == digest, f"step {step}: weights differ across runs"
                saved_step = max(saved_step, step)
        last_begun = max([int(e[2]) for e in begun if e[1] == "checkpoint"], default=ready_step)

        if not ckpt.exists():
            assert saved_step == 0, f"kill {kill}: checkpoint of step {saved_step} vanished"
            continue
        manifest, digest = check_files(ckpt, "checkpoint")
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step = state["global_step"]
        assert manifest["metadata"]["global_step"] == str(step)
        assert saved_step <= step <= last_begun, \
            f"kill {kill}: the checkpoint is of step {step}; saved {saved_step}, the last save begun was {last_begun}"
        assert weights_of_step.setdefault(step, digest) == digest, f"step {step}: weights differ across runs"
        saved_step = step

        # Through the library: a fresh adapter and trainer restore the checkpoint; the adapter directory loads.
        name = f"ckpt{kill}"
        model.add_adapter(name, LORA)
        with graft.Trainer(model, adapter=name, learning_rate=1e-3, schedule="constant", seed=11) as t:
            t.load_checkpoint(ckpt)
        stats["checkpoint loads"] += 1
        logits = model(probe_ids, output="logits")
        assert np.isfinite(logits).all()
        model.delete_adapter(name)
        if adapter.exists():
            _, adapter_digest = check_files(adapter, "adapter")
            # Saved after the checkpoint: that step's adapter, or an earlier step's when a save was cut short.
            earlier = {d for s, d in weights_of_step.items() if s <= step}
            assert adapter_digest in earlier, f"kill {kill}: the adapter is no checkpoint's adapter up to step {step}"
            stats["adapter at checkpoint step"] += adapter_digest == digest
            model.load_adapter(adapter, name=f"adapter{kill}")
            stats["adapter loads"] += 1
            assert np.isfinite(model(probe_ids, output="logits")).all()
            model.delete_adapter(f"adapter{kill}")
        # Interrupted saves leave at most one staging directory each, cleared by the next save.
        leftovers = [p.name for p in work.iterdir() if p.name not in ("ckpt", "adapter")]
        assert len(leftovers) <= 2, f"leftovers pile up: {leftovers}"
        assert "Traceback" not in stderr, stderr

    elapsed = time.monotonic() - started
    inside = stats["inside checkpoint save"] + stats["inside adapter save"]
    print(f"\ncrash test: {stats['kills']} SIGKILLs in {elapsed:.0f} s, {inside} inside a save "
          f"({stats['inside checkpoint save']} checkpoint, {stats['inside adapter save']} adapter); "
          f"{stats['checkpoint loads']} checkpoints and {stats['adapter loads']} adapters loaded and verified "
          f"({stats['adapter at checkpoint step']} adapters of the checkpoint's step); "
          f"{stats['resumes']} resumes; reached step {saved_step}")
    model.close()
    assert stats["kills"] >= 20
    assert inside >= stats["kills"] // 4, f"only {inside} of {stats['kills']} kills landed inside a save"
    assert stats["checkpoint loads"] >= stats["kills"] - 3
