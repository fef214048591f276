"""JSON numbers 0 and 1 are numbers, true/false are booleans, through the C ABI's JSON inputs (issue 11, item
11): on Linux JSONSerialization's NSNumbers for 0 and 1 also cast to Bool, so `extras={"momentum": 0}` was
rejected as "must be a number, got 0" and SGD without momentum was unreachable from Python."""
import pytest

import graft
from conftest import LABELS, SENTENCES


def _lora(model, **extra):
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["query", "value"],
              "modules_to_save": ["classifier"]}
    config.update(extra)
    model.add_adapter("default", config)


@pytest.mark.parametrize("momentum", [0, 0.0, 0.5])
def test_sgd_with_momentum_zero_trains(clf, momentum):
    _lora(clf)
    ids = [clf.tokenize(s) for s in SENTENCES]
    with graft.Trainer(clf, optimizer="sgd", learning_rate=0.5, schedule="constant",
                       extras={"momentum": momentum}) as t:
        loss0, _ = t.evaluate(ids, labels=LABELS)
        for _ in range(6):
            t.step(ids, labels=LABELS)
        loss1, _ = t.evaluate(ids, labels=LABELS)
    assert loss1 < loss0


def test_extras_tell_numbers_from_booleans(clf):
    _lora(clf)
    # 1 is a number: momentum 1 fails on its range, not on its type.
    with pytest.raises(graft.GraftError, match=r"momentum must be in \[0, 1\), got 1"):
        graft.Trainer(clf, optimizer="sgd", extras={"momentum": 1})
    for flag in (True, False):
        with pytest.raises(graft.GraftError, match=f"'momentum' must be a number, got {str(flag).lower()}$"):
            graft.Trainer(clf, optimizer="sgd", extras={"momentum": flag})
    with pytest.raises(graft.GraftError, match="'eval_batch_size' must be an integer, got true$"):
        graft.Trainer(clf, extras={"eval_batch_size": True})
    with pytest.raises(graft.GraftError, match="'eval_batch_size' must be an integer, got 2.5$"):
        graft.Trainer(clf, extras={"eval_batch_size": 2.5})
    # Booleans are accepted where a boolean is required, and 0/1 are not booleans.
    for flag in (True, False):
        graft.Trainer(clf, extras={"shuffle": flag, "eval_batch_size": 1, "max_examples": 1}).close()
    for number in (0, 1):
        with pytest.raises(graft.GraftError, match=f"'shuffle' must be true or false, got {number}$"):
            graft.Trainer(clf, extras={"shuffle": number})


def test_adapter_config_tells_numbers_from_booleans(clf):
    _lora(clf, lora_dropout=0, use_rslora=False, use_dora=False)  # 0 a number, false a boolean: both fine
    clf.delete_adapter("default")
    for key, value, message in [("use_rslora", 0, "'use_rslora' must be true or false, got 0$"),
                                ("use_dora", 1, "'use_dora' must be true or false, got 1$"),
                                ("r", True, "'r' must be an integer, got true$"),
                                ("lora_dropout", False, "'lora_dropout' must be a number, got false$")]:
        with pytest.raises(graft.GraftError, match=message):
            _lora(clf, **{key: value})
