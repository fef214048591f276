"""MoE bases, router designs and dynamic depth side by side on SmolLM2 (issue 17 item 5): each design is built by
`graft moefy` (or, for the dynamic-depth methods, `graft depth`) from the same dense model and calibration text,
trained where the design trains, and measured on the same held-out tweets: perplexity, feed-forward FLOPs per token
(over the converted layers, as the routing spent them) or the depth method's own compute measure, expert passes per
token where they vary, peak RSS and wall time. Results go to bench/results/moe/ (runs.jsonl, moe.md); `--only`
reruns some designs and keeps the others' recorded runs.

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

# name, graft subcommand, its arguments. Layers 26-29 for the designs that train whole FFN copies (memory and
# time). The dynamic-depth methods (graft depth) run with their SmolLM2 tests' recipes, on the same texts.
DESIGNS = [
    ("MoEfication E=8", "moefy", ["--method", "moefication", "--experts", "8", "--top-k", "2,4"]),
    ("HMoE E=8", "moefy", ["--method", "hmoe", "--experts", "8", "--top-k", "2,4"]),
    ("upcycling E=4, layers 26-29, 60 steps", "moefy", ["--method", "upcycling", "--experts", "4", "--top-k", "1,2",
                                                        "--upcycle-layers", "26,27,28,29", "--train-steps", "60"]),
    ("WideNet pairs, layers 26-29, 40 steps", "moefy", ["--method", "widenet", "--group-size", "2", "--top-k", "1,2",
                                                        "--upcycle-layers", "26,27,28,29", "--train-steps", "40", "--lr", "1e-3"]),
    ("SMoE strata 1+2 (384), layers 26-29, 40 steps", "moefy", ["--method", "stratified", "--strata", "1,2",
                                                                "--new-expert-size", "384", "--top-k", "1",
                                                                "--upcycle-layers", "26,27,28,29", "--train-steps", "40"]),
    ("Dr.LLM routers, 40 steps, penalty 1.5", "depth", ["--method", "drllm"]),
    ("Mixture-of-Recursions, layers 12-14 x2, 40 steps", "depth", ["--method", "mor"]),
    ("DyT, target rate 0.5, 60 steps", "depth", ["--method", "dyt"]),
    ("Duo-LLM, target compute 0.5, 60 steps", "depth", ["--method", "duo"]),
    # Router designs on the MoEfication E=8 base at top-4, experts frozen, every block weighing its experts by the
    # router's probabilities (the designs' own combining): the defaults of `graft moefy --router`.
    ("RMoE, GRU 64 across layers, 30 steps", "moefy", ["--experts", "8", "--top-k", "4", "--router", "rmoe"]),
    ("ReXMoE, window 1, 24 steps", "moefy", ["--experts", "8", "--top-k", "4", "--router", "rexmoe"]),
    ("cross-layer shared experts, 24 steps", "moefy", ["--experts", "8", "--top-k", "4", "--router", "shared"]),
    ("test-time router rewiring, 10 steps per text", "moefy", ["--experts", "8", "--top-k", "4", "--router", "rewire"]),
    # μP (#72): the upcycling row's training with router and expert learning rates scaled from a base width of 144.
    ("upcycling E=4, layers 26-29, 60 steps, μP lr 4e-4 at width 144", "moefy",
     ["--method", "upcycling", "--experts", "4", "--top-k", "1,2", "--upcycle-layers", "26,27,28,29", "--train-steps", "60",
      "--lr", "4e-4", "--mup-base-width", "144"]),
]


def bench_json(text):
    for line in text.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    return None


def cpu_model():
    """The CPU's model name (wall times compare only on one CPU)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def run(graft, name, subcommand, args, threads):
    command = [graft, subcommand, "--threads", str(threads)] + args
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - start
    record = {"design": name, "command": subcommand, "args": args, "wall_seconds": round(wall, 1), "cpu": cpu_model()}
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


def section(title, intro, columns):
    """A Markdown section: its heading, intro lines and a table header with `columns`."""
    return ["", f"## {title}", "", *intro, "", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]


def failed(record, columns):
    """The table row of a design whose run failed."""
    return f"| {record['design']} | failed: {record['error']} |" + " |" * (columns - 2)


def render(records, out):
    lines = ["# MoE bases and router designs on SmolLM2", "",
             "`make bench-moe` (bench/moe/moe.py): every design made by `graft moefy` from SmolLM2-135M-Instruct (Q4_1) and",
             "the tweet corpus (4,096 calibration tokens, 200 held-out tweets, every 10th tweet held out). FLOPs are the",
             "feed-forward FLOPs per token the routing spent on the held-out tokens, summed over the converted layers,",
             "against the dense FFN over the same layers.", "",
             "| design | routing | held-out perplexity | dense perplexity | FFN MFLOP/token | dense MFLOP/token | FFN saved | expert passes/token | peak RSS MB | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    depth = [r for r in records if r.get("workload") == "depth" or r.get("command") == "depth"]
    routers = [r for r in records if r.get("workload") == "moefy-router" or "--router" in r.get("args", [])]
    for r in records:
        if r in depth or r in routers:
            continue
        if "error" in r:
            lines.append(failed(r, 10))
            continue
        for setting, ppl, flops, saved, passes in rows(r):
            lines.append(f"| {r['design']} | {setting} | {ppl:.2f} | {r['dense_perplexity']:.2f} | {flops:.2f} | "
                         f"{r['dense_ffn_flops_per_token'] / 1e6:.2f} | {100 * saved:.1f} % | "
                         f"{'' if passes is None else f'{passes:.3f}'} | {r.get('peak_rss_kb', 0) / 1024:.0f} | {r['wall_seconds']:.0f} |")
    lines += section("Dynamic depth", [
        "`graft depth` on the same model, texts and held-out tweets: each method trained with its SmolLM2 test's",
        "recipe on the frozen model, then measured under hard routing. The measure is the method's own compute per",
        "token: decoder layers run (Dr.LLM, Mixture-of-Recursions), FFN MFLOP (DyT, adapters included) or the FFN's",
        "share of the dense compute (Duo-LLM)."],
        ["method", "held-out perplexity", "dense perplexity", "measure", "value", "dense value", "of dense", "peak RSS MB", "wall s"])
    for r in depth:
        if "error" in r:
            lines.append(failed(r, 9))
            continue
        scale = 1e6 if "FLOP" in r["measure_name"] and r["dense_measure"] > 1e4 else 1
        lines.append(f"| {r['design']} | {r['perplexity']:.2f} | {r['dense_perplexity']:.2f} | {r['measure_name']} | "
                     f"{r['measure'] / scale:.3f} | {r['dense_measure'] / scale:.3f} | {100 * r['measure'] / r['dense_measure']:.1f} % | "
                     f"{r.get('peak_rss_kb', 0) / 1024:.0f} | {r['wall_seconds']:.0f} |")
    lines += section("Router designs", [
        "`graft moefy --router` on the MoEfication E=8 base at top-4 (experts frozen, the routers trained on the",
        "calibration tweets). These designs weigh the chosen experts by the router's probabilities, which a",
        "MoEfication base (whose experts sum back to the dense FFN with weight 1) was not made for, so the",
        "design starts far from the dense model (the base column) and its training is measured as the recovery.",
        "Rewiring adapts per-layer router-logit offsets on each held-out tweet's first half and scores its",
        "second half, so its two perplexities are over those suffixes only."],
        ["design", "base perplexity", "perplexity after", "dense perplexity", "statistic", "trainable", "peak RSS MB", "wall s"])
    for r in routers:
        if "error" in r:
            lines.append(failed(r, 8))
            continue
        if "mean_entropy" in r:
            statistic = f"router entropy {r['mean_entropy']:.3f} nats"
        elif "borrowed_share" in r:
            statistic = f"{100 * r['borrowed_share']:.1f} % of picks from other layers"
        else:
            statistic = f"context loss -{r['mean_context_loss_drop']:.3f} over {r['rewire_texts']} texts"
        cell = lambda v: f"{v:.2f}" if v < 1e5 else f"{v:.4g}"
        lines.append(f"| {r['design']} | {cell(r['base_perplexity'])} | {cell(r['perplexity'])} | {r['dense_perplexity']:.2f} | "
                     f"{statistic} | {r.get('trainable_parameters', r['experts'] * r['moe_layers']):,} | "
                     f"{r.get('peak_rss_kb', 0) / 1024:.0f} | {r['wall_seconds']:.0f} |")
    cpus = {}
    for r in records:
        cpus.setdefault(r.get("cpu", "not recorded (runs before the CPU was recorded)"), []).append(r["design"])
    if len(cpus) > 1:
        lines += ["", "Wall times and RSS compare only on one CPU; the designs ran on:"]
        lines += [f"- {cpu}: {'; '.join(names)}" for cpu, names in cpus.items()]
    lines += ["", "Tuning an MoE base (ESFT, PERFT, MOE_PLORA) has its rows in the method comparison",
              "(`bench/results/methods/methods.md`, SmolLM2 task, on an upcycled base of layers 26-29)."]
    (out / "moe.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--graft", default=str(ROOT / ".build" / "release" / "graft"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="comma-separated design numbers (1-based) to run")
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "moe"))
    parser.add_argument("--render-only", action="store_true", help="rewrite moe.md from runs.jsonl, running nothing")
    args = parser.parse_args()
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [] if args.render_only else [DESIGNS[int(i) - 1] for i in args.only.split(",")] if args.only else DESIGNS
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip():
        commit += "+changes"
    # Designs not run now keep their recorded run (--only reruns some); the table follows DESIGNS' order.
    kept = {}
    if (out / "runs.jsonl").exists():
        for line in (out / "runs.jsonl").read_text().splitlines():
            r = json.loads(line)
            kept[r["design"]] = r
    for name, subcommand, design_args in chosen:
        print(f"bench-moe: {name} ...", flush=True)
        record = run(args.graft, name, subcommand, design_args, args.threads)
        record["graft_commit"] = commit
        print(f"bench-moe: {name}: " + (record.get("error") or f"{record['wall_seconds']} s"), flush=True)
        kept[name] = record
    records = [kept[name] for name, _, _ in DESIGNS if name in kept]
    with open(out / "runs.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    render(records, out)
    print((out / "moe.md").read_text())


if __name__ == "__main__":
    main()
