import numpy as np
import pytest

import graft

CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def llm(smollm_path):
    with graft.load_model(smollm_path) as m:
        yield m


def test_greedy_paris(llm):
    assert llm.info()["architecture"] == "llama"
    prompt = llm.tokenize(CHAT.format("What is the capital of France?"))
    pieces = []
    out = llm.generate(prompt, max_new_tokens=24, callback=lambda t, s: pieces.append((t, s)) and False)
    text = llm.decode(out, skip_special_tokens=True)
    assert "Paris" in text
    assert [t for t, _ in pieces] == out and "".join(s for _, s in pieces) == llm.decode(out)
    assert llm.generate_text(CHAT.format("What is the capital of France?"), max_new_tokens=24) == text


def test_fast_decode_answers_like_the_exact_mode(llm):
    # The int8 fast mode (graft.h 0.5.0) reaches the engine through graft_sampling_params.fast_decode.
    prompt = llm.tokenize(CHAT.format("What is the capital of France?"))
    exact = llm.generate(prompt, max_new_tokens=24)
    fast = llm.generate(prompt, max_new_tokens=24, fast_decode=True)
    assert "Paris" in llm.decode(fast, skip_special_tokens=True)
    assert fast[:4] == exact[:4]


def test_callback_stops_and_errors(llm):
    prompt = llm.tokenize("The capital of France is")
    assert len(llm.generate(prompt, max_new_tokens=10, callback=lambda t, s: True)) == 1
    with pytest.raises(ZeroDivisionError):
        llm.generate(prompt, max_new_tokens=5, callback=lambda t, s: 1 / 0)
    with pytest.raises(graft.GraftError):
        llm.generate([], max_new_tokens=5)
    with pytest.raises(graft.GraftError):
        llm.generate(prompt, top_p=0.0)
    sampled = llm.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=40, seed=7, stop_at_eos=False)
    assert sampled == llm.generate(prompt, max_new_tokens=8, temperature=0.8, top_k=40, seed=7, stop_at_eos=False)


def test_llama_logits_and_generation_unsupported_on_bert(llm, bert):
    ids = np.array([llm.tokenize("Hello there")], dtype=np.int32)
    logits = llm(ids, output="logits")
    assert logits.shape == (1, ids.shape[1], llm.info()["vocab_size"])
    with pytest.raises(graft.GraftError) as e:
        bert.generate([101, 102], max_new_tokens=2)
    assert e.value.code == -4


def test_causal_lm_training(smollm_path):
    with graft.load_model(smollm_path, task="causal_lm") as m:
        m.add_adapter("default", graft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        ids = [m.tokenize("Graft trains adapters in Swift. Graft trains adapters in Swift.")]
        with graft.Trainer(m, learning_rate=2e-3) as t:
            first, _ = t.evaluate(ids)
            for _ in range(4):
                t.step(ids)
            last, _ = t.evaluate(ids)
            # Hugging Face-style labels: -100 leaves positions unscored.
            labels = np.full((1, len(ids[0])), -100, dtype=np.int32)
            labels[0, 5:] = ids[0][5:]
            assert np.isfinite(t.step(ids, labels=labels))
        assert last < first


def test_decoder_config_classes_attach(llm):
    """The decoder-only tuners' config classes (PEFT's names) reach the engine through the C ABI's JSON."""
    ids = [llm.tokenize("It is a truth universally acknowledged")]
    base = llm(ids)
    for name, cfg, trainable in [
            ("ap", graft.AdaptionPromptConfig(adapter_len=4, adapter_layers=2), 2 * (4 * 576 + 1)),
            ("mpt", graft.MultitaskPromptTuningConfig(num_virtual_tokens=4, num_tasks=2), 4 * 576 + 2 * 4 + 2 * 576),
            ("cpt", graft.CPTConfig(cpt_token_ids=[1, 2, 3, 4], cpt_tokens_type_mask=[1, 2, 2, 3]), 4 * 576),
            ("cart", graft.CartridgeConfig(num_virtual_tokens=4), 3 * 30 * 2 * 192)]:
        llm.add_adapter(name, cfg)
        entry = [a for a in llm.list_adapters()["adapters"] if a["name"] == name][0]
        assert entry["peft_type"] == cfg.PEFT_TYPE and entry["trainable_parameters"] == trainable
        out = llm(ids)
        assert out.shape == base.shape and np.isfinite(out).all()
        llm.delete_adapter(name)
