"""graftd's combine_adapters request (PEFT's add_weighted_adapter) through graft.remote: the daemon's combination
of PEFT's fixture adapters gives the output of PEFT's own combined adapter, and bad requests come back as errors
while the daemon keeps serving."""
import json

import numpy as np
import pytest

from graft.remote import Client, RemoteError

from conftest import MINILM, ROOT

FIXTURE = ROOT / "Tests" / "Fixtures" / "peft-minilm-merge"
MANIFEST = json.loads((FIXTURE / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["ties", "svd", "cat"])
def test_combine_adapters_matches_peft(daemon, name):
    entry = MANIFEST["combinations"][name]
    with Client(daemon.socket_path, timeout=120) as c:
        model = c.load_model(str(MINILM), model_id=f"combine-{name}")
        for source in ("a", "b", "b4"):
            model.load_adapter(FIXTURE / source, source)
        report = model.add_weighted_adapter(entry["adapters"], entry["weights"], "ours",
                                            combination_type=entry["combination_type"], density=entry.get("density"))
        assert report["name"] == "ours" and report["combination_type"] == entry["combination_type"]
        model.load_adapter(FIXTURE / name, "peft")
        ids = {a["name"]: a["id"] for a in model.list_adapters()["adapters"]}
        texts = MANIFEST["texts"]
        ours = model(texts, adapter_ids=[ids["ours"]] * len(texts), output="hidden")
        peft = model(texts, adapter_ids=[ids["peft"]] * len(texts), output="hidden")
        err = float(np.abs(ours - peft).max())
        print(f"graftd combine_adapters {name}: max-abs vs PEFT's adapter {err:.3g}")
        assert np.isfinite(ours).all() and err <= 1e-4
        model.unload()


def test_bad_combinations_are_errors_and_the_daemon_keeps_serving(daemon):
    with Client(daemon.socket_path, timeout=120) as c:
        model = c.load_model(str(MINILM), model_id="combine-errors")
        model.load_adapter(FIXTURE / "a", "a")
        model.load_adapter(FIXTURE / "b", "b")
        with pytest.raises(RemoteError) as e:
            model.add_weighted_adapter(["a", "b"], [1, 1], "x", combination_type="linear")
        assert e.value.code == "INVALID_ARGUMENT" and "equal rank" in e.value.message
        with pytest.raises(RemoteError) as e:
            model.add_weighted_adapter(["a", "missing"], [1, 1], "x")
        assert e.value.code == "NOT_FOUND" and "missing" in e.value.message
        with pytest.raises(RemoteError) as e:
            model.add_weighted_adapter(["a", "b"], [1], "x")
        assert "1 weights for 2 adapters" in e.value.message
        assert model.add_weighted_adapter(["a", "b"], [1, -1], "x", combination_type="cat")["r"] == 10
        model.unload()


@pytest.mark.parametrize("method", ["compeft", "onebit"])
def test_compress_adapter_round_trips(daemon, method, tmp_path):
    """compress_adapter writes a packed directory that load_adapter reads back as a working adapter."""
    with Client(daemon.socket_path, timeout=120) as c:
        model = c.load_model(str(MINILM), model_id=f"compress-{method}")
        model.load_adapter(FIXTURE / "a", "a")
        report = model.compress_adapter("a", tmp_path / method, method=method,
                                        density=0.2 if method == "compeft" else None)
        assert report["method"] == method and 0 < report["packed_bytes"] < report["float32_bytes"]
        model.load_adapter(tmp_path / method, method)
        ids = {a["name"]: a["id"] for a in model.list_adapters()["adapters"]}
        out = model(MANIFEST["texts"], adapter_ids=[ids[method]] * len(MANIFEST["texts"]), output="hidden")
        assert np.isfinite(out).all()
        with pytest.raises(RemoteError) as e:
            model.compress_adapter("a", tmp_path / "x", method="zip")
        assert e.value.code == "INVALID_ARGUMENT" and "zip" in e.value.message
        model.unload()
