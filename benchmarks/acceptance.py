"""Tokens/step of trained drafters on held-out prompts, greedy, for a grid of beam shapes, with
the real decode driver on the torch runtime (the numbers of benchmarks/RESULTS.md).

    .venv/bin/python benchmarks/acceptance.py DRAFTER [DRAFTER ...] [--widths 1,2,4,8]
        [--lengths 3,4,5] [--prompts 24] [--max-new-tokens 64] [--device cpu|cuda]

Prompts come from held-out Jargon File entries and HumanEval tasks (`heldout_prompts`), never
trained on. `--device cuda` runs the same driver with the torch runtime on a GPU, for sweeps;
greedy fp32 decoding is the same algorithm there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from redrafter.config import BeamShape  # noqa: E402
from redrafter.demo import find_demo_gguf  # noqa: E402
from redrafter.models.checkpoints import load_base, load_drafter  # noqa: E402
from redrafter.models.tokenizer import load_tokenizer  # noqa: E402
from redrafter.train.evaluate import tokens_per_step  # noqa: E402
from redrafter.train.prompts import find_shared_data, heldout_prompts  # noqa: E402
from redrafter.train.recipe import encode_prompt  # noqa: E402

from _common import machine, save  # noqa: E402


def grid(
    base,
    drafter,
    prompts: list[list[int]],
    *,
    widths: list[int],
    lengths: list[int],
    max_new_tokens: int,
    eos: tuple[int, ...],
    batch_size: int = 1,
) -> dict[str, float]:
    """tokens/step for every (W, L): {"W4L5": 2.9, ...}."""
    out = {}
    for L in lengths:
        for W in widths:
            t = time.perf_counter()
            r = tokens_per_step(
                base,
                drafter,
                prompts,
                beam=BeamShape(W, L),
                max_new_tokens=max_new_tokens,
                eos_token_ids=eos,
                batch_size=batch_size,
            )
            out[f"W{W}L{L}"] = round(r["tokens_per_step"], 3)
            print(
                f"  W={W} L={L}: {r['tokens_per_step']:.2f} tokens/step "
                f"({time.perf_counter() - t:.1f} s)",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("drafters", nargs="+")
    ap.add_argument("--widths", default="1,2,4,8")
    ap.add_argument("--lengths", default="3,4,5")
    ap.add_argument("--prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", help="the shared data folder [<repo>/../shared/data]")
    ap.add_argument("--name", default="acceptance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    gguf = find_demo_gguf()
    base, tokenizer = load_base(gguf).to(args.device), load_tokenizer(gguf)
    data = Path(args.data_dir) if args.data_dir else find_shared_data()
    prompts = [encode_prompt(tokenizer, p) for p in heldout_prompts(data, count=args.prompts)]
    widths = [int(w) for w in args.widths.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    results = {}
    for path in args.drafters:
        print(f"{path}:", flush=True)
        drafter = load_drafter(path)
        results[path] = grid(
            base,
            drafter,
            prompts,
            widths=widths,
            lengths=lengths,
            max_new_tokens=args.max_new_tokens,
            eos=base.config.eos_token_ids,
        )
    payload = {
        "machine": info,
        "device": args.device,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "tokens_per_step": results,
    }
    save(args.name, payload)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
