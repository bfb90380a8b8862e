"""Train drafters for the demo model (SmolLM2-135M-Instruct) with several recipes and sizes,
and measure each on held-out prompts: Apple's CE on data labels vs distillation from the
base's own answers, draft-vocab sizes, init, budget. Prints and saves one JSON.

    .venv/bin/python -m benchmarks.train_drafter [--variants distill,ce] [--prompts 320]
        [--epochs 2] [--device cpu|cuda] [--out DIR] [--grid distill,ce]

Variants (names below) share one set of base outputs: the base's greedy answers to the first
N demo training prompts (`redrafter.demo.training_prompts`), and teacher-forced chunks of the
Jargon File and HumanEval for CE. Held-out metrics: teacher-forced accuracy on answers to
held-out prompts and tokens/step (greedy, real driver) on `redrafter.demo.heldout_prompts`;
`--grid` names variants that also get the full W x L table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks._common import machine, save
from benchmarks.acceptance import grid, ort_runtime
from redrafter.bench.prompts import encode_prompts
from redrafter.config import BeamShape
from redrafter.demo import find_demo_gguf, find_shared_data, heldout_prompts, training_prompts
from redrafter.demo.data import HUMANEVAL, JARGON
from redrafter.models.checkpoints import load_base
from redrafter.models.tokenizer import load_tokenizer
from redrafter.train.data import load_chunks
from redrafter.train.prompts import Prompt
from redrafter.train.teacher import Examples, distill_examples, teacher_forced
from redrafter.train.trainer import Heldout, TrainOptions, train_drafter

# name -> (data: "distill" | "distill-all" | "ce", TrainOptions overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "distill": ("distill", {}),
    "distill-kl": ("distill", {"kl_weight": 1.0}),
    "ce": ("ce", {}),
    "distill-random-init": ("distill", {"init": "random"}),
    "distill-vd4096": ("distill", {"draft_vocab": 4096}),
    "distill-vd16384": ("distill", {"draft_vocab": 16384}),
    "distill-fullvocab": ("distill", {"draft_vocab": None}),
    "distill-2layers": ("distill", {"num_layers": 2}),
    "distill-3layers": ("distill", {"num_layers": 3}),
    "distill-8epochs": ("distill", {"epochs": 8.0}),
    "distill-bs64": ("distill", {"batch_size": 64}),
    "distill-exit1152": ("distill", {"exit_dim": 1152}),
    "distill-all-3layers-4epochs": ("distill-all", {"num_layers": 3, "epochs": 4.0}),
    "distill-lr1e-3": ("distill", {"lr": 1e-3}),
    "distill-lr1e-2": ("distill", {"lr": 1e-2}),
    "distill-4epochs": ("distill", {"epochs": 4.0}),
    "distill-all": ("distill-all", {}),
    "distill-all-kl": ("distill-all", {"kl_weight": 1.0}),
    "ce-all": ("ce-all", {}),
}


def main() -> None:
    """Train every named variant on shared base answers, measure each held out, save all."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="distill,distill-kl,ce")
    ap.add_argument("--grid", default="", help="variants that also get the W x L table")
    ap.add_argument("--prompts", type=int, default=320, help="training prompts (distill)")
    ap.add_argument("--all-prompts", type=int, default=2000, help="prompts for *-all variants")
    ap.add_argument("--seq-len", type=int, default=128, help="most tokens per answer")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--predict-tokens", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--draft-vocab", type=int, default=8192, help="0: the full vocabulary")
    ap.add_argument(
        "--runtime",
        choices=["torch", "onnxruntime"],
        default="torch",
        help="runs the tokens/step grid (greedy fp32: the same tokens either way, ORT is faster)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", help="the demo's data folder [redrafter.demo's default]")
    ap.add_argument("--out", default="/tmp/redrafter-drafters")
    ap.add_argument("--name", default="train_drafter")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = machine()
    names = [v for v in args.variants.split(",") if v]
    gguf = find_demo_gguf()
    t0 = time.perf_counter()
    base = load_base(gguf).to(args.device)
    tokenizer = load_tokenizer(gguf)
    eos = base.config.eos_token_ids
    data = find_shared_data(args.data_dir)
    K = args.predict_tokens
    timings: dict[str, float] = {"load": time.perf_counter() - t0}

    def answers(prompts: Sequence[Prompt]) -> tuple[Examples, float]:
        """The base's greedy answers to `prompts` as training examples, and seconds taken."""
        t = time.perf_counter()
        ids = encode_prompts(tokenizer, prompts)
        ex, _ = distill_examples(
            base,
            ids,
            predict_tokens=K,
            max_new_tokens=args.seq_len,
            eos_token_ids=eos,
            batch_size=64 if args.device != "cpu" else 16,
            top_c=16,
        )
        return ex, time.perf_counter() - t

    sources = {VARIANTS[n][0] for n in names}
    pool = training_prompts(data, count=max(args.prompts, args.all_prompts))
    examples: dict[str, Examples] = {}
    small, timings["distill_answers"] = answers(pool[: args.prompts])
    examples["distill"] = small
    if "distill-all" in sources:
        rest, t = answers(pool[args.prompts : args.all_prompts])
        examples["distill-all"] = Examples.cat([small, rest])
        timings["distill_all_answers"] = timings["distill_answers"] + t
    held, timings["heldout_answers"] = answers(heldout_prompts(data, count=16))
    if sources & {"ce", "ce-all"}:
        t = time.perf_counter()
        chunks = torch.cat(
            [
                load_chunks([data / JARGON], tokenizer, seq_len=args.seq_len, separator=eos[0]),
                load_chunks([data / HUMANEVAL], tokenizer, seq_len=args.seq_len, separator=eos[0]),
            ]
        )
        chunks = chunks[torch.randperm(len(chunks), generator=torch.Generator().manual_seed(0))]
        need = -(-len(small) // (args.seq_len - 1))  # as many positions as distill has
        rows = chunks if "ce-all" in sources else chunks[:need]
        ce = teacher_forced(base, rows, predict_tokens=K, batch_size=32)
        examples["ce"] = ce.take(torch.arange(min(len(ce), len(small))))
        examples["ce-all"] = ce
        timings["ce_teacher_forced"] = time.perf_counter() - t
    eval_ids = encode_prompts(tokenizer, heldout_prompts(data, count=args.eval_prompts))
    print(f"examples: { {k: len(v) for k, v in examples.items()} }, held-out {len(held)}")
    results = {}
    for name in names:
        source, overrides = VARIANTS[name]
        fields = {
            "mode": "ce" if source.startswith("ce") else "distill",
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "predict_tokens": K,
            "draft_vocab": args.draft_vocab or None,
        }
        options = TrainOptions(**{**fields, **overrides})
        t = time.perf_counter()
        run = train_drafter(
            base,
            examples[source],
            Path(args.out) / name,
            options,
            heldout=Heldout(held),
            eos_token_ids=eos,
            progress=False,
        )
        train_seconds = time.perf_counter() - t
        drafter = run.drafter
        params = sum(p.numel() for p in drafter.parameters())
        widths = [4] if name not in args.grid.split(",") else [1, 2, 4, 8]
        lengths = [5] if name not in args.grid.split(",") else [3, 4, 5]
        runtime = None
        if args.runtime == "onnxruntime":
            shapes = [BeamShape(w, n) for n in lengths for w in widths]
            runtime = ort_runtime(gguf, str(Path(args.out) / name), shapes, args.threads)
        tps = grid(
            base,
            drafter,
            eval_ids,
            widths=widths,
            lengths=lengths,
            max_new_tokens=args.max_new_tokens,
            eos=eos,
            runtime=runtime,
        )
        chain = [run.final_eval.get(f"eval_chain{k}", 0.0) for k in range(1, K + 1)]
        top1 = [run.final_eval.get(f"eval_top1@{k}", 0.0) for k in range(1, K + 1)]
        results[name] = {
            "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "eval_beam"},
            "examples": len(examples[source]),
            "steps": run.steps,
            "train_seconds": round(train_seconds, 1),
            "params": params,
            "megabytes_fp32": round(4 * params / 1e6, 1),
            "coverage": run.coverage,
            "heldout_top1": [round(x, 3) for x in top1],
            "heldout_chain": [round(x, 3) for x in chain],
            "tokens_per_step": tps,
        }
        print(name, json.dumps(results[name]), flush=True)
        payload = {
            "machine": info,
            "device": args.device,
            "timings": timings,
            "args": vars(args),
            "results": results,
        }
        save(args.name, payload)  # after every variant: a cut-off run keeps what it measured


if __name__ == "__main__":
    main()
