"""Commit (docs/design.md §3.6): plan properties and the torch runtime's move against the oracle."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from redrafter.decoding.kv_cache import apply_commit, commit_plan
from redrafter.decoding.tree import pack
from redrafter.runtimes.torch import TorchRuntime

from conftest import tiny_base

case = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 5)).flatmap(
    lambda s: st.tuples(
        hnp.arrays(np.int64, s, elements=st.integers(0, 2)),  # beams
        st.lists(st.integers(0, s[1] - 1), min_size=s[0], max_size=s[0]),  # chosen beam
        st.lists(st.integers(0, s[2] - 1), min_size=s[0], max_size=s[0]),  # accepted n
        st.lists(st.booleans(), min_size=s[0], max_size=s[0]),  # row still active
        st.lists(st.integers(0, 6), min_size=s[0], max_size=s[0]),  # committed length P
    )
)


@settings(max_examples=150, deadline=None)
@given(case=case, packing=st.sampled_from(["dedup", "full"]))
def test_commit_moves_exactly_the_accepted_path(case, packing) -> None:
    beams, beam, n, active, past = (np.asarray(x) for x in case)
    B, W, L = beams.shape
    tree = pack(beams, packing=packing)
    source, count = commit_plan(tree.unpacker, beam, n, active)
    np.testing.assert_array_equal(count, np.where(active, n + 1, 0))
    # The numpy oracle: a cache whose slot P+j holds packed token j's "key" (its token id and
    # slot, so every row is distinguishable), then commit.
    N = tree.tokens.shape[1]
    S = int(past.max()) + N + 1
    cache = np.full((2, B, 1, S, 2), -1.0)
    for b in range(B):
        for j in range(N):
            cache[:, b, 0, past[b] + j] = [tree.tokens[b, j], j]
    before = cache.copy()
    apply_commit(cache, past, source, count)
    for b in range(B):
        c = int(count[b])
        path = tree.unpacker[b, beam[b], :c]
        assert np.all(np.diff(path) > 0) and np.all(path >= np.arange(c))  # safe in-place move
        np.testing.assert_array_equal(
            cache[0, b, 0, past[b] : past[b] + c, 0], beams[b, beam[b], :c]
        )
        np.testing.assert_array_equal(cache[0, b, 0, past[b] : past[b] + c, 1], path)
        np.testing.assert_array_equal(cache[:, b, :, : past[b]], before[:, b, :, : past[b]])


def test_torch_runtime_commit_matches_oracle() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base)
    runtime.reset(batch=2, capacity=16)
    assert runtime.cache is not None
    runtime.cache.copy_(torch.randn_like(runtime.cache))
    expected = runtime.cache.numpy().copy()
    past = np.array([3, 5])
    source = np.array([[0, 2, 5, 3], [1, 2, 3, 3]])
    count = np.array([3, 2])
    apply_commit(expected, past, source, count)
    runtime.commit(past, source, count)
    np.testing.assert_array_equal(runtime.cache.numpy(), expected)
