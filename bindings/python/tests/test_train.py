import numpy as np
import pytest

import graft
from conftest import LABELS, SENTENCES


def _batch(model):
    return [model.tokenize(s) for s in SENTENCES]


def _add(model):
    model.add_adapter("default", graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"]))


def test_steps_lower_the_loss(clf):
    _add(clf)
    ids = _batch(clf)
    logits = clf(ids, output="logits")
    assert logits.shape == (len(SENTENCES), 3)
    with graft.Trainer(clf, learning_rate=5e-3, warmup_steps=0, schedule="constant") as t:
        loss0, acc0 = t.evaluate(ids, labels=LABELS)
        losses = [t.step(ids, labels=LABELS) for _ in range(8)]
        loss1, acc1 = t.evaluate(ids, labels=LABELS)
    assert t.closed
    assert abs(losses[0] - loss0) < 1e-4
    assert loss1 < loss0 * 0.7 and acc1 >= acc0
    assert not np.allclose(clf(ids, output="logits"), logits)


def test_checkpoint_round_trip(clf, tmp_path):
    _add(clf)
    ids = _batch(clf)
    with graft.Trainer(clf, learning_rate=5e-3) as t:
        for _ in range(2):
            t.step(ids, labels=LABELS)
        t.save_checkpoint(tmp_path / "ckpt")
        saved = clf(ids, output="logits")
        next_loss = t.step(ids, labels=LABELS)
        t.load_checkpoint(tmp_path / "ckpt")
        assert np.array_equal(clf(ids, output="logits"), saved)
        assert t.step(ids, labels=LABELS) == pytest.approx(next_loss, abs=1e-6)
        with pytest.raises(graft.GraftError) as e:
            t.load_checkpoint(tmp_path / "nope")
        assert e.value.code == -5


def test_trainer_errors(clf, minilm_path):
    with pytest.raises(graft.GraftError) as e:
        graft.Trainer(clf)  # no adapter yet
    assert e.value.code == -7
    _add(clf)
    with pytest.raises(graft.GraftError, match="schedule"):
        graft.Trainer(clf, schedule="exponential")
    with pytest.raises(graft.GraftError, match="unknown key"):
        graft.Trainer(clf, extras={"bogus": 1})
    with pytest.raises(graft.GraftError) as e:
        graft.Trainer(clf, adapter="missing")
    assert e.value.code == -5
    with graft.Trainer(clf) as t:
        ids = _batch(clf)
        with pytest.raises(graft.GraftError):
            t.step(ids, labels=[7] * len(ids))  # class out of range
        with pytest.raises(graft.GraftError, match="labels"):
            t.step(ids, labels=[0])
        with pytest.raises(graft.GraftError) as e:
            t.train("/nonexistent/data.jsonl")
        assert e.value.code == -5
    with pytest.raises(graft.GraftError, match="closed"):
        t.step(ids, labels=LABELS)
    with graft.load_model(minilm_path) as base:
        base.add_adapter("default", graft.LoraConfig(target_modules=["query"]))
        with pytest.raises(graft.GraftError) as e:
            graft.Trainer(base)  # a bare BERT has no objective
        assert e.value.code == -4


def test_train_jsonl_with_callback_and_cancel(clf, tmp_path):
    _add(clf)
    data = tmp_path / "data.jsonl"
    import json
    data.write_text("".join(json.dumps({"text": s, "label": l}) + "\n" for s, l in zip(SENTENCES * 4, LABELS * 4)))
    seen = []
    with graft.Trainer(clf, batch_size=8, epochs=2, learning_rate=5e-3) as t:
        r = t.train(data, callback=lambda p: seen.append(p) and False)
        assert not r.cancelled and r.progress.step == len(seen) == 6 and r.progress.total_steps == 6
        assert all(isinstance(p, graft.Progress) and np.isfinite(p.loss) for p in seen)
    with graft.Trainer(clf, batch_size=8, epochs=2) as t:
        r = t.train(data, callback=lambda p: p.step >= 2)
        assert r.cancelled and r.progress.step == 2

    def boom(p):
        raise RuntimeError("stop from callback")

    with graft.Trainer(clf, batch_size=8) as t:
        with pytest.raises(RuntimeError, match="stop from callback"):
            t.train(data, callback=boom)


def test_train_tweets_steps(clf, tweets_path):
    _add(clf)
    with graft.Trainer(clf, total_steps=3, batch_size=8, extras={"max_examples": 64}) as t:
        r = t.train("tweets")
    assert not r.cancelled and r.progress.step == 3
