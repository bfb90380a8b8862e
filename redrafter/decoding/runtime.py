"""The runtime protocol: the calls the decode driver makes. Runtimes own tensors and caches
(torch tensors, ORT values, Core ML states); the driver owns the loop and the bookkeeping, and
talks to every runtime through numpy arrays.

`verify` and `draft` hand back whole distributions; `verify_greedy` and `draft_tokens` hand back
only what greedy acceptance and draft pruning read (each token's argmax, each draft's own
log-prob), so a runtime whose tensors live on a GPU moves (B, N) ids per step instead of
(B, N, V) floats. A runtime without a cheaper way answers them from the full outputs with
`argmax_tokens` / `drafted_log_probs` below: the results are the same by definition.

Dimensions: B batch, T prompt length, N packed tokens, W beam width, L beam length, E hidden,
V vocab, P committed length per row.

Rows of a continuous batch (batch.py): `verify`/`verify_greedy` may be given fewer rows B' than
`reset` allocated; they then run rows [0, B') and leave the caches of rows [B', B) undefined
(a runtime with two ping-pong buffers writes only the first B'), so a row past a call's B' must
be filled again by `prefill_rows` before a call includes it. `commit` always takes every row
(count 0 moves nothing). The drafter calls hold no cache and take any B.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from redrafter.config import BeamShape
from redrafter.errors import ConfigError


class Runtime(Protocol):
    """What a runtime must provide. All arrays are numpy; ids are int64, floats float32."""

    name: str
    vocab_size: int
    context_length: int  # longest prompt + generation the base model accepts
    max_beam_length: int | None  # longest beam (g0 + drafts) commit takes; None: any length

    def reset(self, *, batch: int, capacity: int) -> None:
        """Allocate (or reuse) KV caches of `capacity` slots for `batch` rows; forget the past."""
        ...

    def prefill(self, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Run the prompts (B, T) (right-padded; row b is `lengths[b]` long) into the cache at
        [0, T). Returns logits (B, V) and post-norm hidden state (B, E) at each row's last
        prompt token."""
        ...

    def prefill_rows(
        self, rows: np.ndarray, tokens: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`prefill` for some rows of the batch `reset` allocated: prompt r (tokens (R, T),
        right-padded, `lengths[r]` long) goes into row `rows[r]` from slot 0, and every other
        row's cache stays as it was, so a new request can take a finished row's place while
        the others go on (continuous batching). Returns logits (R, V) and hidden (R, E)."""
        ...

    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drafter beam search from context (B, E) and g0 (B,). Returns beams (B, W, L) int64
        and draft log-probs (B, W, L-1, V)."""
        ...

    def draft_tokens(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        """`draft`, returning beams (B, W, L) and each draft's own log-prob (B, W, L-1)
        (`drafted_log_probs` of draft's output) instead of the whole distributions."""
        ...

    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One LLM pass over tokens (B, N) at positions (B, N) with tree_mask (B, N, N) on top of
        the committed cache (past_len (B,)); writes their K/V at [P, P+N). Returns logits
        (B, N, V) and post-norm hidden states (B, N, E)."""
        ...

    def verify_greedy(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`verify`, returning each token's argmax (B, N) int64 (`argmax_tokens` of the logits:
        the first max) instead of the logits, and the hidden states (B, N, E)."""
        ...

    def commit(self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray) -> None:
        """Move cache slots P + source[b, k] to P + k for k < count[b] (see kv_cache.py)."""
        ...


def check_rows(rows: np.ndarray, *, batch: int, prompts: int) -> None:
    """`prefill_rows`' rows: one per prompt, distinct, each in [0, batch) (a ConfigError)."""
    rows = np.asarray(rows)
    ok = rows.ndim == 1 and len(rows) == prompts and len(set(rows.tolist())) == len(rows)
    if not ok or (len(rows) and (rows.min() < 0 or rows.max() >= batch)):
        raise ConfigError(
            f"rows {rows.tolist()} must be {prompts} distinct row indices in [0, {batch}) "
            "(one per prompt, in the batch reset() allocated)"
        )


def argmax_tokens(logits: np.ndarray) -> np.ndarray:
    """Each position's most likely token, the first on ties: (..., V) -> (...) int64."""
    return logits.argmax(axis=-1).astype(np.int64)


def drafted_log_probs(beams: np.ndarray, log_probs: np.ndarray) -> np.ndarray:
    """Each draft's log-prob under the distribution it was drawn from: beams (B, W, L) (column 0
    is g0, drafts are real tokens) and log_probs (B, W, L-1, V) -> (B, W, L-1) float32."""
    drafts = beams[:, :, 1:, None]  # (B, W, L-1, 1)
    return np.take_along_axis(log_probs, drafts, axis=-1)[..., 0].astype(np.float32)
