"""Train a larger drafter for the demo model (SmolLM2-135M-Instruct) than `make demo` does:
the demo recipe with more training prompts (the base's answers are what limits acceptance,
benchmarks/RESULTS.md "Drafter training") and optionally more ResBlocks and epochs. Same code
path as the demo (`redrafter.demo.ensure_drafter`): the base's answers and the drafter are
cached under ~/.cache/redrafter and an interrupted training resumes. Prints and saves the
drafter's folder and its held-out metrics; pass the folder to `benchmarks.peers --drafter`.

    .venv/bin/python -m benchmarks.large_drafter [--train-prompts 2000] [--num-layers 1]
        [--epochs 4] [--threads 2] [--name large_drafter]

The base's greedy answers cost ~0.7 s per prompt on the 2-core VM (batch 32, fp32 torch): 24
minutes for the default 2,000. A 1-ResBlock drafter does as well as 3 here (RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks._common import machine, save
from redrafter.demo import RECIPE, ensure_drafter, find_demo_gguf
from redrafter.train.recipe import default_cache_dir


def main() -> None:
    """Train (or find cached) the larger drafter; print and save its held-out metrics."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-prompts", type=int, default=2000)
    ap.add_argument("--num-layers", type=int, default=1)
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="large_drafter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    recipe = {
        **RECIPE,
        "train_prompts": args.train_prompts,
        "num_layers": args.num_layers,
        "epochs": args.epochs,
    }
    start = time.perf_counter()
    folder = ensure_drafter(find_demo_gguf(), default_cache_dir(), recipe)
    seconds = time.perf_counter() - start
    state = json.loads((folder / "trainer_state.json").read_text())
    final = state["history"][-1] if state.get("history") else {}
    print(f"drafter: {folder} ({seconds:.0f} s this run)")
    for k in sorted(final):
        if k.startswith(("eval_top1@", "eval_chain", "eval_tokens_per_step")):
            print(f"  {k}: {final[k]:.3f}")
    save(
        args.name,
        {
            "machine": info,
            "command": "python " + " ".join(sys.argv),
            "recipe": recipe,
            "demo_recipe": RECIPE,
            "drafter": str(folder),
            "seconds_this_run": round(seconds, 1),
            "steps": state.get("step"),
            "final_eval": final,
        },
    )


if __name__ == "__main__":
    main()
