"""The compute roofline of batched teacher answers (issue 21): can fp32 greedy answers of the demo
model be generated 3x faster than the 2,878 s per 4,000 prompts of 2026-11-30 on this machine?

Batched decoding of many rows is compute-bound: every processed token (prompt or answer) costs
2 x (parameters in matmuls) FLOPs plus attention. This script measures

  1. fp32 GEMM throughput with --threads threads (torch, the best of --repeats timings per shape)
     at the demo model's projection shapes (576 -> 1536, 1536 -> 576, the 49,152-row LM head)
     for M rows per call (a batch of M rows, or M prompt tokens in one prefill);
  2. the FLOPs of a teacher run recorded by `benchmarks.train_distributed teacher` (prompt and
     answer tokens from its JSON, --teacher-json), the GFLOP/s each of its methods sustained, and
     the GFLOP/s a run would need to be 3x the issue's baseline (0.7195 s per prompt).

The fp32 answers must equal the deployed model's greedy decoding token for token, so lower
precision (bf16, int8 activations) is not an option for this goal.

    .venv/bin/python -m benchmarks.compute_roofline [--threads 2] [--rows 32,64,128,512]

Saves benchmarks/results/compute_roofline.json (or --name).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks._common import RESULTS, idle_report, machine, save

# SmolLM2-135M (the demo model): hidden 576, MLP 1536, 30 layers, 9 query / 3 KV heads of 64,
# vocabulary 49,152 with the LM head tied to the embedding.
HIDDEN, MLP, LAYERS, VOCAB, KV_DIM = 576, 1536, 30, 49152, 192
SHAPES = {"576->1536": (HIDDEN, MLP), "1536->576": (MLP, HIDDEN), "lm_head": (HIDDEN, VOCAB)}
BASELINE_S_PER_PROMPT = 2878.0 / 4000  # issue 21's "today": 2,878 s per 4,000 prompts


def matmul_flops_per_token() -> int:
    """2 x the multiply-adds of one token's projections: q,o (576x576), k,v (576x192), gate and
    up (576x1536), down (1536x576) per layer, and the LM head (the embedding is a lookup)."""
    per_layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_DIM + 3 * HIDDEN * MLP
    return 2 * (LAYERS * per_layer + HIDDEN * VOCAB)


def attention_flops(context: float) -> float:
    """2 x the multiply-adds of one token's scores and weighted values over `context` keys."""
    return 2 * LAYERS * 2 * context * 9 * 64


def gemm_gflops(rows: list[int], threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Best fp32 GFLOP/s of (M x K) @ (K x N) per shape and M."""
    import torch

    torch.set_num_threads(threads)
    out: dict[str, dict[str, float]] = {}
    for name, (K, N) in SHAPES.items():
        out[name] = {}
        for M in rows:
            a, b = torch.randn(M, K), torch.randn(K, N)
            flops = 2 * M * K * N
            calls = max(1, int(2e9 / flops))  # ~2 GFLOP per timing
            for _ in range(3):
                a @ b
            best = float("inf")
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    a @ b
                best = min(best, (time.perf_counter() - start) / calls)
            out[name][str(M)] = round(flops / best / 1e9, 1)
            print(f"  {name:10s} M={M:4d}: {out[name][str(M)]:6.1f} GFLOP/s", flush=True)
    return out


def teacher_needs(path: Path) -> dict[str, Any]:
    """FLOPs of the recorded teacher run and the GFLOP/s each method sustained, against what 3x
    the baseline would need."""
    run = json.loads(path.read_text())
    prompts = run["prompts"]
    prompt_tokens = run["prompt_tokens_mean"] * prompts
    answers = run["answer_tokens"]
    # Mean context while answering: the prompt plus half the answer.
    context = run["prompt_tokens_mean"] + run["answer_tokens_mean"] / 2
    flops = (prompt_tokens + answers) * matmul_flops_per_token() + answers * attention_flops(
        context
    )
    target_s = prompts * BASELINE_S_PER_PROMPT / 3
    return {
        "teacher_json": str(path),
        "prompts": prompts,
        "tokens_processed": round(prompt_tokens + answers),
        "tflop": round(flops / 1e12, 3),
        "sustained_gflops": {m: round(flops / s / 1e9, 1) for m, s in run["best_seconds"].items()},
        "best_seconds": run["best_seconds"],
        "seconds_for_3x": round(target_s, 1),
        "gflops_for_3x": round(flops / target_s / 1e9, 1),
    }


def main() -> None:
    """Measure, compare, print, save."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="32,64,128,512", help="M values (rows per GEMM)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--teacher-json",
        type=Path,
        default=RESULTS / "train_distributed_teacher_bundles.json",
        help="a `benchmarks.train_distributed teacher` result",
    )
    ap.add_argument("--name", default="compute_roofline")
    args = ap.parse_args()

    before = idle_report()
    print(f"fp32 GEMM, {args.threads} threads, best of {args.repeats}:")
    gemm = gemm_gflops([int(m) for m in args.rows.split(",")], args.threads, args.repeats)
    need = teacher_needs(args.teacher_json)
    peak = max(g for shape in gemm.values() for g in shape.values())
    print(
        f"\nteacher run ({need['prompts']} prompts, {need['tokens_processed']} tokens): "
        f"{need['tflop']} TFLOP"
    )
    for method, gflops in need["sustained_gflops"].items():
        print(f"  {method:24s} {need['best_seconds'][method]:7.1f} s = {gflops:6.1f} GFLOP/s")
    print(
        f"3x the baseline: {need['seconds_for_3x']} s = {need['gflops_for_3x']} GFLOP/s "
        f"sustained, against a best fp32 GEMM of {peak} GFLOP/s at any measured shape"
    )
    save(
        args.name,
        {
            "machine": machine(),
            "idle_before": before,
            "threads": args.threads,
            "gemm_gflops": gemm,
            "best_gemm_gflops": peak,
            "teacher": need,
            "idle_after": idle_report(),
        },
    )


if __name__ == "__main__":
    main()
