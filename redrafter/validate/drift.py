"""Drift: how far a candidate's next-token distributions are from the reference's on real text,
teacher-forced (both read the same tokens), as top-1 agreement and mean KL divergence. What a
quantized bundle costs in model quality, reported by `validate` and held to per-precision limits
(docs/parity.md): a sound int4 export passes, a broken one (e.g. a packing bug) does not.

Dimensions: T tokens of a text, C chunk length, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from redrafter.decoding.runtime import Runtime
from redrafter.validate.tensors import mean_kl

# Mean KL(reference || candidate) in nats per position that a precision may cost on real text.
# fp32 only reorders the math; the int4 limit sits between a sound round-to-nearest export and
# the same export with its 4-bit nibbles swapped (docs/parity.md has both figures).
DRIFT_LIMITS = {"float32": 1e-3, "float16": 0.1, "int8": 0.1, "int4": 1.0}
CHUNK = 64  # tokens per verify call: bounds the (1, C, V) logits


@dataclasses.dataclass(frozen=True)
class Drift:
    """Teacher-forced next-token agreement over `positions` positions of the given texts."""

    precision: str
    positions: int
    top1: float  # share of positions whose argmax agrees
    mean_kl: float  # nats per position
    limit: float

    @property
    def passed(self) -> bool:
        return self.mean_kl <= self.limit


def next_token_logits(runtime: Runtime, tokens: Sequence[int]) -> np.ndarray:
    """The runtime's logits for the token after each prefix of `tokens`: (T, V). The first
    token is prefilled; the rest are verified as a causal chain, C at a time, each chunk written
    at the committed length (a chain is already in cache order, so nothing moves)."""
    ids = np.asarray(tokens, np.int64)[None]  # (1, T)
    T = ids.shape[1]
    runtime.reset(batch=1, capacity=T + 1)
    first, _ = runtime.prefill(ids[:, :1], np.array([1]))  # (1, V)
    rows = [first]
    for start in range(1, T, CHUNK):
        chunk = ids[:, start : start + CHUNK]  # (1, C)
        C = chunk.shape[1]
        causal = np.tril(np.ones((C, C), bool))[None]  # (1, C, C)
        positions = np.arange(start, start + C)[None]  # (1, C)
        logits, _ = runtime.verify(chunk, positions, causal, np.array([start]))  # (1, C, V)
        rows.append(logits[0])
    return np.concatenate(rows).astype(np.float32)  # (T, V)


def measure_drift(
    candidate: Runtime, reference: Runtime, texts: Sequence[Sequence[int]], *, precision: str
) -> Drift:
    """Top-1 agreement and mean KL of the candidate against the reference over `texts`
    (token ids), each position weighted equally."""
    agree, kls, n = 0, 0.0, 0
    for tokens in texts:
        want = next_token_logits(reference, tokens)  # (T, V)
        got = next_token_logits(candidate, tokens)  # (T, V)
        agree += int((want.argmax(-1) == got.argmax(-1)).sum())
        kls += mean_kl(want, got) * len(tokens)
        n += len(tokens)
    return Drift(precision, n, agree / max(n, 1), kls / max(n, 1), DRIFT_LIMITS[precision])
