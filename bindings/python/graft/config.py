"""Adapter configurations mirroring PEFT's config classes; `to_dict()` gives adapter_config.json's shape.

Fields and defaults follow PEFT (peft.LoraConfig and friends). Graft honours the keys listed in the README's
"Adapters and PEFT compatibility" table and ignores the rest, as PEFT's own JSON files carry many more.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

Targets = Optional[Union[List[str], str]]


@dataclass
class PeftConfig:
    """Fields every PEFT method shares. Subclasses set PEFT_TYPE."""

    PEFT_TYPE = None

    def to_dict(self) -> Dict[str, Any]:
        """The config as PEFT's adapter_config.json: {"peft_type": ..., field: value, ...}."""
        d = {"peft_type": self.PEFT_TYPE}
        d.update(dataclasses.asdict(self))
        return d


@dataclass
class LoraConfig(PeftConfig):
    """LoRA (and rsLoRA with use_rslora, DoRA with use_dora), as peft.LoraConfig."""

    PEFT_TYPE = "LORA"
    r: int = 8
    lora_alpha: float = 8
    target_modules: Targets = None
    exclude_modules: Targets = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    use_dora: bool = False
    modules_to_save: Optional[List[str]] = None
    init_lora_weights: bool = True
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False


@dataclass
class IA3Config(PeftConfig):
    """(IA)³, as peft.IA3Config."""

    PEFT_TYPE = "IA3"
    target_modules: Targets = None
    exclude_modules: Targets = None
    feedforward_modules: Targets = None
    fan_in_fan_out: bool = False
    modules_to_save: Optional[List[str]] = None
    init_ia3_weights: bool = True
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False


@dataclass
class _LycorisConfig(PeftConfig):
    """Fields LoHa and LoKr share (PEFT's LycorisConfig)."""

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: Targets = None
    exclude_modules: Targets = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    modules_to_save: Optional[List[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False


@dataclass
class LoHaConfig(_LycorisConfig):
    """LoHa (low-rank Hadamard product), as peft.LoHaConfig."""

    PEFT_TYPE = "LOHA"


@dataclass
class LoKrConfig(_LycorisConfig):
    """LoKr (low-rank Kronecker product), as peft.LoKrConfig."""

    PEFT_TYPE = "LOKR"
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False


@dataclass
class VeraConfig(PeftConfig):
    """VeRA (shared random projections with trained scaling vectors), as peft.VeraConfig."""

    PEFT_TYPE = "VERA"
    r: int = 256
    target_modules: Targets = None
    projection_prng_key: int = 0
    save_projection: bool = True
    vera_dropout: float = 0.0
    d_initial: float = 0.1
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[List[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[List[int], int]] = None
    layers_pattern: Optional[Union[List[str], str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False


@dataclass
class AdaptionPromptConfig(PeftConfig):
    """LLaMA-Adapter (gated attention over learned prompts in the top layers), as peft.AdaptionPromptConfig.
    Llama decoders only; adapter_len and adapter_layers have no defaults, as in PEFT."""

    PEFT_TYPE = "ADAPTION_PROMPT"
    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None
    task_type: Optional[str] = "CAUSAL_LM"
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False


@dataclass
class _PromptLearningConfig(PeftConfig):
    """Fields the prompt-learning methods share (PEFT's PromptLearningConfig); the model sizes are filled in from
    the model when left None."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[List[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False


@dataclass
class MultitaskPromptTuningConfig(_PromptLearningConfig):
    """Multitask prompt tuning (a shared prompt rescaled per task by a low-rank matrix), as
    peft.MultitaskPromptTuningConfig. Through Python every example uses task 0 (the C ABI takes no task ids)."""

    PEFT_TYPE = "MULTITASK_PROMPT_TUNING"
    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[str] = None
    tokenizer_kwargs: Optional[Dict[str, Any]] = None
    prompt_tuning_init_state_dict_path: Optional[str] = None
    prompt_tuning_init_task: int = 0
    num_ranks: int = 1
    num_tasks: int = 1


@dataclass
class CPTConfig(_PromptLearningConfig):
    """Context-aware prompt tuning (context tokens plus a projected trained change), as peft.CPTConfig. Causal
    decoders only."""

    PEFT_TYPE = "CPT"
    cpt_token_ids: Optional[List[int]] = None
    cpt_mask: Optional[List[int]] = None
    cpt_tokens_type_mask: Optional[List[int]] = None
    opt_weighted_loss_type: str = "none"
    opt_loss_decay_factor: float = 1.0
    opt_projection_epsilon: float = 0.1
    opt_projection_format_epsilon: float = 0.1
    tokenizer_name_or_path: Optional[str] = None
    task_type: Optional[str] = "CAUSAL_LM"


@dataclass
class CartridgeConfig(_PromptLearningConfig):
    """Cartridges (a trained KV-cache prefix whose first num_frozen_tokens rows stay frozen), as
    peft.CartridgeConfig."""

    PEFT_TYPE = "CARTRIDGE"
    num_frozen_tokens: int = 1
