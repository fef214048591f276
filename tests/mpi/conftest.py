"""Shared helpers for the data-parallel tests: the graft binary, mpirun over TCP on loopback, adapter files."""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAFT = os.environ.get("GRAFT_BIN", os.path.join(ROOT, ".build", "release", "graft"))

# Open MPI's documented settings: run as root (CI does), TCP and self transports only, loopback interface,
# more ranks than cores allowed. Every rank runs one compute thread (--threads 1) so 2 ranks share 2 cores.
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_btl": "tcp,self",
    "OMPI_MCA_btl_tcp_if_include": "lo",
    "OMPI_MCA_oob_tcp_if_include": "lo",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
}


def mpirun(n, args, env=None, timeout=300, **kw):
    """Runs `graft args` on n ranks; returns the CompletedProcess (stdout and stderr captured as text)."""
    if shutil.which("mpirun") is None:
        pytest.fail("mpirun is not installed: run scripts/setup (it installs openmpi-bin and libopenmpi-dev)")
    e = dict(os.environ, **MPI_ENV, **(env or {}))
    cmd = ["mpirun", "-n", str(n), GRAFT] + args
    return subprocess.run(cmd, env=e, capture_output=True, text=True, timeout=timeout, **kw)


def graft(args, env=None, timeout=300):
    """Runs `graft args` as one process, not under mpirun."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("OMPI_")}
    e.update(env or {})
    return subprocess.run([GRAFT] + args, env=e, capture_output=True, text=True, timeout=timeout)


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def read_safetensors(path):
    """{name: float32 array} from a safetensors file (F32 tensors only, which is what Graft saves)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(body[a:b], dtype=np.float32).reshape(info["shape"])
    return out


def adapter_difference(a_dir, b_dir):
    """(largest per-tensor ||a - b|| / ||b||, largest per-tensor max|a - b| / max|b|) over two saved adapters.

    The first is the equivalence measure: AdamW's first steps move every element by about ±lr whatever its
    gradient's size, so an element whose gradient is within rounding of 0 may move either way when the ranks
    sum in another order; such elements are few, and the tensor's norm barely notices them."""
    a = read_safetensors(os.path.join(a_dir, "adapter_model.safetensors"))
    b = read_safetensors(os.path.join(b_dir, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b)
    norm_worst, max_worst = 0.0, 0.0
    for k in a:
        assert np.isfinite(a[k]).all() and np.isfinite(b[k]).all(), f"{k}: NaN or Inf"
        d = a[k].astype(np.float64) - b[k]
        norm_worst = max(norm_worst, float(np.linalg.norm(d)) / (float(np.linalg.norm(b[k])) or 1.0))
        max_worst = max(max_worst, float(np.abs(d).max()) / (float(np.abs(b[k]).max()) or 1.0))
    return norm_worst, max_worst


@pytest.fixture(scope="session")
def eval_files(tmp_path_factory):
    """Tiny evaluation sets, so rank 0's before/after evaluation stays short."""
    d = tmp_path_factory.mktemp("eval")
    cls = d / "cls.jsonl"
    cls.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                           [("what a lovely day", "positive"), ("this is awful", "negative"), ("it is a chair", "neutral")]))
    lm = d / "lm.jsonl"
    lm.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in
                          [("Tweet: I love it\nSentiment:", " positive"), ("Tweet: so bad\nSentiment:", " negative")]))
    return {"cls": str(cls), "lm": str(lm)}


def pytest_sessionstart(session):
    if not os.path.exists(GRAFT):
        print(f"graft binary {GRAFT} is missing: build it with swift build -c release --product graft", file=sys.stderr)
