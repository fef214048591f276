"""Decode and prefill speed, Graft against llama.cpp on the same GGUF file, one invocation (issue 13, item 3).

Each measurement runs each engine in its own child process, one after the other, on the same token ids (a fixed,
vocabulary-spread prompt; greedy decoding with no stop token), 2 threads each, median of --runs after one warm-up.
Graft runs `graft bench decode`; llama.cpp runs through llama-cpp-python (this file's `peer` mode) in the private
venv bench/gguf-lora/setup-venv makes, never a dependency of Graft. Peak RSS of each child comes from wait4. No
peer figure is ever a constant.

Rows:
  decode   prompt 32 tokens, 128 new tokens greedy: decode tokens/s (and prefill tokens/s of the 32)
  prefill  prompt 512 tokens, 1 new token: prefill tokens/s
  lora     Graft only: the decode row with an unmerged LoRA r16 on every linear layer, against Graft's own base;
           each timed LoRA run is paired with a base run (the adapter disabled) just before it in the same
           process, and the ratio is the median of the pairs' ratios (this VM's speed drifts between invocations)
  fast     Graft's fast mode (--fast-decode: int8 activations against the Q4_1/Q8_0 blocks, as llama.cpp does),
           the decode row and the LoRA row again; the exact rows above stay Graft's default

Run through bench/decode/run, or directly:
  <llama venv>/bin/python bench/decode/decode.py --graft .build/release/graft [--runs 3]
"""

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
THREADS = 2


def graft_home():
    return os.environ.get("GRAFT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "graft")


def prompt_ids(count, vocabulary):
    """The prompt both engines decode after (the same formula as `graft bench decode`)."""
    return [1000 + (i * 7919) % max(1, vocabulary - 2000) for i in range(count)]


def peer(args):
    """llama.cpp's side: prints one BENCH_JSON line."""
    import numpy as np
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.model_file, n_ctx=1024, n_batch=512, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False)
    vocab = llm.n_vocab()
    prompt = prompt_ids(args.prompt_tokens, vocab)
    prefill_rates, decode_rates, tokens = [], [], []

    def last_argmax():
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(vocab,))
        return int(np.argmax(logits))

    for run in range(args.warmup + args.runs):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        generated = [last_argmax()]
        first = time.perf_counter()
        while len(generated) < args.new_tokens:
            llm.eval([generated[-1]])
            generated.append(last_argmax())
        end = time.perf_counter()
        if run < args.warmup:
            continue
        tokens = generated
        prefill_rates.append(args.prompt_tokens / (first - start))
        if len(generated) > 1:
            decode_rates.append((len(generated) - 1) / (end - first))
    print("BENCH_JSON " + json.dumps({
        "engine": "llama.cpp", "workload": "decode", "prefill_tokens_per_s": statistics.median(prefill_rates),
        "decode_tokens_per_s": statistics.median(decode_rates) if decode_rates else 0.0, "tokens": tokens,
        "version": llama_cpp.__version__}), flush=True)


def run_child(argv, log):
    """Runs one engine; returns (its BENCH_JSON result or None, its peak RSS in kB)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(THREADS), OMP_NUM_THREADS=str(THREADS))
    log.write("$ " + " ".join(argv) + "\n")
    log.flush()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    result = None
    for line in proc.stdout:
        log.write(line)
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
        elif line.strip():
            print("   " + line.rstrip(), flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        print(f"   (exited with status {status}; see the log)", flush=True)
        return None, usage.ru_maxrss
    return result, usage.ru_maxrss


def same_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main():
    ap = argparse.ArgumentParser(description="Graft vs llama.cpp: decode and prefill tokens/s on one GGUF file.")
    sub = ap.add_subparsers(dest="mode")
    p = sub.add_parser("peer", help="llama.cpp's side (used by the harness)")
    p.add_argument("--model-file", required=True)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--graft", default=".build/release/graft", help="the graft binary (release build)")
    ap.add_argument("--model-file", default=os.path.join(graft_home(), "smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--log", default=os.path.join(graft_home(), "bench-decode.log"))
    a = ap.parse_args()
    if a.mode == "peer":
        return peer(a)
    graft = os.path.abspath(a.graft)
    runs = str(a.runs)
    rows = []
    started = time.time()
    with open(a.log, "w") as log:
        def both(label, prompt, new, graft_extra=()):
            print(f"\n== {label}: prompt {prompt} tokens, {new} new (greedy)", flush=True)
            g = run_child([graft, "bench", "decode", "--model", a.model_file, "--prompt-tokens", str(prompt),
                           "--new-tokens", str(new), "--runs", runs, "--threads", str(THREADS), *graft_extra], log)
            if graft_extra:
                return g, (None, 0)
            l = run_child([sys.executable, os.path.abspath(__file__), "peer", "--model-file", a.model_file,
                           "--prompt-tokens", str(prompt), "--new-tokens", str(new), "--runs", runs,
                           "--threads", str(THREADS)], log)
            return g, l

        (gd, gd_rss), (ld, ld_rss) = both("decode", 32, 128)
        (gp, gp_rss), (lp, lp_rss) = both("prefill", 512, 1)
        (gl, gl_rss), _ = both("decode with LoRA r16 on every linear layer (Graft only)", 32, 128, ("--r", "16"))
        (gf, gf_rss), _ = both("decode, fast mode (Graft only)", 32, 128, ("--fast-decode",))
        (gfl, gfl_rss), _ = both("decode with LoRA r16, fast mode (Graft only)", 32, 128, ("--fast-decode", "--r", "16"))

    def rate(r, key):
        return r[key] if r else float("nan")

    def ratio(x, y):
        return f"{x / y:.2f}" if x == x and y == y and y > 0 else "?"

    print("\n" + "=" * 100)
    print(f"Graft vs llama.cpp {ld.get('version', '?') if ld else '?'}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{os.path.basename(a.model_file)}, {THREADS} threads each, median of {a.runs} after 1 warm-up; ratio = Graft / llama.cpp")
    print("| measurement | Graft | llama.cpp | ratio | Graft peak RSS MB | llama.cpp peak RSS MB | RSS ratio |")
    print("|---|---|---|---|---|---|---|")
    gdr, ldr = rate(gd, "decode_tokens_per_s"), rate(ld, "decode_tokens_per_s")
    print(f"| decode tokens/s (prompt 32, 128 new) | {gdr:.1f} | {ldr:.1f} | {ratio(gdr, ldr)} | {gd_rss / 1024:.0f} | {ld_rss / 1024:.0f} | {ratio(gd_rss, ld_rss)} |")
    gpr, lpr = rate(gd, "prefill_tokens_per_s"), rate(ld, "prefill_tokens_per_s")
    print(f"| prefill tokens/s, 32-token prompt | {gpr:.1f} | {lpr:.1f} | {ratio(gpr, lpr)} | | | |")
    gpr, lpr = rate(gp, "prefill_tokens_per_s"), rate(lp, "prefill_tokens_per_s")
    print(f"| prefill tokens/s, 512-token prompt | {gpr:.1f} | {lpr:.1f} | {ratio(gpr, lpr)} | {gp_rss / 1024:.0f} | {lp_rss / 1024:.0f} | {ratio(gp_rss, lp_rss)} |")
    def paired(r):
        return f"{r['paired_decode_ratio']:.2f}" if r and "paired_decode_ratio" in r else "?"

    glr = rate(gl, "decode_tokens_per_s")
    print(f"| decode tokens/s with LoRA r16 all-linear, unmerged (Graft; ratio to its base, paired) | {glr:.1f} | | {paired(gl)} | {gl_rss / 1024:.0f} | | |")
    gfr = rate(gf, "decode_tokens_per_s")
    print(f"| decode tokens/s, fast mode (int8 activations) | {gfr:.1f} | {ldr:.1f} | {ratio(gfr, ldr)} | {gf_rss / 1024:.0f} | {ld_rss / 1024:.0f} | {ratio(gf_rss, ld_rss)} |")
    gflr = rate(gfl, "decode_tokens_per_s")
    print(f"| decode tokens/s with LoRA r16, fast mode (Graft; ratio to its fast base, paired) | {gflr:.1f} | | {paired(gfl)} | {gfl_rss / 1024:.0f} | | |")
    print("Paired: the LoRA rows' ratio is the median over timed runs of the LoRA run's rate over the rate of a base "
          "run (the adapter disabled) just before it in the same process, so both sides of each pair see the same "
          "machine load.")
    if gf and gd:
        n = same_prefix(gf["tokens"], gd["tokens"])
        print(f"Fast-mode greedy tokens identical to the exact mode's for the first {n} of {len(gd['tokens'])}.")
    if gf and ld:
        n = same_prefix(gf["tokens"], ld["tokens"])
        print(f"Fast-mode greedy tokens identical to llama.cpp's for the first {n} of {len(ld['tokens'])}.")
    if gd and ld:
        n = same_prefix(gd["tokens"], ld["tokens"])
        print(f"Greedy tokens identical for the first {n} of {len(gd['tokens'])} (llama.cpp multiplies Q4_1 weights by "
              "Q8_1-quantized activations, Graft by float32 activations: the argmax may part ways).")
    print(f"({(time.time() - started) / 60:.1f} min; full output: {a.log})")


if __name__ == "__main__":
    main()
