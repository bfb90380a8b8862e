"""The drafter's ONNX Runtime session on one intra-op thread against --threads, in the real decode
loop: the measurement behind `redrafter.runtimes.onnxruntime.drafter_threads` (a small drafter's
session runs on one thread on the CPU).

Two runtimes over one bundle in one process, identical but for the drafter session's thread
count, decode the held-out prompts greedily with W1 L5 + prompt lookup, interleaved round by
round (the order alternating). Reported per side: draft ms per step (the drafter's ORT call plus
the host's pruning and lookup), decode tok/s, and whether the tokens match.

    .venv/bin/python -m benchmarks.drafter_threads --bundle DIR [--threads 2] [--rounds 3]

Saves benchmarks/results/drafter_threads.json (or --name).
"""

from __future__ import annotations

import argparse
from statistics import median
from typing import Any

from benchmarks._common import idle_report, machine, save


def runtime_with_drafter_threads(bundle: str, threads: int, drafter: int) -> Any:
    """A pipeline on the bundle whose drafter sessions get `drafter` intra-op threads, the
    drafter session opened by a short warm-up."""
    from redrafter.pipeline import load
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    pipe = load(bundle, runtime="onnxruntime")
    pipe.runtime = OnnxRuntime(bundle, threads=threads, draft_threads=drafter)
    pipe.generate([pipe.encode("warm-up", chat=False)], _options(8))
    return pipe


def _options(n: int, min_draft_prob: float = 0.25) -> Any:
    from redrafter.config import BeamShape
    from redrafter.decoding import DecodeOptions

    return DecodeOptions(
        max_new_tokens=n, beam=BeamShape(1, 5), prompt_lookup=True, min_draft_prob=min_draft_prob
    )


def main() -> None:
    """Decode on both sides, round by round; print and save."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--threads", type=int, default=2, help="the base's (and other side's) threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jargon", type=int, default=4)
    ap.add_argument("--code", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--name", default="drafter_threads")
    args = ap.parse_args()

    from redrafter.demo.data import heldout_shared_prompts

    before = idle_report()
    sides = {
        "drafter 1 thread": runtime_with_drafter_threads(args.bundle, args.threads, 1),
        f"drafter {args.threads} threads": runtime_with_drafter_threads(
            args.bundle, args.threads, args.threads
        ),
    }
    first = next(iter(sides.values()))
    ids = [
        first.encode(p.text, chat=p.chat) for p in heldout_shared_prompts(args.jargon, args.code)
    ]
    options = _options(args.max_new_tokens)
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    tokens: dict[str, list[list[int]]] = {}
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(sides)[::-1]
        for side in order:
            steps = emitted = 0
            decode_s = draft_s = verify_s = 0.0
            out = []
            for prompt in ids:
                g = sides[side].generate([prompt], options)
                out.append(list(g.token_ids[0]))
                steps += g.stats["steps"]
                emitted += round(g.stats["tokens_per_step"] * g.stats["steps"])
                decode_s += g.stats["decode_seconds"]
                draft_s += g.stats["seconds_by_phase"]["draft"]
                verify_s += g.stats["seconds_by_phase"]["verify"]
            tokens[side] = out
            row = {
                "tokens_per_second": emitted / decode_s,
                "draft_ms_per_step": 1000 * draft_s / steps,
                "verify_ms_per_step": 1000 * verify_s / steps,
            }
            runs[side].append(row)
            print(
                f"round {r + 1} {side:20s} draft {row['draft_ms_per_step']:.3f} ms/step, "
                f"verify {row['verify_ms_per_step']:.3f}, "
                f"{row['tokens_per_second']:.1f} tok/s",
                flush=True,
            )
    summary = {
        side: {
            "draft_ms_per_step_median": round(median(x["draft_ms_per_step"] for x in rows), 3),
            "verify_ms_per_step_median": round(median(x["verify_ms_per_step"] for x in rows), 3),
            "tokens_per_second_median": round(median(x["tokens_per_second"] for x in rows), 1),
        }
        for side, rows in runs.items()
    }
    identical = len({str(t) for t in tokens.values()}) == 1
    for side, s in summary.items():
        print(
            f"{side:20s} draft {s['draft_ms_per_step_median']:.3f} ms/step (median), "
            f"verify {s['verify_ms_per_step_median']:.3f}, "
            f"{s['tokens_per_second_median']:.1f} tok/s"
        )
    print(f"tokens identical: {identical}")
    save(
        args.name,
        {
            "machine": machine(),
            "bundle": args.bundle,
            "threads": args.threads,
            "rounds": args.rounds,
            "idle_before": before,
            "idle_after": idle_report(),
            "runs": runs,
            "summary": summary,
            "tokens_identical": identical,
        },
    )


if __name__ == "__main__":
    main()
