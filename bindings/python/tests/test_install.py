"""`pip install ./bindings/python` into a fresh virtual environment, as a user of a machine that only talks to a
graftd daemon does (issue 11, item 11): graft.remote imports without libgraft.so, and the in-process API says
that it needs libgraft.so.

The environment is made by `python -m venv` without system site packages, so pip installs the package's own
dependencies (numpy, protobuf) from PyPI (or pip's cache) as a user's would. The whole test is bounded to 60 s
(10 to 20 s on a two-core machine, most of it pip fetching and unpacking numpy).
"""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1]  # bindings/python
BUDGET = 60.0  # seconds for venv + install + checks

IMPORT_REMOTE = "from graft.remote import Client, RemoteError; import graft; print(graft.LoraConfig(r=4).r)"
NATIVE_ERROR = """
import graft
try:
    graft.load_model
except ImportError as e:
    print(e)
else:
    raise SystemExit("graft.load_model resolved without libgraft.so")
"""


def _clean_env():
    """The environment minus everything that could point at a libgraft.so or at the checkout's sources."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GRAFT_LIB", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "LD_LIBRARY_PATH")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd, env, cwd, deadline, what):
    left = deadline - time.monotonic()
    if left <= 0:
        pytest.fail(f"out of time ({BUDGET:.0f} s) before: {what}")
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=left)
    assert r.returncode == 0, f"{what} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, emptied afterwards: a venv with numpy is ~100 MB, and pytest keeps its last three runs."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_pip_install_then_import_remote_without_libgraft(scratch):
    tmp_path = scratch
    deadline = time.monotonic() + BUDGET
    env = _clean_env()
    # Install from a copy so the build leaves nothing in the checkout (setuptools writes build/ and *.egg-info
    # beside the sources) and no libgraft.so can ride along.
    source = tmp_path / "python"
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache", "libgraft.so*"))
    venv = tmp_path / "venv"
    # The venv gets no pip of its own (ensurepip alone can take 20 s on a loaded machine); this interpreter's
    # pip installs into it with --python, the same install `venv/bin/pip install` does. --no-compile skips
    # byte-compiling numpy, which the test does not need.
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env, tmp_path, deadline, "python -m venv")
    python = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-compile", str(source)],
         env, tmp_path, deadline, "pip install ./bindings/python")

    # Run from an empty directory: nothing of the checkout is importable, no libgraft.so is beside the package.
    work = tmp_path / "elsewhere"
    work.mkdir()
    site = _run([python, "-c", "import graft, os; print(os.path.dirname(graft.__file__))"], env, work, deadline,
                "import graft")
    installed = Path(site.strip())
    assert installed.is_relative_to(venv), f"graft imported from {installed}, not from the fresh venv"
    assert not (installed / "libgraft.so").exists()

    assert _run([python, "-c", IMPORT_REMOTE], env, work, deadline, "from graft.remote import Client").strip() == "4"
    message = _run([python, "-c", NATIVE_ERROR], env, work, deadline, "graft.load_model without libgraft.so")
    assert "libgraft.so" in message and "graft.remote works without it" in message
    assert time.monotonic() < deadline
