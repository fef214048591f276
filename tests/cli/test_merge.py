"""`graft merge` as a user runs it on PEFT's own adapters (Tests/Fixtures/peft-minilm-merge, PEFT 0.21.2's
add_weighted_adapter): the saved adapter must hold PEFT's keys, shapes and values (for SVD types, the same
products B·A, as SVD factors are unique only up to sign)."""
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFT = os.environ.get("GRAFT_CLI", str(ROOT / ".build" / "release" / "graft"))
FIXTURE = ROOT / "Tests" / "Fixtures" / "peft-minilm-merge"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())


def read_safetensors(path):
    """name -> array of a safetensors file (F32 tensors, and I64 such as BERT's position_ids)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = {"F32": np.float32, "I64": np.int64}[info["dtype"]]
        begin, end = info["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=dtype).reshape(info["shape"])
    return out


def merge(*args, cwd):
    return subprocess.run([GRAFT, "merge", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("name", sorted(MANIFEST["combinations"]))
def test_merge_reproduces_peft(name, tmp_path):
    entry = MANIFEST["combinations"][name]
    args = [str(FIXTURE / a) for a in entry["adapters"]]
    args += ["--weights", ",".join(str(w) for w in entry["weights"]), "--method", entry["combination_type"],
             "--output", str(tmp_path / "merged")]
    if "density" in entry:
        args += ["--density", str(entry["density"])]
    r = merge(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"merged     {entry['combination_type']} of " in r.stdout
    saved = read_safetensors(tmp_path / "merged" / "adapter_model.safetensors")
    peft = read_safetensors(FIXTURE / name / "adapter_model.safetensors")
    assert set(saved) == set(peft)
    worst = 0.0
    for key in peft:
        assert saved[key].shape == peft[key].shape, key
        assert np.isfinite(saved[key]).all(), key
        if not entry["combination_type"].endswith("svd"):
            worst = max(worst, float(np.abs(saved[key] - peft[key]).max()))
        elif key.endswith("lora_A.weight"):
            b_key = key.replace("lora_A", "lora_B")
            worst = max(worst, float(np.abs(saved[b_key] @ saved[key] - peft[b_key] @ peft[key]).max()))
    print(f"graft merge {name}: max-abs vs PEFT {worst:.3g}")
    assert worst <= 1e-5
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    expected = json.loads((FIXTURE / name / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (expected["r"], expected["lora_alpha"])
    assert sorted(config["target_modules"]) == sorted(expected["target_modules"])


def test_dare_reports_the_kept_fraction_and_a_seed_fixes_it(tmp_path):
    def run(seed, out):
        r = merge(str(FIXTURE / "a"), str(FIXTURE / "b4"), "--weights", "0.7,0.5", "--method", "dare_ties",
                  "--density", "0.3", "--seed", str(seed), "--output", str(tmp_path / out), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        kept = float(r.stdout.split("DARE kept ")[1].split()[0])
        assert abs(kept - 0.3) < 0.01, r.stdout
        return read_safetensors(tmp_path / out / "adapter_model.safetensors")
    first, again, other = run(5, "one"), run(5, "two"), run(6, "three")
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("args, message", [
    (["--weights", "0.7"], "1 weights for 2 adapters"),
    (["--weights", "0.7,x"], "--weights: 'x' is not a finite number"),
    (["--method", "average"], "combination_type 'average' is not one of"),
    (["--method", "ties"], "density is required for combination_type 'ties'"),
    (["--method", "linear", "--majority-sign-method", "sum"], "majority_sign_method 'sum'"),
])
def test_bad_flags_name_what_is_wrong(args, message, tmp_path):
    r = merge(str(FIXTURE / "a"), str(FIXTURE / "b4"), *args, "--output", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode != 0 and message in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()


def test_linear_needs_equal_ranks(tmp_path):
    r = merge(str(FIXTURE / "a"), str(FIXTURE / "b"), "--method", "linear", "--output", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode != 0 and "needs adapters of equal rank, got a: r=4, b: r=6" in r.stderr, r.stderr


def test_save_merged_model_adds_the_combination_into_the_base_weights(tmp_path):
    minilm = Path(os.environ.get("GRAFT_HOME") or Path.home() / ".cache" / "graft") / "all-MiniLM-L6-v2"
    r = merge(str(FIXTURE / "a"), str(FIXTURE / "b4"), "--weights", "0.7,0.5", "--method", "ties", "--density", "0.5",
              "--output", str(tmp_path / "adapter"), "--save-merged-model", str(tmp_path / "model"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    merged = read_safetensors(tmp_path / "model" / "model.safetensors")
    base = read_safetensors(minilm / "model.safetensors")
    adapter = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert set(merged) == set(base)
    worst = 0.0
    for name, w in base.items():
        if w.dtype != np.float32:
            continue
        assert np.isfinite(merged[name]).all(), name
        module = name.rsplit(".", 1)[0]
        a_key = f"base_model.model.{module}.lora_A.weight"
        if name.endswith(".weight") and a_key in adapter:
            # ΔW = B·A: the combined adapter's r = lora_alpha, so its scaling is 1.
            delta = adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key]
            worst = max(worst, float(np.abs(merged[name] - w - delta).max()))
        else:
            assert np.array_equal(merged[name], w), name
    print(f"graft merge --save-merged-model: max-abs |W' − W − BA| {worst:.3g}")
    assert worst <= 1e-6
    assert (tmp_path / "model" / "config.json").read_bytes() == (minilm / "config.json").read_bytes()


def test_merge_needs_an_output(tmp_path):
    r = merge(str(FIXTURE / "a"), cwd=tmp_path)
    assert r.returncode != 0 and "--output" in r.stderr and "--save-merged-model" in r.stderr


def test_the_base_model_comes_from_the_adapter_config_unless_given(tmp_path):
    # The fixtures record sentence-transformers/all-MiniLM-L6-v2, which is the minilm asset: no --model needed
    # (the other tests rely on it). A base Graft cannot find must be named with --model.
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    config = json.loads((FIXTURE / "a" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "someone/unknown-model"
    (stranger / "adapter_config.json").write_text(json.dumps(config))
    (stranger / "adapter_model.safetensors").write_bytes((FIXTURE / "a" / "adapter_model.safetensors").read_bytes())
    r = merge(str(stranger), "--output", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode != 0 and "pass --model" in r.stderr, r.stderr
    r = merge(str(stranger), "--model", "minilm", "--output", str(tmp_path / "m"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
