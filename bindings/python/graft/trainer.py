"""graft.Trainer: trains one adapter of a model (graft_trainer_*)."""
import ctypes
import json
import os
from dataclasses import dataclass

from . import _lib
from ._arrays import as_int32, ptr, token_batch
from ._handle import NativeHandle, locked
from ._lib import lib
from .errors import GraftError, check, invalid

_SCHEDULES = {"constant": 0, "linear": 1, "cosine": 2}
_OPTIMIZERS = {"adamw": 0, "sgd": 1}


@dataclass
class Progress:
    """What a train() callback sees after each optimizer step."""

    step: int
    total_steps: int
    epoch: int
    loss: float
    learning_rate: float
    grad_norm: float
    mean_loss: float
    tokens_per_second: float
    elapsed_seconds: float
    eta_seconds: float


@dataclass
class TrainResult:
    """The outcome of Trainer.train(): cancelled is True when the callback stopped it; progress is the last step."""

    cancelled: bool
    progress: "Progress | None"


class Trainer(NativeHandle):
    """Trains adapter `adapter` of `model` (made active). A context manager; close() frees it at once.

    The objective follows the model's task: class cross entropy for a sequence-classification model,
    next-token cross entropy for a Llama. Keyword arguments match graft_trainer_params (defaults in
    parentheses): learning_rate (1e-3), weight_decay (0.01), warmup_steps (0), total_steps (0 = epochs over the
    data in train(); no decay after warm-up in step()), schedule ("linear" | "constant" | "cosine"),
    optimizer ("adamw" | "sgd"), max_grad_norm (1.0, 0 = no clipping), gradient_accumulation_steps (1),
    batch_size (32), epochs (1), max_length (64), seed (42). `extras` is a dict of further settings: beta1,
    beta2, eps, momentum, shuffle, eval_batch_size, max_examples, init_batches (the batches an adapter added with
    init_lora_weights "eva", "lora_ga" or "corda" is initialized from before its first step; default 8).
    """

    _kind = "trainer"

    def __init__(self, model, adapter="default", learning_rate=None, weight_decay=None, warmup_steps=None,
                 total_steps=None, schedule="linear", optimizer="adamw", max_grad_norm=None,
                 gradient_accumulation_steps=None, batch_size=None, epochs=None, max_length=None, seed=None,
                 extras=None):
        where = "Trainer"
        if schedule not in _SCHEDULES:
            raise invalid(f"schedule must be one of {sorted(_SCHEDULES)}, got {schedule!r}", where)
        if optimizer not in _OPTIMIZERS:
            raise invalid(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}", where)
        p = _lib.TrainerParams()
        lib.graft_trainer_params_init_sized(ctypes.byref(p), ctypes.sizeof(p))
        p.schedule = _SCHEDULES[schedule]
        p.optimizer = _OPTIMIZERS[optimizer]
        for name, value, conv in [("learning_rate", learning_rate, float), ("weight_decay", weight_decay, float),
                                  ("warmup_steps", warmup_steps, int), ("total_steps", total_steps, int),
                                  ("max_grad_norm", max_grad_norm, float),
                                  ("gradient_accumulation_steps", gradient_accumulation_steps, int),
                                  ("batch_size", batch_size, int), ("epochs", epochs, int),
                                  ("max_length", max_length, int), ("seed", seed, int)]:
            if value is not None:
                try:
                    setattr(p, name, conv(value))
                except (TypeError, ValueError) as e:
                    raise invalid(f"{name}: {e}", where) from None
        extras_text = None
        if extras:
            try:
                extras_text = json.dumps(extras).encode()
            except (TypeError, ValueError) as e:
                raise invalid(f"extras is not JSON-serialisable: {e}", where) from None
        self.model = model
        self._lock = model._lock
        self._num_labels = model._info.get("num_labels")
        handle = ctypes.c_void_p()
        name = None if adapter is None else str(adapter).encode()
        with self._lock:
            check(lib.graft_trainer_create(model._h(where), name, ctypes.byref(p), extras_text,
                                           ctypes.byref(handle)), f"Trainer(adapter={adapter!r})")
        self._adopt(handle, lib.graft_trainer_free)

    @property
    def options(self):
        """The options the trainer runs with, after defaults: a dict with one key per option (graft_trainer_options;
        the same object graftd's jobs and `graft train` report)."""
        out = ctypes.c_void_p()
        with self._lock:
            check(lib.graft_trainer_options(self._h("options"), ctypes.byref(out)), "options")
        return json.loads(_lib.take_string(out))

    @property
    def world(self):
        """(rank, size) among data-parallel processes (graft_trainer_world): under Open MPI's mpirun every trainer
        sums gradients over the ranks, each rank passing its own share of every global batch to step();
        only rank 0 should save or report. (0, 1) outside mpirun."""
        if not hasattr(lib, "graft_trainer_world"):
            raise GraftError(_lib.ERR_UNSUPPORTED, f"libgraft.so {lib.graft_version_string().decode()} at "
                             f"{_lib.path} predates graft_trainer_world (0.4.0); rebuild it", "world")
        rank, size = ctypes.c_int32(), ctypes.c_int32()
        with self._lock:
            check(lib.graft_trainer_world(self._h("world"), ctypes.byref(rank), ctypes.byref(size)), "world")
        return rank.value, size.value

    def _batch(self, ids, lengths, labels, where):
        mat, lens = token_batch(ids, lengths, where)
        lab = None
        if labels is not None:
            lab = as_int32(labels, "labels", where)
            if lab.size not in (mat.shape[0], mat.size):
                raise invalid(f"labels needs {mat.shape[0]} entries (one class per row) or {mat.size} (per token), "
                              f"got {lab.size}", where)
        return mat, lens, lab

    @locked
    def step(self, ids, lengths=None, labels=None):
        """One training micro-batch (forward, backward, optimizer update); returns its mean loss (before the update).

        labels: one class index per row (sequence classification); for a causal LM None (every token scored) or
        [batch, stride] token labels with -100 = not scored.
        """
        where = "Trainer.step"
        mat, lens, lab = self._batch(ids, lengths, labels, where)
        loss = ctypes.c_float()
        check(lib.graft_trainer_step(self._h(where), ptr(mat), ptr(lens), mat.shape[0], mat.shape[1], ptr(lab),
                                     ctypes.byref(loss)), where)
        return float(loss.value)

    @locked
    def evaluate(self, ids, lengths=None, labels=None):
        """(mean loss, accuracy) over a batch without training; labels as for step()."""
        where = "Trainer.evaluate"
        mat, lens, lab = self._batch(ids, lengths, labels, where)
        loss, acc = ctypes.c_float(), ctypes.c_float()
        check(lib.graft_trainer_evaluate(self._h(where), ptr(mat), ptr(lens), mat.shape[0], mat.shape[1], ptr(lab),
                                         ctypes.byref(loss), ctypes.byref(acc)), where)
        return float(loss.value), float(acc.value)

    @locked
    def train(self, dataset, callback=None):
        """Trains over a dataset for `epochs` (or `total_steps`) with shuffling, packing and the schedule.

        dataset: a JSON Lines path ({"text", "label"} per line for classification; {"prompt", "completion"} or
            {"text"} for causal LM) or "tweets" (the sentiment corpus's demo training split).
        callback: None, or called with a Progress after each optimizer step; returning True stops training.
            An exception raised in it stops training and propagates.
        Returns:
            TrainResult(cancelled, progress): cancelled is True when the callback asked to stop (the trainer
            stays usable).
        """
        where = "Trainer.train"
        h = self._h(where)
        if not isinstance(dataset, (str, os.PathLike)):
            raise invalid(f"dataset must be a path or 'tweets', got {type(dataset).__name__}", where)
        last = [None]
        raised = []

        def on_progress(pp, _user):
            c = pp.contents
            last[0] = Progress(c.step, c.total_steps, c.epoch, c.loss, c.learning_rate, c.grad_norm, c.mean_loss,
                               c.tokens_per_second, c.elapsed_seconds, c.eta_seconds)
            if callback is None:
                return 0
            try:
                return 1 if callback(last[0]) else 0
            except BaseException as e:  # noqa: BLE001 — re-raised after the C call returns
                raised.append(e)
                return 1

        cb = _lib.PROGRESS_CALLBACK(on_progress)
        s = lib.graft_trainer_train_file(h, os.fsencode(dataset), cb, None)
        if raised:
            raise raised[0]
        if s == _lib.ERR_CANCELLED:
            return TrainResult(True, last[0])
        check(s, where)
        return TrainResult(False, last[0])

    @locked
    def save_checkpoint(self, directory):
        """Writes the adapter (PEFT format), optimizer state and trainer state to `directory`."""
        check(lib.graft_trainer_save_checkpoint(self._h("save_checkpoint"), os.fsencode(directory)),
              f"save_checkpoint({os.fspath(directory)!r})")

    @locked
    def load_checkpoint(self, directory):
        """Restores a checkpoint from save_checkpoint(), so training continues exactly where it stopped."""
        check(lib.graft_trainer_load_checkpoint(self._h("load_checkpoint"), os.fsencode(directory)),
              f"load_checkpoint({os.fspath(directory)!r})")

    def __repr__(self):
        return f"<graft.Trainer {'closed' if self.closed else 'open'}>"

