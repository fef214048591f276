"""graft.remote.Client against a real graftd: the whole fine-tune flow, over the Unix socket and TCP."""
import os
from pathlib import Path

import numpy as np
import pytest

import graft
from graft.remote import Client, RemoteError

from conftest import MINILM

TEXTS = ["what a great day, I love it", "awful service, never again", "the meeting is at noon"]
LORA = graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])


def test_load_add_train_save_forward_over_the_unix_socket(daemon, tmp_path):
    with Client(daemon.socket_path) as c:
        assert c.server_version
        model = c.load_model(MINILM, task="seq_cls", num_labels=3, seed=1)
        model.add_adapter("default", LORA)
        assert [a["name"] for a in model.list_adapters()["adapters"]] == ["default"]
        before = model(TEXTS)
        progress = []
        job = c.train(model, "tweets", total_steps=20, batch_size=16, learning_rate=2e-3, callback=progress.append)
        assert [e.step for e in progress] == list(range(1, 21))
        assert all(np.isfinite(e.loss) and e.tokens_per_second > 0 for e in progress)
        assert job.result.finished == "completed" and job.result.step == 20
        first, last = np.mean([e.loss for e in progress[:5]]), np.mean([e.loss for e in progress[-5:]])
        assert last < first, f"training did not lower the loss: first 5 steps {first:.4f}, last 5 {last:.4f}"
        model.save_adapter(tmp_path / "lora")
        assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
        after = model(TEXTS)
        assert after.shape == (3, 3) and after.dtype == np.float32
        assert np.abs(after - before).max() > 1e-4
        # The saved adapter, loaded into a fresh model, reproduces the trained model's output.
        fresh = c.load_model(MINILM, task="seq_cls", num_labels=3, seed=1)
        fresh.load_adapter(tmp_path / "lora")
        assert np.abs(fresh(TEXTS) - after).max() <= 1e-5
        status = c.job_status(job.job_id)
        assert status["state"] == "completed" and status["last"].step == 20
        fresh.unload()
        model.unload()


def test_tcp_with_the_token(daemon):
    with Client(host="127.0.0.1", port=daemon.port, token=daemon.token) as c:
        model = c.load_model(MINILM)
        hidden = model([[101, 7592, 2088, 102]], output="hidden")
        assert hidden.shape == (1, 4, 384)
        ids = model([[101, 7592, 2088, 102]], output="hidden")
        assert np.array_equal(hidden, ids)
        model.unload()


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_tcp_without_the_right_token_is_refused(daemon, token):
    with pytest.raises(RemoteError) as e:
        Client(host="127.0.0.1", port=daemon.port, token=token)
    assert e.value.code == "UNAUTHENTICATED"
    assert "token" in e.value.message


def test_errors_name_what_was_wrong(daemon, tmp_path):
    with Client(daemon.socket_path) as c:
        with pytest.raises(RemoteError) as e:
            c.load_model(tmp_path / "no-such-model")
        assert "no-such-model" in e.value.message
        with pytest.raises(RemoteError) as e:
            c.job_status("j999")
        assert e.value.code == "NOT_FOUND" and "j999" in e.value.message
        model = c.load_model(MINILM)
        with pytest.raises(RemoteError) as e:
            model([[101, 999999, 102]])
        assert e.value.code == "INVALID_ARGUMENT" and "999999" in e.value.message
        with pytest.raises(RemoteError) as e:
            model.add_adapter("x", {"peft_type": "LORA", "r": 0, "target_modules": ["query"]})
        assert e.value.code == "INVALID_ARGUMENT"
        # The connection is still usable after errors.
        assert c.server_stats()["errors_total"] >= 4
        model.unload()


def test_cancel_ends_a_job_as_cancelled(daemon):
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM, task="seq_cls", num_labels=3)
        model.add_adapter("default", LORA)
        job = c.train(model, "tweets", total_steps=500, batch_size=8, wait=False)
        events = job.events()
        first = next(events)
        assert first.step == 1
        c2 = Client(daemon.socket_path)
        c2.cancel(job.job_id)
        c2.close()
        rest = list(events)
        assert rest[-1].finished == "cancelled" and rest[-1].step < 500
        with pytest.raises(RemoteError) as e:
            c.cancel(job.job_id)
        assert e.value.code == "STATE"
        model.unload()


def test_the_readme_python_client_snippet_runs_as_printed(daemon, tmp_path, monkeypatch):
    """The README's "Python client" block, run against this daemon (its default socket path points here)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Python client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    code = code.replace('"out/remote-lora"', repr(str(tmp_path / "remote-lora")))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(Path(daemon.socket_path).parent))
    exec(compile(code, "README.md (Python client)", "exec"), {})
    assert (tmp_path / "remote-lora" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("progress_every, steps", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5])])
def test_the_training_callback_sees_each_step_once(daemon, progress_every, steps):
    """The callback is called once per reported step; the job's final event (which repeats the last step's
    figures with `finished` set) is the result, not another call."""
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM, task="seq_cls", num_labels=3)
        model.add_adapter("default", LORA)
        calls = []
        job = c.train(model, "tweets", total_steps=5, batch_size=4, progress_every=progress_every,
                      callback=calls.append)
        print(f"progress_every={progress_every}: callback called {len(calls)} times, steps {[e.step for e in calls]}")
        assert [e.step for e in calls] == steps
        assert not any(e.finished for e in calls)
        assert job.result.finished == "completed" and job.result.step == 5
        # job.events() still ends with the final event, for clients that want it.
        model.add_adapter("second", LORA)
        events = list(c.train(model, "tweets", adapter="second", total_steps=2, batch_size=4, wait=False).events())
        assert [(e.step, e.finished) for e in events] == [(1, None), (2, None), (2, "completed")]
        model.unload()


def test_relative_paths_resolve_against_the_daemons_working_directory(daemon):
    """graftd reads and writes relative paths in its own working directory, and errors say which path and
    directory it tried."""
    cwd = os.path.realpath(daemon.directory)
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM, task="seq_cls", num_labels=3)
        model.add_adapter("default", LORA)
        model.save_adapter("relative/lora")
        assert (Path(cwd) / "relative" / "lora" / "adapter_model.safetensors").exists()
        model.load_adapter("relative/lora", name="reloaded")
        for call, field, given in [
            (lambda: model.load_adapter("missing/lora"), "load_adapter.path", "missing/lora"),
            (lambda: c.train(model, "missing.jsonl", total_steps=1), "start_training.data", "missing.jsonl"),
            (lambda: c.train(model, "tweets", eval_data="missing-eval.jsonl", total_steps=1),
             "start_training.eval_data", "missing-eval.jsonl"),
            (lambda: c.load_model("missing-model"), "load_model.path", "missing-model"),
        ]:
            with pytest.raises(RemoteError) as e:
                call()
            assert e.value.code == "NOT_FOUND", e.value
            assert field in e.value.message and os.path.join(cwd, given) in e.value.message, e.value.message
            assert f"working directory {cwd}" in e.value.message, e.value.message
        # A write that fails names the resolved path and the directory too (here a file stands where a directory
        # would have to be created).
        with pytest.raises(RemoteError) as e:
            model.save_adapter("relative/lora/adapter_config.json/inside")
        assert e.value.code == "IO" and os.path.join(cwd, "relative/lora/adapter_config.json/inside") in e.value.message
        assert f"working directory {cwd}" in e.value.message, e.value.message
        # An absolute path is used as given.
        with pytest.raises(RemoteError) as e:
            model.load_adapter(os.path.join(cwd, "elsewhere"))
        assert os.path.join(cwd, "elsewhere") in e.value.message and "working directory" not in e.value.message
        model.unload()


@pytest.mark.parametrize("config", [
    {"peft_type": "INCRELORA", "init_r": 1, "target_r": 2, "max_r": 3, "deltaT": 2, "target_modules": ["query", "value"]},
    {"peft_type": "TRIADAPTLORA", "init_r": 1, "target_r": 2, "max_r": 3, "incre_rank_num": 1, "target_modules": ["query", "value"]},
    {"peft_type": "TAPS", "l1_weight": 0.01, "target_modules": ["query"]},
    {"peft_type": "SELECTIVE_LORA", "r": 4, "target_modules": ["query", "value"]},
    {"peft_type": "LOSIA", "rank_factor": 0.05, "relocalize_every": 3, "target_modules": ["query", "value"]},
    {"peft_type": "TR_PTS", "budget": 3000, "fisher_steps": 2, "token_keep_ratio": 0.5, "target_modules": ["query", "value"]},
], ids=lambda c: c["peft_type"])
def test_adaptive_and_gated_methods_train_and_reload_over_the_daemon(daemon, tmp_path, config):
    with Client(daemon.socket_path) as c:
        model = c.load_model(MINILM, task="seq_cls", num_labels=3, seed=1)
        model.add_adapter("default", config)
        job = c.train(model, "tweets", total_steps=6, batch_size=8, learning_rate=5e-3)
        assert job.result.finished == "completed"
        model.save_adapter(tmp_path / "a")
        after = model(TEXTS)
        fresh = c.load_model(MINILM, task="seq_cls", num_labels=3, seed=1)
        fresh.load_adapter(tmp_path / "a")
        # IncreLoRA / TriAdaptLoRA come back as PEFT LoRA with their grown ranks.
        assert np.abs(fresh(TEXTS) - after).max() <= 1e-5
        fresh.unload()
        model.unload()
