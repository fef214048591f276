"""load_model(moe_base=...) (graft_model_params.moe_base, graft.h 0.6.0): the decoder made an MoE base at load, so
the adapters that tune an MoE base's experts (PERFT, ESFT, MOE_PLORA) reach the engine through the C ABI."""
import numpy as np
import pytest

import graft
from synthetic_moe_base import write_moe_base

TEXT = "Graft tunes the experts of a mixture-of-experts base."


def test_an_all_experts_moe_base_computes_the_dense_model(smollm_path, tmp_path):
    base = write_moe_base(tmp_path / "moe", experts=2, moe_layers=(28, 29))
    with graft.load_model(smollm_path, task="causal-lm") as dense, \
            graft.load_model(smollm_path, task="causal-lm", moe_base=base) as moe:
        assert "moe_base" not in dense.info()
        described = moe.info()["moe_base"]
        assert described["experts"] == 2 and described["top_k"] == 2 and described["moe_layers"] == [28, 29]
        ids = [dense.tokenize(TEXT)]
        want, got = dense(ids, output="logits"), moe(ids, output="logits")
        assert np.isfinite(got).all()
        # Both experts together hold every neuron ("sum" combine): the dense FFN up to summation order.
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_top1_routing_differs_and_perft_trains_on_it(smollm_path, tmp_path):
    base = write_moe_base(tmp_path / "moe", experts=2, top_k=1, moe_layers=(29,))
    with graft.load_model(smollm_path, task="causal-lm") as dense, \
            graft.load_model(smollm_path, task="causal-lm", moe_base=base) as moe:
        ids = [dense.tokenize(TEXT)]
        assert np.abs(moe(ids, output="logits") - dense(ids, output="logits")).max() > 1e-3
        with pytest.raises(graft.GraftError, match="MoE"):
            dense.add_adapter("perft", {"peft_type": "PERFT", "num_experts": 2, "top_k": 1, "r": 4, "lora_alpha": 8})
        moe.add_adapter("perft", {"peft_type": "PERFT", "num_experts": 2, "top_k": 1, "r": 4, "lora_alpha": 8})
        listed = {a["name"]: a for a in moe.list_adapters()["adapters"]}
        # One layer: a router [2, 576] and two LoRA experts of rank 4 on a 576 → 576 block.
        assert listed["perft"]["trainable_parameters"] == 2 * 576 + 2 * 4 * (576 + 576)
        with graft.Trainer(moe, adapter="perft", learning_rate=2e-3, warmup_steps=0, schedule="constant") as t:
            first, _ = t.evaluate(ids)
            losses = [t.step(ids) for _ in range(4)]
            last, _ = t.evaluate(ids)
        assert np.isfinite(losses).all() and last < first


def test_moe_base_errors_name_the_file_and_field(smollm_path, minilm_path, tmp_path):
    with pytest.raises(graft.GraftError) as e:
        graft.load_model(smollm_path, task="causal-lm", moe_base=tmp_path / "missing")
    assert e.value.code == -5 and "missing" in e.value.message and "moe_base" in e.value.message
    with pytest.raises(graft.GraftError) as e:
        graft.load_model(minilm_path, moe_base=write_moe_base(tmp_path / "moe"))
    assert e.value.code == -4 and "Llama" in e.value.message
    wrong = write_moe_base(tmp_path / "wrong", config_overrides={"layers": 12})
    with pytest.raises(graft.GraftError) as e:
        graft.load_model(smollm_path, task="causal-lm", moe_base=wrong)
    assert e.value.code == -3 and "moe_config.json" in e.value.message and "'layers'" in e.value.message
    with pytest.raises(graft.GraftError, match="moe_base must be a string"):
        graft.load_model(smollm_path, moe_base=3)
