"""Adapter configurations: `to_dict()` gives adapter_config.json's shape.

PEFT's own config classes (LoraConfig, GloraConfig, ...: one for every PEFT method Graft builds) are generated
into the peft_configs package (one module per method family) with PEFT's fields and defaults. Graft's own
methods from the seed papers, which PEFT does not have, take an AdapterConfig with their keys (README, "Methods").
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict


@dataclass
class PeftConfig:
    """Fields every PEFT method shares. Subclasses set PEFT_TYPE."""

    PEFT_TYPE = None

    def to_dict(self) -> Dict[str, Any]:
        """The config as PEFT's adapter_config.json: {"peft_type": ..., field: value, ...}."""
        d = {"peft_type": self.PEFT_TYPE}
        d.update(dataclasses.asdict(self))
        return d


class AdapterConfig(PeftConfig):
    """Any method by its peft_type and keys, as adapter_config.json holds them; for Graft's own methods
    (ETHER, MOS, SEQ_BN, LOREFT, LORA_MOE, INCRELORA, TRIADAPTLORA, TAPS, SELECTIVE_LORA, LOSIA, TR_PTS, ...), e.g. AdapterConfig("ETHER", nb=4, target_modules=["query"])."""

    def __init__(self, peft_type: str, **options: Any):
        self.peft_type = peft_type
        self.options = options

    def to_dict(self) -> Dict[str, Any]:
        return {"peft_type": self.peft_type, **self.options}

    def __repr__(self) -> str:
        return f"AdapterConfig({self.peft_type!r}, {', '.join(f'{k}={v!r}' for k, v in self.options.items())})"
