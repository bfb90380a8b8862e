"""What a tree token costs and what a prompt-lookup draft token is worth, on one bundle: the two
sides of the tree settings (`--min-draft-prob`, `--lookup-span`, `--lookup-min-ngram`).

    .venv/bin/python -m benchmarks.tree_costs --bundle DIR [--tokens 1-17] [--context 300]
        [--rounds 8] [--jargon 4 --code 4 --max-new-tokens 128] [--span 12]
        [--threads 2] [--name tree_costs]

1. **Cost**: a verify of n chained tokens after `--context` cached ones (`verify_greedy`, the
   call greedy decoding makes), for every n in `--tokens`, one runtime, in rounds whose order
   reverses every round; median ms per n and its ratio to n = 1.
2. **Worth**: the held-out prompts decoded greedily (autoregressive: the text every greedy
   setting emits); at every position, the lookup continuation of each matched length n
   (`decoding/lookup.py`'s `continuation`, `--span` drafts per matched token) against the text
   that follows (n up to LONGEST_MATCH = 8: longer matches count as 8). Reported per n: how
   many positions match, and the fraction whose k-th draft
   token is accepted (all of the first k equal the text), k = 1 .. span x n. Positions whose
   remaining text is shorter than the draft and all of it matched are left out (their fate
   past the text is unknown). No timing: the same bundle gives the same figures.

A draft token pays where its acceptance rate times what an accepted token saves (a step's
time over its tokens) beats its cost (the curve's slope): benchmarks/RESULTS.md, issue 22.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks._common import idle_report, machine, save

LONGEST_MATCH = 8  # the longest suffix match scored; longer ones count as this long


def verify_curve(runtime: Any, widths: list[int], context: int, rounds: int) -> dict[int, float]:
    """Median ms of a verify of n chained tokens after `context`, per n, interleaved."""
    import numpy as np

    runtime.reset(batch=1, capacity=context + max(widths) + 8)
    runtime.prefill(np.arange(3, 3 + context)[None] % 1000, np.array([context]))
    calls = {}
    for n in widths:
        ids = np.full((1, n), 42)
        positions = (context + np.arange(n))[None]  # (1, n)
        mask = np.tril(np.ones((1, n, n), bool))  # (1, n, n) a chain
        calls[n] = (ids, positions, mask, np.array([context]))
    for args in calls.values():  # warm-up
        for _ in range(3):
            runtime.verify_greedy(*args)
    ms: dict[int, list[float]] = {n: [] for n in widths}
    for r in range(rounds):
        for n in widths if r % 2 == 0 else widths[::-1]:
            t = time.perf_counter()
            for _ in range(10):
                runtime.verify_greedy(*calls[n])
            ms[n].append(100 * (time.perf_counter() - t))
    return {n: median(v) for n, v in ms.items()}


def lookup_worth(texts: list[tuple[list[int], list[int]]], span: int) -> dict[int, dict]:
    """Per matched length n: positions with a longest match of n, and the fraction whose k-th
    lookup draft token is accepted. texts: (prompt, generated) id lists."""
    import numpy as np

    from redrafter.decoding.lookup import continuation

    accepted: dict[int, list[int]] = {}  # n -> accepted drafts per position
    for prompt, generated in texts:
        text = np.array([*prompt, *generated], dtype=np.int64)
        for t in range(len(prompt), len(text) - 1):  # text[t] is the step's g0
            history = text[: t + 1]
            for n in range(min(LONGEST_MATCH, t), 0, -1):  # the longest match first
                draft = continuation(history, span_per_ngram=span, max_ngram=n, min_ngram=n)
                if draft is not None:
                    break
            else:
                continue
            future = text[t + 1 :]
            k = len(draft)
            agree = draft[: len(future)] == future[:k]
            a = int(np.argmin(agree)) if not agree.all() else len(agree)
            if a == len(future) < k:
                continue  # the text ends before the draft: its fate past the end is unknown
            accepted.setdefault(n, []).append(a)
    out = {}
    for n, counts in sorted(accepted.items()):
        c = np.array(counts)
        out[n] = {
            "positions": len(c),
            "accepted_at_k": [float((c >= k).mean()) for k in range(1, span * n + 1)],
            "mean_accepted": float(c.mean()),
        }
    return out


def main() -> None:
    """Time the verify curve, decode the prompts, score the lookup drafts; print and save."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--tokens", default="1-17", help="verify widths: a range A-B or a comma list")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--jargon", type=int, default=4)
    ap.add_argument("--code", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--span", type=int, default=12, help="lookup drafts per matched token")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="tree_costs")
    args = ap.parse_args()

    from redrafter.decoding import AUTOREGRESSIVE
    from redrafter.demo.data import heldout_shared_prompts
    from redrafter.pipeline import load

    if "-" in args.tokens:
        first, last = (int(x) for x in args.tokens.split("-"))
        widths = list(range(first, last + 1))
    else:
        widths = [int(x) for x in args.tokens.split(",")]
    pipe = load(args.bundle, runtime="onnxruntime", threads=args.threads)
    before = idle_report()
    curve = verify_curve(pipe.runtime, widths, args.context, args.rounds)
    after = idle_report()
    print("verify ms (ratio to n = 1):")
    one = curve[widths[0]]
    print("  " + ", ".join(f"{n}: {curve[n]:.2f} ({curve[n] / one:.2f})" for n in widths))
    prompts = [
        pipe.encode(p.text, chat=p.chat) for p in heldout_shared_prompts(args.jargon, args.code)
    ]
    options = AUTOREGRESSIVE.replace(max_new_tokens=args.max_new_tokens)
    texts = [(list(p), pipe.generate([p], options).token_ids[0]) for p in prompts]
    worth = lookup_worth(texts, args.span)
    print("\nlookup draft token k accepted, by the matched length n (positions):")
    for n, w in worth.items():
        shown = ", ".join(
            f"{k}: {w['accepted_at_k'][k - 1]:.2f}"
            for k in (1, 2, 3, 4, 6, 8, 12, 16, 24)
            if k <= len(w["accepted_at_k"])
        )
        print(f"  n = {n} ({w['positions']}): {shown}")
    save(
        args.name,
        {
            "machine": {**machine(), "idle_before": before, "idle_after": after},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "bundle": str(args.bundle),
            "context": args.context,
            "verify_ms": curve,
            "prompts": len(prompts),
            "lookup_span": args.span,
            "lookup_worth": worth,
        },
    )


if __name__ == "__main__":
    main()
