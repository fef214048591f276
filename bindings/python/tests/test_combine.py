"""Model.add_weighted_adapter against PEFT 0.21.2's own combinations (Tests/Fixtures/peft-minilm-merge): the
combined adapter's output on MiniLM and its saved keys and shapes."""
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

import graft

FIXTURE = Path(__file__).resolve().parents[3] / "Tests" / "Fixtures" / "peft-minilm-merge"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())


def read_safetensors(path):
    """name -> array of a safetensors file (F32 and I64 tensors)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    types = {"F32": np.float32, "I64": np.int64}
    out = {}
    for name, info in header.items():
        if name != "__metadata__":
            begin, end = info["data_offsets"]
            out[name] = np.frombuffer(raw[8 + n + begin:8 + n + end], dtype=types[info["dtype"]]).reshape(info["shape"])
    return out


INPUTS = read_safetensors(FIXTURE / "inputs.safetensors")
LENGTHS = INPUTS["attention_mask"].sum(axis=1).astype(np.int32)


@pytest.fixture
def sources(minilm_path):
    """MiniLM with PEFT's source adapters a (r4 α8), b (r6 α6), b4 (r4 α8) loaded."""
    with graft.load_model(minilm_path) as m:
        for name in ("a", "b", "b4"):
            m.load_adapter(FIXTURE / name, name)
        yield m


def max_abs_on_tokens(out, expected):
    """max |out − expected| over the real tokens (Graft zeroes padding); NaN anywhere makes it NaN."""
    worst = 0.0
    for row, n in enumerate(LENGTHS):
        d = float(np.abs(out[row, :n] - expected[row, :n]).max())
        worst = d if math.isnan(d) else max(worst, d)
    return worst


@pytest.mark.parametrize("name", sorted(MANIFEST["combinations"]))
def test_add_weighted_adapter_reproduces_peft(sources, name, tmp_path):
    entry = MANIFEST["combinations"][name]
    report = sources.add_weighted_adapter(entry["adapters"], entry["weights"], "merged",
                                          combination_type=entry["combination_type"], density=entry.get("density"))
    assert sources.active_adapter == "b4"  # PEFT leaves the active adapter alone
    sources.set_adapter("merged")
    out = sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    expected = read_safetensors(FIXTURE / name / "expected.safetensors")["last_hidden_state"]
    err = max_abs_on_tokens(out, expected)
    print(f"add_weighted_adapter {name}: r={report['r']}, max-abs vs PEFT {err:.3g}")
    assert err <= 1e-4
    sources.save_adapter(tmp_path / "merged", "merged")
    saved = read_safetensors(tmp_path / "merged" / "adapter_model.safetensors")
    peft = read_safetensors(FIXTURE / name / "adapter_model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in peft.items()}
    config = json.loads((tmp_path / "merged" / "adapter_config.json").read_text())
    assert config["r"] == report["r"] == json.loads((FIXTURE / name / "adapter_config.json").read_text())["r"]


@pytest.mark.parametrize("combination_type", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_keeps_the_density_and_a_seed_fixes_it(sources, combination_type):
    def combine(name, seed):
        report = sources.add_weighted_adapter(["a", "b4"], [0.7, 0.5], name, combination_type=combination_type,
                                              density=0.4, majority_sign_method="frequency", seed=seed)
        sources.set_adapter(name)
        return report, sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    (first, out1), (_, out2), (_, out3) = combine("m1", 11), combine("m2", 11), combine("m3", 12)
    assert abs(first["kept_fraction"] - 0.4) < 0.01
    assert np.isfinite(out1).all()
    assert np.array_equal(out1, out2)
    assert not np.array_equal(out1, out3)


def test_one_adapter_is_combined_linearly_and_weights_can_negate(sources):
    sources.set_adapter("a")
    plain = sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    report = sources.add_weighted_adapter(["a"], [1.0], "copy", combination_type="svd")
    assert report["combination_type"] == "linear" and report["kept_fraction"] is None
    sources.set_adapter("copy")
    assert max_abs_on_tokens(sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS), plain) <= 1e-5


@pytest.mark.parametrize("args, kwargs, message", [
    ((["a", "b4"], [1.0], "x"), {}, "1 weights for 2 adapters"),
    ((["a", "nope"], [1.0, 1.0], "x"), {}, "nope"),
    ((["a", "b"], [1.0, 1.0], "x"), {"combination_type": "linear"}, "equal rank"),
    ((["a", "b4"], [1.0, 1.0], "x"), {"combination_type": "ties"}, "density is required"),
    ((["a", "b4"], [1.0, float("nan")], "x"), {}, "'b4'"),
    ((["a", "b4"], [1.0, 1.0], "x"), {"combination_type": "average"}, "average"),
    ((["a", "b4"], [1.0, 1.0], "x"), {"majority_sign_method": "sum"}, "majority_sign_method"),
    ((["a", "b4"], [1.0, 1.0], "x"), {"svd_clamp": 2.0}, "svd_clamp"),
    ((["a", "b4"], [1.0, 1.0], "b"), {}, "already exists"),
    (("a", [1.0], "x"), {}, "adapters must be a list"),
    ((["a", "b4"], [1.0, "1"], "x"), {}, "weights[1] must be a number"),
])
def test_bad_arguments_raise_graft_error_naming_the_fault(sources, args, kwargs, message):
    with pytest.raises(graft.GraftError) as e:
        sources.add_weighted_adapter(*args, **kwargs)
    assert message in str(e.value)
    assert [a["name"] for a in sources.list_adapters()["adapters"]] == ["a", "b", "b4"]


def test_save_merged_model_reloads_as_a_plain_model(sources, minilm_path, tmp_path):
    entry = MANIFEST["combinations"]["ties"]
    sources.add_weighted_adapter(entry["adapters"], entry["weights"], "ties", combination_type="ties",
                                 density=entry["density"])
    sources.set_adapter("ties")
    with_adapter = sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    sources.save_merged_model(tmp_path / "merged", "ties")
    assert "ties" not in [a["name"] for a in sources.list_adapters()["adapters"]]
    with graft.load_model(tmp_path / "merged") as plain:
        out = plain(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    err = max_abs_on_tokens(out, with_adapter)
    print(f"save_merged_model: reloaded max-abs vs the adapter {err:.3g}")
    assert err <= 1e-4
    with pytest.raises(graft.GraftError) as e:
        sources.save_merged_model(tmp_path / "again", "ties")
    assert "ties" in str(e.value)


@pytest.mark.parametrize("method", ["compeft", "onebit"])
def test_compress_adapter_round_trips_through_load_adapter(sources, method, tmp_path):
    """A compressed directory is smaller than the float32 tensors and loads back as a working adapter."""
    report = sources.compress_adapter("a", tmp_path / method, method=method,
                                      density=0.2 if method == "compeft" else None)
    assert report["method"] == method and 0 < report["file_bytes"]
    assert report["packed_bytes"] < report["float32_bytes"]
    sources.load_adapter(tmp_path / method, method)
    sources.set_adapter(method)
    out = sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    assert np.isfinite(out).all()
    with pytest.raises(graft.GraftError, match="zip"):
        sources.compress_adapter("a", tmp_path / "x", method="zip")


def test_copa_combination(sources):
    """Graft's CoPA-Merging is a combination_type like PEFT's."""
    report = sources.add_weighted_adapter(["a", "b"], [1.0, 0.5], "copa", combination_type="copa", density=0.4)
    assert report["combination_type"] == "copa" and report["r"] == 6
    sources.set_adapter("copa")
    out = sources(INPUTS["input_ids"].astype(np.int32), lengths=LENGTHS)
    assert np.isfinite(out).all()
