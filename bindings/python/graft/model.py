"""graft.Model: a loaded model with its tokenizer and named adapters (graft_model_* and graft_adapter_*)."""
import ctypes
import json
import os
import threading

import numpy as np

from . import _lib, _tasks
from ._arrays import as_int32, ptr, token_batch
from ._handle import NativeHandle, locked
from ._lib import lib
from .combine import AdapterCombinationMixin
from .config import PeftConfig
from .errors import GraftError, check, invalid

_OUTPUTS = {"hidden": _lib.OUTPUT_HIDDEN, "logits": _lib.OUTPUT_LOGITS}


def _enc(s, what, where):
    if not isinstance(s, (str, os.PathLike)):
        raise invalid(f"{what} must be a string, got {type(s).__name__}", where)
    return os.fsencode(s) if isinstance(s, os.PathLike) else s.encode("utf-8")


def load_model(path, task=None, num_labels=None, threads=None, seed=0, compute_dtype="float32", moe_base=None):
    """Loads a model: a transformers BERT directory or a Llama GGUF file, or an asset name.

    Args:
        path: model directory (config.json, model.safetensors, vocab.txt) or .gguf file, or one of the asset
            names the CLI and graftd accept: "minilm" or "smollm2" (the models scripts/fetch-assets caches in
            ${GRAFT_HOME:-~/.cache/graft}; resolved by the library, see graft_model_load in graft.h).
        task: None/"base" (bare model), "seq-cls" (BERT with a fresh `classifier` head; list "classifier" in
            modules_to_save to train it) or "causal-lm" (Llama). The CLI's spellings and these are one
            vocabulary: "seq_cls", "sequence_classification", "causal_lm" and PEFT's task_type spellings
            ("SEQ_CLS", "CAUSAL_LM") work too.
        num_labels: classes of the classification head (default 2).
        threads: worker threads for all Graft work in the process (default: $GRAFT_NUM_THREADS, else all cores).
        seed: seed of the classification head's initialisation.
        compute_dtype: "float32" (exact, the default), "bfloat16" (frozen weights multiplied in bfloat16 with
            float32 accumulation: about twice as fast on CPUs with AVX-512 BF16) or "auto" (bfloat16 where the CPU
            has it). Adapters and trainable weights always stay float32.
        moe_base: a directory `graft moefy --output` wrote: the Llama decoder is made that MoE base, for the
            adapters that tune an MoE base's experts ("ESFT", "PERFT", "MOE_PLORA"); `info()["moe_base"]` then
            describes it. None (the default) keeps the dense model.
    Returns:
        a Model; close it (or use `with`) to free it now, else it is freed when garbage-collected.
    Raises:
        GraftError: missing path (code -5), malformed files, an unsupported architecture/task, bad arguments.
    """
    number = _tasks.task_number(task)
    if number is None:
        raise invalid(f"unknown task {task!r} (known: {_tasks.known()})", "load_model")
    params = _lib.ModelParams()
    lib.graft_model_params_init_sized(ctypes.byref(params), ctypes.sizeof(params))
    params.task = number
    if num_labels is not None:
        params.num_labels = int(num_labels)
    if threads is not None:
        params.num_threads = int(threads)
    params.seed = int(seed)
    if compute_dtype not in _lib.COMPUTE_DTYPES:
        raise invalid(f"compute_dtype must be one of {sorted(_lib.COMPUTE_DTYPES)}, got {compute_dtype!r}", "load_model")
    params.compute_dtype = _lib.COMPUTE_DTYPES[compute_dtype]
    if moe_base is not None:
        params.moe_base = _enc(moe_base, "moe_base", "load_model")
    handle = ctypes.c_void_p()
    check(lib.graft_model_load(_enc(path, "path", "load_model"), ctypes.byref(params), ctypes.byref(handle)),
          f"load_model({os.fspath(path)!r})")
    return Model(handle)


class Model(NativeHandle, AdapterCombinationMixin):
    """A loaded model. Create with graft.load_model(). A context manager; close() frees it at once.

    Calls on one model (and its trainers) are serialised by a lock, so sharing it between threads is safe.
    """

    _kind = "model"

    def __init__(self, handle):
        self._lock = threading.RLock()
        self._adopt(handle, lib.graft_model_free)
        self._info = self.info()

    # -- lifetime: close() frees the model now; trainers created from it stay usable (NativeHandle) ----------

    # -- description -----------------------------------------------------------------------------------------
    @locked
    def info(self):
        """The model's description (graft_model_info) as a dict: architecture, task, sizes, module tree."""
        out = ctypes.c_void_p()
        check(lib.graft_model_info(self._h("info"), ctypes.byref(out)), "info")
        return json.loads(_lib.take_string(out))

    @property
    def architecture(self):
        """"bert" or "llama"."""
        return self._info["architecture"]

    @property
    def task(self):
        """"base", "sequence_classification" or "causal_lm"."""
        return self._info["task"]

    @property
    def id2label(self):
        """Class names by index ({0: "negative", ...}, transformers' id2label) of a sequence classifier, or None
        until data with string labels or a loaded adapter's labels.json names them."""
        names = self.info().get("id2label")
        return None if names is None else {int(k): v for k, v in names.items()}

    @property
    def label2id(self):
        """The inverse of id2label ({"negative": 0, ...}), or None."""
        names = self.id2label
        return None if names is None else {v: k for k, v in names.items()}

    # -- tokenizer -------------------------------------------------------------------------------------------
    @locked
    def tokenize(self, text, add_special_tokens=True):
        """Token ids (list of int) of UTF-8 `text`; add_special_tokens adds the model's template ([CLS] ... [SEP])."""
        h = self._h("tokenize")
        data = _enc(text, "text", "tokenize")
        n = ctypes.c_size_t()
        cap = len(data) + 8
        buf = (ctypes.c_int32 * cap)()
        s = lib.graft_tokenize(h, data, int(bool(add_special_tokens)), buf, cap, ctypes.byref(n))
        if s == _lib.ERR_INVALID_ARGUMENT and n.value > cap:
            cap = n.value
            buf = (ctypes.c_int32 * cap)()
            s = lib.graft_tokenize(h, data, int(bool(add_special_tokens)), buf, cap, ctypes.byref(n))
        check(s, "tokenize")
        return list(buf[: n.value])

    @locked
    def decode(self, ids, skip_special_tokens=False):
        """The text of token ids (ids outside the vocabulary are skipped)."""
        arr = as_int32(np.asarray(ids).reshape(-1) if not isinstance(ids, np.ndarray) else ids.reshape(-1),
                       "ids", "decode")
        out = ctypes.c_void_p()
        check(lib.graft_detokenize(self._h("decode"), ptr(arr), arr.size, int(bool(skip_special_tokens)),
                                   ctypes.byref(out)), "decode")
        return _lib.take_string(out)

    # -- adapters --------------------------------------------------------------------------------------------
    @locked
    def add_adapter(self, name, config):
        """Attaches a new adapter and makes it active.

        `config` is a PEFT-style config object (graft.LoraConfig(...), ...), a dict in adapter_config.json's
        shape ({"peft_type": "LORA", "r": 8, ...}) or that JSON as a string.
        """
        if isinstance(config, PeftConfig):
            text = json.dumps(config.to_dict())
        elif isinstance(config, dict):
            try:
                text = json.dumps(config)
            except (TypeError, ValueError) as e:
                raise invalid(f"config is not JSON-serialisable: {e}", "add_adapter") from None
        elif isinstance(config, str):
            text = config
        else:
            raise invalid(f"config must be a PeftConfig, dict or JSON string, got {type(config).__name__}",
                          "add_adapter")
        check(lib.graft_adapter_add(self._h("add_adapter"), _enc(name, "name", "add_adapter"), text.encode()),
              f"add_adapter({name!r})")

    @locked
    def load_adapter(self, peft_dir, name="default"):
        """Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) as `name`, active."""
        check(lib.graft_adapter_load(self._h("load_adapter"), _enc(peft_dir, "peft_dir", "load_adapter"),
                                     _enc(name, "name", "load_adapter")), f"load_adapter({os.fspath(peft_dir)!r})")

    @locked
    def save_adapter(self, directory, name=None):
        """Saves adapter `name` (default: the active one) in PEFT's format to `directory` (created if missing)."""
        if name is None:
            name = self.active_adapter
            if name is None:
                raise GraftError(_lib.ERR_NOT_FOUND, "the model has no adapter to save", "save_adapter")
        check(lib.graft_adapter_save(self._h("save_adapter"), _enc(name, "name", "save_adapter"),
                                     _enc(directory, "directory", "save_adapter")), f"save_adapter({name!r})")

    @locked
    def list_adapters(self):
        """{"active": name|None, "enabled": bool, "adapters": [{"id", "name", "peft_type", "active", "merged",
        "layers", "trainable_parameters", "config"}, ...]}."""
        out = ctypes.c_void_p()
        check(lib.graft_adapter_list(self._h("list_adapters"), ctypes.byref(out)), "list_adapters")
        return json.loads(_lib.take_string(out))

    @property
    def active_adapter(self):
        """The active adapter's name, or None."""
        return self.list_adapters()["active"]

    @locked
    def set_adapter(self, name):
        """Makes adapter `name` the one forward passes, generation and training use."""
        check(lib.graft_adapter_set_active(self._h("set_adapter"), _enc(name, "name", "set_adapter")),
              f"set_adapter({name!r})")

    @locked
    def enable_adapters(self):
        """Turns the active adapter back on after disable_adapters()."""
        check(lib.graft_adapter_set_enabled(self._h("enable_adapters"), 1), "enable_adapters")

    @locked
    def disable_adapters(self):
        """Forward passes see the base model until enable_adapters() (merged adapters stay in the weights)."""
        check(lib.graft_adapter_set_enabled(self._h("disable_adapters"), 0), "disable_adapters")

    @locked
    def delete_adapter(self, name):
        """Detaches and forgets adapter `name`."""
        check(lib.graft_adapter_delete(self._h("delete_adapter"), _enc(name, "name", "delete_adapter")),
              f"delete_adapter({name!r})")

    @locked
    def merge_adapter(self, name=None):
        """Adds adapter `name`'s (default: active) weight delta into the base weights. Reversible."""
        name = self.active_adapter if name is None else name
        check(lib.graft_adapter_merge(self._h("merge_adapter"), _enc(name, "name", "merge_adapter")),
              f"merge_adapter({name!r})")

    @locked
    def unmerge_adapter(self, name=None):
        """Subtracts a merged adapter's delta from the base weights again."""
        name = self.active_adapter if name is None else name
        check(lib.graft_adapter_unmerge(self._h("unmerge_adapter"), _enc(name, "name", "unmerge_adapter")),
              f"unmerge_adapter({name!r})")

    # -- inference -------------------------------------------------------------------------------------------
    def _output_shape(self, output, batch, stride):
        info = self._info
        if output == "hidden":
            return (batch, stride, info["hidden_size"])
        if info["task"] == "sequence_classification":
            return (batch, info["num_labels"])
        return (batch, stride, info["vocab_size"])

    @locked
    def __call__(self, ids, lengths=None, adapter_ids=None, output="hidden", out=None):
        """Runs a batch without gradients (graft_model_forward) and returns a float32 numpy array.

        Args:
            ids: a 2-D int array [batch, stride] (a C-contiguous int32 array is read in place, without a copy),
                a list of token lists (padded; lengths taken from the rows), or texts: a list of strings (or one
                string) tokenized with the model's tokenizer and special tokens (BERT: [CLS] ... [SEP]) and
                padded, as graft.remote does.
            lengths: real tokens per row (1..stride); None = full rows (or the list rows' lengths). Not with
                texts.
            adapter_ids: None (current adapter state) or one entry per row: an adapter id or name, or
                -1/None for the base model.
            output: "hidden" -> [batch, stride, hidden_size]; "logits" -> [batch, num_labels] for sequence
                classification, [batch, stride, vocab_size] for Llama. Padding positions are 0.
            out: optional C-contiguous float32 array of that shape to write into (returned, no copy).
        """
        where = "forward"
        if output not in _OUTPUTS:
            raise invalid(f"output must be 'hidden' or 'logits', got {output!r}", where)
        h = self._h(where)
        ids = self._texts_to_ids(ids, lengths, where)
        mat, lens = token_batch(ids, lengths, where)
        batch, stride = mat.shape
        aids = None
        if adapter_ids is not None:
            if len(adapter_ids) != batch:
                raise invalid(f"adapter_ids needs one entry per row ({batch}), got {len(adapter_ids)}", where)
            names = None
            resolved = []
            for a in adapter_ids:
                if a is None:
                    resolved.append(-1)
                elif isinstance(a, str):
                    if names is None:
                        names = {x["name"]: x["id"] for x in self.list_adapters()["adapters"]}
                    if a not in names:
                        raise GraftError(_lib.ERR_NOT_FOUND, f"no adapter named {a!r} (have: {sorted(names)})",
                                         where)
                    resolved.append(names[a])
                else:
                    resolved.append(a)
            aids = as_int32(resolved, "adapter_ids", where)
        shape = self._output_shape(output, batch, stride)
        if out is None:
            out = np.empty(shape, dtype=np.float32)
        elif not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.flags.c_contiguous
                  and out.flags.writeable and out.shape == shape):
            raise invalid(f"out must be a writeable C-contiguous float32 array of shape {shape}", where)
        count = ctypes.c_size_t()
        check(lib.graft_model_forward(h, ptr(mat), ptr(lens), batch, stride, ptr(aids), _OUTPUTS[output],
                                      out.ctypes.data_as(_lib.c_float_p), out.size, ctypes.byref(count)), where)
        if count.value != out.size:
            raise GraftError(_lib.ERR_INTERNAL, f"expected {out.size} floats, the library wrote {count.value}", where)
        return out

    forward = __call__

    def _texts_to_ids(self, inputs, lengths, where):
        """`inputs` with every text replaced by its token ids (special tokens added); other inputs unchanged."""
        if isinstance(inputs, str):
            inputs = [inputs]
        elif not isinstance(inputs, (list, tuple)) or not any(isinstance(x, str) for x in inputs):
            return inputs
        if not all(isinstance(x, str) for x in inputs):
            raise invalid("ids mixes texts and token lists; give one kind", where)
        if lengths is not None:
            raise invalid("lengths is only for token ids; texts are measured by their tokens", where)
        rows = [self.tokenize(text, add_special_tokens=True) for text in inputs]
        for i, row in enumerate(rows):
            if not row:
                raise invalid(f"text {i} ({inputs[i]!r}) has no tokens", where)
        return rows

    # -- generation ------------------------------------------------------------------------------------------
    @locked
    def apply_chat_template(self, message):
        """`message` as the user turn of the model's chat template (graft_chat_template_apply): the prompt text
        `graft generate` sends by default (ChatML for the supported decoders). Tokenize it without special
        tokens added; generate(message, chat=True) does both."""
        where = "apply_chat_template"
        h = self._h(where)
        if not hasattr(lib, "graft_chat_template_apply"):
            raise GraftError(_lib.ERR_UNSUPPORTED, f"libgraft.so {_lib.lib.graft_version_string().decode()} at "
                             f"{_lib.path} predates graft_chat_template_apply (0.2.0); rebuild it", where)
        out = ctypes.c_void_p()
        check(lib.graft_chat_template_apply(h, _enc(message, "message", where), ctypes.byref(out)), where)
        return _lib.take_string(out)

    @locked
    def generate(self, prompt, max_new_tokens=128, temperature=0.0, top_p=1.0, top_k=0, seed=0,
                 stop_at_eos=True, callback=None, chat=False, fast_decode=False):
        """Generates a continuation (Llama models) with the active adapter; returns the new token ids.

        Args:
            prompt: token ids, or text (tokenized without special tokens added).
            chat: wrap a text prompt in the model's chat template first (apply_chat_template), as
                `graft generate` does unless --raw and graft.remote does with chat=True. Use it to ask an
                instruct model a question; leave it off for raw completion prompts.
            temperature: 0 = greedy. top_p, top_k, seed: sampling controls.
            stop_at_eos: stop at end-of-sequence / end-of-turn tokens (not returned).
            fast_decode: the fast mode: decoding steps multiply int8-quantized activations with a GGUF base's
                Q4_1 / Q8_0 weights (integer dot products, as llama.cpp); logits deviate slightly from the
                default exact mode.
            callback: None, or called as callback(token_id, text_piece) for each new token; returning True stops.
                An exception raised in it stops generation and propagates.
        """
        where = "generate"
        h = self._h(where)
        if isinstance(prompt, str):
            if chat:
                prompt = self.apply_chat_template(prompt)
            elif not prompt:
                raise invalid("the prompt is empty", where)
            prompt = self.tokenize(prompt, add_special_tokens=False)
        elif chat:
            raise invalid("chat=True needs a text prompt, not token ids", where)
        p = as_int32(np.asarray(prompt).reshape(-1) if not isinstance(prompt, np.ndarray) else prompt.reshape(-1),
                     "prompt", where)
        if p.size == 0:
            raise invalid("the prompt is empty", where)
        if int(max_new_tokens) < 0:
            raise invalid(f"max_new_tokens must be >= 0, got {max_new_tokens}", where)
        sp = _lib.SamplingParams()
        lib.graft_sampling_params_init_sized(ctypes.byref(sp), ctypes.sizeof(sp))
        sp.max_new_tokens = int(max_new_tokens)
        sp.temperature = float(temperature)
        sp.top_p = float(top_p)
        sp.top_k = int(top_k)
        sp.stop_at_eos = int(bool(stop_at_eos))
        sp.seed = int(seed)
        sp.fast_decode = int(bool(fast_decode))
        raised = []

        def on_token(token, piece, _user):
            try:
                return 1 if callback(int(token), (piece or b"").decode("utf-8", "replace")) else 0
            except BaseException as e:  # noqa: BLE001 — re-raised after the C call returns
                raised.append(e)
                return 1

        cb = _lib.TOKEN_CALLBACK(on_token) if callback is not None else _lib.TOKEN_CALLBACK()
        cap = max(1, int(max_new_tokens))
        buf = (ctypes.c_int32 * cap)()
        n = ctypes.c_size_t()
        s = lib.graft_generate(h, ptr(p), p.size, ctypes.byref(sp), cb, None, buf, cap, ctypes.byref(n))
        if raised:
            raise raised[0]
        check(s, where)
        return list(buf[: n.value])

    def generate_text(self, prompt, **kwargs):
        """generate() returning the decoded text of the new tokens (special tokens left out); "" when the model
        ends the sequence at once. Pass chat=True to ask an instruct model a question:
        model.generate_text("What is the capital of France?", chat=True)."""
        return self.decode(self.generate(prompt, **kwargs), skip_special_tokens=True)

    def __repr__(self):
        state = "closed" if self.closed else f"{self._info['architecture']}, {self._info['task']}"
        return f"<graft.Model {state}>"
