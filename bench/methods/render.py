"""Renders bench/methods' runs.jsonl as a Markdown table (methods.md) and a plot of accuracy against trainable
parameters (methods.png, with matplotlib from the bench's private environment)."""

import json
import math
import statistics
from pathlib import Path

import plan

HEAD = 384 * 3 + 3  # MiniLM's 3-class classifier head, trained by every MiniLM run
TRAILS = 0.03  # accuracy below LoRA's by more than this gets a note on why (trails.json)
TRAILS_CLOSED = 0.02  # a learning-rate probe this close to LoRA's mean (about 2.5 of its seeds' std) explains the gap


def _latest(runs):
    """The last successful record per (task, method, seed), and the last error per (task, method) without one."""
    ok, errors = {}, {}
    for r in runs:
        key = (r["task"], r["peft_type"], r["seed"])
        if "error" in r:
            errors[(r["task"], r["peft_type"])] = r["error"]
        else:
            ok[key] = r
    for (task, kind, _) in ok:
        errors.pop((task, kind), None)
    return ok, errors


def _mean_std(values):
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results):
    runs = [json.loads(line) for line in (results / "runs.jsonl").read_text().splitlines() if line.strip()] \
        if (results / "runs.jsonl").exists() else []
    ok, errors = _latest(runs)
    plans = {}
    for task in plan.TASKS:
        path = results / f"plan-{task}.json"
        if path.exists():
            plans[task] = {e["peft_type"]: e for e in json.loads(path.read_text())}
    kinds = sorted(set(plans.get("minilm", {})) | set(plans.get("smollm2", {})))
    trails = json.loads(Path(__file__).with_name("trails.json").read_text())
    probes = {}  # peft_type -> [(lr, seed-0 accuracy)] from probe_lr.py
    probe_path = results / "lr-probes.jsonl"
    for line in (probe_path.read_text().splitlines() if probe_path.exists() else []):
        r = json.loads(line) if line.strip() else {}
        if "accuracy" in r and "error" not in r:
            probes.setdefault(r["peft_type"], []).append((r["lr"], r["accuracy"]))
    rows = []
    for kind in kinds:
        mini = [r for (t, k, _), r in ok.items() if t == "minilm" and k == kind]
        smol = [r for (t, k, _), r in ok.items() if t == "smollm2" and k == kind]
        entry = plans.get("minilm", {}).get(kind) or plans.get("smollm2", {}).get(kind)
        acc_mean, acc_std = _mean_std([r["accuracy"] for r in mini if math.isfinite(r["accuracy"])])
        rows.append({
            "peft_type": kind, "family": entry["family"], "why": entry.get("why", ""),
            # The rate the runs used: MiniLM's, or SmolLM2's for a method only that task runs (the MoE tuners).
            "lr": mini[0]["lr"] if mini else smol[0]["lr"] if smol else entry["lr"],
            "trails": trails.get(kind, ""),
            "probes": sorted(probes.get(kind, [])),
            "seed0": next((r["accuracy"] for (t, k, seed), r in ok.items() if t == "minilm" and k == kind and seed == 0), None),
            # A run prints adapter + head; a method not run yet shows its planned adapter size + the 3-class head.
            "trainable": mini[0]["trainable"] if mini and "trainable" in mini[0]
            else (entry["trainable"] + HEAD if entry.get("trainable") and kind in plans.get("minilm", {}) else None),
            "seeds": len(mini), "accuracy": acc_mean, "accuracy_std": acc_std,
            "perplexity": smol[0].get("perplexity") if smol else None,
            "smollm2_trainable": smol[0].get("trainable") if smol else None,
            "train_seconds": statistics.median([r["train_seconds"] for r in mini]) if mini else None,
            "cpu_seconds": statistics.median([r["cpu_seconds"] for r in mini]) if mini else None,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mini) if mini else None,
            "load": max(r["load_average"] for r in mini) if mini else None,
            "skipped": (plans.get("minilm", {}).get(kind) or {}).get("skipped"),
            "smollm2_skipped": (plans.get("smollm2", {}).get(kind) or {}).get("skipped"),
            "error": errors.get(("minilm", kind)), "smollm2_error": errors.get(("smollm2", kind)),
        })
    base = [r for (t, k, _), r in ok.items() if t == "smollm2" and k == "LORA" and "perplexity_before" in r]
    return rows, (base[0]["perplexity_before"] if base else None), runs


def _fmt(value, pattern, missing="—"):
    return missing if value is None else pattern.format(value)


def render(results):
    results = Path(results)
    rows, base_ppl, runs = summarize(results)
    if not rows:
        print("no plans yet: nothing to render")
        return
    rows.sort(key=lambda r: (r["accuracy"] is None, -(r["accuracy"] or 0)))
    lora = next((r for r in rows if r["peft_type"] == "LORA"), None)
    commits = sorted({r.get("graft_commit", "?") for r in runs})
    cpus = sorted({r.get("cpu", "not recorded (runs before 2026-12-01)") for r in runs})
    lines = [
        "# Every method at a common budget (`make bench-methods`)",
        "",
        "Generated by `bench/methods/methods.py` from `runs.jsonl` (one line per run; rerun or extend with",
        "`make bench-methods`, which skips runs already recorded). Budget and learning rates: `bench/methods/budget.json`.",
        "",
        "- **MiniLM**: the demo recipe (tweet sentiment, 3 classes, 2 epochs, batch 32, 20 warm-up steps, AdamW, weight",
        "  decay 0.01, classifier head trained by every method), test accuracy on the 1,490 test tweets, mean ± std over",
        "  the seeds run. Each method is sized to about 73,728 adapter parameters (LoRA r8 on query,value) plus the",
        "  1,155-parameter head; `trainable` counts both.",
        "- **SmolLM2**: causal-LM tuning on real text, the corpus's tweets as plain text (q_proj,v_proj, budget",
        "  460,800 = LoRA r8; 40 steps of 8 sequences), perplexity on 200 held-out tweets, one seed."
        + (f" The base model's perplexity there is {base_ppl:.2f}." if base_ppl else ""),
        "- Time is the median training time (and CPU-seconds of the whole process) on MiniLM; RSS the process peak. The",
        "  load column is the 1-minute load average when the run started: above 2, other work shared the 2 cores.",
        "- A note on a method that trails LoRA by more than 0.03 comes from `bench/methods/trails.json`, or quotes",
        "  `lr-probes.jsonl` (`bench/methods/probe_lr.py`: seed 0 again at 3× the table's learning rate, then 10× or ÷3",
        "  where 3× did not close the gap).",
        f"- Graft commits: {', '.join(commits)}.",
        f"- CPUs (times compare only on one CPU): {'; '.join(cpus)}.",
        "",
        "| method | family | trainable | lr | accuracy (seeds) | vs LoRA | SmolLM2 perplexity | SmolLM2 trainable | train s | CPU s | peak RSS MB | load |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        acc = "—"
        if r["accuracy"] is not None:
            acc = f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f} ({r['seeds']})"
        elif r["skipped"]:
            acc = "n/a"
        elif r["error"]:
            acc = "failed"
        delta = "" if r["accuracy"] is None or not lora or lora["accuracy"] is None else f"{r['accuracy'] - lora['accuracy']:+.3f}"
        ppl = _fmt(r["perplexity"], "{:.2f}", "n/a" if r["smollm2_skipped"] else ("failed" if r["smollm2_error"] else "—"))
        lines.append(f"| {r['peft_type']} | {r['family']} | {_fmt(r['trainable'], '{:,}')} | {r['lr']:g} | {acc} | {delta} "
                     f"| {ppl} | {_fmt(r['smollm2_trainable'], '{:,}')} | {_fmt(r['train_seconds'], '{:.1f}')} | {_fmt(r['cpu_seconds'], '{:.0f}')} "
                     f"| {_fmt(r['peak_rss_mb'], '{:.0f}')} | {_fmt(r['load'], '{:.1f}')} |")
        why = [r["why"]] if r["why"] else []
        if delta and float(delta) < -TRAILS:
            cause = r["trails"]
            if r["probes"] and r["seed0"] is not None:
                # A measured learning-rate probe (probe_lr.py): seed 0 at another rate, against seed 0 here.
                tried = ", ".join(f"{acc:.3f} at lr {lr:g}" for lr, acc in r["probes"])
                best_lr, best = max(r["probes"], key=lambda probe: probe[1])
                gap = lora["accuracy"] - best
                if best <= r["seed0"] + 0.01:
                    verdict = "no rate tried closes the gap; cause not established yet"
                elif gap <= TRAILS_CLOSED:
                    verdict = (f"the table's learning rate is too {'low' if best_lr > r['lr'] else 'high'} for this "
                               f"recipe: at lr {best_lr:g} it comes "
                               + (f"within {gap:.3f} of LoRA's mean" if gap > 0 else f"{-gap:.3f} above LoRA's mean"))
                else:
                    verdict = (f"a higher learning rate closes part of the gap (to {gap:.3f} below LoRA's mean)"
                               + ("" if cause else "; the rest is not established"))
                probe = f"seed 0 reaches {tried} (at the table's rate {r['seed0']:.3f}): {verdict}"
                cause = f"{cause}; {probe}" if cause else probe
            cause = cause or "cause not established yet"
            why.append(f"trails LoRA by {-float(delta):.3f}: " + cause)
        for label, text in (("MiniLM", r["skipped"]), ("SmolLM2", r["smollm2_skipped"]),
                            ("MiniLM failed", r["error"]), ("SmolLM2 failed", r["smollm2_error"])):
            if text:
                why.append(f"{label}: {text}")
        if why:
            notes.append(f"- **{r['peft_type']}**: " + "; ".join(why))
    pending = [r["peft_type"] for r in rows if r["accuracy"] is None and not r["skipped"] and not r["error"]]
    if pending:
        lines += ["", f"Not run yet ({len(pending)}): {', '.join(pending)}."]
    lines += ["", "## Notes", ""] + notes + ["", "![accuracy against trainable parameters](methods.png)", ""]
    (results / "methods.md").write_text("\n".join(lines))
    _plot(rows, lora, results / "methods.png")
    print(f"wrote {results / 'methods.md'} and {results / 'methods.png'}")


def _plot(rows, lora, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = [r for r in rows if r["accuracy"] is not None and r["trainable"]]
    fig, ax = plt.subplots(figsize=(13, 8), dpi=110)
    markers = "osD^v<>phX*P"
    families = sorted({r["family"].split(" (")[0] for r in points})
    for r in points:
        family = r["family"].split(" (")[0]
        i = families.index(family)
        ax.errorbar(r["trainable"], r["accuracy"], yerr=r["accuracy_std"], fmt=markers[i % len(markers)],
                    color=plt.cm.tab10(i % 10), markersize=6, capsize=2, label=family)
        ax.annotate(r["peft_type"], (r["trainable"], r["accuracy"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    if lora and lora["accuracy"] is not None:
        ax.axhline(lora["accuracy"], color="grey", linewidth=0.7, linestyle="--", label="LoRA r8 (mean)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + classifier head)")
    ax.set_ylabel("test accuracy (mean over seeds; bars: std)")
    ax.set_title("MiniLM, tweet sentiment demo recipe: every Graft method at a ~75k budget")
    ax.grid(True, which="both", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
