"""Draft pruning: end each drafted beam where the drafter stops believing in it.

Dimensions: B batch, W beam width, L beam length, V vocab.

Every tree token costs the verification the same slice of compute, accepted or not. Where the
verification is compute-bound (a CPU: one pass over 8 tokens costs about 1.3x a pass over one,
benchmarks/RESULTS.md), a draft the drafter itself rates unlikely costs more than it is worth.
`prune` ends each beam before its first draft whose cumulative draft probability (the product
of the drafter's probabilities along the beam, i.e. exp of the beam-search score) is below
`min_prob`; the rest of the beam becomes NO_TOKEN, which packs to no tree token.

Greedy output is unchanged (a shorter draft changes how many tokens a step takes, never which),
and both sampling rules treat the shortened beam as the draft it now is.

Worked example (min_prob = 0.25): a beam `[g0, a, b, c, d]` whose drafts had probabilities
0.9, 0.5, 0.4, 0.9 has cumulative probabilities 0.9, 0.45, 0.18, 0.16, so it becomes
`[g0, a, b, NO_TOKEN, NO_TOKEN]`: two drafts verified instead of four.
"""

from __future__ import annotations

import numpy as np

from redrafter.config import NO_TOKEN


def prune(beams: np.ndarray, log_p: np.ndarray, *, min_prob: float) -> np.ndarray:
    """Beams (B, W, L) int64 (column 0 = g0) with NO_TOKEN after each beam's last draft whose
    cumulative draft probability is >= min_prob. log_p: (B, W, L-1) each draft's own log-prob
    under the distribution it was drawn from (`Runtime.draft_tokens`). min_prob <= 0 keeps
    every draft."""
    if min_prob <= 0:
        return beams
    drafts = beams[:, :, 1:]  # (B, W, L-1)
    real = drafts != NO_TOKEN  # (B, W, L-1)
    confident = np.cumsum(log_p.astype(np.float64), axis=-1) >= np.log(min_prob)  # (B, W, L-1)
    keep = np.cumprod(real & confident, axis=-1).astype(bool)  # (B, W, L-1) a prefix per beam
    out = beams.copy()
    out[:, :, 1:] = np.where(keep, drafts, NO_TOKEN)
    return out
