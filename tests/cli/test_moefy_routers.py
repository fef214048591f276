"""`graft moefy --router`: RMoE, ReXMoE, cross-layer shared experts and test-time router rewiring on a small MoE
base of SmolLM2 (E = 8, top-4): each runs, prints a JSON line with finite figures, RMoE saves in its format, and
options that cannot be used are refused by name before any model is read."""
import json
import math
import os
import subprocess
from pathlib import Path

import pytest

GRAFT = os.environ.get("GRAFT_CLI", str(Path(__file__).resolve().parents[2] / ".build" / "release" / "graft"))
BASE = ["--experts", "8", "--top-k", "4", "--calibration-tokens", "256", "--eval-texts", "8"]


def moefy(*args, cwd, timeout=600):
    return subprocess.run([GRAFT, "moefy", *BASE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def bench_json(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("BENCH_JSON "):])


@pytest.mark.parametrize("router, args, statistic", [
    ("rmoe", ["--design-steps", "3"], "mean_entropy"),
    ("rexmoe", ["--design-steps", "3", "--open-at", "1"], "borrowed_share"),
    ("shared", ["--design-steps", "3", "--open-at", "1"], "borrowed_share"),
    ("rewire", ["--rewire-steps", "2", "--rewire-texts", "4"], "heldout_suffix_perplexity_rewired"),
])
def test_each_router_design_runs_on_the_moe_base(tmp_path, router, args, statistic):
    saved = tmp_path / "router"
    extra = ["--router-output", str(saved)] if router == "rmoe" else []
    r = moefy("--router", router, *args, *extra, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    j = bench_json(r.stdout)
    assert (j["workload"], j["router"], j["experts"], j["top_k"], j["moe_layers"]) == ("moefy-router", router, 8, 4, 30), j
    for key in ("dense_perplexity", "base_perplexity", "perplexity", statistic):
        assert isinstance(j[key], float) and math.isfinite(j[key]) and j[key] >= 0, (key, j)
    assert j["train_steps"] == (2 if router == "rewire" else 3), j
    if router == "rewire":
        assert j["rewire_texts"] == 4 and j["suffix_tokens"] > 0, j
        assert j["base_perplexity"] == j["heldout_suffix_perplexity_base"] and math.isfinite(j["mean_context_loss_drop"]), j
        assert "rewire     text 4/4 context loss" in r.stdout, r.stdout
        return
    assert "train      step 3/3 loss" in r.stdout, r.stdout
    if router == "rmoe":
        assert 0 < j["mean_entropy"] <= math.log(8) + 1e-6 and j["gru_size"] == 64, j
        config = json.loads((saved / "rmoe_config.json").read_text())
        assert config["format"] == "graft-rmoe" and config["gru_size"] == 64 and config["experts"] == 8, config
        assert (saved / "rmoe_router.safetensors").stat().st_size > 1_000_000
        assert (saved / "graft_manifest.json").exists()
    else:
        # The pool is open from step 1 and at evaluation: some tokens go to other layers' experts.
        assert 0 < j["borrowed_share"] <= 1 and j["window"] == (1 if router == "rexmoe" else -1) and j["open_at"] == 1, j


def test_router_options_that_cannot_be_used_are_refused_by_name(tmp_path):
    widenet = tmp_path / "wide"
    widenet.mkdir()
    (widenet / "widenet_config.json").write_text("{}")
    for args, named in ((["--router", "moe"], "--router 'moe' is not one of rmoe, rexmoe, shared, rewire"),
                        (["--router", "rmoe", "--method", "widenet"], "--method widenet"),
                        (["--router", "rexmoe", "--method", "stratified"], "--method stratified"),
                        (["--router", "shared", "--load", str(widenet)], "--load"),
                        (["--router", "rexmoe", "--open-at", "30"], "--open-at 30"),
                        (["--router", "rmoe", "--gru-size", "0"], "--gru-size 0"),
                        (["--router", "rmoe", "--router-lr", "0"], "--router-lr 0"),
                        (["--router", "rewire", "--rewire-texts", "0"], "--rewire-texts 0"),
                        (["--router-output", str(tmp_path / "r")], "--router-output")):
        bad = moefy(*args, cwd=tmp_path, timeout=60)
        assert bad.returncode != 0 and named in bad.stderr, (args, bad.stderr)
        assert "dense      held-out perplexity" not in bad.stdout, "refused before any model is read"
