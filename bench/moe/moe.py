"""MoE bases and router designs side by side on SmolLM2 (issue 17 item 5): each design is built by `graft moefy`
from the same dense model and calibration text, trained where the design trains, and measured on the same held-out
tweets: perplexity, feed-forward FLOPs per token (over the converted layers, as the routing spent them), expert
passes per token where they vary, peak RSS and wall time. Results go to bench/results/moe/ (runs.jsonl, moe.md).

Perplexity and FLOPs are deterministic for a given build and seed, so each design runs once; wall time and RSS are
one run's, on this machine.
"""

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name, graft moefy arguments. Layers 26-29 for the designs that train whole FFN copies (memory and time).
DESIGNS = [
    ("MoEfication E=8", ["--method", "moefication", "--experts", "8", "--top-k", "2,4"]),
    ("HMoE E=8", ["--method", "hmoe", "--experts", "8", "--top-k", "2,4"]),
    ("upcycling E=4, layers 26-29, 60 steps", ["--method", "upcycling", "--experts", "4", "--top-k", "1,2",
                                               "--upcycle-layers", "26,27,28,29", "--train-steps", "60"]),
    ("WideNet pairs, layers 26-29, 40 steps", ["--method", "widenet", "--group-size", "2", "--top-k", "1,2",
                                               "--upcycle-layers", "26,27,28,29", "--train-steps", "40", "--lr", "1e-3"]),
    ("SMoE strata 1+2 (384), layers 26-29, 40 steps", ["--method", "stratified", "--strata", "1,2", "--new-expert-size", "384",
                                                       "--top-k", "1", "--upcycle-layers", "26,27,28,29", "--train-steps", "40"]),
]


def bench_json(text):
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    return None


def run(graft, name, args, threads):
    command = [graft, "moefy", "--threads", str(threads)] + args
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - start
    record = {"design": name, "args": args, "wall_seconds": round(wall, 1)}
    data = bench_json(proc.stdout)
    if proc.returncode != 0 or data is None:
        record["error"] = (proc.stderr.strip().splitlines() or ["no output"])[-1][-400:]
        return record
    record.update(data)
    return record


def rows(record):
    """(setting, perplexity, MFLOP/token, saved vs dense, passes) rows of one record."""
    dense = record["dense_ffn_flops_per_token"]
    if "routed" in record:
        for r in record["routed"]:
            yield (f"k={r['k']}", r["perplexity"], r["ffn_flops_per_token"] / 1e6, 1 - r["ffn_flops_per_token"] / dense, None)
    else:
        yield ("top-1", record["perplexity"], record["ffn_flops_per_token"] / 1e6, 1 - record["ffn_flops_per_token"] / dense,
               record.get("mean_passes"))


def render(records, out):
    lines = ["# MoE bases and router designs on SmolLM2", "",
             "`make bench-moe` (bench/moe/moe.py): every design made by `graft moefy` from SmolLM2-135M-Instruct (Q4_1) and",
             "the tweet corpus (4,096 calibration tokens, 200 held-out tweets, every 10th tweet held out). FLOPs are the",
             "feed-forward FLOPs per token the routing spent on the held-out tokens, summed over the converted layers,",
             "against the dense FFN over the same layers.", "",
             "| design | routing | held-out perplexity | dense perplexity | FFN MFLOP/token | dense MFLOP/token | FFN saved | expert passes/token | peak RSS MB | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['design']} | failed: {r['error']} | | | | | | | | |")
            continue
        for setting, ppl, flops, saved, passes in rows(r):
            lines.append(f"| {r['design']} | {setting} | {ppl:.2f} | {r['dense_perplexity']:.2f} | {flops:.2f} | "
                         f"{r['dense_ffn_flops_per_token'] / 1e6:.2f} | {100 * saved:.1f} % | "
                         f"{'' if passes is None else f'{passes:.3f}'} | {r.get('peak_rss_kb', 0) / 1024:.0f} | {r['wall_seconds']:.0f} |")
    lines += ["", "Tuning these bases (ESFT, PERFT, MOE_PLORA) and the depth routers (Dr.LLM, Mixture-of-Recursions, DyT,",
              "Duo-LLM) are measured by their SmolLM2 tests (README, issue 17); their rows here need an MoE base and",
              "depth policies behind `graft train`'s front doors first."]
    (out / "moe.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--graft", default=str(ROOT / ".build" / "release" / "graft"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated design numbers (1-based) to run")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "moe"))
    args = parser.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [DESIGNS[int(i) - 1] for i in args.only.split(",")] if args.only else DESIGNS
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    records = []
    for name, design_args in chosen:
        print(f"bench-moe: {name} ...", flush=True)
        record = run(args.graft, name, design_args, args.threads)
        record["graft_commit"] = commit
        print(f"bench-moe: {name}: " + (record.get("error") or f"{record['wall_seconds']} s"), flush=True)
        records.append(record)
    with open(out / "runs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    render(records, out)
    print((out / "moe.md").read_text())


if __name__ == "__main__":
    main()
