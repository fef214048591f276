"""The task names every Graft front door accepts, shared by graft.load_model and graft.remote.

The same vocabulary as the CLI (`graft train --task seq-cls`), the Lua host and Swift's SessionTask.aliases:
base; seq-cls, seq_cls, sequence_classification (and PEFT's SEQ_CLS); causal-lm, causal_lm (and CAUSAL_LM).
Case is ignored. Pure Python: importable without libgraft.so.
"""
BASE = 0
SEQUENCE_CLASSIFICATION = 1
CAUSAL_LM = 2

#: name -> task number (the graft_task values of graft.h, which graft.proto's Task shares).
ALIASES = {
    "base": BASE,
    "seq-cls": SEQUENCE_CLASSIFICATION, "seq_cls": SEQUENCE_CLASSIFICATION,
    "sequence_classification": SEQUENCE_CLASSIFICATION,
    "causal-lm": CAUSAL_LM, "causal_lm": CAUSAL_LM,
}


def task_number(task):
    """The task number of `task` (None = base), or None when the name is not one of ALIASES."""
    if task is None:
        return BASE
    if not isinstance(task, str):
        return None
    return ALIASES.get(task.lower())


def known():
    """The accepted names, for error messages."""
    return ", ".join(ALIASES)
