"""Model.add_weighted_adapter (PEFT's LoRA combination, graft_adapter_combine, with PEFT's signature) and
Model.save_merged_model (PEFT's merge_and_unload + save_pretrained, graft_model_save_merged)."""
import ctypes
import json
import numbers
import os

from . import _lib
from ._handle import locked
from ._lib import lib
from .errors import GraftError, check, invalid

# graft_adapter_combine and graft_model_save_merged were added in graft.h 0.3.0; declared when the library has them.
if hasattr(lib, "graft_adapter_combine"):
    # GRAFT_API graft_status graft_adapter_combine(graft_model *model, const char *name, const char *const *adapters,
    #     const double *weights, size_t count, const char *options_json, char **report_json);
    # GRAFT_API graft_status graft_model_save_merged(graft_model *model, const char *adapter, const char *directory);
    lib.graft_model_save_merged.restype = ctypes.c_int32
    lib.graft_model_save_merged.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.graft_adapter_combine.restype = ctypes.c_int32
    lib.graft_adapter_combine.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p),
                                          ctypes.POINTER(ctypes.c_double), ctypes.c_size_t, ctypes.c_char_p,
                                          ctypes.POINTER(ctypes.c_void_p)]
if hasattr(lib, "graft_adapter_compress"):  # graft.h 0.4.0
    # GRAFT_API graft_status graft_adapter_compress(graft_model *model, const char *name, const char *method,
    #     const char *directory, const char *options_json, char **report_json);
    lib.graft_adapter_compress.restype = ctypes.c_int32
    lib.graft_adapter_compress.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_char_p, ctypes.POINTER(ctypes.c_void_p)]


def _name(value, what, where):
    if not isinstance(value, str):
        raise invalid(f"{what} must be a string, got {type(value).__name__}", where)
    return value.encode("utf-8")


class AdapterCombinationMixin:
    """Model's adapter combination and merged-model saving (mixed into graft.Model)."""

    @locked
    def add_weighted_adapter(self, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                             svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                             majority_sign_method="total", seed=0):
        """Combines LoRA adapters into a new adapter `adapter_name`, as PEFT's LoraModel.add_weighted_adapter.

        Arguments as PEFT's: `adapters` (names) and `weights` (one each; negative weights subtract);
        `combination_type` one of svd (default), linear, cat, ties, ties_svd, dare_linear, dare_ties,
        dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd, or Graft's copa; `svd_rank` (default: the largest
        source rank); `svd_clamp` (a quantile; default none); `density` (required by the pruning types);
        `majority_sign_method` "total" or "frequency". `svd_full_matrices` and `svd_driver` do not change the
        result. Graft's `seed` fixes DARE's random masks.

        The new adapter is attached but not activated (call set_adapter), as in PEFT. Unlike PEFT, a name in
        use raises instead of silently doing nothing. Returns {"name", "combination_type", "r",
        "kept_fraction"} (DARE's kept share of entries, else None).
        """
        where = "add_weighted_adapter"
        h = self._h(where)
        if not hasattr(lib, "graft_adapter_combine"):
            raise GraftError(_lib.ERR_UNSUPPORTED, f"libgraft.so {lib.graft_version_string().decode()} at "
                             f"{_lib.path} predates graft_adapter_combine (0.3.0); rebuild it", where)
        if isinstance(adapters, (str, bytes)) or not hasattr(adapters, "__len__"):
            raise invalid(f"adapters must be a list of adapter names, got {type(adapters).__name__}", where)
        if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
            raise invalid(f"weights must be a list of numbers, got {type(weights).__name__}", where)
        names = [_name(a, f"adapters[{i}]", where) for i, a in enumerate(adapters)]
        values = []
        for i, w in enumerate(weights):
            if isinstance(w, bool) or not isinstance(w, numbers.Real):
                raise invalid(f"weights[{i}] must be a number, got {type(w).__name__}", where)
            values.append(float(w))
        if len(names) != len(values):
            raise invalid(f"weights: {len(values)} weights for {len(names)} adapters", where)
        options = {"combination_type": combination_type, "svd_rank": svd_rank, "svd_clamp": svd_clamp,
                   "svd_full_matrices": svd_full_matrices, "svd_driver": svd_driver, "density": density,
                   "majority_sign_method": majority_sign_method, "seed": seed}
        try:
            # allow_nan=False: a NaN option is named by the library's check rather than sent as invalid JSON.
            text = json.dumps(options, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise invalid(f"the options are not JSON numbers and strings: {e}", where) from None
        c_names = (ctypes.c_char_p * max(len(names), 1))(*names)
        c_weights = (ctypes.c_double * max(len(values), 1))(*values)
        out = ctypes.c_void_p()
        check(lib.graft_adapter_combine(h, _name(adapter_name, "adapter_name", where), c_names, c_weights,
                                        len(names), text.encode(), ctypes.byref(out)),
              f"{where}({adapter_name!r})")
        return json.loads(_lib.take_string(out))

    @locked
    def compress_adapter(self, adapter_name, directory, method="compeft", density=None, alpha=None):
        """Writes adapter `adapter_name` compressed to `directory` (graft_adapter_compress): `method` "compeft"
        (each tensor's top `density` entries, default 0.1, stored as alpha·σ·sign) or "onebit" (sign bits and a
        scale per row group; takes no density or alpha). load_adapter(directory, name) reads it back as a working
        adapter. Returns {"method", "file_bytes", "float32_bytes", "packed_bytes", "kept_fraction"}."""
        where = "compress_adapter"
        h = self._h(where)
        if not hasattr(lib, "graft_adapter_compress"):
            raise GraftError(_lib.ERR_UNSUPPORTED, f"libgraft.so {lib.graft_version_string().decode()} at "
                             f"{_lib.path} predates graft_adapter_compress; rebuild it", where)
        if not isinstance(directory, (str, os.PathLike)):
            raise invalid(f"directory must be a path, got {type(directory).__name__}", where)
        options = {k: v for k, v in (("density", density), ("alpha", alpha)) if v is not None}
        try:
            text = json.dumps(options, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise invalid(f"density and alpha must be numbers: {e}", where) from None
        out = ctypes.c_void_p()
        check(lib.graft_adapter_compress(h, _name(adapter_name, "adapter_name", where), _name(method, "method", where),
                                         os.fsencode(directory), text.encode(), ctypes.byref(out)),
              f"{where}({adapter_name!r})")
        return json.loads(_lib.take_string(out))

    @locked
    def save_merged_model(self, directory, adapter=None):
        """PEFT's merge_and_unload() then save_pretrained(directory): merges `adapter` (default: the active one)
        into the base weights, removes it, and writes the plain model (model.safetensors with transformers' names,
        the source's config and tokenizer files; for Llama a copy of the .gguf with the merged tensors re-encoded
        in their type) that graft.load_model, transformers and llama.cpp load."""
        where = "save_merged_model"
        h = self._h(where)
        if not hasattr(lib, "graft_model_save_merged"):
            raise GraftError(_lib.ERR_UNSUPPORTED, f"libgraft.so {lib.graft_version_string().decode()} at "
                             f"{_lib.path} predates graft_model_save_merged (0.3.0); rebuild it", where)
        if adapter is None:
            adapter = self.active_adapter
            if adapter is None:
                raise GraftError(_lib.ERR_NOT_FOUND, "the model has no adapter to merge", where)
        if not isinstance(directory, (str, os.PathLike)):
            raise invalid(f"directory must be a path, got {type(directory).__name__}", where)
        check(lib.graft_model_save_merged(h, _name(adapter, "adapter", where), os.fsencode(directory)),
              f"{where}({adapter!r})")
