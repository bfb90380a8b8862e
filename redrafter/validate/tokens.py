"""Token parity: greedy generations on a candidate runtime against the torch reference's
*autoregressive* generations (docs/design.md §3, the invariant), first divergence reported."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from redrafter.config import BeamShape
from redrafter.decoding.driver import decode
from redrafter.decoding.options import AUTOREGRESSIVE, DecodeOptions
from redrafter.decoding.runtime import Runtime
from redrafter.decoding.stats import summarize
from redrafter.decoding.tree import Packing


@dataclasses.dataclass(frozen=True)
class TokenCheck:
    """One prompt: did the candidate emit exactly the reference's tokens? `first_divergence`
    is the index of the first differing generated token (None when identical)."""

    prompt: int
    prompt_tokens: int
    generated: int
    first_divergence: int | None
    tokens_per_step: float

    @property
    def passed(self) -> bool:
        return self.first_divergence is None


def _generated(steps, beam_length: int | None = None) -> tuple[list[int], float]:  # type: ignore[no-untyped-def]
    steps = list(steps)
    tokens = [t for s in steps for t in s.new_tokens[0]]
    # beam_length sizes the acceptance histogram: without it, any accepted draft overflows it.
    return tokens, summarize(steps, beam_length=beam_length)["tokens_per_step"]


def check_token_parity(
    candidate: Runtime,
    reference: Runtime,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    beam: BeamShape | None,
    packing: Packing = "dedup",
    eos_token_ids: Sequence[int] = (),
) -> list[TokenCheck]:
    """Greedy, one prompt at a time: the candidate decodes speculatively (autoregressively
    when there is no drafter) and must match the reference's autoregressive tokens."""
    reference_options = AUTOREGRESSIVE.replace(max_new_tokens=max_new_tokens)
    options = (
        reference_options
        if beam is None
        else DecodeOptions(max_new_tokens=max_new_tokens, beam=beam, packing=packing)
    )
    checks = []
    for i, prompt in enumerate(prompts):
        want, _ = _generated(
            decode(reference, [prompt], reference_options, eos_token_ids=eos_token_ids)
        )
        got, tokens_per_step = _generated(
            decode(candidate, [prompt], options, eos_token_ids=eos_token_ids), options.beam_length
        )
        diverge = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        if diverge is None and len(got) != len(want):
            diverge = min(len(got), len(want))
        checks.append(TokenCheck(i, len(prompt), len(got), diverge, tokens_per_step))
    return checks
