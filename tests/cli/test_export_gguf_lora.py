"""`graft export-gguf-lora` as a user runs it: a PEFT LoRA directory for SmolLM2 (written here with numpy) becomes
llama.cpp's GGUF LoRA file, read back here with an independent GGUF parser and checked against what llama.cpp's
convert_lora_to_gguf.py writes (metadata, tensor names, GGUF dimensions, lora_b's q/k rows permuted as the
converter's LlamaModel.permute does); and `graft generate --adapter file.gguf` generates what the directory does."""
import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
GRAFT = os.environ.get("GRAFT_CLI", str(ROOT / ".build" / "release" / "graft"))
HEADS, KV_HEADS, HIDDEN, LAYERS = 9, 3, 576, 30
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_HEADS * 64, HIDDEN), "v_proj": (KV_HEADS * 64, HIDDEN)}
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v"}


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = np.ascontiguousarray(tensors[name], dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def peft_adapter(directory):
    rng = np.random.default_rng(7)
    tensors = {}
    for layer in range(LAYERS):
        for module, (out, inp) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[key + ".lora_A.weight"] = rng.uniform(-0.04, 0.04, (4, inp)).astype(np.float32)
            tensors[key + ".lora_B.weight"] = rng.uniform(-0.05, 0.05, (out, 4)).astype(np.float32)
    os.makedirs(directory)
    write_safetensors(os.path.join(directory, "adapter_model.safetensors"), tensors)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(SHAPES), "task_type": "CAUSAL_LM",
              "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    Path(directory, "adapter_config.json").write_text(json.dumps(config))
    return tensors


def read_gguf(path):
    """(metadata, {name: (dims innermost first, type, array)}) of a GGUF v3 file with F32 tensors."""
    raw = Path(path).read_bytes()
    assert raw[:4] == b"GGUF" and struct.unpack_from("<I", raw, 4)[0] == 3
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos = 24

    def string():
        nonlocal pos
        (n,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + n
        return raw[pos - n:pos].decode()

    meta = {}
    for _ in range(n_kv):
        key = string()
        (kind,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if kind == 8:
            meta[key] = string()
        elif kind in (4, 6):
            meta[key] = struct.unpack_from("<I" if kind == 4 else "<f", raw, pos)[0]
            pos += 4
        else:
            raise AssertionError(f"unexpected metadata type {kind} for {key}")
    infos = []
    for _ in range(n_tensors):
        name = string()
        (ndim,) = struct.unpack_from("<I", raw, pos)
        dims = struct.unpack_from(f"<{ndim}Q", raw, pos + 4)
        kind, offset = struct.unpack_from("<IQ", raw, pos + 4 + 8 * ndim)
        pos += 4 + 8 * ndim + 12
        infos.append((name, dims, kind, offset))
    start = (pos + 31) // 32 * 32
    tensors = {}
    for name, dims, kind, offset in infos:
        count = int(np.prod(dims))
        data = np.frombuffer(raw[start + offset:start + offset + 4 * count], dtype=np.float32)
        tensors[name] = (tuple(dims), kind, data.reshape(tuple(reversed(dims))))
    return meta, tensors


def permute(w, heads):
    """llama.cpp convert_hf_to_gguf's LlamaModel.permute (q/k rows into RoPE's interleaved order)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def run(*args):
    return subprocess.run([GRAFT, *args], capture_output=True, text=True, timeout=600)


def test_export_writes_the_converters_file_and_generates_like_the_directory(tmp_path):
    adapter = str(tmp_path / "smol-lora")
    tensors = peft_adapter(adapter)
    out = str(tmp_path / "smol-lora.gguf")
    r = run("export-gguf-lora", "--adapter", adapter, "--model", "smollm2", "--output", out)
    assert r.returncode == 0, r.stderr
    assert "90 LoRA pairs" in r.stdout
    meta, gguf = read_gguf(out)
    assert list(meta) == ["general.architecture", "general.type", "adapter.type", "general.name", "adapter.lora.alpha",
                          "general.quantization_version"]
    assert (meta["general.architecture"], meta["general.type"], meta["adapter.type"]) == ("llama", "adapter", "lora")
    assert meta["adapter.lora.alpha"] == 8 and meta["general.quantization_version"] == 2
    assert len(gguf) == 180
    for layer in (0, 17, 29):
        for module, heads in (("q_proj", HEADS), ("k_proj", KV_HEADS), ("v_proj", None)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            name = f"blk.{layer}.{GGUF_NAMES[module]}.weight"
            a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
            dims_a, type_a, got_a = gguf[name + ".lora_a"]
            dims_b, type_b, got_b = gguf[name + ".lora_b"]
            assert dims_a == (a.shape[1], 4) and dims_b == (4, b.shape[0]) and type_a == type_b == 0
            np.testing.assert_array_equal(got_a, a)
            np.testing.assert_array_equal(got_b, permute(b, heads) if heads else b)

    prompt = "Tweet: I love my new self-driving car\nSentiment:"
    from_dir = run("generate", "--adapter", adapter, "--raw", "--prompt", prompt, "--max-tokens", "4")
    from_gguf = run("generate", "--adapter", out, "--raw", "--prompt", prompt, "--max-tokens", "4")
    assert from_dir.returncode == 0 and from_gguf.returncode == 0, from_dir.stderr + from_gguf.stderr
    assert from_gguf.stdout == from_dir.stdout and from_dir.stdout.strip()


def test_refusals_name_the_fault(tmp_path):
    r = run("export-gguf-lora", "--adapter", str(tmp_path / "missing"), "--output", str(tmp_path / "x.gguf"))
    assert r.returncode == 1 and "adapter_config.json" in r.stderr
    adapter = str(tmp_path / "smol-lora")
    peft_adapter(adapter)
    r = run("export-gguf-lora", "--adapter", adapter, "--output", str(tmp_path / "x.gguf"), "--outtype", "q4_0")
    assert r.returncode == 1 and "q4_0" in r.stderr
    assert not (tmp_path / "x.gguf").exists()
