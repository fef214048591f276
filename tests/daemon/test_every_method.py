"""graftd reaches every method: each of PEFT's config classes and each of Graft's own methods builds an adapter
over the wire (the same configs bindings/python/tests/test_method_configs.py builds in process)."""
import sys

import pytest

from graft import peft_configs
from graft.remote import Client

from conftest import ASSETS, MINILM, ROOT

sys.path.insert(0, str(ROOT / "bindings" / "python" / "tests"))
from test_method_configs import DECODER_ONLY, ENCODER_NAMES, OWN, peft_config  # noqa: E402

CONFIGS = [peft_config(name) for name in ENCODER_NAMES] + OWN
SMOLLM = ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_every_method_builds_an_adapter_over_the_wire(daemon):
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM)
        for config in CONFIGS:
            peft_type = config.to_dict()["peft_type"]
            model.add_adapter("probe", config)
            entry = model.list_adapters()["adapters"][0]
            assert entry["peft_type"] == peft_type and entry["trainable_parameters"] > 0, entry
            model.delete_adapter("probe")
        assert model.list_adapters()["adapters"] == []


def test_decoder_only_methods_build_over_the_wire_on_a_decoder(daemon):
    with Client(daemon.socket_path) as c:
        model = c.load_model(SMOLLM)
        for name in sorted(DECODER_ONLY):
            config = peft_config(name)
            model.add_adapter("probe", config)
            entry = model.list_adapters()["adapters"][0]
            assert entry["peft_type"] == config.PEFT_TYPE and entry["trainable_parameters"] > 0, entry
            model.delete_adapter("probe")
