"""Writes a small MoE base directory in the format `graft moefy --output` writes (MoEBaseFormat: moe_config.json +
moe_routers.safetensors), without running MoEfication: SmolLM2's FFN neurons split into equal experts in index
order, random routers. With `top_k == experts` and the "sum" combine every neuron runs, so the MoE base computes
exactly the dense model: the invariant the load tests check. Shared by the binding's and graftd's tests.
"""
import json
import random
import struct
from pathlib import Path

# SmolLM2-135M's shape.
LAYERS, HIDDEN, INTERMEDIATE = 30, 576, 1536


def _safetensors(tensors):
    """The bytes of a safetensors file holding `tensors`: {name: (dtype "F32" | "I64", shape, flat values)}."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, values) in tensors.items():
        blob = struct.pack(f"<{len(values)}{'f' if dtype == 'F32' else 'q'}", *values)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def write_moe_base(directory, experts=2, top_k=None, moe_layers=(28, 29), seed=0, config_overrides=None):
    """Writes the MoE base into `directory` (created) and returns it as a str."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    tensors = {}
    for i in moe_layers:
        p = f"model.layers.{i}.mlp."
        tensors[p + "router.weight"] = ("F32", [experts, HIDDEN], [rng.gauss(0, 0.02) for _ in range(experts * HIDDEN)])
        tensors[p + "router.bias"] = ("F32", [experts], [0.0] * experts)
        tensors[p + "partition"] = ("I64", [INTERMEDIATE], list(range(INTERMEDIATE)))
    config = {"format": "graft-moe-base", "version": 2, "method": "moefication", "experts": experts,
              "top_k": experts if top_k is None else top_k, "layers": LAYERS, "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "router": "linear", "combine": "sum", "moe_layers": list(moe_layers),
              "expert_sizes": [INTERMEDIATE // experts] * experts}
    config.update(config_overrides or {})
    (directory / "moe_config.json").write_text(json.dumps(config))
    (directory / "moe_routers.safetensors").write_bytes(_safetensors(tensors))
    return str(directory)
