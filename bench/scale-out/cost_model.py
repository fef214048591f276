#!/usr/bin/env python3
"""The cost model behind docs/scaling.md: data-parallel adapter training on p nodes, on paper.

Per step every node runs the forward and backward pass of its own batch (compute, fixed per node: weak scaling)
and then allreduces the adapter's gradients. This prints, for each workload and network, the allreduce time of
ring, binomial-tree and recursive-halving/doubling (Rabenseifner) allreduce at p nodes, and the fraction of the
step spent communicating, with and without overlapping the allreduce with the backward pass.

Model (Thakur, Rabenseifner & Gropp, "Optimization of Collective Communication Operations in MPICH", 2005), for
n bytes, latency alpha (s) and inverse bandwidth beta (s/byte); the local reduction (gamma) is folded into beta:
  ring                   2(p-1)·alpha + 2·(p-1)/p·n·beta
  binomial tree          2·ceil(log2 p)·(alpha + n·beta)        (reduce to a root, then broadcast)
  halving/doubling       2·ceil(log2 p)·alpha + 2·(p-1)/p·n·beta
Inputs are flags; the defaults are the figures measured on this machine kind in bench/README.md and
bench/scale-out/README.md, and the adapter sizes are counted from the models' shapes below.
"""
import argparse
import math

# Shapes from the models' config.json (all-MiniLM-L6-v2, SmolLM2-135M).
MINILM = dict(layers=6, hidden=384, kv=384, intermediate=1536)
SMOLLM2 = dict(layers=30, hidden=576, kv=192, intermediate=1536)


def lora_parameters(model, rank, modules):
    """Trainable parameters of LoRA rank `rank` on the named linear modules of every layer: r·(in + out) each."""
    h, kv, i = model["hidden"], model["kv"], model["intermediate"]
    dims = {"q": (h, h), "k": (h, kv), "v": (h, kv), "o": (h, h), "gate": (h, i), "up": (h, i), "down": (i, h)}
    return model["layers"] * sum(rank * sum(dims[m]) for m in modules)


WORKLOADS = [
    # name, gradient bytes (float32), GFLOP per step per node (bench/README.md "Throughput against the ceiling")
    ("MiniLM LoRA r8 q,v + classifier, B32×T64", 4 * (lora_parameters(MINILM, 8, ["q", "v"]) + 384 * 6 + 6), 89.0),
    ("SmolLM2 LoRA r8 q,v, B4×T128", 4 * lora_parameters(SMOLLM2, 8, ["q", "v"]), 288.0),
    ("SmolLM2 LoRA r16 all linear, B4×T128", 4 * lora_parameters(
        SMOLLM2, 16, ["q", "k", "v", "o", "gate", "up", "down"]), 288.0 * 1.05),
]

NETWORKS = [
    # name, alpha (s), bandwidth (bytes/s)
    ("10 GbE, TCP", 25e-6, 1.1e9),
    ("100 Gb/s InfiniBand / RoCE", 2e-6, 11e9),
]


def allreduce_seconds(algorithm, p, n, alpha, beta):
    if p <= 1:
        return 0.0
    steps = math.ceil(math.log2(p))
    if algorithm == "ring":
        return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n * beta
    if algorithm == "tree":
        return 2 * steps * (alpha + n * beta)
    if algorithm == "halving-doubling":
        return 2 * steps * alpha + 2 * (p - 1) / p * n * beta
    raise ValueError(f"unknown allreduce algorithm {algorithm!r}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gflops-per-node", type=float, default=150.0,
                        help="sustained GFLOP/s of one node's step (default: 2 cores × ≈ 75 GFLOP per CPU-second, "
                             "Graft's measured float32 step throughput in bench/README.md)")
    parser.add_argument("--backward-share", type=float, default=0.5,
                        help="share of the step that is backward, the window an overlapped allreduce can hide in")
    parser.add_argument("--buckets", type=int, default=4,
                        help="gradient buckets: with overlap only the last bucket's allreduce cannot hide")
    parser.add_argument("--jitter", type=float, default=0.05,
                        help="coefficient of variation of one node's step time (stragglers; an assumption)")
    parser.add_argument("--nodes", default="2,8,64,1000", help="comma-separated node counts")
    args = parser.parse_args()
    nodes = [int(x) for x in args.nodes.split(",")]

    for name, n, gflop in WORKLOADS:
        compute = gflop / args.gflops_per_node
        print(f"\n{name}: {n / 1e6:.2f} MB of gradients, {gflop:.0f} GFLOP ⇒ {compute:.2f} s compute per step")
        print("| network | algorithm | " + " | ".join(f"p = {p}" for p in nodes) + " |")
        print("|---|---|" + "---|" * len(nodes))
        for network, alpha, bandwidth in NETWORKS:
            for algorithm in ("ring", "tree", "halving-doubling"):
                cells = []
                for p in nodes:
                    t = allreduce_seconds(algorithm, p, n, alpha, 1 / bandwidth)
                    last = allreduce_seconds(algorithm, p, n / args.buckets, alpha, 1 / bandwidth)
                    exposed = max(last, t - args.backward_share * compute)
                    cells.append(f"{t * 1e3:.2f} ms, {100 * t / (compute + t):.2f} % ({100 * exposed / (compute + exposed):.2f} %)")
                print(f"| {network} | {algorithm} | " + " | ".join(cells) + " |")
    print("\ncells: allreduce time, communication share of the step without overlap (with bucketed overlap)")
    # Stragglers: every step waits for the slowest node; for independent normal step times the expected
    # maximum of p draws is about mu + sigma·sqrt(2 ln p).
    print("\nstragglers: expected slowest-node step / mean step at a jitter of "
          f"{100 * args.jitter:.0f} %: " + ", ".join(
              f"p = {p}: {1 + args.jitter * math.sqrt(2 * math.log(p)):.3f}" for p in nodes))


if __name__ == "__main__":
    main()
