"""The per-phase clock both decode loops' steps report, and the log-probability of a token
chosen from next-token logits (a joining row's first token, an autoregressive step's).

Dimensions: B batch, V vocab.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from redrafter.config import SamplingParams
from redrafter.decoding.accept import penalised_rows, token_logprobs


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
