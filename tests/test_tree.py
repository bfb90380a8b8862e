"""Tree packing (docs/design.md §3.3): hand-checked examples and hypothesis properties."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from redrafter.config import NO_TOKEN
from redrafter.decoding.tree import pack, unpack

T, F = True, False

BEAMS = np.array([[[7, 1, 2], [7, 1, 3], [7, 4, 5]]])  # (1, 3, 3)
EXPECTED_TOKENS = [[7, 1, 2, 3, 4, 5]]
EXPECTED_UNPACKER = [[[0, 1, 2], [0, 1, 3], [0, 4, 5]]]
EXPECTED_DEPTH = [[0, 1, 2, 2, 1, 2]]
EXPECTED_MASK = [
    [
        [T, F, F, F, F, F],  # 7
        [T, T, F, F, F, F],  # 7 1
        [T, T, T, F, F, F],  # 7 1 2
        [T, T, F, T, F, F],  # 7 1 3
        [T, F, F, F, T, F],  # 7 4
        [T, F, F, F, T, T],  # 7 4 5
    ]
]


def test_dedup_hand_example() -> None:
    tree = pack(BEAMS)
    np.testing.assert_array_equal(tree.tokens, EXPECTED_TOKENS)
    np.testing.assert_array_equal(tree.unpacker, EXPECTED_UNPACKER)
    np.testing.assert_array_equal(tree.depth, EXPECTED_DEPTH)
    np.testing.assert_array_equal(tree.tree_mask, EXPECTED_MASK)
    np.testing.assert_array_equal(tree.sizes, [6])


def test_full_packing_is_block_diagonal() -> None:
    tree = pack(BEAMS[:, :2, :2], packing="full")  # beams [7 1], [7 1]: no dedup
    np.testing.assert_array_equal(tree.tokens, [[7, 1, 7, 1]])
    np.testing.assert_array_equal(tree.unpacker, [[[0, 1], [2, 3]]])
    np.testing.assert_array_equal(tree.depth, [[0, 1, 0, 1]])
    expected = [[T, F, F, F], [T, T, F, F], [F, F, T, F], [F, F, T, T]]
    np.testing.assert_array_equal(tree.tree_mask[0], expected)


def test_batch_rows_are_padded_with_self_only_slots() -> None:
    beams = np.array([[[5, 6], [5, 6]], [[5, 6], [5, 7]]])  # row 0 packs to 2, row 1 to 3
    tree = pack(beams)
    np.testing.assert_array_equal(tree.sizes, [2, 3])
    np.testing.assert_array_equal(tree.tokens[0], [5, 6, 5])
    np.testing.assert_array_equal(tree.tree_mask[0, 2], [F, F, T])
    np.testing.assert_array_equal(tree.unpacker[1], [[0, 1], [0, 2]])


def test_ragged_beams_pack_without_their_missing_tokens() -> None:
    X = NO_TOKEN
    beams = np.array([[[7, 1, 2, X], [7, 4, X, X], [7, 1, 2, 9]]])  # (1, 3, 4)
    tree = pack(beams)
    np.testing.assert_array_equal(tree.tokens, [[7, 1, 2, 4, 9]])
    np.testing.assert_array_equal(tree.depth, [[0, 1, 2, 1, 3]])
    # A missing slot points at its beam's last real token.
    np.testing.assert_array_equal(tree.unpacker, [[[0, 1, 2, 2], [0, 3, 3, 3], [0, 1, 2, 4]]])
    np.testing.assert_array_equal(tree.tree_mask[0, 4], [T, T, T, F, T])
    full = pack(beams, packing="full")  # static shape: the slot stays and verifies g0
    np.testing.assert_array_equal(full.tokens[0, :4], [7, 1, 2, 7])


def test_unknown_packing_is_rejected() -> None:
    with pytest.raises(ValueError, match="packing"):
        pack(BEAMS, packing="sparse")  # type: ignore[arg-type]


beams_strategy = st.tuples(
    st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 4)
).flatmap(lambda s: hnp.arrays(np.int64, (s[0], s[1], s[2]), elements=st.integers(0, s[3])))


@settings(max_examples=200, deadline=None)
@given(
    beams=beams_strategy,
    packing=st.sampled_from(["dedup", "full"]),
    cuts=st.lists(st.integers(1, 5), min_size=15, max_size=15),
)
def test_pack_properties(beams: np.ndarray, packing: str, cuts: list[int]) -> None:
    B, W, L = beams.shape
    lengths = np.array(cuts[: B * W]).reshape(B, W).clip(max=L)  # (B, W) ragged: real tokens
    beams = np.where(np.arange(L) < lengths[..., None], beams, NO_TOKEN)  # (B, W, L)
    tree = pack(beams, packing=packing)  # type: ignore[arg-type]
    # Unpacking restores the beams up to each one's end.
    real = beams != NO_TOKEN
    np.testing.assert_array_equal(unpack(tree.tokens, tree.unpacker)[real], beams[real])
    for b in range(B):
        n = tree.sizes[b]
        # Distinct prefixes are kept once each (dedup), or all W*L tokens (full).
        prefixes = {tuple(beams[b, w, : d + 1]) for w in range(W) for d in range(lengths[b, w])}
        assert n == (len(prefixes) if packing == "dedup" else W * L)
        for w in range(W):
            slots = tree.unpacker[b, w]
            if packing == "dedup":  # ragged: only the real prefix has slots of its own
                assert np.all(slots[lengths[b, w] :] == slots[lengths[b, w] - 1])
                slots = slots[: lengths[b, w]]
            # Ancestors precede descendants: slots along a beam strictly increase.
            assert np.all(np.diff(slots) > 0)
            np.testing.assert_array_equal(tree.depth[b, slots], np.arange(len(slots)))
            for d in range(len(slots)):
                # Mask row = ancestor-or-self: exactly the slots of this beam's prefix.
                expected = np.zeros(tree.tokens.shape[1], dtype=bool)
                expected[slots[: d + 1]] = True
                np.testing.assert_array_equal(tree.tree_mask[b, slots[d]], expected)
        # The tree mask is inside the causal mask.
        assert not np.any(np.triu(tree.tree_mask[b], k=1))
