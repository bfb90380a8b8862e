"""What both decode loops start with (checking, padding and running the prompts) and the
per-phase clock their steps report.

Dimensions: B batch, T longest prompt, E hidden, V vocab, P committed length per row.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from redrafter.config import SamplingParams
from redrafter.decoding.accept import choose_token, penalised_rows, token_logprobs
from redrafter.decoding.output import pad_prompts
from redrafter.decoding.runtime import Runtime


class PhaseClock:
    """Wall time per named phase of one step: `clock.lap("draft")` charges the time since the
    previous lap (or creation) to "draft"."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now


def prefill(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    *,
    extra_slots: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    rng: np.random.Generator,
    logprobs: bool = False,
) -> tuple[np.ndarray, list[list[float]] | None, np.ndarray, np.ndarray, dict[str, float]]:
    """Check and pad prompts, size the cache, run the prompts. Returns the first token g0 (B,),
    its log-probability per row ([[lp]] * B, when `logprobs`; else None), the context hidden
    state (B, E), the committed lengths P (B,) and {"prefill": seconds}."""
    tokens, lengths = pad_prompts(
        prompts,
        vocab_size=runtime.vocab_size,
        context_length=runtime.context_length,
        max_new_tokens=max_new_tokens,
    )
    clock = PhaseClock()
    runtime.reset(batch=len(prompts), capacity=tokens.shape[1] + max_new_tokens + extra_slots)
    logits, context = runtime.prefill(tokens, lengths)  # (B, V), (B, E)
    clock.lap("prefill")
    none: list[list[int]] = [[] for _ in prompts]  # nothing generated yet
    g0 = choose_token(logits, sampling, rng, prompts=prompts, generated=none)  # (B,)
    lp = next_logprobs(logits, g0, sampling, prompts=prompts, generated=none) if logprobs else None
    return g0, lp, context, lengths, clock.seconds


def next_logprobs(
    logits: np.ndarray,
    tokens: np.ndarray,
    sampling: SamplingParams,
    *,
    prompts: Sequence[Sequence[int]],
    generated: Sequence[Sequence[int]],
) -> list[list[float]]:
    """Each row's chosen next token's log-probability, as a one-token list per row:
    logits (B, V), tokens (B,)."""
    if sampling.penalised:
        logits = penalised_rows(logits, sampling, prompts=prompts, generated=generated)
    return [
        token_logprobs(logits[b : b + 1], tokens[b : b + 1], sampling) for b in range(len(tokens))
    ]
