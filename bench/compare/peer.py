"""The PyTorch + transformers + PEFT side of bench/compare: the same workloads as `graft bench ...`.

Each subcommand loads its model, runs warm-up then timed repetitions, prints a human-readable line and, last,
``BENCH_JSON {...}`` with the median and the process's own peak RSS (the harness measures the child's peak RSS
itself too, with wait4). Float32 throughout, ``torch.set_num_threads(threads)``. Run inside the private venv made
by bench/compare/setup-venv; never imported by Graft.

Workloads (issue 12, item 1):

* ``train-step``: one LoRA optimizer step (forward, backward, AdamW) on random full-length token sequences;
  MiniLM as sequence classification (LoRA on query,value + classifier as modules_to_save) or SmolLM2 as a causal
  LM (LoRA on q_proj,v_proj). The base model's own dropout is set to 0 because Graft's models have none: equal
  work. No gradient clipping (Graft's train-step has none either).
* ``forward``: MiniLM encoder forward, inference mode.
* ``prefill``: SmolLM2 prefill of B×T random tokens with logits of the last position only (``logits_to_keep=1``):
  the base (adapters disabled), one LoRA adapter, and B different adapters mixed in one batch with PEFT's
  ``adapter_names=``.
* ``demo``: the `graft demo` recipe end to end with transformers + PEFT's own data pipeline (tokenizer, dynamic
  padding per batch, shuffled DataLoader), on the same split (bench/compare/tweets.py).
* ``train-text``: causal-LM LoRA training on a JSONL file of ``{"text"}``, consecutive batches in file order,
  padded to the longest in each batch; tokens per second counts real (unpadded) tokens.
"""

import argparse
import json
import os
import random
import resource
import sys
import time

import torch


def peak_rss_kb():
    """This process's peak resident set size in KiB (Linux ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def report(fields):
    """Prints the machine-readable result line the harness reads."""
    out = dict(fields)
    out["engine"] = "pytorch"
    out["peak_rss_kb"] = peak_rss_kb()
    out["versions"] = versions()
    print("BENCH_JSON " + json.dumps(out), flush=True)


def versions():
    """Versions of the reference stack, as imported."""
    import peft
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def graft_home():
    """The asset cache Graft uses: ``$GRAFT_HOME`` or ``~/.cache/graft``."""
    return os.environ.get("GRAFT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "graft")


def model_path(name):
    """Resolves the asset names Graft resolves (``minilm``, ``smollm2``) to ``(directory, gguf file or None)``."""
    home = graft_home()
    if name == "minilm":
        return os.path.join(home, "all-MiniLM-L6-v2"), None
    if name == "smollm2":
        return os.path.join(home, "smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    if name.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    return name, None


def load_causal_lm(name):
    """A Llama decoder from a GGUF file, dequantized by transformers to float32."""
    from transformers import AutoModelForCausalLM
    directory, gguf = model_path(name)
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)


def load_tokenizer(name):
    """The model's tokenizer (from the GGUF metadata for a .gguf model)."""
    from transformers import AutoTokenizer
    directory, gguf = model_path(name)
    return AutoTokenizer.from_pretrained(directory, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(directory)


def random_ids(batch, length, vocab, seed):
    """Random token ids in ``[1000, vocab - 1000)``, as Graft's benches draw them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, vocab - 1000, (batch, length), generator=g)


def timed(fn, runs, warmup):
    """Runs ``fn`` ``warmup`` times untimed then ``runs`` times timed; returns the sorted times in seconds."""
    times = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        fn()
        t = time.perf_counter() - start
        if i >= warmup:
            times.append(t)
    return sorted(times)


def median(times):
    """The median as Graft computes it (the upper middle of the sorted list)."""
    s = sorted(times)
    return s[len(s) // 2]


def cmd_train_step(a):
    """One LoRA optimizer step on random full-length sequences (workloads a and b)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    if a.model == "minilm":
        directory, _ = model_path("minilm")
        model = AutoModelForSequenceClassification.from_pretrained(
            directory, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
        targets = a.targets.split(",") if a.targets else ["query", "value"]
        config = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=targets,
                            modules_to_save=["classifier"])
        labels = torch.tensor([i % 3 for i in range(a.batch)])
    else:
        model = load_causal_lm(a.model)
        targets = a.targets.split(",") if a.targets else ["q_proj", "v_proj"]
        config = LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=targets)
        labels = None
    model = get_peft_model(model, config)
    model.train()
    vocab = model.config.vocab_size
    ids = random_ids(a.batch, a.length, vocab, 3)
    mask = torch.ones_like(ids)
    if labels is None:
        labels = ids.clone()  # transformers shifts internally; the last position has no target
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)

    def step():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    c0 = time.process_time()
    times = timed(step, a.runs, 0)
    cpu_per_step = (time.process_time() - c0) / a.runs
    n_trainable = sum(p.numel() for p in trainable)
    print(f"pytorch train-step {a.model} B{a.batch}×T{a.length} LoRA r{a.r} on {','.join(targets)}, {n_trainable} "
          f"trainable, threads={torch.get_num_threads()}: median {median(times):.4f} s/step "
          f"(min {times[0]:.4f}, max {times[-1]:.4f}, {a.runs} steps after {a.warmup} warm-up)", flush=True)
    report({"workload": "train-step", "median_s": median(times), "times_s": times, "trainable": n_trainable,
            "cpu_s_per_step": cpu_per_step})


def cmd_forward(a):
    """Encoder forward in inference mode (workload d)."""
    from transformers import AutoModel
    directory, _ = model_path(a.model)
    model = AutoModel.from_pretrained(directory).eval()
    ids = random_ids(a.batch, a.length, model.config.vocab_size, 1)
    mask = torch.ones_like(ids)

    def forward():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask)

    times = timed(forward, a.runs, a.warmup)
    print(f"pytorch forward {a.model} B{a.batch}×T{a.length} threads={torch.get_num_threads()}: median "
          f"{median(times):.4f} s (min {times[0]:.4f}, max {times[-1]:.4f}, {a.runs} runs)", flush=True)
    report({"workload": "forward", "median_s": median(times), "times_s": times})


def cmd_prefill(a):
    """Prefill with last-position logits: mixed adapters, one adapter, base (workload c)."""
    from peft import LoraConfig, get_peft_model
    model = load_causal_lm(a.model)
    targets = a.targets.split(",")
    config = LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=targets, init_lora_weights=False)
    torch.manual_seed(100)
    model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, a.batch):
        model.add_adapter(f"a{i}", config)
    model.eval()
    ids = random_ids(a.batch, a.length, model.config.vocab_size, 5)
    mask = torch.ones_like(ids)
    order = list(range(a.batch))
    random.Random(5).shuffle(order)
    names = [f"a{i}" for i in order]

    def run(**kwargs):
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1, **kwargs)
        assert out.logits.shape[1] == 1

    model.set_adapter("a0")
    mixed = timed(lambda: run(adapter_names=names), a.runs, a.warmup)
    one = timed(lambda: run(), a.runs, a.warmup)

    def base():
        with model.disable_adapter():
            run()
    base_t = timed(base, a.runs, a.warmup)
    print(f"pytorch prefill {a.model} {a.batch}×{a.length}, {a.batch} LoRA r{a.r} adapters on {a.targets}, last-position "
          f"logits, threads={torch.get_num_threads()}: mixed {median(mixed):.3f} s, one adapter {median(one):.3f} s, "
          f"base {median(base_t):.3f} s", flush=True)
    report({"workload": "mixed-adapters", "median_s": median(mixed), "mixed_s": median(mixed),
            "one_adapter_s": median(one), "base_s": median(base_t),
            "times_s": {"mixed": mixed, "one": one, "base": base_t}})


def cmd_demo(a):
    """The `graft demo` recipe with transformers + PEFT and a plain PyTorch training loop (workload e).

    LoRA r8 α16 dropout 0.1 on query,value, classifier in modules_to_save, 2 epochs, batch 32, AdamW lr 1e-3 weight
    decay 0.01, 20 warm-up steps then linear decay to 0, gradient norm clipped at 1.0, max length 64, seed 42.
    The model keeps transformers' default dropout (what a user of this stack gets)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import tweets
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
    from transformers import get_linear_schedule_with_warmup

    t_all = time.perf_counter()
    torch.manual_seed(42)
    directory, _ = model_path("minilm")
    tok = AutoTokenizer.from_pretrained(directory)
    train, test = tweets.demo_subsets()
    model = AutoModelForSequenceClassification.from_pretrained(directory, num_labels=3)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    collate = DataCollatorWithPadding(tok)

    def encode(rows):
        return [dict(tok(text, truncation=True, max_length=64), labels=label) for text, label in rows]

    train_ds, test_ds = encode(train), encode(test)
    g = torch.Generator().manual_seed(42)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=32, shuffle=True, collate_fn=collate, generator=g)
    test_loader = torch.utils.data.DataLoader(test_ds, batch_size=64, collate_fn=collate)
    epochs = 2
    total = epochs * len(loader)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.01)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=20, num_training_steps=total)

    def evaluate():
        model.eval()
        correct, loss_sum = 0, 0.0
        with torch.inference_mode():
            for b in test_loader:
                out = model(**b)
                loss_sum += out.loss.item() * len(b["labels"])
                correct += (out.logits.argmax(-1) == b["labels"]).sum().item()
        return correct / len(test_ds), loss_sum / len(test_ds)

    acc0, loss0 = evaluate()
    print(f"before     test accuracy {acc0:.3f}, loss {loss0:.4f}", flush=True)
    model.train()
    t_train = time.perf_counter()
    tokens = 0
    for epoch in range(epochs):
        for step, b in enumerate(loader):
            loss = model(**b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            tokens += int(b["attention_mask"].sum())
        print(f"epoch {epoch + 1}/{epochs} done, {time.perf_counter() - t_train:.1f} s, last loss {loss.item():.4f}",
              flush=True)
    train_s = time.perf_counter() - t_train
    acc, loss1 = evaluate()
    all_s = time.perf_counter() - t_all
    print(f"after      test accuracy {acc:.3f}, loss {loss1:.4f}", flush=True)
    print(f"time       {train_s:.1f} s training ({tokens / train_s:.0f} tokens/s), {all_s:.1f} s in all", flush=True)
    report({"workload": "demo", "median_s": train_s, "train_s": train_s, "total_s": all_s, "accuracy": acc,
            "accuracy_before": acc0, "steps": total})


def cmd_train_text(a):
    """Causal-LM LoRA training on JSONL texts, consecutive batches in file order (workload f)."""
    from peft import LoraConfig, get_peft_model
    tok = load_tokenizer(a.model)
    model = load_causal_lm(a.model)
    targets = a.targets.split(",")
    model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0, target_modules=targets))
    model.train()
    with open(a.data, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    needed = (a.warmup + a.steps) * a.batch
    if len(texts) < needed:
        sys.exit(f"{a.data}: {len(texts)} examples, {needed} needed")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    # As Graft's ExampleTokenizer.causalLM: no special tokens, EOS appended, truncated to max length.
    seqs = [(tok(t, add_special_tokens=False)["input_ids"] + [eos])[: a.max_length] for t in texts[:needed]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=a.lr, weight_decay=0.01)

    def batch_tensors(rows):
        n = max(len(r) for r in rows)
        ids = torch.full((len(rows), n), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        labels = torch.full((len(rows), n), -100, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            labels[i, : len(r)] = torch.tensor(r)
        return ids, mask, labels

    times, tokens, loss = [], 0, None
    for s in range(a.warmup + a.steps):
        rows = seqs[s * a.batch:(s + 1) * a.batch]
        start = time.perf_counter()
        ids, mask, labels = batch_tensors(rows)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t = time.perf_counter() - start
        if s >= a.warmup:
            times.append(t)
            tokens += sum(len(r) for r in rows)
    total = sum(times)
    print(f"pytorch train-text causal LM, LoRA r{a.r} on {a.targets}, B{a.batch} (max {a.max_length} tokens), "
          f"threads={torch.get_num_threads()}: {tokens / total:.0f} tokens/s over {a.steps} steps after {a.warmup} "
          f"warm-up (median {median(times):.4f} s/step, last loss {loss.item():.4f})", flush=True)
    report({"workload": "train-text", "median_s": median(times), "times_s": times, "tokens": tokens,
            "tokens_per_s": tokens / total, "last_loss": loss.item()})


def cuda_library_rss_kb():
    """Resident KiB of the CUDA runtime libraries mapped into this process (PyPI's torch is the CUDA build; a
    CPU-only build would not map them). Read from /proc/self/smaps."""
    total, counting = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and not parts[0].endswith(":"):
                path = parts[5] if len(parts) > 5 else ""
                name = os.path.basename(path)
                counting = "/nvidia/" in path or name.startswith(("libtorch_cuda", "libc10_cuda", "libnv", "libcu"))
            elif counting and parts and parts[0] == "Rss:":
                total += int(parts[1])
    return total


def cmd_idle(a):
    """The floor: peak RSS of importing torch, transformers and peft, and the CUDA libraries' share of it."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    cuda = cuda_library_rss_kb()
    print(f"pytorch import floor: peak RSS {peak_rss_kb() / 1e6 * 1.024:.2f} GB, of which CUDA libraries resident "
          f"{cuda / 1e6 * 1.024:.2f} GB", flush=True)
    report({"workload": "idle", "median_s": None, "cuda_libraries_rss_kb": cuda})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--autocast", action="store_true", help="run under torch.autocast('cpu', dtype=torch.bfloat16)")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("train-step")
    s.add_argument("--model", required=True)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--length", type=int, default=64)
    s.add_argument("--r", type=int, default=8)
    s.add_argument("--targets")
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--warmup", type=int, default=2)
    s.set_defaults(fn=cmd_train_step)

    s = sub.add_parser("forward")
    s.add_argument("--model", default="minilm")
    s.add_argument("--batch", type=int, default=32)
    s.add_argument("--length", type=int, default=64)
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.set_defaults(fn=cmd_forward)

    s = sub.add_parser("prefill")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--length", type=int, default=64)
    s.add_argument("--r", type=int, default=16)
    s.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.set_defaults(fn=cmd_prefill)

    s = sub.add_parser("demo")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("train-text")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--data", required=True)
    s.add_argument("--batch", type=int, default=8)
    s.add_argument("--max-length", type=int, default=64)
    s.add_argument("--r", type=int, default=8)
    s.add_argument("--targets", default="q_proj,v_proj")
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--warmup", type=int, default=2)
    s.set_defaults(fn=cmd_train_text)

    s = sub.add_parser("idle")
    s.set_defaults(fn=cmd_idle)

    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # Equal precision for Graft's bfloat16 mode: PyTorch's own mixed precision on the CPU.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.autocast):
        a.fn(a)


if __name__ == "__main__":
    main()
