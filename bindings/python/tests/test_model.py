import gc
import json
import weakref

import numpy as np
import pytest

import graft
from graft import _arrays

LORA = graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])


def test_version():
    assert graft.__version__.count(".") == 2
    assert graft.version_number >= 100


def test_info_and_tokenize(bert):
    info = bert.info()
    assert info["architecture"] == "bert" and info["hidden_size"] == 384 and info["num_layers"] == 6
    ids = bert.tokenize("hello world")
    assert ids[0] == 101 and ids[-1] == 102 and len(ids) == 4
    assert bert.tokenize("hello world", add_special_tokens=False) == ids[1:-1]
    assert bert.decode(ids, skip_special_tokens=True) == "hello world"
    long_text = "word " * 2000
    assert len(bert.tokenize(long_text)) == 2002


def test_forward_shapes_and_determinism(bert):
    a, b = bert.tokenize("hello world"), bert.tokenize("a longer sentence than the first")
    h1 = bert([a, b])
    assert h1.dtype == np.float32 and h1.shape == (2, len(b), 384)
    assert np.all(h1[0, len(a):] == 0) and np.abs(h1[0, : len(a)]).sum() > 0
    h2 = bert([a, b])
    assert np.array_equal(h1, h2)
    # The same rows as a padded int32 matrix with explicit lengths give the same values.
    mat = np.zeros((2, len(b)), dtype=np.int32)
    mat[0, : len(a)] = a
    mat[1] = b
    assert np.array_equal(bert(mat, lengths=[len(a), len(b)]), h1)
    # One row alone equals its row in the batch (padding is never read).
    np.testing.assert_allclose(bert([a])[0], h1[0, : len(a)], atol=1e-5)


def test_zero_copy_input_and_output(bert):
    ids = np.array([bert.tokenize("zero copy please")], dtype=np.int32)
    assert _arrays.as_int32(ids, "ids", "t") is ids  # contiguous int32: the library reads it in place
    mat, lens = _arrays.token_batch(ids, None, "t")
    assert mat is ids and lens is None
    as64 = ids.astype(np.int64)
    conv = _arrays.as_int32(as64, "ids", "t")
    assert conv.dtype == np.int32 and not np.shares_memory(conv, as64)  # a wrong dtype is copied
    wide = np.zeros((1, ids.shape[1] * 2), dtype=np.int32)
    wide[:, ::2] = ids
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    conv = _arrays.as_int32(strided, "ids", "t")
    assert conv.flags.c_contiguous and np.array_equal(conv, ids)
    out = np.empty((1, ids.shape[1], 384), dtype=np.float32)
    res = bert(ids, out=out)
    assert res is out and np.shares_memory(res, out)
    assert np.array_equal(res, bert(strided))
    assert np.array_equal(res, bert(as64))


def test_bad_inputs(bert):
    with pytest.raises(graft.GraftError) as e:
        bert(np.zeros((1, 2, 3), dtype=np.int32))
    assert e.value.code == -1 and "2-D" in str(e.value)
    with pytest.raises(graft.GraftError, match="integers"):
        bert(np.zeros((1, 3), dtype=np.float32))
    with pytest.raises(graft.GraftError, match="vocab|range|outside"):
        bert([[101, 999999, 102]])
    with pytest.raises(graft.GraftError):
        bert(np.array([[101, 102]], dtype=np.int32), lengths=[5])
    with pytest.raises(graft.GraftError, match="lengths"):
        bert(np.array([[101, 102]], dtype=np.int32), lengths=[1, 2])
    with pytest.raises(graft.GraftError):
        bert([[]])
    with pytest.raises(graft.GraftError, match="output"):
        bert([[101, 102]], output="probabilities")
    with pytest.raises(graft.GraftError) as e:
        bert([[101, 102]], output="logits")  # a bare BERT has no logits
    assert e.value.code == -4
    with pytest.raises(graft.GraftError, match="out must be"):
        bert([[101, 102]], out=np.empty((1, 2, 384), dtype=np.float64))


def test_load_errors(tmp_path):
    with pytest.raises(graft.GraftError) as e:
        graft.load_model(tmp_path / "missing")
    assert e.value.code == -5 and "missing" in e.value.message
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(graft.GraftError):
        graft.load_model(tmp_path)
    with pytest.raises(graft.GraftError, match="unknown task"):
        graft.load_model(tmp_path, task="translation")


def test_adapter_config_errors(bert):
    with pytest.raises(graft.GraftError) as e:
        bert.add_adapter("x", "{not json")
    assert e.value.code == -1 and "JSON" in e.value.message
    with pytest.raises(graft.GraftError) as e:
        bert.add_adapter("x", {"peft_type": "NOT_A_METHOD", "target_modules": ["query"]})
    assert e.value.code == -4 and "NOT_A_METHOD" in e.value.message
    with pytest.raises(graft.GraftError, match="match"):
        bert.add_adapter("x", graft.LoraConfig(target_modules=["no_such_module"]))
    with pytest.raises(graft.GraftError):
        bert.add_adapter("x", 42)
    with pytest.raises(graft.GraftError) as e:
        bert.set_adapter("nope")
    assert e.value.code == -5
    with pytest.raises(graft.GraftError) as e:
        bert.load_adapter("/nonexistent/adapter")
    assert e.value.code == -5
    assert bert.list_adapters()["adapters"] == []


def test_config_dataclasses():
    d = graft.LoraConfig(r=4, lora_alpha=8, target_modules=["query"], use_dora=True).to_dict()
    assert d["peft_type"] == "LORA" and d["r"] == 4 and d["use_dora"] is True and d["rank_pattern"] == {}
    json.dumps(d)
    for cls, t in [(graft.IA3Config, "IA3"), (graft.LoHaConfig, "LOHA"), (graft.LoKrConfig, "LOKR"),
                   (graft.VeraConfig, "VERA")]:
        assert cls(target_modules=["query"]).to_dict()["peft_type"] == t


def test_lora_changes_output_disable_restores(bert, tmp_path):
    ids = [bert.tokenize("adapters change the output")]
    base = bert(ids)
    bert.add_adapter("a", {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
                           "init_lora_weights": False})
    try:
        adapted = bert(ids)
        assert not np.allclose(adapted, base, atol=1e-4)
        bert.disable_adapters()
        assert np.array_equal(bert(ids), base)
        assert bert.list_adapters()["enabled"] is False
        bert.enable_adapters()
        assert np.array_equal(bert(ids), adapted)
        # Per-row adapters: row 0 base, row 1 adapter "a" (by name).
        both = bert([ids[0], ids[0]], adapter_ids=[-1, "a"])
        np.testing.assert_allclose(both[0], base[0], atol=1e-5)
        np.testing.assert_allclose(both[1], adapted[0], atol=1e-5)
        # Merge / unmerge keep the output.
        bert.merge_adapter("a")
        assert bert.list_adapters()["adapters"][0]["merged"] is True
        np.testing.assert_allclose(bert(ids), adapted, atol=1e-4)
        bert.unmerge_adapter("a")
        np.testing.assert_allclose(bert(ids), adapted, atol=1e-4)
        # Save / load round trip gives identical output.
        adapted = bert(ids)
        bert.save_adapter(tmp_path / "a")
        assert (tmp_path / "a" / "adapter_config.json").exists()
        assert (tmp_path / "a" / "adapter_model.safetensors").exists()
        bert.load_adapter(tmp_path / "a", name="b")
        listing = bert.list_adapters()
        assert listing["active"] == "b" and [x["name"] for x in listing["adapters"]] == ["a", "b"]
        assert np.array_equal(bert(ids), adapted)
        bert.set_adapter("a")
        assert bert.active_adapter == "a"
        bert.delete_adapter("b")
        with pytest.raises(graft.GraftError):
            bert.delete_adapter("b")
    finally:
        bert.delete_adapter("a")
    # merge + unmerge round the base weights in float32, so the base output comes back to within rounding.
    np.testing.assert_allclose(bert(ids), base, atol=1e-4)


def test_config_classes_attach(bert):
    ids = [bert.tokenize("every method attaches")]
    for name, cfg in [("lora", LORA), ("ia3", graft.IA3Config(target_modules=["query", "value"])),
                      ("loha", graft.LoHaConfig(target_modules=["query"])),
                      ("lokr", graft.LoKrConfig(target_modules=["query"])),
                      ("vera", graft.VeraConfig(r=16, target_modules=["query", "value"]))]:
        bert.add_adapter(name, cfg)
        entry = [a for a in bert.list_adapters()["adapters"] if a["name"] == name][0]
        assert entry["peft_type"] == cfg.PEFT_TYPE and entry["trainable_parameters"] > 0
        assert bert(ids).shape == (1, len(ids[0]), 384)
        bert.delete_adapter(name)


def test_close_and_gc(minilm_path):
    with graft.load_model(minilm_path) as m:
        assert not m.closed
    assert m.closed
    with pytest.raises(graft.GraftError) as e:
        m.tokenize("x")
    assert e.value.code == -7 and "closed" in e.value.message
    m.close()  # idempotent
    m2 = graft.load_model(minilm_path)
    fin = m2._finalizer
    ref = weakref.ref(m2)
    del m2
    gc.collect()
    assert ref() is None and not fin.alive


def test_threads_share_a_model(bert):
    from concurrent.futures import ThreadPoolExecutor
    ids = [bert.tokenize("one model, several threads"), bert.tokenize("calls are serialised")]
    want = bert(ids)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: bert(ids), range(8)))
    assert all(np.array_equal(r, want) for r in results)


def test_bfloat16_compute_stays_near_float32(minilm_path):
    ids = [[101, 2307, 2154, 1010, 1045, 2293, 2009, 102]]
    with graft.load_model(minilm_path) as exact, graft.load_model(minilm_path, compute_dtype="bfloat16") as narrow:
        assert exact.info()["compute_dtype"] == "float32"
        a, b = exact(ids), narrow(ids)
        assert np.isfinite(b).all()
        if narrow.info()["compute_dtype"] == "bfloat16":  # oneDNN present
            assert 0 < np.abs(a - b).max() <= 0.02 * np.abs(a).max()
    with pytest.raises(graft.GraftError, match="compute_dtype"):
        graft.load_model(minilm_path, compute_dtype="float16")
