"""`graft moefy --method upcycling --mup-base-width`: the upcycled base trains under μP for MoE (seed #72), is saved
in the MoE-base format with the parametrization it was trained under recorded, and reloads with the same
held-out perplexity."""
import json
import math
import os
import subprocess
from pathlib import Path

GRAFT = os.environ.get("GRAFT_CLI", str(Path(__file__).resolve().parents[2] / ".build" / "release" / "graft"))


def moefy(*args, cwd):
    return subprocess.run([GRAFT, "moefy", "--calibration-tokens", "256", "--eval-texts", "4", *args],
                          capture_output=True, text=True, timeout=600, cwd=cwd)


def perplexity(stdout, label):
    rows = [line.split() for line in stdout.splitlines() if line.startswith(label)]
    assert rows, stdout
    return float(rows[0][2 if label.startswith("E=") else 1])


def test_upcycling_under_mup_saves_its_parametrization_and_reloads(tmp_path):
    saved = tmp_path / "mup"
    r = moefy("--method", "upcycling", "--experts", "4", "--top-k", "1", "--upcycle-layers", "28,29",
              "--train-steps", "3", "--batch-size", "2", "--lr", "4e-4", "--mup-base-width", "144",
              "--output", str(saved), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # ρ = 576 / 144 = 4: the router starts and steps like an output layer (rate η/ρ).
    assert "mup        base width 144 (experts 384)" in r.stdout and "router 0.25" in r.stdout, r.stdout
    config = json.loads((saved / "moe_config.json").read_text())
    assert config["format"] == "graft-moe-base" and config["method"] == "upcycling", config
    assert (config["mup_base_width"], config["train_steps"], config["lr"]) == (144, 3, 0.0004), config
    assert config["moe_layers"] == [28, 29], config
    trained = r.stdout
    again = moefy("--load", str(saved), "--top-k", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    for out in (trained, again.stdout):
        assert math.isfinite(perplexity(out, "E=4 k=1")), out
    assert perplexity(again.stdout, "E=4 k=1") == perplexity(trained, "E=4 k=1"), (trained, again.stdout)


def test_mup_base_width_is_refused_by_name_when_it_cannot_apply(tmp_path):
    for args, named in ((["--method", "upcycling", "--mup-base-width", "0"], "--mup-base-width 0 must be ≥ 1"),
                        (["--method", "hmoe", "--mup-base-width", "144"], "not --method hmoe")):
        r = moefy("--experts", "4", "--top-k", "1", *args, cwd=tmp_path)
        assert r.returncode != 0 and named in r.stderr, (args, r.stderr)
        assert "dense" not in r.stdout, "refused before any model is read"
