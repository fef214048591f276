"""Continuous batching in graftd: concurrent generate requests for one model share decode steps, each under its
own adapter, and each client gets exactly the tokens its request gets alone; KV caches are bounded by the context
limit and reported in server_stats; prompts sharing a prefix under the same adapter reuse its keys and values."""
import shutil
import tempfile
import threading

import pytest

from graft.remote import Client, RemoteError

from conftest import ASSETS, Daemon

SMOLLM = ASSETS / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The quick brown fox", "Once upon a time, in a land far away,", "1, 2, 3,", "The capital of France is",
           "def fibonacci(n):", "Roses are red,"]


@pytest.fixture(scope="module")
def server():
    """A graftd of its own (its counters start at zero) with a context limit of 96 positions."""
    directory = tempfile.mkdtemp(prefix="graftd-batching-")
    d = Daemon(directory, ["--context-limit", "96"])
    yield d
    d.stop()
    assert d.process.returncode == 0, f"graftd exited with {d.process.returncode}; log in {d.log_path}"
    shutil.rmtree(directory, ignore_errors=True)


LORA = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"],
        "init_lora_weights": False}


def generate_concurrently(server, model_id, jobs, **options):
    """Each (prompt, adapter) of `jobs` generated at once, each on its own connection; returns the results and the
    tokens each client saw streamed."""
    results, streamed, errors = [None] * len(jobs), [[] for _ in jobs], []
    start = threading.Barrier(len(jobs))

    def run(i):
        try:
            with Client(server.socket_path) as ci:
                m = ci.model(model_id)
                start.wait()
                results[i] = m.generate(jobs[i][0], adapter=jobs[i][1], stop_at_eos=False,
                                        on_token=lambda t, _text: streamed[i].append(t), **options)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results, streamed


def test_concurrent_clients_share_steps_and_get_their_alone_tokens(server):
    with Client(server.socket_path) as c:
        model = c.load_model(SMOLLM, task="causal-lm")
        for i in range(4):
            model.add_adapter(f"user{i}", LORA, seed=i + 1)
        jobs = [(PROMPTS[i], f"user{i % 4}" if i < 5 else "") for i in range(len(PROMPTS))]
        alone = [model.generate(p, max_new_tokens=16, stop_at_eos=False, adapter=a) for p, a in jobs]
        assert len({tuple(t) for t in alone}) == len(alone), "the adapters should change what is generated"
        before = c.server_stats()

        results, streamed = generate_concurrently(server, model.model_id, jobs, max_new_tokens=16)
        assert results == alone
        assert streamed == alone
        after = c.server_stats()
        steps = after["generate_steps"] - before["generate_steps"]
        tokens = after["generated_tokens"] - before["generated_tokens"]
        print(f"{len(jobs)} concurrent requests: {tokens} tokens in {steps} steps")
        assert tokens == 16 * len(jobs)
        # Alone, each request takes 16 steps; batched, they share most of them.
        assert steps < 16 * len(jobs) // 2
        assert after["generating"] == 0 and after["kv_cache_bytes"] == 0
        model.unload()


def test_fast_mode_clients_under_all_linear_adapters_get_their_alone_tokens(server):
    """Eight clients at once in the fast mode, each under its own LoRA r16 on every linear layer (the serving
    bench's setup). The fast mode rounds activations to int8, so a last-digit difference in a prompt's prefill
    becomes a different token: each prompt is prefilled in a step of its own, as it is alone."""
    words = "the river ran past old stone houses while children played near the bridge and a dog slept".split()
    lora = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": "all-linear", "init_lora_weights": False}
    with Client(server.socket_path) as c:
        model = c.load_model(SMOLLM, task="causal-lm")
        jobs = []
        for i in range(8):
            model.add_adapter(f"fast{i}", lora, seed=i + 1)
            jobs.append((" ".join(words[(i + k) % len(words)] for k in range(12 + i)), f"fast{i}"))
        alone = [model.generate(p, max_new_tokens=24, stop_at_eos=False, adapter=a, fast_decode=True) for p, a in jobs]
        results, _ = generate_concurrently(server, model.model_id, jobs, max_new_tokens=24, fast_decode=True)
        for i, (got, expected) in enumerate(zip(results, alone)):
            assert got == expected, f"client {i} under {jobs[i][1]}: batched {got} vs alone {expected}"
        model.unload()


def test_the_context_limit_and_kv_memory_are_reported(server):
    with Client(server.socket_path) as c:
        model = c.load_model(SMOLLM, task="causal-lm")
        stats = c.server_stats()
        assert stats["context_limit"] == 96
        with pytest.raises(RemoteError) as e:
            model.generate("The quick brown fox", max_new_tokens=100, stop_at_eos=False)
        assert "context limit of 96" in str(e.value)
        seen = []

        def on_token(_t, _text):
            if not seen:
                seen.append(c2.server_stats())

        with Client(server.socket_path) as c2:
            ids = model.generate("The quick brown fox", max_new_tokens=8, stop_at_eos=False, on_token=on_token)
        assert len(ids) == 8
        assert model.generate("The quick brown fox", max_new_tokens=0) == []
        during = seen[0]
        info = model.info()
        n_prompt = 4
        print("during generation:", {k: during[k] for k in ("generating", "kv_cache_bytes")})
        assert during["generating"] == 1 and during["kv_cache_bytes"] > 0
        # The cache is allocated for exactly prompt + max_new_tokens positions, keys and values, float32.
        per_position = during["kv_cache_bytes"] // (n_prompt + 8)
        assert per_position * (n_prompt + 8) == during["kv_cache_bytes"], info
        model.unload()


def test_prompts_sharing_a_prefix_reuse_its_keys_and_values(server):
    with Client(server.socket_path) as c:
        model = c.load_model(SMOLLM, task="causal-lm")
        model.add_adapter("a", LORA, seed=7)
        system = "You are a terse assistant. Answer in one word. Question: "
        first = model.generate(system + "colour of the sky?", max_new_tokens=4, stop_at_eos=False, adapter="a")
        before = c.server_stats()
        second = model.generate(system + "opposite of hot?", max_new_tokens=4, stop_at_eos=False, adapter="a")
        after = c.server_stats()
        assert after["prefix_cache_hits"] == before["prefix_cache_hits"] + 1
        reused = after["prefix_cache_tokens"] - before["prefix_cache_tokens"]
        print(f"prompt cache: {reused} prompt tokens reused, {after['prefix_cache_bytes']} bytes kept")
        assert reused >= 8 and after["prefix_cache_bytes"] > 0
        # Changing the adapters forgets the kept caches; the result is the same computed from scratch.
        model.add_adapter("b", LORA, seed=8)
        assert c.server_stats()["prefix_cache_bytes"] == 0
        assert model.generate(system + "opposite of hot?", max_new_tokens=4, stop_at_eos=False, adapter="a") == second
        assert len(first) == len(second) == 4
        model.unload()


def test_a_connection_sees_its_requests_answered_in_order(server):
    with Client(server.socket_path) as c:
        model = c.load_model(SMOLLM, task="causal-lm")
        model.add_adapter("a", LORA, seed=3)
        # Pipelined on one connection: two generates, then a delete; the delete waits for both generations.
        ids = [c._send("generate", _generate(model, p)) for p in PROMPTS[:2]]
        from graft import graft_pb2 as pb
        delete_id = c._send("delete_adapter", pb.DeleteAdapter(model_id=model.model_id, name="a"))
        finals = []
        while len(finals) < 3:
            r = c._receive()
            kind = r.WhichOneof("kind")
            if kind in ("generated", "ok", "error"):
                finals.append((r.id, kind))
        assert finals == [(ids[0], "generated"), (ids[1], "generated"), (delete_id, "ok")] or \
            finals == [(ids[1], "generated"), (ids[0], "generated"), (delete_id, "ok")], finals
        model.unload()


def _generate(model, prompt):
    from graft import graft_pb2 as pb
    return pb.Generate(model_id=model.model_id, prompt=prompt, max_new_tokens=6, ignore_eos=True, adapter="a")
