"""KV-cache commit bookkeeping (docs/design.md §3.6).

Dimensions: B batch, W beam width, L beam length, S cache capacity, P committed length.

Verification writes packed token j at cache slot P + j. The accepted path (g0 plus n drafts)
sits at packed slots `unpacker[beam, 0..n]`, strictly increasing because ancestors precede
descendants; commit moves them to [P, P+n+1). Each source slot is >= its destination, so an
in-order, in-place move never overwrites a row it still has to read.
"""

from __future__ import annotations

import numpy as np


def commit_plan(
    unpacker: np.ndarray, beam: np.ndarray, n: np.ndarray, active: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Which packed slots to keep, per row.

    unpacker: (B, W, L); beam, n: (B,) from acceptance; active: (B,) bool, rows still generating
    (finished rows commit nothing). Returns source (B, L) int64, offsets from P, padded with
    their own index, and count (B,) int64 = n + 1 for active rows, else 0.
    """
    B, _, L = unpacker.shape
    source = unpacker[np.arange(B), beam].astype(np.int64)  # (B, L)
    count = np.where(active, n + 1, 0).astype(np.int64)  # (B,)
    keep = np.arange(L)[None, :] < count[:, None]  # (B, L)
    return np.where(keep, source, np.arange(L)[None, :]), count


def apply_commit(
    cache: np.ndarray, past_len: np.ndarray, source: np.ndarray, count: np.ndarray
) -> None:
    """Reference commit on a numpy cache (..., B, Hkv, S, D), in place.

    Runtimes implement the same move on their own tensors; this is the oracle.
    """
    for b in range(len(past_len)):
        P = int(past_len[b])
        for k in range(int(count[b])):  # in order: source >= destination
            cache[..., b, :, P + k, :] = cache[..., b, :, P + int(source[b, k]), :]
