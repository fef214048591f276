#!/usr/bin/env python3
"""Learning-rate probes for the methods that trail LoRA on MiniLM (bench/methods).

Every method in the table runs at one learning rate (budget.json). For each method whose mean accuracy trails
LoRA's by more than render.TRAILS and that has no note in trails.json, this runs seed 0 once more at `--factor`
times that rate (the demo recipe otherwise unchanged) and appends the record to
bench/results/methods/lr-probes.jsonl; render.py prints the probe beside the table's figure, so a gap that a
learning rate closes reads as such. Resumable: probes on record are skipped.

  ${GRAFT_HOME:-~/.cache/graft}/bench-venv/bin/python bench/methods/probe_lr.py --graft .build/release/graft
"""
import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

import methods
import render

ROOT = methods.ROOT


def trailing(results, notes):
    """peft_types whose mean MiniLM accuracy is below LoRA's by more than render.TRAILS and have no note."""
    ok, _ = render._latest([json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines() if line])
    accuracy = {}
    for (task, kind, _), record in ok.items():
        if task == "minilm":
            accuracy.setdefault(kind, []).append(record["accuracy"])
    lora = statistics.fmean(accuracy["LORA"])
    return sorted((statistics.fmean(a) - lora, kind) for kind, a in accuracy.items()
                  if statistics.fmean(a) < lora - render.TRAILS and kind not in notes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--graft", default=str(ROOT / ".build" / "release" / "graft"))
    ap.add_argument("--factor", type=float, default=3.0, help="the probe's rate over the table's (default 3)")
    ap.add_argument("--only", help="comma-separated peft_types (default: every trailing method without a note)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results" / "methods"))
    ap.add_argument("--work", default=os.path.join(os.environ.get("GRAFT_HOME", os.path.expanduser("~/.cache/graft")),
                                                   "bench-methods"))
    ap.add_argument("--commit", help="the commit the graft binary was built from (default: this checkout's HEAD)")
    args = ap.parse_args()
    args.commit = args.commit or subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                capture_output=True, text=True).stdout.strip()
    results = Path(args.results)
    notes = json.loads(Path(render.__file__).with_name("trails.json").read_text())
    plans = {e["peft_type"]: e for e in json.loads((results / "plan-minilm.json").read_text())}
    probes_path = results / "lr-probes.jsonl"
    done = {(r["peft_type"], r["lr"]) for r in (json.loads(line) for line in
            (probes_path.read_text().splitlines() if probes_path.exists() else []) if line) if "error" not in r}
    kinds = args.only.split(",") if args.only else [kind for _, kind in trailing(results, notes)]
    for index, kind in enumerate(kinds):
        entry = dict(plans[kind])
        entry["lr"] = float(f"{entry['lr'] * args.factor:.3g}")
        if (kind, entry["lr"]) in done:
            continue
        record = methods.run_one(args.graft, "minilm", entry, 0, args, Path(args.work) / "minilm" / f"{kind}-probe-lr{entry['lr']:g}")
        record["table_lr"] = plans[kind]["lr"]
        with open(probes_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        print(f"[{index + 1}/{len(kinds)}] {kind} seed 0 at lr {entry['lr']:g} (table {plans[kind]['lr']:g}): "
              f"{record.get('error') or record.get('accuracy')} ({record['wall_seconds']} s)", flush=True)
    render.render(results)


if __name__ == "__main__":
    main()
