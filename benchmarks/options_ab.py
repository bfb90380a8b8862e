"""Decode settings against each other on one bundle, interleaved prompt by prompt: the A/B for a
tree-shape choice (draft floor, lookup span or shortest match) whose effect, a few percent, is
smaller than this VM's drift between whole rounds.

    .venv/bin/python -m benchmarks.options_ab --bundle DIR
        --config min_draft_prob=0.25 --config min_draft_prob=0.3,lookup_min_ngram=2
        [--beam 1x5] [--no-lookup] [--jargon 4 --code 4 --max-new-tokens 128] [--rounds 6]
        [--threads 2] [--wait-idle MIN] [--name options_ab]

Every `--config` is a list of `DecodeOptions` fields (`key=value`, comma-separated) over W1 L5
with the prompt-lookup beam (`--beam`, `--no-lookup` change that base); autoregressive decoding
runs beside them. `benchmarks.lookup_ablation` runs each configuration over all prompts in
turn, so a whole round of one meets the machine at another speed than the next one's: on the
2-core VM, round-to-round swings of 20-30 % hid a 4 % difference (benchmarks/RESULTS.md, issue
22). Here each prompt (~0.6 s) is decoded by every configuration back to back, in an order that
reverses every prompt, so drift hits them alike; a round is the sum over the prompts, and the
ratio of two configurations' seconds is paired per round. Greedy settings all emit the same
tokens (checked: any difference is an error).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks._common import idle_report, machine, save, wait_for_idle


def parse_config(text: str, base: Any) -> Any:
    """`key=value,...` over `base` (a DecodeOptions): each value parsed as its field's type."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key in ("beam", "sampling", "stop_token_ids"):
            raise SystemExit(f"error: --config {text!r}: {item!r} is not a DecodeOptions key=value")
        kind = type(getattr(base, key))
        changes[key] = value.lower() in ("1", "true", "on") if kind is bool else kind(value)
    return base.replace(**changes)


def main() -> None:
    """Interleave the configurations prompt by prompt for `--rounds` rounds and report each one's
    tok/s and its paired speed-up over the first `--config` per round."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--config", action="append", required=True, help="key=value,... (repeat)")
    ap.add_argument("--beam", default="1x5", help="WxL of the base configuration [1x5]")
    ap.add_argument("--no-lookup", action="store_true", help="base without the lookup beam")
    ap.add_argument("--jargon", type=int, default=4)
    ap.add_argument("--code", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-idle", type=float, default=0, metavar="MIN")
    ap.add_argument("--name", default="options_ab")
    args = ap.parse_args()

    from redrafter.config import BeamShape
    from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions
    from redrafter.demo.data import heldout_shared_prompts
    from redrafter.pipeline import load

    width, length = (int(x) for x in args.beam.lower().split("x"))
    base = DecodeOptions(
        max_new_tokens=args.max_new_tokens,
        beam=BeamShape(width, length),
        prompt_lookup=not args.no_lookup,
    )
    configs = {c.name: c for c in (parse_config(text, base) for text in args.config)}
    configs["autoregressive"] = AUTOREGRESSIVE.replace(max_new_tokens=args.max_new_tokens)
    names = list(configs)
    pipe = load(args.bundle, runtime="onnxruntime", threads=args.threads)
    ids = [pipe.encode(p.text, chat=p.chat) for p in heldout_shared_prompts(args.jargon, args.code)]
    for options in configs.values():  # warm-up: sessions, packed weights, drafter graph
        pipe.generate([ids[0]], options)
    if args.wait_idle:
        wait_for_idle(args.wait_idle)
    before = idle_report()
    seconds: dict[str, list[float]] = {k: [] for k in names}
    steps: dict[str, int] = dict.fromkeys(names, 0)
    tokens: dict[str, list[list[int]]] = {k: [] for k in names}
    for r in range(args.rounds):
        spent = dict.fromkeys(names, 0.0)
        for i, prompt in enumerate(ids):
            for name in names if (r + i) % 2 == 0 else names[::-1]:
                t = time.perf_counter()
                result = pipe.generate([prompt], configs[name])
                spent[name] += time.perf_counter() - t
                if r == 0:
                    tokens[name].append(list(result.token_ids[0]))
                    steps[name] += int(result.stats["steps"])
        for name in names:
            seconds[name].append(spent[name])
        print(f"round {r + 1}: " + ", ".join(f"{k} {spent[k]:.2f} s" for k in names), flush=True)
    after = idle_report()
    if any(tokens[k] != tokens["autoregressive"] for k in names):
        raise SystemExit("error: the configurations emitted different tokens (greedy expected)")
    n_tokens = sum(len(t) for t in tokens["autoregressive"])
    first = names[0]
    results: dict[str, Any] = {}
    for name in names:
        results[name] = {
            "tokens_per_second": n_tokens * args.rounds / sum(seconds[name]),
            "tokens_per_step": n_tokens / steps[name],
            "seconds_per_round": seconds[name],
            f"speedup_over_{first}_per_round": [
                a / b for a, b in zip(seconds[first], seconds[name], strict=True)
            ],
        }
    print(f"\n| config | tok/s | tok/step | speed-up over {first}, per round (median) |")
    print("|---|---:|---:|---|")
    for name, r in results.items():
        per = r[f"speedup_over_{first}_per_round"]
        print(
            f"| {name} | {r['tokens_per_second']:.1f} | {r['tokens_per_step']:.2f} | "
            f"{', '.join(f'{x:.3f}' for x in per)} ({median(per):.3f}) |"
        )
    save(
        args.name,
        {
            "machine": {**machine(), "idle_before": before, "idle_after": after},
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "bundle": str(args.bundle),
            "prompts": len(ids),
            "tokens": n_tokens,
            "rounds": args.rounds,
            "results": results,
        },
    )


if __name__ == "__main__":
    main()
