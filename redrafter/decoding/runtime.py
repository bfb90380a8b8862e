"""The runtime protocol: the four calls the decode driver makes. Runtimes own tensors and caches
(torch tensors, ORT values, Core ML states); the driver owns the loop and the bookkeeping, and
talks to every runtime through numpy arrays.

Dimensions: B batch, T prompt length, N packed tokens, W beam width, L beam length, E hidden,
V vocab, P committed length per row.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from redrafter.config import BeamShape


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

    def draft(
        self, context: np.ndarray, first_token: np.ndarray, beam: BeamShape
    ) -> tuple[np.ndarray, np.ndarray]:
        """Drafter beam search from context (B, E) and g0 (B,). Returns beams (B, W, L) int64
        and draft log-probs (B, W, L-1, V)."""
        ...

    def verify(
        self, tokens: np.ndarray, positions: np.ndarray, tree_mask: np.ndarray, past_len: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """One LLM pass over tokens (B, N) at positions (B, N) with tree_mask (B, N, N) on top of
        the committed cache (past_len (B,)); writes their K/V at [P, P+N). Returns logits
        (B, N, V) and post-norm hidden states (B, N, E)."""
        ...

    def commit(self, past_len: np.ndarray, source: np.ndarray, count: np.ndarray) -> None:
        """Move cache slots P + source[b, k] to P + k for k < count[b] (see kv_cache.py)."""
        ...
