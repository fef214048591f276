"""Loads libgraft.so and declares the C ABI of include/graft.h for ctypes.

The library is looked up, in order, at $GRAFT_LIB, beside this package (graft/libgraft.so), and at
.build/release/libgraft.so of the repository checkout the package runs from.
"""
import ctypes
import os
from pathlib import Path

c_int32_p = ctypes.POINTER(ctypes.c_int32)
c_float_p = ctypes.POINTER(ctypes.c_float)
c_char_pp = ctypes.POINTER(ctypes.c_char_p)

TASK_BASE = 0  # graft_task; names for them (one vocabulary with the CLI and Lua) live in _tasks.py
TASK_SEQUENCE_CLASSIFICATION = 1
TASK_CAUSAL_LM = 2

OUTPUT_HIDDEN = 1
OUTPUT_LOGITS = 2


class ModelParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("num_threads", ctypes.c_int32),
        ("task", ctypes.c_int32),
        ("num_labels", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("compute_dtype", ctypes.c_int32),  # graft.h 0.3.0
        ("moe_base", ctypes.c_char_p),  # added in 0.6.0
    ]


#: graft_compute_dtype values by name.
COMPUTE_DTYPES = {"float32": 0, "bfloat16": 1, "auto": 2}


class SamplingParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("max_new_tokens", ctypes.c_int32),
        ("temperature", ctypes.c_float),
        ("top_p", ctypes.c_float),
        ("top_k", ctypes.c_int32),
        ("stop_at_eos", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("fast_decode", ctypes.c_int32),  # added in 0.5.0
    ]


class TrainerParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("learning_rate", ctypes.c_float),
        ("weight_decay", ctypes.c_float),
        ("warmup_steps", ctypes.c_int32),
        ("total_steps", ctypes.c_int32),
        ("schedule", ctypes.c_int32),
        ("optimizer", ctypes.c_int32),
        ("max_grad_norm", ctypes.c_float),
        ("gradient_accumulation_steps", ctypes.c_int32),
        ("batch_size", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("epochs", ctypes.c_int32),
        ("max_length", ctypes.c_int32),
    ]


class Progress(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_uint32),
        ("step", ctypes.c_int32),
        ("total_steps", ctypes.c_int32),
        ("epoch", ctypes.c_int32),
        ("loss", ctypes.c_float),
        ("learning_rate", ctypes.c_float),
        ("grad_norm", ctypes.c_float),
        ("mean_loss", ctypes.c_float),
        ("tokens_per_second", ctypes.c_double),
        ("elapsed_seconds", ctypes.c_double),
        ("eta_seconds", ctypes.c_double),
    ]


TOKEN_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int32, ctypes.c_char_p, ctypes.c_void_p)
PROGRESS_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(Progress), ctypes.c_void_p)


def _candidates():
    env = os.environ.get("GRAFT_LIB")
    if env:
        return [("$GRAFT_LIB", Path(env))]
    here = Path(__file__).resolve().parent
    found = [("beside the package", here / "libgraft.so")]
    checkout = here.parents[2]  # <repo>/bindings/python/graft when running from a checkout
    if (checkout / "include" / "graft.h").is_file():
        found.append(("in the repository checkout", checkout / ".build" / "release" / "libgraft.so"))
    return found


def _load():
    tried = []
    for where, path in _candidates():
        if path.is_file():
            try:
                return ctypes.CDLL(str(path)), path
            except OSError as e:  # present but not loadable (wrong architecture, missing OpenBLAS, ...)
                raise ImportError(f"graft: cannot load libgraft.so {where} at {path}: {e}") from e
        tried.append(f"{where} ({path})")
    raise ImportError(
        "graft: libgraft.so not found; looked " + ", ".join(tried)
        + ". Build it with `make lib` in the Graft repository and/or set GRAFT_LIB=/path/to/libgraft.so")


lib, path = _load()

_S = ctypes.c_int32  # graft_status
_P = ctypes.c_void_p  # opaque handles
_sigs = {
    "graft_version": (ctypes.c_uint32, []),
    "graft_version_string": (ctypes.c_char_p, []),
    "graft_status_string": (ctypes.c_char_p, [_S]),
    "graft_last_error": (ctypes.c_char_p, []),
    "graft_string_free": (None, [ctypes.c_void_p]),
    "graft_model_params_init_sized": (None, [ctypes.POINTER(ModelParams), ctypes.c_size_t]),
    "graft_model_load": (_S, [ctypes.c_char_p, ctypes.POINTER(ModelParams), ctypes.POINTER(_P)]),
    "graft_model_free": (None, [_P]),
    "graft_model_info": (_S, [_P, ctypes.POINTER(ctypes.c_void_p)]),
    "graft_tokenize": (_S, [_P, ctypes.c_char_p, ctypes.c_int, c_int32_p, ctypes.c_size_t,
                            ctypes.POINTER(ctypes.c_size_t)]),
    "graft_detokenize": (_S, [_P, c_int32_p, ctypes.c_size_t, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]),
    "graft_adapter_add": (_S, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "graft_adapter_load": (_S, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "graft_adapter_save": (_S, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "graft_adapter_list": (_S, [_P, ctypes.POINTER(ctypes.c_void_p)]),
    "graft_adapter_set_active": (_S, [_P, ctypes.c_char_p]),
    "graft_adapter_set_enabled": (_S, [_P, ctypes.c_int]),
    "graft_adapter_delete": (_S, [_P, ctypes.c_char_p]),
    "graft_adapter_merge": (_S, [_P, ctypes.c_char_p]),
    "graft_adapter_unmerge": (_S, [_P, ctypes.c_char_p]),
    "graft_model_forward": (_S, [_P, c_int32_p, c_int32_p, ctypes.c_int32, ctypes.c_int32, c_int32_p,
                                 ctypes.c_int32, c_float_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "graft_sampling_params_init_sized": (None, [ctypes.POINTER(SamplingParams), ctypes.c_size_t]),
    "graft_generate": (_S, [_P, c_int32_p, ctypes.c_size_t, ctypes.POINTER(SamplingParams), TOKEN_CALLBACK,
                            ctypes.c_void_p, c_int32_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]),
    "graft_trainer_params_init_sized": (None, [ctypes.POINTER(TrainerParams), ctypes.c_size_t]),
    "graft_trainer_create": (_S, [_P, ctypes.c_char_p, ctypes.POINTER(TrainerParams), ctypes.c_char_p,
                                  ctypes.POINTER(_P)]),
    "graft_trainer_free": (None, [_P]),
    "graft_trainer_step": (_S, [_P, c_int32_p, c_int32_p, ctypes.c_int32, ctypes.c_int32, c_int32_p, c_float_p]),
    "graft_trainer_evaluate": (_S, [_P, c_int32_p, c_int32_p, ctypes.c_int32, ctypes.c_int32, c_int32_p,
                                    c_float_p, c_float_p]),
    "graft_trainer_train_file": (_S, [_P, ctypes.c_char_p, PROGRESS_CALLBACK, ctypes.c_void_p]),
    "graft_trainer_save_checkpoint": (_S, [_P, ctypes.c_char_p]),
    "graft_trainer_load_checkpoint": (_S, [_P, ctypes.c_char_p]),
}

# Added in graft.h 0.2.0; declared when the loaded library has it (an older libgraft.so still loads, and the
# methods using these raise a GraftError saying the library is too old).
_sigs_since_0_2 = {
    # GRAFT_API graft_status graft_chat_template_apply(const graft_model *model, const char *user_message,
    #                                                  char **prompt);
    "graft_chat_template_apply": (_S, [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]),
    # GRAFT_API const char *graft_status_name(graft_status status);
    "graft_status_name": (ctypes.c_char_p, [_S]),
    # GRAFT_API graft_status graft_trainer_options(const graft_trainer *trainer, char **json);
    "graft_trainer_options": (_S, [_P, ctypes.POINTER(ctypes.c_void_p)]),
    # Added in 0.4.0. GRAFT_API graft_status graft_trainer_world(const graft_trainer *trainer, int32_t *rank,
    #                                                            int32_t *size);
    "graft_trainer_world": (_S, [_P, ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int32)]),
}
for _name, (_res, _args) in _sigs.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args
for _name, (_res, _args) in _sigs_since_0_2.items():
    if hasattr(lib, _name):
        _f = getattr(lib, _name)
        _f.restype = _res
        _f.argtypes = _args


# Status codes: graft.h's GRAFT_STATUS_MAP, read from the library (the one table behind GraftError, the C codes,
# graftd's wire codes and these constants). A library older than 0.2 has no graft_status_name: its nine codes.
_OLD_STATUS_NAMES = ["OK", "ERR_INVALID_ARGUMENT", "ERR_IO", "ERR_FORMAT", "ERR_UNSUPPORTED", "ERR_NOT_FOUND",
                     "ERR_OUT_OF_MEMORY", "ERR_STATE", "ERR_CANCELLED", "ERR_INTERNAL"]
STATUS_NAMES = {}
for _code in range(0, -64, -1):
    _status_name = (lib.graft_status_name(_code) or b"").decode() if hasattr(lib, "graft_status_name") else (
        _OLD_STATUS_NAMES[-_code] if -_code < len(_OLD_STATUS_NAMES) else "")
    if _status_name:
        STATUS_NAMES[_code] = _status_name
        globals()[_status_name] = _code


def take_string(ptr):
    """Decodes a library-owned `char *` returned through an out-parameter and releases it."""
    try:
        return ctypes.string_at(ptr.value).decode("utf-8") if ptr.value else ""
    finally:
        lib.graft_string_free(ptr)
