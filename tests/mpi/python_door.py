"""Data-parallel training through the Python binding (libgraft.so's C ABI) under mpirun, or alone as the reference.

Each step's global batch is 8 tweets; under 2 ranks rank 0 passes the first 5 and rank 1 the last 3 to
Trainer.step (unequal shares: the library weights each rank's gradient by its share). Rank 0 saves the adapter.
    python3 python_door.py OUTPUT_DIR
"""
import sys

import graft

TEXTS = ["I love this", "worst day ever", "the bus is at noon", "so happy for you", "this is terrible",
         "a table and a chair", "what a great game", "never again, awful"]
LABELS = [2, 0, 1, 2, 0, 1, 2, 0]


def main():
    out = sys.argv[1]
    with graft.load_model("minilm", task="seq_cls", num_labels=3, seed=42) as model:
        model.add_adapter("default", graft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      lora_dropout=0.0, modules_to_save=["classifier"]))
        # SGD: an update proportional to the gradient checks the ranks' weighting directly (AdamW's first steps
        # move each element by about ±lr whatever its gradient's size).
        with graft.Trainer(model, optimizer="sgd", learning_rate=0.05, schedule="constant", seed=42) as trainer:
            rank, size = trainer.world
            assert size in (1, 2), size
            lo, hi = (0, 8) if size == 1 else ((0, 5) if rank == 0 else (5, 8))
            ids = [model.tokenize(t) for t in TEXTS[lo:hi]]
            for _ in range(3):
                trainer.step(ids, labels=LABELS[lo:hi])
            if rank == 0:
                model.save_adapter(out)
            print(f"rank {rank} of {size}: done", flush=True)


if __name__ == "__main__":
    main()
