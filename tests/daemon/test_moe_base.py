"""moe_base through the wire (LoadModel.moe_base, graft.h 0.6.0): the same MoE base and the same numbers as
graft.load_model, an MoE tuner added remotely, and a missing directory named with its resolution."""
import sys

import numpy as np
import pytest

import graft
from graft.remote import Client, RemoteError

from conftest import ROOT

SMOLLM = "smollm2"  # the asset name: graftd and graft.load_model resolve it in the cache

sys.path.insert(0, str(ROOT / "bindings" / "python" / "tests"))
from synthetic_moe_base import write_moe_base  # noqa: E402

TEXTS = ["Graft tunes the experts of a mixture-of-experts base."]


def test_moe_base_over_the_wire_matches_in_process(daemon, tmp_path):
    base = write_moe_base(tmp_path / "moe", experts=2, top_k=1, moe_layers=(29,))
    with Client(daemon.socket_path, timeout=120) as c:
        remote = c.load_model(SMOLLM, task="causal-lm", moe_base=base)
        assert remote.info()["moe_base"]["experts"] == 2
        got = remote(TEXTS, output="logits")
        with graft.load_model(SMOLLM, task="causal-lm", moe_base=base) as local:
            here = local(TEXTS, output="logits")
        assert np.isfinite(got).all() and got.shape == here.shape
        assert np.abs(got - here).max() <= 1e-6 * np.abs(here).max()
        remote.add_adapter("perft", {"peft_type": "PERFT", "num_experts": 2, "top_k": 1, "r": 4, "lora_alpha": 8})
        assert any(a["name"] == "perft" and a["trainable_parameters"] > 0 for a in remote.list_adapters()["adapters"])
        with pytest.raises(RemoteError) as e:
            c.load_model(SMOLLM, task="causal-lm", moe_base="no-such-moe-base")
        assert e.value.code == "NOT_FOUND" and "load_model.moe_base 'no-such-moe-base'" in e.value.message
