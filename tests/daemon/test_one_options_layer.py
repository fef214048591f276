"""One typed options layer behind every door: the same training configuration given through the C ABI (the
ctypes Trainer), graftd's wire protocol (graft.remote), and `graft train` flags resolves to identical options,
and each door's defaults are the same."""
import json
import os
import subprocess
from pathlib import Path

import graft
from graft.remote import Client

from conftest import MINILM, ROOT

GRAFT_CLI = os.environ.get("GRAFT_CLI", str(ROOT / ".build" / "release" / "graft"))
LORA = graft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])

# Non-default everywhere, including the values where doors used to disagree: max_grad_norm 0 (no clipping),
# weight_decay 0, momentum 0, and a schedule that is not the wire enum's zero.
SETTINGS = dict(learning_rate=2e-3, weight_decay=0.0, warmup_steps=3, total_steps=4, schedule="cosine",
                optimizer="sgd", max_grad_norm=0.0, gradient_accumulation_steps=2, batch_size=8, seed=7, epochs=2,
                max_length=48)
EXTRAS = {"momentum": 0, "shuffle": False, "eval_batch_size": 16}


def resolved_in_process(**kwargs):
    with graft.load_model(MINILM, task="seq_cls", num_labels=3) as model:
        model.add_adapter("default", LORA)
        with graft.Trainer(model, **kwargs) as trainer:
            return trainer.options


def resolved_remotely(daemon, data, **kwargs):
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM, task="seq_cls", num_labels=3)
        model.add_adapter("default", LORA)
        job = c.train(model, str(data), wait=False, **kwargs)
        job.wait()
        return job.options


def resolved_by_the_cli(data, tmp_path, *flags, config=None):
    args = [GRAFT_CLI, "train", "--data", str(data), "--num-labels", "3", "--r", "4",
            "--output", str(tmp_path / "cli-adapter"), *flags]
    if config is not None:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        args += ["--config", str(path)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("options "))
    return json.loads(line.split(None, 1)[1])


def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": f"example number {i}", "label": i % 3} for i in range(40)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_the_same_configuration_through_c_the_wire_the_cli_and_python_gives_identical_options(daemon, tmp_path):
    data = data_file(tmp_path)
    c_door = resolved_in_process(**SETTINGS, extras=EXTRAS)
    wire_door = resolved_remotely(daemon, data, **SETTINGS, extras=EXTRAS)
    cli_door = resolved_by_the_cli(
        data, tmp_path, "--lr", "2e-3", "--weight-decay", "0", "--warmup", "3", "--max-steps", "4",
        "--schedule", "cosine", "--optimizer", "sgd", "--max-grad-norm", "0", "--accumulate", "2",
        "--batch-size", "8", "--seed", "7", "--epochs", "2", "--max-length", "48",
        config={"training": EXTRAS})
    assert c_door == wire_door == cli_door, f"C {c_door}\nwire {wire_door}\nCLI {cli_door}"
    assert c_door["max_grad_norm"] == 0 and c_door["weight_decay"] == 0 and c_door["momentum"] == 0
    assert c_door["schedule"] == "cosine" and c_door["optimizer"] == "sgd" and c_door["total_steps"] == 4


def test_every_door_has_the_same_defaults(daemon, tmp_path):
    data = data_file(tmp_path)
    c_door = resolved_in_process()
    wire_door = resolved_remotely(daemon, data, total_steps=1)
    cli_door = resolved_by_the_cli(data, tmp_path, "--max-steps", "1")
    # The step budget and the CLI's per-task max_length aside, nothing is set: every door's defaults agree.
    for door in (wire_door, cli_door):
        door["total_steps"] = c_door["total_steps"]
    cli_door["max_length"] = c_door["max_length"]
    assert c_door == wire_door == cli_door, f"C {c_door}\nwire {wire_door}\nCLI {cli_door}"
    assert c_door["max_grad_norm"] == 1.0 and abs(c_door["weight_decay"] - 0.01) < 1e-9 and c_door["seed"] == 42
