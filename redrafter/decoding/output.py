"""What the decode loops share: prompt checks, padding, and the per-row output stream that
applies EOS and max-token stops. Dimensions: B batch, T longest prompt."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from redrafter.errors import PromptError


@dataclasses.dataclass
class Step:
    """One decode step. `new_tokens[b]`: tokens row b emitted this step (after stops);
    `accepted` (B,): drafts accepted (0 for prefill and autoregressive steps); `seconds`:
    wall time per phase (draft, verify, accept, commit, prefill); `verified` (B,): tokens the
    LLM ran for row b this step (the packed tree's size; 1 per autoregressive step), the cost
    side of speculation on a compute-bound device."""

    new_tokens: list[list[int]]
    accepted: np.ndarray
    seconds: dict[str, float]
    kind: str  # "prefill" | "speculative" | "autoregressive"
    verified: np.ndarray | None = None
    # logprobs[b][i]: new_tokens[b][i]'s log-probability under the controlled target
    # distribution at its position; None unless DecodeOptions(logprobs=True).
    logprobs: list[list[float]] | None = None


def trim(logprobs: list[list[float]] | None, kept: list[list[int]]) -> list[list[float]] | None:
    """Log-probabilities cut to the tokens `OutputStream.emit` kept (stops drop the rest)."""
    return (
        None if logprobs is None else [lp[: len(k)] for lp, k in zip(logprobs, kept, strict=True)]
    )


def pad_prompts(
    prompts: Sequence[Sequence[int]], *, vocab_size: int, context_length: int, max_new_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check prompts and right-pad them: returns tokens (B, T) int64 and lengths (B,) int64."""
    if not prompts:
        raise PromptError("no prompts given; pass at least one prompt")
    if max_new_tokens < 1:
        raise PromptError(f"max_new_tokens={max_new_tokens} must be >= 1")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise PromptError(f"prompt {i} is empty; give at least one token")
        bad = [t for t in p if not 0 <= int(t) < vocab_size]
        if bad:
            raise PromptError(
                f"prompt {i} has token id(s) {bad[:5]} outside the vocab [0, {vocab_size}); "
                "check the tokenizer matches the model"
            )
        if len(p) + max_new_tokens > context_length:
            raise PromptError(
                f"prompt {i} has {len(p)} tokens + max_new_tokens {max_new_tokens} > the model's "
                f"context {context_length}; shorten the prompt or lower --max-new-tokens"
            )
    lengths = np.array([len(p) for p in prompts], dtype=np.int64)
    tokens = np.zeros((len(prompts), int(lengths.max())), dtype=np.int64)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, lengths


class OutputStream:
    """Per-row generated tokens with stops: a row finishes at an EOS token (kept) or at its
    token limit (`max_new_tokens`, or the one `open_row` gave it); later tokens of that row
    are dropped. A continuous batch reuses rows: `open_row` starts a row afresh."""

    def __init__(self, batch: int, *, max_new_tokens: int, eos_token_ids: Sequence[int]) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.finished = np.zeros(batch, dtype=bool)
        self.max_new_tokens = max_new_tokens
        self.limits = np.full(batch, max_new_tokens, dtype=np.int64)  # (B,) per-row limits
        self.eos = set(int(t) for t in eos_token_ids)

    @property
    def done(self) -> bool:
        return bool(self.finished.all())

    def open_row(self, b: int, *, max_new_tokens: int) -> None:
        """Row b starts a new generation of at most `max_new_tokens` tokens."""
        self.tokens[b], self.finished[b], self.limits[b] = [], False, max_new_tokens

    def close_row(self, b: int) -> None:
        """Row b holds nothing any more: finished, its tokens dropped."""
        self.tokens[b], self.finished[b] = [], True

    def emit(self, per_row: Sequence[Sequence[int]]) -> list[list[int]]:
        """Append each row's candidate tokens, honouring stops; returns what was kept."""
        kept: list[list[int]] = []
        for b, candidates in enumerate(per_row):
            row: list[int] = []
            for t in candidates:
                if self.finished[b]:
                    break
                row.append(int(t))
                self.tokens[b].append(int(t))
                if int(t) in self.eos or len(self.tokens[b]) >= self.limits[b]:
                    self.finished[b] = True
            kept.append(row)
        return kept
