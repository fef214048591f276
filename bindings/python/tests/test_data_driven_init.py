"""EVA and LoRA-GA through the Python binding: an added adapter is initialized from the first training batches
before step 1 (train() and step() alike); a loaded adapter keeps its weights."""
import numpy as np

import graft
from conftest import LABELS, SENTENCES
from test_combine import read_safetensors

# A negligible step: what is saved is the initialization itself.
STILL = dict(learning_rate=1e-9, weight_decay=0.0, total_steps=1, batch_size=16)


def _config(init):
    return graft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=init)


def _lora(path):
    tensors = read_safetensors(path / "adapter_model.safetensors")
    keys = sorted(k for k in tensors if k.endswith("lora_A.weight"))
    return [(tensors[k].astype(np.float64), tensors[k.replace("lora_A", "lora_B")].astype(np.float64)) for k in keys]


def _orthonormality_gap(a):
    return float(np.abs(a @ a.T - np.eye(a.shape[0])).max())


def test_eva_from_train_and_a_loaded_adapter_is_kept(clf, minilm_path, tmp_path):
    clf.add_adapter("default", _config("eva"))
    with graft.Trainer(clf, extras={"max_examples": 96, "init_batches": 3}, **STILL) as t:
        assert t.options["init_batches"] == 3
        t.train("tweets")
    clf.save_adapter(tmp_path / "eva")
    factors = _lora(tmp_path / "eva")
    assert len(factors) == 12
    assert max(_orthonormality_gap(a) for a, _ in factors) < 1e-4  # principal components, not a random A
    assert max(float(np.abs(b).max()) for _, b in factors) < 1e-6

    # Loaded into a fresh model and trained: no second initialization replaces the file's A.
    with graft.load_model(minilm_path, task="seq_cls", num_labels=3) as fresh:
        fresh.load_adapter(tmp_path / "eva")
        with graft.Trainer(fresh, extras={"max_examples": 96}, **STILL) as t:
            t.train("tweets")
        fresh.save_adapter(tmp_path / "again")
    again = _lora(tmp_path / "again")
    assert max(float(np.abs(a - a2).max()) for (a, _), (a2, _) in zip(factors, again)) < 1e-6


def test_lora_ga_from_step(clf, tmp_path):
    clf.add_adapter("default", _config("lora_ga"))
    ids = [clf.tokenize(s) for s in SENTENCES]
    with graft.Trainer(clf, **STILL) as t:
        t.step(ids, labels=LABELS)
    clf.save_adapter(tmp_path / "ga")
    # PEFT's converted form: rank 2r, A = [A; A0] with orthonormal gradient directions, B = [B, -B0], B not zero.
    for a, b in _lora(tmp_path / "ga"):
        assert a.shape[0] == 8 and _orthonormality_gap(a[:4]) < 1e-4
        assert np.abs(b[:, :4] + b[:, 4:]).max() < 1e-6 and np.abs(b).max() > 1e-6
