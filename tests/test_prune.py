"""Draft pruning (decoding/prune.py): the docstring's hand example, and hypothesis properties
(each beam keeps exactly its prefix of drafts whose cumulative probability clears the floor)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from redrafter.config import NO_TOKEN
from redrafter.decoding.prune import prune
from redrafter.decoding.runtime import drafted_log_probs

X = NO_TOKEN


def _log_probs(beams: np.ndarray, probs: np.ndarray, V: int) -> np.ndarray:
    """Each draft's own log-prob (B, W, L-1), as `drafted_log_probs` reads it from draft
    distributions (B, W, L-1, V) that give each drafted token the probability in `probs`
    (B, W, L-1) and spread the rest evenly."""
    B, W, L = beams.shape
    rest = (1.0 - probs) / (V - 1)  # (B, W, L-1)
    q = np.broadcast_to(rest[..., None], (B, W, L - 1, V)).copy()
    np.put_along_axis(q, beams[:, :, 1:, None], probs[..., None], axis=-1)
    drafted = drafted_log_probs(beams, np.log(q))  # (B, W, L-1)
    np.testing.assert_allclose(drafted, np.log(probs), rtol=1e-6)
    return drafted


def test_docstring_example() -> None:
    beams = np.array([[[3, 4, 5, 6, 7]]])  # g0 = 3
    q = _log_probs(beams, np.array([[[0.9, 0.5, 0.4, 0.9]]]), V=10)
    # Cumulative: 0.9, 0.45, 0.18, 0.162.
    np.testing.assert_array_equal(prune(beams, q, min_prob=0.25), [[[3, 4, 5, X, X]]])
    np.testing.assert_array_equal(prune(beams, q, min_prob=0.95), [[[3, X, X, X, X]]])
    np.testing.assert_array_equal(prune(beams, q, min_prob=0.1), beams)
    np.testing.assert_array_equal(prune(beams, q, min_prob=0.0), beams)  # off


def test_each_beam_is_cut_on_its_own_path() -> None:
    beams = np.array([[[3, 4, 5], [3, 8, 9]], [[2, 4, 5], [2, 6, 7]]])  # (2, 2, 3)
    probs = np.array([[[0.9, 0.9], [0.2, 0.9]], [[0.5, 0.9], [0.6, 0.3]]])
    out = prune(beams, _log_probs(beams, probs, V=12), min_prob=0.3)
    np.testing.assert_array_equal(out, [[[3, 4, 5], [3, X, X]], [[2, 4, 5], [2, 6, X]]])


@settings(max_examples=150, deadline=None)
@given(
    data=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 6)).flatmap(
        lambda s: st.tuples(
            hnp.arrays(np.int64, s, elements=st.integers(0, 7)),
            hnp.arrays(np.float64, (*s[:2], s[2] - 1), elements=st.floats(0.01, 0.99)),
        )
    ),
    min_prob=st.floats(0.001, 0.99),
)
def test_prune_keeps_the_confident_prefix(data, min_prob: float) -> None:
    beams, probs = data
    out = prune(beams, _log_probs(beams, probs, V=8), min_prob=min_prob)
    cumulative = np.cumprod(probs, axis=-1)  # (B, W, L-1)
    kept = out[:, :, 1:] != X
    np.testing.assert_array_equal(out[:, :, 0], beams[:, :, 0])  # g0 always stays
    np.testing.assert_array_equal(out[:, :, 1:][kept], beams[:, :, 1:][kept])
    # Kept slots form a prefix, and are exactly those whose cumulative probability clears it
    # (up to the float error of a log round trip).
    assert np.all(np.diff(kept.astype(int), axis=-1) <= 0)
    clear = np.abs(np.log(cumulative) - np.log(min_prob)) > 1e-9
    np.testing.assert_array_equal(kept[clear], (cumulative >= min_prob)[clear])
