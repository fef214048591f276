"""Many adapters, one server: N clients, each with its own LoRA adapter, generate concurrently through graftd
(continuous batching: one decode step per token for every running sequence). Each of --runs runs is a pass of every
client alone (one request at a time), then all of them at once: prints each pass's single-client tokens/s (median of
its requests), the aggregate tokens/s, the ratio run by run and its median, and whether every client got exactly the
tokens its request gets alone in every pass. Asserts nothing (a bench, not a test)."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bindings" / "python"))
from graft.remote import Client  # noqa: E402

CACHE = Path(os.environ.get("GRAFT_CACHE", Path.home() / ".cache" / "graft"))
WORDS = ("the river ran past old stone houses while children played near the bridge and a dog slept in the warm "
         "afternoon sun beside an open door").split()


def prompt(i, n):
    """A prompt of about n words, different for each client."""
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--graftd", default=str(ROOT / ".build" / "release" / "graftd"))
    ap.add_argument("--model", default=str(CACHE / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fast-decode", action="store_true", help="both the single and the concurrent runs in fast mode (int8)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="graft-serve-bench-"))
    sock = str(work / "graftd.sock")
    daemon = subprocess.Popen([args.graftd, "--socket", sock, "--threads", str(args.threads), "--quiet",
                               "--max-batch-sequences", str(max(args.clients, 1))],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if "listening" not in daemon.stdout.readline():
            sys.exit("graftd did not start")
        with Client(sock) as c:
            model = c.load_model(args.model, task="causal-lm")
            lora = {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": "all-linear",
                    "init_lora_weights": False}
            for i in range(args.clients):
                model.add_adapter(f"user{i}", lora, seed=i + 1)
            jobs = [(prompt(i, args.prompt_words), f"user{i}") for i in range(args.clients)]
            # Warm-up. Then, for each run, each client alone (one request at a time: its tokens and its tokens/s)
            # followed by all clients at once, so each ratio compares passes a minute apart rather than the VM's
            # speed at the start with its speed at the end.
            fast = args.fast_decode
            model.generate(jobs[0][0], max_new_tokens=8, stop_at_eos=False, adapter=jobs[0][1], fast_decode=fast)

            def single_pass():
                rates, tokens = [], []
                for p, a in jobs:
                    t = time.perf_counter()
                    ids = model.generate(p, max_new_tokens=args.tokens, stop_at_eos=False, adapter=a, fast_decode=fast)
                    rates.append(len(ids) / (time.perf_counter() - t))
                    tokens.append(ids)
                return statistics.median(rates), tokens

            def concurrent_pass():
                results = [None] * len(jobs)
                barrier = threading.Barrier(len(jobs) + 1)

                def run(i):
                    with Client(sock) as ci:
                        m = ci.model(model.model_id)
                        barrier.wait()
                        results[i] = m.generate(jobs[i][0], max_new_tokens=args.tokens, stop_at_eos=False,
                                                adapter=jobs[i][1], fast_decode=fast)

                threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
                for t in threads:
                    t.start()
                barrier.wait()
                t0 = time.perf_counter()
                for t in threads:
                    t.join()
                return args.clients * args.tokens / (time.perf_counter() - t0), results

            alone, singles, aggregates, identical = None, [], [], True
            for _ in range(args.runs):
                single, tokens = single_pass()
                alone = alone or tokens
                aggregate, results = concurrent_pass()
                identical = identical and results == alone and tokens == alone
                singles.append(single)
                aggregates.append(aggregate)
            stats = c.server_stats()
    finally:
        daemon.terminate()
        daemon.wait()
    ratios = [x / y for x, y in zip(aggregates, singles)]
    print(f"graftd, SmolLM2 Q4_1, {args.clients} clients x {args.tokens} tokens, {args.clients} LoRA r{args.rank} "
          f"all-linear adapters (one per client), {args.threads} threads, prompt ~{args.prompt_words} words, "
          f"{'fast (int8)' if args.fast_decode else 'exact'} mode; {args.runs} runs of a single-client pass, then "
          f"all clients at once")
    print("single client alone (median of the pass's requests):  "
          + " / ".join(f"{x:.1f}" for x in singles) + " tokens/s")
    print(f"{args.clients} clients at once (aggregate):                "
          + " / ".join(f"{x:.1f}" for x in aggregates) + " tokens/s")
    print("ratio, run by run: " + " / ".join(f"{x:.2f}x" for x in ratios)
          + f"; median {statistics.median(ratios):.2f}x a single client")
    print(f"each client's tokens identical to its request alone: {'yes' if identical else 'NO'}")
    print(f"server_stats: {stats['generate_steps']} decode steps for {stats['generated_tokens']} tokens; "
          f"prompt cache {stats['prefix_cache_bytes'] / 2**20:.1f} MB kept, {stats['prefix_cache_hits']} hits")


if __name__ == "__main__":
    main()
