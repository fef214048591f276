"""compute_dtype through the wire: the same option and the same numbers as graft.load_model (issue 12, item 4)."""
import numpy as np
import pytest

import graft
from graft.remote import Client

from conftest import MINILM

TEXTS = ["what a great day, I love it", "awful service, never again"]


def test_bfloat16_over_the_wire_matches_in_process(daemon):
    with Client(daemon.socket_path, timeout=120) as c:
        exact = c.load_model(MINILM)
        narrow = c.load_model(MINILM, compute_dtype="bfloat16")
        assert exact.info()["compute_dtype"] == "float32"
        remote = narrow(TEXTS, output="hidden")
        with graft.load_model(MINILM, compute_dtype="bfloat16") as local:
            assert narrow.info()["compute_dtype"] == local.info()["compute_dtype"]
            here = local(TEXTS, output="hidden")
        # Same engine, same format: the wire adds nothing (rows padded alike, padding zeroed).
        assert np.isfinite(remote).all() and remote.shape == here.shape
        assert np.abs(remote - here).max() <= 1e-6
        with pytest.raises(ValueError, match="compute_dtype"):
            c.load_model(MINILM, compute_dtype="float16")
