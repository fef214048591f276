"""Side-by-side benchmark: Graft against PyTorch + transformers + PEFT, same work, one invocation (issue 12).

For each workload it runs the Graft command (`graft bench ...` or `graft demo`) and the PyTorch side
(bench/compare/peer.py) one after the other, each in its own child process, with the same shapes and 2 threads
(Graft --threads 2, OPENBLAS_NUM_THREADS=2; torch.set_num_threads(2), OMP_NUM_THREADS=2). Each child prints a
final ``BENCH_JSON {...}`` line with its median; the harness takes each child's peak RSS from wait4 (ru_maxrss of
that child alone). Then it prints one Markdown table. No figure is ever a constant: a peer figure comes only from
the peer's run here, on the same work.

Workloads (letters as in issue 12):
  a  MiniLM LoRA r8 α16 on query,value + classifier, one AdamW step, B32×T64
  b  SmolLM2 LoRA r8 on q_proj,v_proj, one AdamW step, B4×T128 (causal-LM loss)
  c  SmolLM2 prefill 8×64, last-position logits: base, one LoRA r16 all-linear, 8 adapters mixed
  d  MiniLM forward B32×T64 (inference)
  e  the demo recipe end to end (2 epochs on the tweet demo split): training time and test accuracy
  f  SmolLM2 causal-LM LoRA training on the demo split's tweets as {"text"}: tokens per second

Timing workloads (a–d) report the median of --runs after warm-up; e is one run of each engine (2 epochs each;
repeat the invocation for more); f reports tokens/s over --text-steps consecutive steps after 2 warm-up.
Times are wall clock on a machine that may be shared: only ratios from one invocation, repeated, mean much.

Run through `make bench-compare` (which builds Graft and makes the venv), or directly:
  <venv>/bin/python bench/compare/run.py --graft .build/release/graft [--only a,b] [--runs 5]
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tweets  # noqa: E402  (stdlib only; builds the same split Graft builds)

THREADS = 2


def child_env():
    """The environment both engines run with: 2 threads everywhere, offline Hugging Face libraries."""
    env = dict(os.environ)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[var] = str(THREADS)
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["PYTHONUNBUFFERED"] = "1"
    return env


PEER_ENV = {}


def run_child(label, argv, log):
    """Runs one engine's command as a child process, echoing its output with a prefix.

    Returns ``(result, peak_rss_kb, wall_s, lines)``: ``result`` is the parsed BENCH_JSON object (None when the
    child printed none), ``peak_rss_kb`` the child's ru_maxrss from wait4."""
    print(f"  [{label}] $ {' '.join(argv)}", flush=True)
    log.write(f"$ {' '.join(argv)}\n")
    start = time.perf_counter()
    env = child_env()
    if label == "pytorch":
        env.update(PEER_ENV)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            bufsize=1)
    lines, result = [], None
    for line in proc.stdout:
        line = line.rstrip("\n")
        # Progress bars redraw with carriage returns; keep the last state of the line.
        line = line.split("\r")[-1]
        lines.append(line)
        log.write(line + "\n")
        if line.startswith("BENCH_JSON "):
            result = json.loads(line[len("BENCH_JSON "):])
        elif line.strip():
            print(f"  [{label}] {line}", flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"  [{label}] exited with status {proc.returncode}", flush=True)
        result = None
    return result, usage.ru_maxrss, wall, lines


def parse_graft_demo(lines):
    """Reads `graft demo`'s human-readable summary (it prints no JSON): training time and test accuracy."""
    text = "\n".join(lines)
    acc = re.search(r"^after\s+test accuracy ([0-9.]+)", text, re.M)
    train = re.search(r"^time\s+([0-9.]+) s training", text, re.M)
    total = re.search(r"([0-9.]+) s in all", text)
    if not (acc and train):
        return None
    return {"workload": "demo", "median_s": float(train.group(1)), "train_s": float(train.group(1)),
            "total_s": float(total.group(1)) if total else None, "accuracy": float(acc.group(1))}


def cpu_model():
    """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def gb(kb):
    """KiB to GB (10^9 bytes), two decimals."""
    return f"{kb * 1024 / 1e9:.2f}" if kb else "—"


def fmt_ratio(x, y):
    """``x / y`` with two decimals, or a dash."""
    return f"{x / y:.2f}" if x and y else "—"


class Row:
    """One line of the table."""

    def __init__(self, workload, graft_s, peer_s, graft_rss, peer_rss, note="", ratio=None):
        self.workload, self.graft_s, self.peer_s = workload, graft_s, peer_s
        self.graft_rss, self.peer_rss, self.note = graft_rss, peer_rss, note
        self.ratio = ratio if ratio is not None else (graft_s / peer_s if graft_s and peer_s else None)

    def cells(self):
        t = lambda s: f"{s:.3f} s" if s is not None else "failed"  # noqa: E731
        return [self.workload, t(self.graft_s), t(self.peer_s), f"{self.ratio:.2f}" if self.ratio else "—",
                gb(self.graft_rss), gb(self.peer_rss), fmt_ratio(self.graft_rss, self.peer_rss), self.note]


def table(rows):
    """The Markdown table of all rows."""
    head = ["workload", "Graft", "PyTorch+PEFT", "ratio G/P", "Graft peak RSS GB", "PyTorch peak RSS GB",
            "RSS ratio", "notes"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(out)


def pair(name, graft_argv, peer_argv, log):
    """Runs both engines on one workload; returns ``((graft result, rss), (peer result, rss))``."""
    print(f"\n== {name}", flush=True)
    g, g_rss, _, g_lines = run_child("graft", graft_argv, log)
    p, p_rss, _, p_lines = run_child("pytorch", peer_argv, log)
    return (g, g_rss, g_lines), (p, p_rss, p_lines)


def cpu_note(g, p):
    """CPU seconds per step of both engines (all threads): how many cores each kept busy, and what each step costs
    in CPU time whatever else the machine is doing."""
    gc, pc = median_of(g, "cpu_s_per_step"), median_of(p, "cpu_s_per_step")
    return f"CPU-s/step Graft {gc or 0:.2f} / PyTorch {pc or 0:.2f}"


def median_of(result, key="median_s"):
    """A field of a result, or None when the run failed."""
    return result.get(key) if result else None


def main():
    ap = argparse.ArgumentParser(description="Graft vs PyTorch + PEFT, side by side (issue 12).")
    ap.add_argument("--graft", default=".build/release/graft", help="the graft binary (release build)")
    ap.add_argument("--python", default=sys.executable, help="the venv's python, with torch, transformers, peft")
    ap.add_argument("--only", default="a,b,c,d,e,f", help="comma-separated workload letters")
    ap.add_argument("--runs", type=int, default=5, help="timed repetitions for a–d (median reported)")
    ap.add_argument("--text-steps", type=int, default=20, help="timed steps for f")
    ap.add_argument("--log", default=None, help="where to keep both engines' full output")
    ap.add_argument("--peer-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for the PyTorch side only, e.g. OMP_WAIT_POLICY=PASSIVE (repeatable)")
    ap.add_argument("--graft-dtype", default="float32", choices=["float32", "bfloat16", "auto"],
                    help="Graft's compute_dtype for every workload (frozen weights' products)")
    ap.add_argument("--peer-autocast", action="store_true",
                    help="run the PyTorch side under torch.autocast('cpu', dtype=torch.bfloat16): equal precision with "
                         "--graft-dtype bfloat16")
    a = ap.parse_args()
    PEER_ENV.update(kv.split("=", 1) for kv in a.peer_env)
    if a.runs < 5:
        print("note: fewer than 5 runs; issue 12 asks for a median of ≥ 5", flush=True)
    only = set(a.only.split(","))
    graft = os.path.abspath(a.graft)
    peer = [a.python, os.path.join(HERE, "peer.py"), "--threads", str(THREADS)] + (["--autocast"] if a.peer_autocast else [])
    dtype = ["--compute-dtype", a.graft_dtype]
    work = os.path.join(tweets.graft_home(), "bench-compare")
    os.makedirs(work, exist_ok=True)
    log_path = a.log or os.path.join(work, "last-run.log")
    runs = str(a.runs)
    rows = []
    started = time.time()
    with open(log_path, "w") as log:
        print("\n== the PyTorch side's floor: importing torch, transformers and peft", flush=True)
        idle, idle_rss, _, _ = run_child("pytorch", peer + ["idle"], log)
        if "a" in only:
            (g, gr, _), (p, pr, _) = pair(
                "a: MiniLM LoRA r8 query,value + classifier, one AdamW step, B32×T64",
                [graft, "bench", "train-step", "--model", "minilm", "--batch", "32", "--length", "64", "--r", "8",
                 "--runs", runs, "--warmup", "2", "--threads", "2"] + dtype,
                peer + ["train-step", "--model", "minilm", "--batch", "32", "--length", "64", "--r", "8",
                        "--runs", runs, "--warmup", "2"], log)
            rows.append(Row("a. MiniLM LoRA step B32×T64", median_of(g), median_of(p), gr, pr, "s/step; " + cpu_note(g, p)))
        if "b" in only:
            (g, gr, _), (p, pr, _) = pair(
                "b: SmolLM2 LoRA r8 q_proj,v_proj, one AdamW step, B4×T128",
                [graft, "bench", "train-step", "--model", "smollm2", "--batch", "4", "--length", "128", "--r", "8",
                 "--runs", runs, "--warmup", "2", "--threads", "2"] + dtype,
                peer + ["train-step", "--model", "smollm2", "--batch", "4", "--length", "128", "--r", "8",
                        "--runs", runs, "--warmup", "2"], log)
            rows.append(Row("b. SmolLM2 LoRA step B4×T128", median_of(g), median_of(p), gr, pr,
                            "s/step; " + cpu_note(g, p) + "; Graft keeps the GGUF weights in their Q4_1/Q8_0 blocks, PyTorch dequantized them to float32 (Graft's bfloat16 mode adds a bfloat16 copy of each frozen weight)"))
        if "c" in only:
            (g, gr, _), (p, pr, _) = pair(
                "c: SmolLM2 prefill 8×64, last-position logits, LoRA r16 all-linear",
                [graft, "bench", "mixed-adapters", "--model", "smollm2", "--batch", "8", "--length", "64", "--r", "16",
                 "--logits", "last", "--runs", runs, "--warmup", "1", "--threads", "2"] + dtype,
                peer + ["prefill", "--model", "smollm2", "--batch", "8", "--length", "64", "--r", "16",
                        "--runs", runs, "--warmup", "1"], log)
            for key, label in (("base_s", "base"), ("one_adapter_s", "one adapter"), ("mixed_s", "8 adapters mixed")):
                rows.append(Row(f"c. SmolLM2 prefill 8×64, {label}", median_of(g, key), median_of(p, key), gr, pr,
                                "one process per engine for all three"))
        if "d" in only:
            (g, gr, _), (p, pr, _) = pair(
                "d: MiniLM forward B32×T64 (inference)",
                [graft, "bench", "forward", "--model", "minilm", "--batch", "32", "--length", "64",
                 "--runs", runs, "--warmup", "1", "--threads", "2"] + dtype,
                peer + ["forward", "--model", "minilm", "--batch", "32", "--length", "64", "--runs", runs,
                        "--warmup", "1"], log)
            rows.append(Row("d. MiniLM forward B32×T64", median_of(g), median_of(p), gr, pr, "inference"))
        if "e" in only:
            out_dir = tempfile.mkdtemp(prefix="graft-demo-")
            (g, gr, g_lines), (p, pr, _) = pair(
                "e: the demo recipe end to end (2 epochs, tweet demo split)",
                [graft, "demo", "--output", out_dir] + dtype, peer + ["demo"], log)
            shutil.rmtree(out_dir, ignore_errors=True)
            g = parse_graft_demo(g_lines) if g_lines else None
            note = "training time, 1 run each; test accuracy Graft {} / PEFT {}".format(
                f"{g['accuracy']:.3f}" if g else "?", f"{p['accuracy']:.3f}" if p else "?")
            rows.append(Row("e. demo, 2 epochs", median_of(g, "train_s"), median_of(p, "train_s"), gr, pr, note))
        if "f" in only:
            data = os.path.join(work, "tweets-demo-train.jsonl")
            tweets.write_text_jsonl(data, tweets.demo_subsets()[0])
            steps = str(a.text_steps)
            (g, gr, _), (p, pr, _) = pair(
                "f: SmolLM2 causal-LM LoRA r8 q_proj,v_proj on tweets as {\"text\"}, B8, max 64 tokens",
                [graft, "bench", "train-text", "--model", "smollm2", "--data", data, "--batch", "8",
                 "--max-length", "64", "--steps", steps, "--warmup", "2", "--threads", "2"] + dtype,
                peer + ["train-text", "--model", "smollm2", "--data", data, "--batch", "8", "--max-length", "64",
                        "--steps", steps, "--warmup", "2"], log)
            gt, pt = median_of(g, "tokens_per_s"), median_of(p, "tokens_per_s")
            rows.append(Row("f. SmolLM2 LoRA on tweet text", median_of(g), median_of(p), gr, pr,
                            f"s/step median; tokens/s Graft {gt or 0:.0f} / PyTorch {pt or 0:.0f}",
                            ratio=(pt / gt) if gt and pt else None))
    elapsed = time.time() - started
    print("\n" + "=" * 100)
    print(f"Graft vs PyTorch + PEFT, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{cpu_model()}, {os.cpu_count()} CPUs, {THREADS} threads each, median of {a.runs} after warm-up "
          f"(e: one run each); ratio = Graft time / PyTorch time (f: for the same tokens)")
    print(f"precision: Graft compute_dtype {a.graft_dtype}; PyTorch "
          + ("torch.autocast(cpu, bfloat16)" if a.peer_autocast else "float32"))
    if PEER_ENV:
        print("PyTorch side's extra environment: " + " ".join(f"{k}={v}" for k, v in PEER_ENV.items()))
    print(table(rows))
    if idle:
        print(f"PyTorch side's floor (import torch, transformers, peft; no model): peak RSS {gb(idle_rss)} GB, of which "
              f"{gb(idle['cuda_libraries_rss_kb'])} GB are the CUDA libraries PyPI's torch maps (unused on the CPU). "
              f"Versions: {', '.join(f'{k} {v}' for k, v in idle['versions'].items())}.")
    print(f"({elapsed / 60:.1f} min; both engines' full output: {log_path})")


if __name__ == "__main__":
    main()
