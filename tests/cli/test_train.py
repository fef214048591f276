"""`graft train` as a user runs it: a step budget, a held-out split when no eval data is given, and an adapter
config PEFT can resolve the base model from."""
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_merge import read_safetensors

GRAFT = os.environ.get("GRAFT_CLI", str(Path(__file__).resolve().parents[2] / ".build" / "release" / "graft"))


@pytest.fixture
def data(tmp_path):
    texts = ["what a great day", "awful service", "it is fine", "love it", "hate it", "meh",
             "brilliant show", "terrible food", "okay I guess", "so happy", "so sad", "nothing special"]
    names = ["positive", "negative", "neutral"]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": names[i % 3]}) for i, t in enumerate(texts)))
    return path


def train(*args, cwd):
    r = subprocess.run([GRAFT, "train", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return r.stdout, r.stderr


def test_max_steps_overrides_epochs_and_eval_is_held_out(data, tmp_path):
    out, err = train("--data", str(data), "--batch-size", "4", "--epochs", "1", "--max-steps", "5",
                     "--output", str(tmp_path / "adapter"), cwd=tmp_path)
    # 12 examples, 2 held out: 10 train in batches of 4 = 3 steps per epoch; a budget of 5 needs a second epoch.
    assert "2 of 12 examples (every 10th) held out of training" in out
    assert "held-out accuracy" in out and "test accuracy" not in out
    assert "5/5" in err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


def test_max_steps_must_be_positive(data, tmp_path):
    r = subprocess.run([GRAFT, "train", "--data", str(data), "--max-steps", "0"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "--max-steps must be ≥ 1, got 0" in r.stderr


def test_max_eval_examples_must_be_positive(data, tmp_path):
    r = subprocess.run([GRAFT, "train", "--data", str(data), "--max-eval-examples", "0"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "--max-eval-examples must be ≥ 1, got 0" in r.stderr, r.stderr


def test_report_shows_rank_growth_and_the_adapter_saves_as_lora_with_rank_pattern(data, tmp_path):
    config = tmp_path / "increlora.json"
    config.write_text(json.dumps({"adapter": {"peft_type": "INCRELORA", "init_r": 1, "target_r": 2, "max_r": 3,
                                              "deltaT": 2, "target_modules": ["query", "value"]}}))
    out, _ = train("--config", str(config), "--data", str(data), "--batch-size", "4", "--max-steps", "6", "--report",
                   "--output", str(tmp_path / "adapter"), cwd=tmp_path)
    growth = [line for line in out.splitlines() if line.startswith("hook") and "IncreLoRA step" in line]
    assert [line.split("step ")[1].split(":")[0] for line in growth] == ["2", "4", "6"], out
    assert "report     IncreLoRA rank allocation (budget 24, total 24); ranks at steps 0 2 4 6" in out
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA"
    assert sum(saved["rank_pattern"].values()) == 24 and saved["rank_pattern"] == saved["alpha_pattern"]


def test_skip_initial_eval_drops_only_the_before_line(data, tmp_path):
    out, _ = train("--data", str(data), "--batch-size", "4", "--max-steps", "2", "--skip-initial-eval", cwd=tmp_path)
    assert "before" not in out
    assert "after      held-out accuracy" in out


def test_methods_json_lists_every_method_with_an_example_config_that_trains(data, tmp_path):
    r = subprocess.run([GRAFT, "methods", "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = {row["peft_type"]: row for row in json.loads(r.stdout)}
    assert {"LORA", "IA3", "SPIEL", "XLORA", "ADAPTION_PROMPT"} <= set(rows)
    lora = rows["LORA"]
    assert lora["trainable_parameters"] == 73728 and lora["mergeable"] is True and lora["peft_parity"] == "yes"
    assert lora["example_config"]["peft_type"] == "LORA" and lora["example_config"]["target_modules"] == ["query", "value"]
    # A decoder-only method on MiniLM: no count, the reason instead, and still its example config.
    assert rows["ADAPTION_PROMPT"]["trainable_parameters"] is None and "decoders" in rows["ADAPTION_PROMPT"]["note"]
    # The example config is a working adapter config: train with it as printed.
    config = tmp_path / "ia3.json"
    config.write_text(json.dumps({"adapter": rows["IA3"]["example_config"]}))
    out, _ = train("--config", str(config), "--data", str(data), "--batch-size", "4", "--max-steps", "1", cwd=tmp_path)
    # The classification run trains the fresh 3-class head too: 384 × 3 + 3 parameters.
    assert f"{rows['IA3']['trainable_parameters'] + 1155} trainable parameters" in out


def test_trpts_selects_by_fisher_reduces_tokens_and_refuses_token_reduction_on_a_decoder(data, tmp_path):
    config = tmp_path / "trpts.json"
    config.write_text(json.dumps({"adapter": {"peft_type": "TR_PTS", "budget": 2000, "fisher_steps": 2,
                                              "token_keep_ratio": 0.5, "target_modules": ["query", "value"]}}))
    out, _ = train("--config", str(config), "--data", str(data), "--batch-size", "4", "--max-steps", "5", "--report",
                   "--output", str(tmp_path / "adapter"), cwd=tmp_path)
    assert any(line.startswith("hook") and "TR-PTS: 2000 entries chosen by Fisher information after step 2" in line
               for line in out.splitlines()), out
    report = [line for line in out.splitlines() if line.startswith("report") and "TR-PTS tokens" in line]
    assert report and "keep 0.5 at layers [2, 4] (merge)" in report[0] and "encoder FLOPs −" in report[0], out
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TR_PTS" and saved["token_keep_ratio"] == 0.5
    decoder = tmp_path / "trpts-decoder.json"
    decoder.write_text(json.dumps({"adapter": {"peft_type": "TR_PTS", "token_keep_ratio": 0.5,
                                               "target_modules": ["q_proj"]}}))
    r = subprocess.run([GRAFT, "train", "--config", str(decoder), "--task", "causal-lm", "--model", "smollm2",
                        "--data", str(data), "--max-steps", "1"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "token_keep_ratio" in r.stderr and "causal decoder" in r.stderr, r.stderr


def data_driven_run(tmp_path, name, init, steps, lr, weight_decay):
    config = tmp_path / f"{name}.json"
    adapter = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query", "value"],
               "init_lora_weights": init}
    config.write_text(json.dumps({"adapter": adapter, "training": {"init_batches": 4}}))
    out, _ = train("--config", str(config), "--data", "tweets", "--max-examples", "320", "--max-eval-examples", "300",
                   "--batch-size", "16",
                   "--max-steps", str(steps), "--lr", str(lr), "--weight-decay", str(weight_decay), "--seed", "3",
                   "--output", str(tmp_path / name), cwd=tmp_path)
    saved = json.loads((tmp_path / name / "adapter_config.json").read_text())
    return out, saved, read_safetensors(tmp_path / name / "adapter_model.safetensors")


def losses(out):
    def loss(prefix):
        line = next(line for line in out.splitlines() if line.startswith(prefix))
        return float(line.rsplit("loss ", 1)[1])
    return loss("before"), loss("after")


def test_config_keys_and_types_are_checked(data, tmp_path):
    # A PEFT adapter_config.json passed as the train config itself: refused with where it belongs, not ignored.
    peft = tmp_path / "peft.json"
    peft.write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["query"]}))
    r = subprocess.run([GRAFT, "train", "--config", str(peft), "--data", str(data), "--max-steps", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "unknown key 'peft_type'" in r.stderr and 'goes under "adapter"' in r.stderr, r.stderr
    typed = tmp_path / "typed.json"
    typed.write_text(json.dumps({"max_length": "64", "adapter": {"peft_type": "LORA"}}))
    r = subprocess.run([GRAFT, "train", "--config", str(typed), "--data", str(data), "--max-steps", "1"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "'max_length' must be a whole number, got 64" in r.stderr, r.stderr


def orthonormality_gap(a):
    return float(np.abs(a @ a.T - np.eye(a.shape[0])).max())


@pytest.mark.parametrize("init", ["eva", "lora_ga"])
def test_data_driven_init_runs_before_step_one_and_training_lowers_the_loss(tmp_path, init):
    # One step at a negligible rate: the saved adapter is the initialization itself.
    out, saved, tensors = data_driven_run(tmp_path, f"{init}-init", init, 1, 1e-9, 0)
    assert f'init       init_lora_weights "{init}" from the first 4 training batches before step 1' in out
    assert "data       320 train / 300 test examples" in out, out  # --max-eval-examples 300 of the 1,490
    a_keys = sorted(k for k in tensors if k.endswith("lora_A.weight"))
    assert len(a_keys) == 12
    if init == "eva":
        # Principal components of each layer's inputs: orthonormal rows (a random A is not), B zero.
        assert saved["init_lora_weights"] == "eva"
        assert max(orthonormality_gap(tensors[k].astype(np.float64)) for k in a_keys) < 1e-4
        assert max(float(np.abs(tensors[k.replace("lora_A", "lora_B")]).max()) for k in a_keys) < 1e-6
    else:
        # LoRA-GA saves PEFT's converted form: rank 2r, A = [A; A0], B = [B, -B0], which is zero right after init;
        # A's rows are the gradient's right singular vectors (orthonormal) and B is not zero.
        assert saved["r"] == 8 and saved["init_lora_weights"] is True
        for k in a_keys:
            a, b = tensors[k].astype(np.float64), tensors[k.replace("lora_A", "lora_B")].astype(np.float64)
            assert a.shape[0] == 8 and orthonormality_gap(a[:4]) < 1e-4
            assert np.abs(a[:4] - a[4:]).max() < 1e-6 and np.abs(b[:, :4] + b[:, 4:]).max() < 1e-6
            assert np.abs(b).max() > 1e-6  # a data-free init has B = 0
    # A data-free init of the same seed has no orthonormal A.
    _, _, gaussian = data_driven_run(tmp_path, f"{init}-gaussian", "gaussian", 1, 1e-9, 0)
    assert min(orthonormality_gap(gaussian[k].astype(np.float64)) for k in a_keys) > 0.1
    # Real training from that initialization lowers the held-out loss.
    out, _, _ = data_driven_run(tmp_path, f"{init}-trained", init, 30, 3e-3, 0.01)
    before, after = losses(out)
    print(f"{init}: held-out loss {before:.4f} -> {after:.4f}")
    assert after < before - 0.01, out


def test_esft_and_perft_train_on_a_moefied_base(tmp_path):
    """`graft moefy --output` then `graft train` with moe_base: ESFT selects its experts from the training data and
    saves only them; PERFT's routers report one statistics line per MoE layer."""
    texts = [f"the {w} was {v} today" for w in ("service", "flight", "food", "crew") for v in ("great", "awful", "late")]
    data = tmp_path / "lm.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    base = tmp_path / "moe"
    r = subprocess.run([GRAFT, "moefy", "--experts", "8", "--top-k", "4", "--calibration-tokens", "256", "--eval-texts", "2",
                        "--output", str(base)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    esft = tmp_path / "esft.json"
    esft.write_text(json.dumps({"model": "smollm2", "task": "causal-lm", "moe_base": str(base),
                                "adapter": {"peft_type": "ESFT", "score_function": "gate", "top_p": 0.3}}))
    out, _ = train("--config", str(esft), "--data", str(data), "--batch-size", "4", "--max-steps", "1", "--skip-initial-eval",
                   "--output", str(tmp_path / "esft"), cwd=tmp_path)
    assert "moe base   " in out and "esft       gate score, top_p 0.30:" in out, out
    saved = json.loads((tmp_path / "esft" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ESFT" and saved["num_experts"] == 8 and len(saved["experts"]) == 30
    tensors = read_safetensors(tmp_path / "esft" / "adapter_model.safetensors")
    gate = [k for k in tensors if k.endswith("mlp.tuned_experts.gate_proj")]
    assert len(gate) == sum(1 for v in saved["experts"].values() if v)
    assert all(tensors[k].shape == (len(saved["experts"][k.split(".")[4]]), 192, 576) for k in gate)
    perft = tmp_path / "perft.json"
    perft.write_text(json.dumps({"model": "smollm2", "task": "causal-lm", "moe_base": str(base),
                                 "adapter": {"peft_type": "PERFT", "num_experts": 2, "top_k": 1, "r": 2}}))
    out, _ = train("--config", str(perft), "--data", str(data), "--batch-size", "4", "--max-steps", "1", "--skip-initial-eval",
                   "--output", str(tmp_path / "perft"), cwd=tmp_path)
    assert "adapter    PERFT on 30 layers" in out, out
    assert sum(1 for line in out.splitlines() if line.startswith("router") and "mlp.peft_experts" in line) == 30
    # MOE_PLORA: partial LoRA on the experts for the new domain's tokens only (here the whole vocabulary, so the one step trains).
    plora = tmp_path / "plora.json"
    plora.write_text(json.dumps({"model": "smollm2", "task": "causal-lm", "moe_base": str(base),
                                 "adapter": {"peft_type": "MOE_PLORA", "r": 2, "domain_token_ranges": [[0, 49151]]}}))
    out, _ = train("--config", str(plora), "--data", str(data), "--batch-size", "4", "--max-steps", "1", "--skip-initial-eval",
                   "--output", str(tmp_path / "plora"), cwd=tmp_path)
    assert "adapter    MOE_PLORA on 30 layers" in out, out
    # Its domain pathways are router statistics: one line per MoE block, the evaluation's tokens all domain tokens.
    assert sum(1 for line in out.splitlines() if line.startswith("router") and "mlp.experts.plora_domain: load [" in line) == 30, out
    tensors = read_safetensors(tmp_path / "plora" / "adapter_model.safetensors")
    assert sum(1 for k in tensors if k.endswith("mlp.experts.plora_gate_A")) == 30
    # Without an MoE base both are refused by name.
    r = subprocess.run([GRAFT, "train", "--config", str(perft), "--moe-base", str(tmp_path / "missing"), "--data", str(data)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "moe_config.json" in r.stderr


def moefy(*args, cwd):
    r = subprocess.run([GRAFT, "moefy", "--calibration-tokens", "256", "--eval-texts", "2", *args],
                       capture_output=True, text=True, timeout=600, cwd=cwd)
    return r


def test_moefy_makes_widenet_and_stratified_models_that_reload(tmp_path):
    """`graft moefy --method widenet|stratified`: each trains, saves in its own format and reloads with the same
    perplexity; the stratified report counts expert passes per token; bad options are refused by name."""
    wide = tmp_path / "wide"
    r = moefy("--method", "widenet", "--top-k", "1,2", "--upcycle-layers", "26,27,28,29", "--train-steps", "2",
              "--batch-size", "2", "--output", str(wide), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "widenet    2 groups of 2 layers sharing one router over their FFNs, top-1" in r.stdout, r.stdout
    config = json.loads((wide / "widenet_config.json").read_text())
    assert config["format"] == "graft-widenet" and config["groups"] == [[26, 27], [28, 29]] and config["top_k"] == 1
    ppl = lambda out, label: [l for l in out.splitlines() if l.startswith(label)][0].split()[1]
    again = moefy("--load", str(wide), "--top-k", "1,2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert ppl(again.stdout, "E=2 k=1") == ppl(r.stdout, "E=2 k=1"), (r.stdout, again.stdout)

    strat = tmp_path / "strat"
    r = moefy("--method", "stratified", "--strata", "1,2", "--new-expert-size", "64", "--top-k", "1", "--upcycle-layers", "28,29",
              "--train-steps", "2", "--batch-size", "2", "--output", str(strat), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "stratified 2 layers, strata 1+2 (stratum 0: FFN copies), top-1" in r.stdout, r.stdout
    row = [l for l in r.stdout.splitlines() if l.startswith("strata")][0].split()
    assert 1 <= float(row[4]) <= 2, r.stdout
    tensors = read_safetensors(strat / "stratified.safetensors")
    assert tensors["model.layers.29.mlp.strata.1.norm.weight"].shape == (576,)
    again = moefy("--load", str(strat), "--top-k", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert ppl(again.stdout, "strata") == ppl(r.stdout, "strata"), (r.stdout, again.stdout)
    for args, named in ((["--method", "stratified", "--strata", "1,0"], "--strata"),
                        (["--method", "widenet", "--group-size", "3", "--upcycle-layers", "28,29"], "group size 3")):
        bad = moefy(*args, cwd=tmp_path)
        assert bad.returncode != 0 and named in bad.stderr, bad.stderr


def test_moefy_makes_hmoe_and_upcycled_bases_that_reload(tmp_path):
    """`graft moefy --method hmoe|upcycling`: HMoE's heterogeneous sizes and tuned routers, upcycled layers trained and
    saved with their experts; each reloads with the same perplexity, and a wrong option is refused by name."""
    hmoe = tmp_path / "hmoe"
    r = moefy("--method", "hmoe", "--experts", "4", "--top-k", "2", "--expert-sizes", "256,320,384,576",
              "--router-steps", "5", "--output", str(hmoe), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "hmoe       expert sizes 256/320/384/576" in r.stdout and "activated FFN neurons" in r.stdout, r.stdout
    config = json.loads((hmoe / "moe_config.json").read_text())
    assert config["method"] == "hmoe" and config["expert_sizes"] == [256, 320, 384, 576] and config["version"] == 2
    ppl = lambda out: [l for l in out.splitlines() if l.startswith("E=4 k=2")][0].split()[2]
    again = moefy("--load", str(hmoe), "--experts", "4", "--top-k", "2", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert ppl(again.stdout) == ppl(r.stdout), (r.stdout, again.stdout)

    up = tmp_path / "up"
    r = moefy("--method", "upcycling", "--experts", "2", "--top-k", "1", "--upcycle-layers", "28,29", "--train-steps", "2",
              "--batch-size", "2", "--mup-base-width", "144", "--output", str(up), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "upcycle    2 layers, 2 experts each" in r.stdout and "train      step 2/2 loss" in r.stdout, r.stdout
    # μP from a proxy a quarter as wide: the router and gate/up rates at 1/4, down's at 1/4 too (expert width ∝ width).
    assert "mup        base width 144 (experts 384): router std 0.005, learning-rate factors router 0.25, gate/up 0.25, down 0.25" in r.stdout, r.stdout
    config = json.loads((up / "moe_config.json").read_text())
    assert config["method"] == "upcycling" and config["moe_layers"] == [28, 29] and config["combine"] == "normalized_probability"
    # The parametrization the experts were trained under is recorded with them.
    assert (config["mup_base_width"], config["train_steps"], config["lr"]) == (144, 2, 0.0001), config
    tensors = read_safetensors(up / "moe_routers.safetensors")
    assert tensors["model.layers.29.mlp.experts.gate_proj"].shape == (2, 1536, 576)
    ppl = lambda out: [l for l in out.splitlines() if l.startswith("E=2 k=1")][0].split()[2]
    again = moefy("--load", str(up), "--experts", "2", "--top-k", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert ppl(again.stdout) == ppl(r.stdout), (r.stdout, again.stdout)

    for args, named in ((["--method", "switch"], "--method 'switch'"),
                        (["--method", "hmoe", "--experts", "4", "--expert-sizes", "1,2,3,4"], "--expert-sizes"),
                        (["--method", "upcycling", "--upcycle-layers", "30"], "--upcycle-layers"),
                        (["--method", "upcycling", "--upcycle-layers", "29", "--mup-base-width", "0"], "--mup-base-width 0 must be ≥ 1"),
                        (["--method", "hmoe", "--mup-base-width", "144"], "not --method hmoe")):
        bad = moefy(*args, cwd=tmp_path)
        assert bad.returncode != 0 and named in bad.stderr, bad.stderr
