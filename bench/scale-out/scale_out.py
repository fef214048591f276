"""bench/scale-out/run's driver: runs `graft train` under mpirun and reads its `scale-out` line (see run)."""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRAFT = os.path.join(ROOT, ".build", "release", "graft")
CORES = os.cpu_count() or 1
MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMPI_MCA_btl": "tcp,self",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
}
LINE = re.compile(r"scale-out  (\d+) rank\(s\), step ([\d.]+) s, allreduce ([\d.]+) ms/step \((\d+) calls\), (\d+) bytes/step")
WORKLOADS = {
    "MiniLM LoRA r8 query,value + classifier": [
        "--data", "tweets", "--max-examples", "2000", "--r", "8", "--target-modules", "query,value",
        "--batch-size", "16", "--max-steps", "8"],
    "SmolLM2 LoRA r16 all-linear": [
        "--task", "causal-lm", "--model", "smollm2", "--data", "tweets", "--max-examples", "400", "--max-length", "64",
        "--r", "16", "--alpha", "32", "--target-modules", "all-linear", "--batch-size", "4", "--max-steps", "4"],
}
NS = ("graftbench0", "graftbench1")
VETH = ("gveth0", "gveth1")
ADDR = ("10.77.0.1", "10.77.0.2")


def run(cmd, env, prefix=()):
    r = subprocess.run(list(prefix) + cmd, env=env, capture_output=True, text=True)
    m = LINE.search(r.stdout)
    if r.returncode != 0 or not m:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return float(m.group(2)), float(m.group(3)), int(m.group(5))


def measure(label, ranks, args, runs, eval_file, extra_mpi=(), prefix=(), env_extra=None):
    threads = max(1, CORES // ranks)
    env = dict(os.environ, **MPI_ENV, **(env_extra or {}))
    cmd = ["mpirun", "-n", str(ranks), *extra_mpi, GRAFT, "train", *args, "--dropout", "0", "--threads", str(threads),
           "--eval-data", eval_file, "--output", os.path.join(tempfile.gettempdir(), "graft-scale-out-adapter")]
    samples = [run(cmd, env, prefix) for _ in range(runs)]
    step = statistics.median(s[0] for s in samples)
    comm = statistics.median(s[1] for s in samples)
    print(f"  {label:<40} step {step:7.3f} s   allreduce {comm:8.3f} ms/step ({100 * comm / 1000 / step:5.2f}%)   "
          f"{samples[0][2]:>10,} bytes/step", flush=True)


def netns_setup():
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    sh = lambda *a: subprocess.run(a, check=True)
    for ns in NS:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", VETH[0], "netns", NS[0], "type", "veth", "peer", "name", VETH[1], "netns", NS[1])
    for ns, veth, addr in zip(NS, VETH, ADDR):
        sh("ip", "-n", ns, "addr", "add", addr + "/24", "dev", veth)
        sh("ip", "-n", ns, "link", "set", veth, "up")


def netns_teardown():
    for ns in NS:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def allreduce_alone(label, ranks, extra_mpi=(), prefix=()):
    """`graft bench allreduce`: the collective alone for the two adapters' payloads (and 8 bytes for latency)."""
    env = dict(os.environ, **MPI_ENV)
    cmd = ["mpirun", "-n", str(ranks), *extra_mpi, GRAFT, "bench", "allreduce", "--runs", "20"]
    r = subprocess.run(list(prefix) + cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    for line in r.stdout.splitlines():
        if line.startswith("allreduce"):
            print(f"  {label:<40} {line}", flush=True)


def netns_agent(work):
    agent = os.path.join(work, "netns-agent")
    with open(agent, "w") as f:
        # Open MPI's rsh launcher calls `agent <host> <orted command>`: run it inside that host's namespace.
        f.write("#!/bin/sh\nhost=$1; shift\ncase $host in\n"
                + "".join(f"  {addr}) ns={ns} ;;\n" for addr, ns in zip(ADDR, NS))
                + "  *) echo \"netns-agent: unknown host $host\" >&2; exit 1 ;;\nesac\n"
                + "exec ip netns exec $ns sh -c \"$*\"\n")
    os.chmod(agent, 0o755)
    return agent


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-netns", action="store_true")
    p.add_argument("--only", choices=["minilm", "smollm2"])
    a = p.parse_args()
    if shutil.which("mpirun") is None:
        sys.exit("mpirun not found: run scripts/setup (openmpi-bin)")
    work = tempfile.mkdtemp(prefix="graft-scale-out-")
    evals = {}
    for kind, row in (("cls", {"text": "a fine day", "label": "positive"}),
                      ("lm", {"prompt": "Tweet: ok\nSentiment:", "completion": " neutral"})):
        evals[kind] = os.path.join(work, kind + ".jsonl")
        with open(evals[kind], "w") as f:
            f.write(json.dumps(row) + "\n")
    netns = not a.skip_netns and os.geteuid() == 0 and shutil.which("ip") is not None
    loop = ["--mca", "btl_tcp_if_include", "lo"]
    veth = ["--host", f"{ADDR[0]}:1,{ADDR[1]}:1", "--mca", "plm_rsh_agent", netns_agent(work),
            "--mca", "btl_tcp_if_include", "10.77.0.0/24", "--mca", "oob_tcp_if_include", "10.77.0.0/24"]
    print(f"bench/scale-out/run: median of {a.runs} runs, {CORES} cores; per-rank batch fixed (weak scaling); "
          f"threads per rank = cores / ranks; bytes = allreduce payload per rank per optimizer step; allreduce "
          f"time includes waiting for the slowest rank")
    if netns:
        netns_setup()
    try:
        for name, args in WORKLOADS.items():
            if a.only and not name.lower().startswith(a.only):
                continue
            ev = evals["lm" if name.startswith("SmolLM2") else "cls"]
            print(name)
            for ranks in (1, 2, 4):
                label = f"{ranks} rank{'s' if ranks > 1 else ''}, loopback TCP" + (" (oversubscribed)" if ranks > CORES else "")
                measure(label, ranks, args, a.runs, ev, extra_mpi=loop)
            if netns:
                measure("2 ranks, 2 namespaces over veth", 2, args, a.runs, ev, prefix=["ip", "netns", "exec", NS[0]],
                        extra_mpi=veth)
            else:
                print("  (namespaces skipped: needs root and iproute2)")
        print("The allreduce alone (graft bench allreduce, median of 20, ranks lined up first)")
        allreduce_alone("2 ranks, loopback TCP", 2, extra_mpi=loop)
        allreduce_alone(f"4 ranks, loopback TCP{' (oversubscribed)' if 4 > CORES else ''}", 4, extra_mpi=loop)
        if netns:
            allreduce_alone("2 ranks, 2 namespaces over veth", 2, extra_mpi=veth, prefix=["ip", "netns", "exec", NS[0]])
    finally:
        if netns:
            netns_teardown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
