"""Prompt lookup: an n-gram draft that rides along with the drafter's beams as one more beam.

Dimensions: B batch, W beam width, L beam length, T tokens so far in a row, V vocab.

Text repeats itself: code reuses the prompt's identifiers, answers quote the question, lists
echo their own structure. Prompt lookup (Saxena, 2023) drafts by finding the latest earlier
occurrence of the sequence's last n tokens (longest n first) and proposing what followed it.
It costs microseconds on the host, so it pairs well with a small drafter whose weakness is
exactly such copies. The tree verification takes any set of beams, so the lookup draft is one
extra beam `[g0, c1 .. c_{L-1}]`:

- dedup packing shares its prefix with the drafter's beams; with no match it repeats beam 0,
  which packs to no new token at all;
- greedy acceptance keeps the first beam among equals, so the lookup beam wins only where it is
  strictly longer, and the emitted tokens stay those of greedy autoregressive decoding;
- for sampling, the lookup draft is a point mass: its draft distribution Q is one-hot (log-prob
  0 on the drafted token, LOG_0 elsewhere). Apple's rule then accepts v with probability P(v)
  and resamples from relu(P - Q) = P without v, which is exact for a deterministic draft; the
  exact tree walk needs no Q.

Worked example (L = 4): the row so far is `5 8 9 3 5 8`, so g0 = 8. The 3-gram `3 5 8` occurs
nowhere earlier, the 2-gram `5 8` at position 0, followed by `9 3 5`: the lookup beam is
`[8, 9, 3, 5]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from redrafter.config import LOG_0

MAX_NGRAM = 3  # longer suffixes rarely match more often than 3-grams and cost more to search
MIN_NGRAM = 1


def continuation(
    history: np.ndarray, *, length: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM
) -> np.ndarray | None:
    """Up to `length` tokens that followed the latest earlier occurrence of the longest suffix
    n-gram (max_ngram down to min_ngram) of `history` (T,) int64; None when no n-gram recurs."""
    T = len(history)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):
        # Windows over history[:-1] start at 0..T-1-n: every match is followed by a token and
        # the suffix itself (start T-n) is excluded.
        windows = sliding_window_view(history[:-1], n)  # (T-n, n)
        hits = np.flatnonzero((windows == history[T - n :]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return history[start : start + length]
    return None


def lookup_beam(
    history: np.ndarray,
    fallback: np.ndarray,
    *,
    max_ngram: int = MAX_NGRAM,
    min_ngram: int = MIN_NGRAM,
) -> np.ndarray:
    """One row's lookup beam (L,): the fallback beam's g0 (which ends `history` while the row
    runs), then the continuation; a row with no match gets the fallback beam (L,) itself, which
    packs onto the existing branch instead of adding tree tokens."""
    L = len(fallback)
    beam = fallback.copy()  # (L,)
    found = continuation(history, length=L - 1, max_ngram=max_ngram, min_ngram=min_ngram)
    if found is not None and len(found) > 0:
        beam[1 : 1 + len(found)] = found
        if len(found) < L - 1:  # the rest cannot follow the lookup draft: repeat its last token
            beam[1 + len(found) :] = found[-1]
    return beam


def add_lookup_beam(
    beams: np.ndarray,
    draft_log_probs: np.ndarray | None,
    histories: Sequence[Sequence[int]],
    *,
    max_ngram: int = MAX_NGRAM,
    min_ngram: int = MIN_NGRAM,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Append each row's lookup beam to the drafter's beams.

    beams: (B, W, L) int64 with g0 in column 0; draft_log_probs: (B, W, L-1, V) or None (greedy
    and the exact rule never read it); histories[b]: row b's prompt + emitted tokens, ending
    with g0. Returns beams (B, W+1, L) and draft log-probs (B, W+1, L-1, V) or None."""
    B, W, L = beams.shape
    extra = np.stack(
        [
            lookup_beam(
                np.asarray(h, dtype=np.int64),
                beams[b, 0],
                max_ngram=max_ngram,
                min_ngram=min_ngram,
            )
            for b, h in enumerate(histories)
        ]
    )  # (B, L)
    out = np.concatenate([beams, extra[:, None, :]], axis=1)  # (B, W+1, L)
    if draft_log_probs is None:
        return out, None
    V = draft_log_probs.shape[-1]
    point = np.full((B, 1, L - 1, V), LOG_0, dtype=draft_log_probs.dtype)  # (B, 1, L-1, V)
    rows, cols = np.arange(B)[:, None], np.arange(L - 1)[None, :]
    point[rows, 0, cols, extra[:, 1:]] = 0.0  # one-hot Q: log 1 on the drafted token
    return out, np.concatenate([draft_log_probs, point], axis=1)
