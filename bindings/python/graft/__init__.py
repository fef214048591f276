"""Graft: parameter-efficient fine-tuning (LoRA, DoRA, IA³, LoHa, LoKr, VeRA, ...) from Python.

A ctypes binding of libgraft.so's C ABI (include/graft.h) with a PEFT-shaped API:

    import graft
    with graft.load_model("minilm", task="seq-cls", num_labels=3) as model:   # an asset name or a path
        model.add_adapter("default", graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
        with graft.Trainer(model, total_steps=10) as trainer:
            trainer.train("tweets")
        model.save_adapter("out/lora")

libgraft.so is found through $GRAFT_LIB, else beside this package, else in the checkout's .build/release.
graft.remote (a client of the graftd daemon) works without it.
"""
from . import peft_configs as _peft_configs
from .config import AdapterConfig, PeftConfig
from .peft_configs import *  # noqa: F401,F403  (LoraConfig, GloraConfig, ...: PEFT's config classes)

# What needs libgraft.so; without it these names raise an ImportError that says so.
_NATIVE = {"GraftError", "Model", "Progress", "TrainResult", "Trainer", "load_model", "__version__",
           "version_number", "library_path"}

try:
    from . import _lib
except ImportError as _error:  # no libgraft.so here: only graft.remote (and the configs) are usable
    _native_error = _error

    def __getattr__(name):
        # Only the native API fails loudly. Any other name (a submodule such as graft_pb2 that the import
        # system looks up while running `from . import graft_pb2`, dunders probed by tools) must raise
        # AttributeError, or importing graft.remote itself would fail.
        if name in _NATIVE:
            raise ImportError(f"graft.{name} needs libgraft.so, which could not be loaded ({_native_error}); "
                              "graft.remote works without it") from None
        raise AttributeError(f"module 'graft' has no attribute {name!r}")
else:
    from .errors import GraftError
    from .model import Model, load_model
    from .trainer import Progress, Trainer, TrainResult

    __version__ = _lib.lib.graft_version_string().decode()
    #: The loaded library's version as MAJOR * 10000 + MINOR * 100 + PATCH.
    version_number = _lib.lib.graft_version()
    #: Where libgraft.so was loaded from.
    library_path = str(_lib.path)

__all__ = ["AdapterConfig", "GraftError", "Model", "PeftConfig", "Progress", "TrainResult", "Trainer", "load_model",
           "__version__"] + _peft_configs.__all__
