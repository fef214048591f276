#!/usr/bin/env python3
"""Graft's GGUF LoRA export against real llama.cpp (llama-cpp-python), and llama.cpp's own converter against Graft.

Run with the llama venv's python (bench/gguf-lora/setup-venv prints it); bench/gguf-lora/run.sh does it all:

  1. a LoRA adapter on SmolLM2 (trained here with `graft train` unless --adapter gives a PEFT directory);
  2. `graft export-gguf-lora` at each --outtype (f32, f16, q8_0);
  3. logits on a prompt from llama.cpp (base GGUF, then base + exported LoRA) and from Graft through its Python
     binding (base, the PEFT directory, the exported file loaded back): llama.cpp runs the base's Q4_1 weights on
     Q8_1-quantized activations, so its base logits differ from Graft's float32 arithmetic by some amount; that
     amount is the quantization tolerance, and base + LoRA must agree within it (2x, the LoRA's own rounding on top);
  4. with the bench venv (torch + transformers, bench/compare/setup-venv) when present: llama.cpp's
     convert_lora_to_gguf.py converts the same PEFT directory; its tensors are compared with Graft's export and
     the converted file is loaded into Graft (the round trip from llama.cpp's side).

Prints a Markdown report; exits 1 when an agreement check fails. llama-cpp-python is never a dependency of Graft.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOME = os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft"))
TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def sh(*cmd, **kw):
    print("$ " + " ".join(cmd), file=sys.stderr)
    return subprocess.run(cmd, check=True, **kw)


def graft_logits(graft, model_path, ids, adapter=None):
    with graft.load_model(model_path, task="causal-lm", threads=2) as m:
        if adapter is not None:
            m.load_adapter(adapter)
        return m(np.array([ids], dtype=np.int32), output="logits")[0].astype(np.float64)


def llama_logits(model_path, ids, lora=None):
    from llama_cpp import Llama
    kw = dict(model_path=model_path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False, seed=0)
    if lora is not None:
        kw["lora_path"] = lora
    llm = Llama(**kw)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float64)
    del llm
    return out


def maxabs(a, b):
    d = np.abs(a - b)
    return float(np.nan if np.isnan(d).any() else d.max())


def base_config(model_path, directory):
    """transformers' config.json for the GGUF base (the converter reads the architecture and head counts from it)."""
    import gguf
    r = gguf.GGUFReader(model_path)

    def value(key):
        f = r.fields[key]
        return f.parts[f.data[0]].tolist()[0]

    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": value("llama.embedding_length"), "num_hidden_layers": value("llama.block_count"),
        "num_attention_heads": value("llama.attention.head_count"),
        "num_key_value_heads": value("llama.attention.head_count_kv"),
        "intermediate_size": value("llama.feed_forward_length"), "rms_norm_eps": value("llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": value("llama.rope.freq_base"), "max_position_embeddings": value("llama.context_length"),
        "vocab_size": len(r.fields["tokenizer.ggml.tokens"].data), "tie_word_embeddings": "output.weight" not in {t.name for t in r.tensors},
    }
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f)


def compare_files(graft_file, converter_file):
    import gguf
    a, b = gguf.GGUFReader(graft_file), gguf.GGUFReader(converter_file)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    worst = 0.0
    for n in tb:
        if n not in ta or list(ta[n].shape) != list(tb[n].shape) or ta[n].tensor_type != tb[n].tensor_type:
            return f"tensor {n} differs in presence, shape or type", None
        worst = max(worst, float(np.abs(np.asarray(ta[n].data, np.float64) - np.asarray(tb[n].data, np.float64)).max()))
    if set(ta) != set(tb):
        return f"tensor sets differ: {sorted(set(ta) ^ set(tb))[:4]}", None
    keys = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")
    for k in keys:
        fa, fb = a.fields.get(k), b.fields.get(k)
        if fa is None or fb is None or fa.parts[fa.data[0]].tobytes() != fb.parts[fb.data[0]].tobytes():
            return f"metadata {k} differs", None
    return None, worst


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", help="PEFT LoRA directory trained on SmolLM2 (default: train one with graft train)")
    p.add_argument("--model", default=os.path.join(HOME, "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    p.add_argument("--graft", default=os.environ.get("GRAFT", os.path.join(ROOT, ".build/release/graft")))
    p.add_argument("--prompt", default="Tweet: I love my new self-driving car, it drives me to work\nSentiment:")
    p.add_argument("--steps", type=int, default=40, help="training steps of the default adapter")
    p.add_argument("--bench-python", default=os.environ.get("GRAFT_BENCH_PYTHON", os.path.join(HOME, "bench-venv/bin/python")),
                   help="python with torch + transformers for llama.cpp's converter (skipped when missing)")
    p.add_argument("--converter", default=os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "llama.cpp"))
    args = p.parse_args()
    sys.path.insert(0, os.path.join(ROOT, "bindings/python"))
    import graft  # noqa: E402  (the in-process binding: GRAFT_LIB names libgraft.so)

    work = tempfile.mkdtemp(prefix="graft-gguf-lora-")
    adapter = args.adapter
    if adapter is None:
        adapter = os.path.join(work, "smol-lora")
        sh(args.graft, "train", "--task", "causal-lm", "--model", args.model, "--data", "tweets", "--max-examples", "320",
           "--batch-size", "8", "--lr", "2e-3", "--max-steps", str(args.steps), "--r", "8", "--alpha", "16",
           "--target-modules", TARGETS, "--threads", "2", "--output", adapter, stdout=sys.stderr)
    with graft.load_model(args.model, task="causal-lm", threads=2) as m:
        ids = m.tokenize(args.prompt, add_special_tokens=False)

    g_base = graft_logits(graft, args.model, ids)
    g_peft = graft_logits(graft, args.model, ids, adapter)
    l_base = llama_logits(args.model, ids)
    tolerance = maxabs(l_base, g_base)
    effect = maxabs(g_peft, g_base)
    scale = float(np.abs(g_base).max())
    rows = [("base model (no adapter)", "-", "-", tolerance, "-", int((l_base.argmax(1) == g_base.argmax(1)).sum()))]
    failures = []
    for outtype in ("f32", "f16", "q8_0"):
        path = os.path.join(work, f"smol-lora-{outtype}.gguf")
        sh(args.graft, "export-gguf-lora", "--adapter", adapter, "--model", args.model, "--output", path,
           "--outtype", outtype, stdout=sys.stderr)
        l_lora = llama_logits(args.model, ids, path)
        g_gguf = graft_logits(graft, args.model, ids, path)
        err = maxabs(l_lora, g_peft)
        delta = maxabs(l_lora - l_base, g_peft - g_base)
        rows.append((f"base + LoRA, {outtype}", os.path.getsize(path), maxabs(g_gguf, g_peft), err, delta,
                     int((l_lora.argmax(1) == g_peft.argmax(1)).sum())))
        if not err <= 2 * tolerance:
            failures.append(f"{outtype}: llama.cpp vs Graft {err:.4g} > 2 x base tolerance {tolerance:.4g}")
        if outtype == "f32" and not maxabs(g_gguf, g_peft) <= 1e-5:
            failures.append(f"f32 round trip in Graft {maxabs(g_gguf, g_peft):.3g} > 1e-5")

    print(f"# Graft's GGUF LoRA export in llama.cpp (llama-cpp-python {__import__('llama_cpp').__version__})\n")
    print(f"Model `{os.path.basename(args.model)}`, adapter `{adapter if args.adapter else f'LoRA r8 α16 on {TARGETS}, {args.steps} steps of graft train on tweets'}`, "
          f"prompt of {len(ids)} tokens, logits over {g_base.shape[1]} tokens of the vocabulary at every position "
          f"(|logits| up to {scale:.1f}; the adapter moves Graft's logits by up to {effect:.3f}).\n")
    print("| run | file bytes | Graft: GGUF loaded back vs PEFT dir | llama.cpp vs Graft (max-abs) | adapter's effect, llama.cpp vs Graft | same argmax |")
    print("|---|---|---|---|---|---|")
    for name, size, rt, err, delta, same in rows:
        f = (lambda x: x if isinstance(x, str) else f"{x:.3g}")
        print(f"| {name} | {size} | {f(rt)} | {f(err)} | {f(delta)} | {same}/{len(ids)} |")
    print(f"\nTolerance: llama.cpp's own base-model discrepancy, {tolerance:.4g} (Q4_1 weights times Q8_1-quantized "
          f"activations against Graft's float32 products); base + LoRA must stay within 2x that.")

    if os.path.exists(args.bench_python) and os.path.exists(os.path.join(args.converter, "convert_lora_to_gguf.py")):
        cfg = os.path.join(work, "base-config")
        base_config(args.model, cfg)
        converted = os.path.join(work, "converter-f32.gguf")
        sh(args.bench_python, os.path.join(args.converter, "convert_lora_to_gguf.py"), "--base", cfg, "--outfile", converted,
           "--outtype", "f32", adapter, stdout=sys.stderr, stderr=sys.stderr)
        problem, worst = compare_files(os.path.join(work, "smol-lora-f32.gguf"), converted)
        g_conv = graft_logits(graft, args.model, ids, converted)
        rt = maxabs(g_conv, g_peft)
        print(f"\nllama.cpp's convert_lora_to_gguf.py (from the same llama-cpp-python source) on the same PEFT directory: "
              + (problem or f"same tensor names, shapes, types and metadata as Graft's f32 export, values max-abs {worst:.3g}")
              + f"; loaded into Graft, its logits differ from the PEFT directory's by {rt:.3g}.")
        if problem:
            failures.append("converter file: " + problem)
        if not rt <= 1e-5:
            failures.append(f"converter file in Graft: {rt:.3g} > 1e-5")
    else:
        print("\n(llama.cpp's converter not run: no bench venv with torch at --bench-python, or no converter at --converter)")
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        sys.exit(1)
    print("\nAll checks passed.")


if __name__ == "__main__":
    main()
