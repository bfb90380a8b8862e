"""Prompt lookup: an n-gram draft that rides along with the drafter's beams as one more beam.

Dimensions: B batch, W beam width, L beam length, K lookup beam length, T tokens so far in a
row, V vocab.

Text repeats itself: code reuses the prompt's identifiers, answers quote the question, lists
echo their own structure. Prompt lookup (Saxena, 2023) drafts by finding the latest earlier
occurrence of the sequence's last n tokens (longest n first) and proposing what followed it.
It costs microseconds on the host, so it pairs well with a small drafter whose weakness is
exactly such copies. The tree verification takes any set of beams, so the lookup draft is one
extra beam `[g0, c1 .. c_m]`:

- its length follows the evidence: a match of n tokens drafts up to SPAN_PER_NGRAM * n tokens
  (4, 8 or 12), since a longer matched context predicts a longer copy; the beams become ragged
  (the drafter's beams and a short lookup draft end in NO_TOKEN, which packs to no tree token);
- dedup packing shares its prefix with the drafter's beams; with no match it is g0 alone,
  which packs to no new token at all;
- greedy acceptance keeps the first beam among equals, so the lookup beam wins only where it is
  strictly longer, and the emitted tokens stay those of greedy autoregressive decoding;
- for sampling, the lookup draft is a point mass: its draft distribution Q is one-hot (log-prob
  0 on the drafted token, LOG_0 elsewhere). Apple's rule then accepts v with probability P(v)
  and resamples from relu(P - Q) = P without v, which is exact for a deterministic draft; the
  exact tree walk needs no Q.

Worked example (SPAN_PER_NGRAM = 3): the row so far is `5 8 9 3 5 8`, so g0 = 8. The 3-gram
`3 5 8` occurs nowhere earlier, the 2-gram `5 8` at position 0, followed by `9 3 5 8`. A 2-gram
match drafts 2 x 3 = 6 tokens; the copy reaches the end of the text after 4 and goes on with
its own output (`9 3` again, as LZ77 copies overlap), so the lookup beam is
`[8, 9, 3, 5, 8, 9, 3]`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from redrafter.config import LOG_0, NO_TOKEN

# The suffix lengths sought by default (DecodeOptions.lookup_min_ngram / lookup_max_ngram change
# them). Where tree tokens are dear (int4 on a CPU: each costs ~1/8 of a one-token verify) a
# 1-gram match's drafts are mostly waste (its k-th token accepted 27, 16, 6, 2 % of the time on
# the int4 demo model's held-out text) and 2 pays; benchmarks/RESULTS.md, issue 22.
MAX_NGRAM = 3
MIN_NGRAM = 1
LONGEST_NGRAM = 32  # the most `max_ngram` may be (DecodeOptions checks it)
# Drafts per matched n-gram token: a longer match predicts a longer copy. Each drafted token
# costs the verification compute whether or not it is accepted; on held-out text span 4 beats
# 2 and 1 in every round (benchmarks/RESULTS.md, "Lookup span and draft-probability floor").
SPAN_PER_NGRAM = 4


def continuation(
    history: np.ndarray,
    *,
    span_per_ngram: int = SPAN_PER_NGRAM,
    max_ngram: int = MAX_NGRAM,
    min_ngram: int = MIN_NGRAM,
) -> np.ndarray | None:
    """`span_per_ngram * n` tokens that follow the latest earlier occurrence of the longest
    suffix n-gram (max_ngram down to min_ngram) of `history` (T,) int64, copied with overlap;
    None when no n-gram recurs."""
    T = len(history)
    top = min(max_ngram, T - 1)
    if top < min_ngram:
        return None
    # Every earlier occurrence of the last token (ends at 0..T-2: each match is followed by a
    # token, and the suffix itself is excluded), then how far back each one keeps matching: one
    # pass over the text instead of one per n-gram length (this runs every decode step).
    ends = np.flatnonzero(history[:-1] == history[-1])  # (M,) where matches end
    if ends.size == 0:
        return None
    matched = np.ones(ends.size, dtype=np.int64)  # (M,) suffix tokens matched so far
    alive = np.ones(ends.size, dtype=bool)  # (M,)
    for j in range(1, top):
        back = ends - j  # (M,)
        alive &= back >= 0
        alive &= history[np.maximum(back, 0)] == history[T - 1 - j]
        matched += alive
    for n in range(top, min_ngram - 1, -1):
        hits = np.flatnonzero(matched >= n)
        if hits.size:
            # Copy from just after the match, overlapping like LZ77: a copy that reaches the
            # end of the text continues with its own output, so a loop of period p (the match
            # p tokens back) drafts the loop again instead of stopping short.
            start, want = int(ends[hits[-1]]) + 1, span_per_ngram * n
            period = T - start  # each copied token comes from `period` tokens before it
            reps = -(-want // period)  # ceil
            return np.tile(history[start:], reps)[:want]
    return None


def lookup_beam(history: np.ndarray, g0: int, *, length: int, **search: int) -> np.ndarray:
    """One row's lookup beam (length,): g0 (which ends `history` while the row runs), then the
    continuation, then NO_TOKEN; a row with no match gets g0 alone, which packs onto the
    existing root instead of adding tree tokens. `search`: continuation()'s keywords."""
    beam = np.full(length, NO_TOKEN, dtype=np.int64)  # (length,)
    beam[0] = g0
    found = continuation(history, **search)
    if found is not None:
        found = found[: length - 1]
        beam[1 : 1 + len(found)] = found
    return beam


def lookup_length(max_ngram: int = MAX_NGRAM, span_per_ngram: int = SPAN_PER_NGRAM) -> int:
    """The longest lookup beam, g0 included."""
    return 1 + span_per_ngram * max_ngram


def padded_length(
    L: int,
    *,
    max_length: int | None = None,
    span_per_ngram: int = SPAN_PER_NGRAM,
    max_ngram: int = MAX_NGRAM,
) -> int:
    """K, the length of every beam once the lookup beam is added: the drafter's L or the
    longest lookup beam, capped at `max_length` (the longest beam the runtime can commit;
    None: no limit) but never below L."""
    K = lookup_length(max_ngram, span_per_ngram)
    return max(L, K if max_length is None else min(K, max_length))


def add_lookup_beam(
    beams: np.ndarray,
    draft_log_probs: np.ndarray | None,
    histories: Sequence[Sequence[int]],
    *,
    length: int,
    **search: int,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Append each row's lookup beam to the drafter's beams, padding both to `length` = K
    (`padded_length`) with NO_TOKEN.

    beams: (B, W, L) int64 with g0 in column 0, L <= K; draft_log_probs: (B, W, L-1, V) or None
    (greedy and the exact rule never read it); histories[b]: row b's prompt + emitted tokens,
    ending with g0; search: continuation()'s keywords. Returns beams (B, W+1, K) and draft
    log-probs (B, W+1, K-1, V) or None."""
    B, W, L = beams.shape
    K = length
    assert K >= L, "padded_length() is never below the drafter's beam length"
    extra = np.stack(
        [
            lookup_beam(np.asarray(h, dtype=np.int64), int(beams[b, 0, 0]), length=K, **search)
            for b, h in enumerate(histories)
        ]
    )  # (B, K)
    padded = np.full((B, W, K), NO_TOKEN, dtype=np.int64)  # (B, W, K)
    padded[:, :, :L] = beams
    out = np.concatenate([padded, extra[:, None, :]], axis=1)  # (B, W+1, K)
    if draft_log_probs is None:
        return out, None
    V = draft_log_probs.shape[-1]
    q = np.full((B, W + 1, K - 1, V), LOG_0, dtype=draft_log_probs.dtype)  # (B, W+1, K-1, V)
    q[:, :W, : L - 1] = draft_log_probs  # the drafter's; its NO_TOKEN slots are never read
    rows, cols = np.arange(B)[:, None], np.arange(K - 1)[None, :]
    drafted = extra[:, 1:] != NO_TOKEN  # (B, K-1)
    q[rows, W, cols, np.where(drafted, extra[:, 1:], 0)] = np.where(drafted, 0.0, LOG_0)
    return out, q
