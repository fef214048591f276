"""`graft depth` as a user runs it: each dynamic-depth method (Dr.LLM, Mixture-of-Recursions, DyT, Duo-LLM) builds on
SmolLM2, trains a few steps, saves in its own format and reloads with the same held-out perplexity; the depth or
compute it reports is in its valid range; bad options are refused by name."""
import json
import os
import subprocess
from pathlib import Path

import pytest

GRAFT = os.environ.get("GRAFT_CLI", str(Path(__file__).resolve().parents[2] / ".build" / "release" / "graft"))

# Small settings: a few training steps on a small pool of tweets, a few held-out tweets.
SMALL = ["--train-steps", "4", "--eval-texts", "16", "--calibration-tokens", "512", "--max-length", "32"]

CONFIG = {"drllm": "drllm_config.json", "mor": "recursion_config.json", "dyt": "dyt_config.json", "duo": "duo_config.json"}


def depth(*args, cwd):
    """Runs `graft depth` with `args`; returns the completed process."""
    return subprocess.run([GRAFT, "depth", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def bench_json(stdout):
    """The fields of the one `BENCH_JSON {...}` line of `stdout`."""
    lines = [line for line in stdout.splitlines() if line.startswith("BENCH_JSON ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("BENCH_JSON "):])


def check_range(method, report):
    """The depth or compute `report` gives for `method` lies in its valid range."""
    layers = report["layers"]
    if method == "drllm":
        assert 0 <= report["layers_per_token"] <= 2 * layers and report["mean_depth"] == report["layers_per_token"], report
        assert abs(sum(report["action_fractions"].values()) - 1) < 1e-9, report
    elif method == "mor":
        assert 1 <= report["mean_depth"] <= report["max_recursions"], report
        assert report["min_layers_per_token"] <= report["layers_per_token"] <= report["max_layers_per_token"], report
    elif method == "dyt":
        assert 0 <= report["ffn_activation_rate"] <= 1, report
        assert 0 < report["ffn_flops_per_token"] and report["dense_ffn_flops_per_token"] > 0, report
    else:
        assert 0 <= report["ffn_compute_fraction"] <= 1, report
        assert abs(sum(report["choice_fractions"].values()) - 1) < 1e-9, report


@pytest.mark.parametrize("method", ["drllm", "mor", "dyt", "duo"])
def test_depth_method_trains_saves_and_reloads_with_the_same_perplexity(method, tmp_path):
    saved = tmp_path / method
    extra = ["--rank-tokens", "256"] if method == "duo" else []
    built = depth("--method", method, *SMALL, *extra, "--output", str(saved), cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "train      step 4/4 loss" in built.stdout and f"saved      {saved}" in built.stdout, built.stdout
    config = json.loads((saved / CONFIG[method]).read_text())
    assert config["train_steps"] == 4 and config["base_model"] == "smollm2", config
    report = bench_json(built.stdout)
    assert report["workload"] == "depth" and report["method"] == method and report["train_steps"] == 4, report
    assert report["perplexity"] > 1 and report["dense_perplexity"] > 1, report
    check_range(method, report)

    again = depth("--load", str(saved), "--eval-texts", "16", "--max-length", "32", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    reloaded = bench_json(again.stdout)
    assert reloaded["method"] == method and reloaded["loaded"] and reloaded["train_steps"] == 4, reloaded
    assert reloaded["dense_perplexity"] == report["dense_perplexity"], (report, reloaded)
    assert reloaded["perplexity"] == report["perplexity"], (report, reloaded)
    check_range(method, reloaded)


def test_depth_refuses_bad_options_by_name(tmp_path):
    unknown = depth("--method", "layerdrop", cwd=tmp_path)
    assert unknown.returncode != 0
    assert "--method 'layerdrop' is not one of drllm, mor, dyt, duo" in unknown.stderr, unknown.stderr
    for args, named in ((["--method", "dyt", "--target-rate", "1.5"], "--target-rate must be in [0, 1], got 1.5"),
                        (["--method", "drllm", "--lr", "0"], "--lr must be a finite number > 0"),
                        (["--method", "mor", "--train-steps=-3"], "--train-steps must be ≥ 0, got -3"),
                        (["--load", str(tmp_path)], "holds none of drllm_config.json")):
        bad = depth(*args, cwd=tmp_path)
        assert bad.returncode != 0 and named in bad.stderr, (args, bad.stderr)
