"""Generation statistics from a list of `Step`s: tokens/step, tokens/s, acceptance histogram,
time per phase. Dimensions: B batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redrafter.decoding.output import Step


def summarize(steps: Sequence[Step], *, beam_length: int | None = None) -> dict[str, Any]:
    """Aggregate per-step results. `tokens_per_step` counts, per row, tokens emitted per decode
    step while the row was generating (1.0 for autoregressive decoding), `verified_per_step`
    the tokens the LLM ran for it in those steps (the tree's size); `tokens_per_second` is
    decode-phase throughput over all rows (the prefill's first token and time excluded)."""
    decode = [s for s in steps if s.kind != "prefill"]
    seconds: dict[str, float] = {}
    for s in steps:
        for k, v in s.seconds.items():
            seconds[k] = seconds.get(k, 0.0) + v
    emitted = sum(len(row) for s in decode for row in s.new_tokens)
    row_steps = sum(1 for s in decode for row in s.new_tokens if row)
    verified = sum(
        int(s.verified[b]) for s in decode if s.verified is not None
        for b, row in enumerate(s.new_tokens) if row
    )  # fmt: skip
    decode_seconds = sum(v for k, v in seconds.items() if k != "prefill")
    histogram = [0] * (beam_length if beam_length else 1)  # accepted drafts 0..L-1, and more:
    for s in decode:  # the prompt-lookup beam may be longer than the drafter's L
        for b, row in enumerate(s.new_tokens):
            if row and s.kind == "speculative":
                n = int(s.accepted[b])
                histogram += [0] * (n + 1 - len(histogram))
                histogram[n] += 1
    return {
        "steps": len(decode),
        "generated_tokens": emitted
        + sum(len(r) for s in steps if s.kind == "prefill" for r in s.new_tokens),
        "tokens_per_step": emitted / row_steps if row_steps else 0.0,
        "verified_per_step": verified / row_steps if row_steps else 0.0,
        "tokens_per_second": emitted / decode_seconds if decode_seconds > 0 else 0.0,
        "prefill_seconds": seconds.get("prefill", 0.0),
        "decode_seconds": decode_seconds,
        "seconds_by_phase": seconds,
        "acceptance_histogram": histogram if beam_length else None,
    }
