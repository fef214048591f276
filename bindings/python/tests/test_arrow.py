"""PEFT's Arrow router (`arrow_config`) through the Python binding: the task and general adapters PEFT's
create_arrow_model loads, then its arrow_router directory, reproduce PEFT 0.21.2's output
(Tests/Fixtures/peft-arrow, scripts/fixtures/peft-arrow.py)."""
from pathlib import Path

import numpy as np
import pytest

import graft

from test_combine import read_safetensors

ROOT = Path(__file__).resolve().parents[3] / "Tests" / "Fixtures"
FIXTURE = ROOT / "peft-arrow"


@pytest.mark.parametrize("case", ["top2", "top1_gks"])
def test_peft_arrow_router_reproduces_peft(minilm_path, case):
    inputs = read_safetensors(ROOT / "peft-minilm" / "base_expected.safetensors")
    ids = inputs["input_ids"].astype(np.int32)
    lengths = inputs["attention_mask"].sum(axis=1).astype(np.int32)
    expected = read_safetensors(FIXTURE / case / "expected.safetensors")["last_hidden_state"]
    with graft.load_model(minilm_path) as m:
        for i in range(3):
            m.load_adapter(FIXTURE / "task" / str(i), name=f"task_{i}")
        for i in range(2):
            m.load_adapter(FIXTURE / "general" / str(i), name=f"gks_{i}")
        m.load_adapter(FIXTURE / case / "arrow_router", name="arrow_router")
        out = m(ids, lengths=lengths)
    real = inputs["attention_mask"].astype(bool)
    assert np.isfinite(out).all()
    assert np.abs(out[real] - expected[real]).max() <= 1e-4


def test_a_router_naming_a_missing_adapter_is_refused(minilm_path):
    with graft.load_model(minilm_path) as m:
        m.load_adapter(FIXTURE / "task" / "0", name="task_0")
        with pytest.raises(graft.GraftError, match="task_1"):
            m.load_adapter(FIXTURE / "top2" / "arrow_router", name="arrow_router")
