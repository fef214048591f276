# Generates Tests/Fixtures/io/quants.gguf (random blocks of each block format, scales forced finite) and
# quants_expected.safetensors (gguf-py's dequantize of the same bytes). Dev-only (pip install gguf numpy safetensors); run from this directory.
import numpy as np, gguf
from gguf import GGMLQuantizationType as T
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize
from safetensors.numpy import save_file
rng = np.random.default_rng(1234)
def f16bytes(vals):
    return np.array(vals, dtype=np.float16).view(np.uint8).reshape(-1, 2)
# offsets of f16 scale fields inside each block
scale_fields = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
                T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
w = gguf.GGUFWriter("quants.gguf", "test")
expected = {}
rows, cols = 2, 512
for t, offs in scale_fields.items():
    bs, ts = GGML_QUANT_SIZES[t]
    nblocks = rows * cols // bs
    raw = rng.integers(0, 256, size=(nblocks, ts), dtype=np.uint8)
    for o in offs:
        raw[:, o:o+2] = f16bytes(rng.uniform(-0.05, 0.05, size=nblocks))
    raw = raw.reshape(rows, cols // bs * ts)
    name = "q." + t.name.lower()
    w.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=t)
    expected[name] = dequantize(raw, t).reshape(rows, cols).astype(np.float32)
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
save_file(expected, "quants_expected.safetensors", metadata={"source": "gguf-py " + __import__("importlib.metadata").metadata.version("gguf") + " gguf.quants.dequantize"})
print({k: v[0, :4] for k, v in expected.items()})
