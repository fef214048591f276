"""Every method reaches Python: each of PEFT's config classes (graft.peft_configs, generated from PEFT) and
graft.AdapterConfig for Graft's own methods builds a working adapter through the C ABI's JSON door."""
import dataclasses
from pathlib import Path

import pytest

import graft
from graft import peft_configs

TARGETS = ["query", "value"]
# What a config needs beyond target_modules to build on MiniLM (PEFT requires these too).
EXTRA = {
    "AdaLoraConfig": {"total_step": 100},
    "C3AConfig": {"block_size": 64},
    "PromptTuningConfig": {"num_virtual_tokens": 4},
    "PrefixTuningConfig": {"num_virtual_tokens": 4},
    "PromptEncoderConfig": {"num_virtual_tokens": 4, "encoder_hidden_size": 32},
    "TrainableTokensConfig": {"token_indices": [1, 2], "target_modules": ["word_embeddings"]},
    "LNTuningConfig": {"target_modules": ["LayerNorm"]},
    "VBLoRAConfig": {"vector_length": 64},
}
# PEFT's decoder-only methods build on SmolLM2 instead (LLaMA-Adapter attends inside LlamaAttention; CPT is causal
# LM only, as PEFT), with the arguments PEFT requires.
# X-LoRA mixes LoRA experts read from their directories: PEFT's own SmolLM2 experts from the X-LoRA fixture (PEFT's
# X-LoRA loads decoder checkpoints only).
XLORA_EXPERTS = Path(__file__).resolve().parents[3] / "Tests" / "Fixtures" / "peft-xlora" / "smollm2" / "experts"
DECODER_ONLY = {
    "AdaptionPromptConfig": {"adapter_len": 4, "adapter_layers": 2},
    "CPTConfig": {"cpt_token_ids": [1, 2, 3], "cpt_tokens_type_mask": [1, 2, 3], "task_type": "CAUSAL_LM"},
    "XLoraConfig": {"adapters": {str(i): str(XLORA_EXPERTS / str(i)) for i in range(3)}, "hidden_size": 576,
                    "layerwise_scalings": True, "task_type": "CAUSAL_LM"},
}
# Graft's own methods (not in PEFT), with small configs.
OWN = [
    graft.AdapterConfig("ASYMMETRIC_LORA", r=4, target_modules=TARGETS),
    graft.AdapterConfig("ETHER", nb=4, target_modules=TARGETS),
    graft.AdapterConfig("ETHER_PLUS", nb=4, target_modules=TARGETS),
    graft.AdapterConfig("LORAXS", r=4, target_modules=TARGETS),
    graft.AdapterConfig("SVFT", target_modules=TARGETS),
    graft.AdapterConfig("ROSA", r=4, target_modules=TARGETS),
    graft.AdapterConfig("MOS", r=4, target_modules=TARGETS),
    graft.AdapterConfig("SEQ_BN", reduction_factor=16),
    graft.AdapterConfig("PAR_BN", reduction_factor=16),
    graft.AdapterConfig("LOREFT", r=2),
    graft.AdapterConfig("LORA_MOE", r=2, num_experts=2, target_modules=TARGETS),
    graft.AdapterConfig("BITFIT", target_modules=TARGETS),
    graft.AdapterConfig("SPIEL", density=0.01, update_interval=5, target_modules=TARGETS),
    graft.AdapterConfig("NEUROADA", k=2, target_modules=TARGETS),
    graft.AdapterConfig("DSEE", r=4, num_sparse=16, prune_ratio=0.1, target_modules=TARGETS),
    graft.AdapterConfig("ID3", density=0.01, unmask_steps=10, target_modules=TARGETS),
    graft.AdapterConfig("SPT", budget_density=0.01, lora_threshold=0.02, r=4, warmup_steps=2, target_modules=TARGETS),
    graft.AdapterConfig("SPARSE_ADAPTER", reduction_factor=16, sparsity=0.5, large_sparse=True),
    graft.AdapterConfig("INCRELORA", init_r=2, target_r=4, max_r=8, target_modules=TARGETS),
    graft.AdapterConfig("TRIADAPTLORA", init_r=1, target_r=4, incre_rank_num=2, target_modules=TARGETS),
    graft.AdapterConfig("TAPS", l1_weight=1e-3, target_modules=TARGETS),
    graft.AdapterConfig("SELECTIVE_LORA", r=4, l1_weight=1e-3, target_modules=TARGETS),
    graft.AdapterConfig("LOSIA", rank_factor=0.125, relocalize_every=50, target_modules=TARGETS),
    graft.AdapterConfig("TR_PTS", density=0.005, fisher_steps=2, token_keep_ratio=0.5, target_modules=TARGETS),
]


def peft_config(name):
    cls = getattr(peft_configs, name)
    if name in DECODER_ONLY:
        return cls(**DECODER_ONLY[name])
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    if "target_modules" in fields and name not in ("PromptTuningConfig", "PrefixTuningConfig", "PromptEncoderConfig"):
        kwargs["target_modules"] = TARGETS
    kwargs.update(EXTRA.get(name, {}))
    return cls(**kwargs)


#: The config classes that build on MiniLM (every one but the decoder-only methods).
ENCODER_NAMES = [name for name in peft_configs.__all__ if name not in DECODER_ONLY]


def assert_builds(model, config, peft_type):
    """`config` adds an adapter of `peft_type` with trainable parameters; the model is left without it."""
    model.add_adapter("probe", config)
    try:
        entry = model.list_adapters()["adapters"][0]
        assert entry["peft_type"] == peft_type
        assert entry["trainable_parameters"] > 0
    finally:
        model.delete_adapter("probe")


@pytest.mark.parametrize("name", ENCODER_NAMES)
def test_peft_config_class_builds_its_adapter(bert, name):
    config = peft_config(name)
    assert config.to_dict()["peft_type"] == config.PEFT_TYPE
    assert_builds(bert, config, config.PEFT_TYPE)


@pytest.mark.parametrize("name", sorted(DECODER_ONLY))
def test_decoder_only_config_class_builds_on_a_decoder(smollm_path, minilm_path, name):
    config = peft_config(name)
    with graft.load_model(smollm_path) as llm:
        assert_builds(llm, config, config.PEFT_TYPE)
        # On an encoder the method is refused with an error, never built wrong.
        with graft.load_model(minilm_path) as bert:
            with pytest.raises(graft.GraftError):
                bert.add_adapter("probe", config)


@pytest.mark.parametrize("config", OWN, ids=lambda c: c.peft_type)
def test_graft_method_builds_through_adapter_config(bert, config):
    assert_builds(bert, config, config.peft_type)


def test_config_classes_mirror_peft_names():
    # A few of PEFT's class names, spelled as PEFT spells them.
    for name in ["LoraConfig", "GloraConfig", "PsoftConfig", "VBLoRAConfig", "HRAConfig", "PromptEncoderConfig"]:
        assert name in graft.__all__ and hasattr(graft, name)


def test_trpts_token_reduction_is_refused_on_a_decoder_by_name(smollm_path):
    with graft.load_model(smollm_path) as llm:
        with pytest.raises(graft.GraftError) as e:
            llm.add_adapter("probe", graft.AdapterConfig("TR_PTS", token_keep_ratio=0.5, target_modules=["q_proj"]))
        assert "token_keep_ratio" in str(e.value) and "causal decoder" in str(e.value)
        # Its parameter selection alone works there.
        assert_builds(llm, graft.AdapterConfig("TR_PTS", density=0.001, target_modules=["q_proj"]), "TR_PTS")
