"""`graft compress` and `graft merge --method copa` as a user runs them on PEFT's fixture adapters
(Tests/Fixtures/peft-minilm-merge): the compressed directory is smaller than PEFT's file and loads back; CoPA-Merging
writes a LoRA adapter of the requested rank."""
import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GRAFT = os.environ.get("GRAFT_CLI", str(ROOT / ".build" / "release" / "graft"))
FIXTURE = ROOT / "Tests" / "Fixtures" / "peft-minilm-merge"


def graft(*args, cwd):
    return subprocess.run([GRAFT, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("method,packed", [("compeft", "adapter_compeft.safetensors"), ("onebit", "adapter_1bit.safetensors")])
def test_compress_reports_the_size_and_writes_the_packed_file(method, packed, tmp_path):
    r = graft("compress", str(FIXTURE / "a"), "--method", method, "--output", "out", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    size = (tmp_path / "out" / packed).stat().st_size
    assert f"({method}): {size} bytes" in r.stdout
    assert size < (FIXTURE / "a" / "adapter_model.safetensors").stat().st_size
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    # Compressing the compressed directory again reads it back as a working adapter first.
    again = graft("compress", "out", "--method", method, "--output", "again", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_compress_refusals_name_the_fault(tmp_path):
    r = graft("compress", str(FIXTURE / "a"), "--method", "zip", "--output", "out", cwd=tmp_path)
    assert r.returncode == 1 and "zip" in r.stderr
    r = graft("compress", str(FIXTURE / "a"), "--method", "compeft", "--density", "2", "--output", "out", cwd=tmp_path)
    assert r.returncode == 1 and "density" in r.stderr


def test_merge_copa_writes_a_lora_adapter(tmp_path):
    r = graft("merge", str(FIXTURE / "a"), str(FIXTURE / "b"), "--method", "copa", "--density", "0.5",
              "--svd-rank", "4", "--output", "copa", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "copa" in r.stdout
    config = json.loads((tmp_path / "copa" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["peft_type"] == "LORA"
    r = graft("merge", str(FIXTURE / "a"), str(FIXTURE / "b"), "--method", "copa", "--output", "x", cwd=tmp_path)
    assert r.returncode == 1 and "density is required" in r.stderr
