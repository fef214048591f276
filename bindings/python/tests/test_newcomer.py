"""What a newcomer did from Python, following the README (issue 11, item 14), each as they did it."""
import numpy as np
import pytest

import graft

TASK_SPELLINGS = {
    "base": "base",
    "seq-cls": "sequence_classification", "seq_cls": "sequence_classification",
    "sequence_classification": "sequence_classification", "SEQ_CLS": "sequence_classification",
    "causal-lm": "causal_lm", "causal_lm": "causal_lm", "CAUSAL_LM": "causal_lm",
}


# -- item 14: generation ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llm(smollm_path):
    with graft.load_model(smollm_path, task="causal-lm") as m:
        yield m


def test_generate_text_when_the_model_stops_at_once(llm):
    # What the newcomer typed: a raw question, on which SmolLM2 emits end-of-sequence at once.
    out = llm.generate("What is the capital of France?", max_new_tokens=20)
    text = llm.generate_text("What is the capital of France?", max_new_tokens=20)
    assert isinstance(text, str) and text == llm.decode(out, skip_special_tokens=True)
    assert llm.decode([]) == "" and llm.decode(np.array([])) == ""
    assert llm.generate_text("The capital of France is", max_new_tokens=0) == ""


def test_generate_with_the_cli_chat_template(llm):
    prompt = llm.apply_chat_template("What is the capital of France?")
    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    text = llm.generate_text("What is the capital of France?", max_new_tokens=20, chat=True)
    assert "Paris" in text
    assert text == llm.generate_text(prompt, max_new_tokens=20)
    with pytest.raises(graft.GraftError, match="chat=True needs a text prompt"):
        llm.generate(llm.tokenize("hi"), chat=True)


def test_generate_empty_prompt_says_so(llm):
    for prompt in ("", []):
        with pytest.raises(graft.GraftError, match="the prompt is empty"):
            llm.generate(prompt)
        with pytest.raises(graft.GraftError, match="the prompt is empty"):
            llm.generate_text(prompt, max_new_tokens=5)


def test_chat_template_on_an_encoder_is_unsupported(bert):
    with pytest.raises(graft.GraftError, match="chat template") as e:
        bert.apply_chat_template("hi")
    assert e.value.code == -4


# -- item 14: texts in, asset names, one task vocabulary ---------------------------------------------------------

def test_forward_takes_texts_like_the_remote_client(clf):
    texts = ["what a great day", "awful"]
    logits = clf(texts, output="logits")
    assert logits.shape == (2, 3)
    by_ids = clf([clf.tokenize(t) for t in texts], output="logits")
    assert np.array_equal(logits, by_ids)
    assert np.array_equal(clf("awful", output="logits"), clf([clf.tokenize("awful")], output="logits"))
    assert clf(texts).shape[:2] == (2, len(clf.tokenize(texts[0])))
    with pytest.raises(graft.GraftError, match="mixes texts and token lists"):
        clf(["awful", clf.tokenize("great")])
    with pytest.raises(graft.GraftError, match="lengths is only for token ids"):
        clf(texts, lengths=[1, 1])


def test_load_model_by_asset_name(minilm_path):
    with graft.load_model("minilm", task="seq-cls", num_labels=2) as m:
        assert m.architecture == "bert" and m.task == "sequence_classification"
        assert m.info()["path"] == str(minilm_path)
    with pytest.raises(graft.GraftError) as e:
        graft.load_model("no-such-asset")
    assert e.value.code == -5 and "no-such-asset" in str(e.value)


@pytest.mark.parametrize("spelling", sorted(TASK_SPELLINGS))
def test_one_task_vocabulary(minilm_path, smollm_path, spelling):
    expected = TASK_SPELLINGS[spelling]
    path = smollm_path if expected == "causal_lm" else minilm_path
    with graft.load_model(path, task=spelling) as m:
        assert m.task == expected


def test_unknown_task_lists_the_vocabulary(minilm_path):
    with pytest.raises(graft.GraftError, match="seq-cls, seq_cls, sequence_classification, causal-lm"):
        graft.load_model(minilm_path, task="classification")


def test_remote_client_takes_the_same_task_vocabulary():
    from graft import _tasks, remote

    for spelling, expected in TASK_SPELLINGS.items():
        number = _tasks.task_number(spelling)
        assert remote._TASKS[number] == {"base": 0, "sequence_classification": 1, "causal_lm": 2}[expected]
    assert _tasks.task_number("bogus") is None


# -- item 14: string labels are numbered once and kept with the adapter ----------------------------------------

def test_string_labels_are_saved_with_the_adapter_and_used_on_load(minilm_path, tmp_path):
    import json

    first = tmp_path / "first.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "win money now", "label": "spam"}, {"text": "see you at lunch", "label": "ham"}]))
    with graft.load_model(minilm_path, task="seq_cls", num_labels=2) as m:
        m.add_adapter("default", graft.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
        assert m.id2label is None
        graft.Trainer(m, total_steps=1, batch_size=2).train(str(first))
        assert m.id2label == {0: "spam", 1: "ham"} and m.label2id == {"spam": 0, "ham": 1}
        m.save_adapter(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "labels.json").read_text())
    assert saved == {"id2label": {"0": "spam", "1": "ham"}, "label2id": {"spam": 0, "ham": 1}}

    # The next run loads the adapter and its names: a file listing "ham" first trains, "eggs" is refused.
    with graft.load_model(minilm_path, task="seq_cls", num_labels=2) as m:
        m.load_adapter(str(tmp_path / "adapter"))
        assert m.id2label == {0: "spam", 1: "ham"}
        second = tmp_path / "second.jsonl"
        second.write_text(json.dumps({"text": "lunch?", "label": "ham"}) + "\n")
        graft.Trainer(m, total_steps=1, batch_size=1).train(str(second))
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "hello", "label": "eggs"}) + "\n")
        with pytest.raises(graft.GraftError, match="'eggs' is not one of"):
            graft.Trainer(m, total_steps=1).train(str(bad))
