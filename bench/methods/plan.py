"""Sizes every method of Graft's catalog to bench/methods' common trainable budget.

The catalog comes from `graft methods --json` (so a new method is benchmarked without touching this file); each
method's example config is resized along the knob budget.json names for it, counting trainable parameters through the
Python binding on the real model (the classifier head excluded: every classification run trains it too).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bindings" / "python"))

TASKS = {
    # name: (model asset, task, target modules, budget key)
    "minilm": ("minilm", "seq-cls", ["query", "value"]),
    "smollm2": ("smollm2", "causal-lm", ["q_proj", "v_proj"]),
}


def load_budget():
    with open(Path(__file__).with_name("budget.json")) as f:
        return json.load(f)


def catalog(graft_bin, model):
    """`graft methods --json` on `model`: a list of {peft_type, family, peft_parity, example_config, ...}."""
    out = subprocess.run([graft_bin, "methods", "--json", "--model", model], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


# The MoE base the methods that tune an MoE base's experts (ESFT, PERFT, MOE_PLORA) train on in the SmolLM2 task:
# SmolLM2's last four layers upcycled into 4 copies of their FFN with top-1 routers and no training, so it computes
# the dense model exactly and every row starts from the same held-out perplexity.
MOE_LAYERS = [26, 27, 28, 29]
MOE_EXPERTS = 4


def ensure_moe_base(graft_bin, work, log=print):
    """Builds the SmolLM2 task's MoE base under `work` with `graft moefy` unless it is there; returns its path."""
    path = Path(work) / "moe-base"
    if (path / "moe_config.json").exists():
        return path
    log(f"== building the MoE base for ESFT, PERFT and MOE_PLORA: {path}")
    subprocess.run([graft_bin, "moefy", "--model", "smollm2", "--method", "upcycling", "--experts", str(MOE_EXPERTS),
                    "--top-k", "1", "--upcycle-layers", ",".join(map(str, MOE_LAYERS)), "--train-steps", "0",
                    "--eval-texts", "20", "--output", str(path)], check=True, capture_output=True, text=True)
    return path


def _count(model, config):
    import graft
    try:
        model.add_adapter("probe", config)
    except graft.GraftError as e:
        return None, str(e)
    try:
        listed = model.list_adapters()["adapters"]
        return next(a["trainable_parameters"] for a in listed if a["name"] == "probe"), None
    finally:
        model.delete_adapter("probe")


def _closest(candidates, budget):
    """The (value, count) whose count is nearest `budget` on a log scale; ties go to the smaller adapter."""
    ok = [(v, c) for v, c in candidates if c]
    if not ok:
        return None
    return min(ok, key=lambda vc: (abs(math.log(vc[1] / budget)), vc[1]))


def plan_task(graft_bin, task, log=print, work=None):
    """One entry per method: {peft_type, family, peft_parity, config, trainable, lr, why, skipped}; the methods
    that tune an MoE base's experts are sized on the MoE base built under `work` (SmolLM2 only)."""
    import graft
    asset, task_name, targets = TASKS[task]
    spec = load_budget()
    budget = spec["budget"][task]
    rows = catalog(graft_bin, asset)
    model = graft.load_model(asset, task=task_name, num_labels=3 if task_name == "seq-cls" else None)
    moe_model = None
    plans = []
    try:
        for row in rows:
            kind = row["peft_type"]
            rule = spec["methods"].get(kind, {})
            entry = {"peft_type": kind, "family": row["family"], "peft_parity": row["peft_parity"],
                     "lr": rule.get("lr", spec["default_lr"]), "why": rule.get("why", ""), "skipped": None}
            counting = model
            if row.get("needs_moe_base"):
                if task != "smollm2" or work is None:
                    entry["skipped"] = "tunes the experts of an MoE base, which Graft makes from a Llama decoder (SmolLM2 task)"
                    plans.append(entry)
                    continue
                if moe_model is None:
                    moe_model = graft.load_model(asset, task=task_name, moe_base=ensure_moe_base(graft_bin, work, log))
                counting, entry["moe_base"] = moe_model, True
                if rule.get("select_experts"):
                    # ESFT: graft train selects the experts from the training data; nothing to size beforehand.
                    entry.update(config={k: v for k, v in {**row["example_config"], **rule.get("set", {})}.items()
                                         if k != "experts"}, trainable=None, scale=None)
                    plans.append(entry)
                    log(f"  {kind:24s} experts chosen by graft train from the data")
                    continue
            elif row["trainable_parameters"] is None and not row["example_config"].get("adapters") == {}:
                entry["skipped"] = row["note"] or "does not apply to this model"
                plans.append(entry)
                continue
            base = dict(row["example_config"])
            if "target_modules" in base and isinstance(base["target_modules"], list) and base["target_modules"] in (
                    ["query", "value"], ["q_proj", "v_proj"]):
                base["target_modules"] = targets
            base.update(rule.get("set", {}))
            if kind == "XLORA":
                # Mixes this bench's own LoRA adapters (the MiniLM LoRA seeds); the runner fills 'adapters'.
                entry["needs_experts"] = True
                entry["why"] = ("X-LoRA's classifier over the LoRA factors of this bench's three LoRA runs (frozen; their "
                                "heads are left out and X-LoRA trains its own). Not sized to the budget: the trainable part "
                                "is the scaling classifier plus the head (15,015); the three experts add 221,184 frozen "
                                "LoRA parameters" if task == "minilm" else
                                "X-LoRA's classifier over LoRA runs of seeds 0-2 (frozen experts; seeds 1 and 2 are "
                                "trained for this only). Not sized to the budget: the trainable part is the scaling classifier")
                entry["config"] = base
                plans.append(entry)
                continue
            key = rule.get("scale")
            candidates = []
            for value in (rule.get("values") or [None]) if key else [None]:
                config = dict(base)
                if key:
                    config[key] = value
                    if "target_r_ratio" in rule:
                        config["target_r"] = max(1, int(value * rule["target_r_ratio"]))
                count, error = _count(counting, config)
                if error:
                    log(f"  {kind} {key}={value}: {error}")
                candidates.append((value, count))
            best = _closest(candidates, budget)
            if best is None:
                entry["skipped"] = "no config in budget.json builds on this model"
                plans.append(entry)
                continue
            value, count = best
            config = dict(base)
            if key:
                config[key] = value
                if "target_r_ratio" in rule:
                    config["target_r"] = max(1, int(value * rule["target_r_ratio"]))
            entry.update(config=config, trainable=count, scale=(key, value) if key else None)
            plans.append(entry)
            log(f"  {kind:24s} {key or '-'}={value if key else '-'}  {count} trainable (budget {budget})")
    finally:
        model.close()
        if moe_model is not None:
            moe_model.close()
    return plans
