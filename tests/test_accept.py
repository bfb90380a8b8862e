"""Acceptance rules (docs/design.md §3.5) and the traps of docs/design.md §7."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from redrafter.config import LOG_0, NO_TOKEN, SamplingParams
from redrafter.decoding.accept import (
    accept_apple,
    accept_exact,
    accept_greedy,
    target_probs,
    warp_logits,
)


def test_greedy_hand_example() -> None:
    beams = np.array([[[9, 1, 2, 3], [9, 1, 5, 6], [9, 4, 4, 4]]])  # (1, 3, 4)
    llm = np.array([[[1, 2, 7, 0], [1, 5, 6, 8], [1, 0, 0, 0]]])  # LLM argmax per position
    acc = accept_greedy(beams, llm)
    # Beam 1 matches 1, 5, 6 (all three drafts); the next token is the LLM's 8 after them.
    assert (acc.beam[0], acc.n[0], acc.next_token[0]) == (1, 3, 8)


def test_greedy_first_max_tie_break() -> None:
    beams = np.array([[[9, 1, 2], [9, 1, 3], [9, 1, 2]]])
    llm = np.array([[[1, 4, 0], [1, 5, 0], [1, 6, 0]]])  # every beam accepts exactly one draft
    acc = accept_greedy(beams, llm)
    assert (acc.beam[0], acc.n[0], acc.next_token[0]) == (0, 1, 4)


def test_greedy_nothing_accepted_takes_llm_token_after_g0() -> None:
    beams = np.array([[[9, 1], [9, 2]]])
    llm = np.array([[[3, 0], [3, 0]]])
    acc = accept_greedy(beams, llm)
    assert (acc.beam[0], acc.n[0], acc.next_token[0]) == (0, 0, 3)


def test_greedy_ragged_beam_stops_at_its_end() -> None:
    X = NO_TOKEN
    beams = np.array([[[9, 1, X, X], [9, 1, 2, X]]])  # both drafts right as far as they go
    llm = np.array([[[1, 2, 2, 2], [1, 2, 3, 3]]])  # unpacked: a missing slot repeats its parent
    acc = accept_greedy(beams, llm)
    assert (acc.beam[0], acc.n[0], acc.next_token[0]) == (1, 2, 3)


@settings(max_examples=200, deadline=None)
@given(
    data=st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(2, 5)).flatmap(
        lambda s: st.tuples(
            hnp.arrays(np.int64, s, elements=st.integers(0, 2)),
            hnp.arrays(np.int64, s, elements=st.integers(0, 2)),
            hnp.arrays(np.int64, s[:2], elements=st.integers(1, s[2])),
        )
    )
)
def test_greedy_matches_naive_definition(
    data: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    beams, llm, lengths_real = data
    L = beams.shape[2]
    beams = np.where(np.arange(L) < lengths_real[..., None], beams, NO_TOKEN)  # ragged
    acc = accept_greedy(beams, llm)
    for b in range(beams.shape[0]):
        lengths = []
        for w in range(beams.shape[1]):
            n = 0
            while n < lengths_real[b, w] - 1 and beams[b, w, n + 1] == llm[b, w, n]:
                n += 1
            lengths.append(n)
        best = max(lengths)
        assert acc.n[b] == best and acc.beam[b] == lengths.index(best)
        assert acc.next_token[b] == llm[b, acc.beam[b], best]


def test_warp_keeps_top_k_and_ties() -> None:
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    np.testing.assert_array_equal(warp_logits(logits, 2), [3.0, LOG_0, 2.0, 2.0, LOG_0])
    probs = target_probs(np.random.default_rng(0).normal(size=(4, 200)), SamplingParams(1.0))
    assert np.all((probs > 0).sum(-1) == 50)  # the LLM side is top-50 warped too
    np.testing.assert_allclose(probs.sum(-1), 1.0)


def _one_hot_logits(V: int, hot: int, L: int) -> np.ndarray:
    x = np.full((L, V), -30.0)
    x[:, hot] = 30.0
    return x


def test_apple_uses_normalised_drafter_probs() -> None:
    """P(v) = 1/2 and Q(v) = 1 give acceptance 1/2; treating raw logits as log Q would not."""
    V, L = 4, 2
    p_logits = np.log(np.array([0.5, 0.5, 1e-30, 1e-30]))  # P = [.5, .5, 0, 0]
    llm = np.broadcast_to(p_logits, (1, 1, L, V)).copy()
    beams = np.array([[[3, 0]]])
    q = np.log(np.array([[[[1.0 - 3e-9, 1e-9, 1e-9, 1e-9]]]]))  # normalised Q, Q(0) ~ 1
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=1.0)
    accepted = [accept_apple(beams, llm, q, params, rng).n[0] for _ in range(4000)]
    assert abs(np.mean(accepted) - 0.5) < 0.03


def test_apple_resamples_rejections_from_relu_p_minus_q() -> None:
    V, L = 4, 2
    llm = np.broadcast_to(np.log([0.5, 0.5, 1e-30, 1e-30]), (1, 1, L, V)).copy()
    beams = np.array([[[3, 0]]])
    q = np.log(np.array([[[[1.0 - 3e-9, 1e-9, 1e-9, 1e-9]]]]))
    rng = np.random.default_rng(1)
    params = SamplingParams(temperature=1.0)
    for _ in range(500):
        acc = accept_apple(beams, llm, q, params, rng)
        if acc.n[0] == 0:  # rejected: relu(P - Q) = [0, .5, 0, 0], so always token 1
            assert acc.next_token[0] == 1


def test_apple_bonus_token_when_whole_beam_accepted() -> None:
    V, L = 8, 3
    llm = np.stack(
        [_one_hot_logits(V, 2, 1)[0], _one_hot_logits(V, 5, 1)[0], _one_hot_logits(V, 7, 1)[0]]
    )[None, None]  # (1, 1, 3, V)
    beams = np.array([[[0, 2, 5]]])  # drafts agree with the LLM's point masses
    q = np.log(np.full((1, 1, L - 1, V), 1.0 / V))
    acc = accept_apple(beams, llm, q, SamplingParams(temperature=1.0), np.random.default_rng(0))
    assert (acc.n[0], acc.next_token[0]) == (2, 7)  # bonus from P at the last position


def test_apple_ragged_beam_gets_its_bonus_token_at_its_end() -> None:
    V, L = 8, 4
    half = np.log(np.array([1e-30] * 6 + [0.5, 0.5]))  # P after the draft: 6 or 7
    llm = np.stack([_one_hot_logits(V, 2, 1)[0], half, half, half])[None, None]  # (1, 1, L, V)
    beams = np.array([[[0, 2, NO_TOKEN, NO_TOKEN]]])  # one draft, which P wants
    q = np.log(np.full((1, 1, L - 1, V), 1e-9))
    q[..., 6] = 0.0  # Q puts its mass on 6 where nothing was drafted: it must not be used
    rng = np.random.default_rng(0)
    runs = [accept_apple(beams, llm, q, SamplingParams(temperature=1.0), rng) for _ in range(400)]
    assert all(a.n[0] == 1 for a in runs)
    # The next token comes from P after the draft (6 or 7 evenly), not from relu(P - Q) (7 only).
    sixes = sum(a.next_token[0] == 6 for a in runs)
    assert 150 < sixes < 250 and all(a.next_token[0] in (6, 7) for a in runs)


def test_exact_walks_a_ragged_tree() -> None:
    V = 8
    llm = np.stack([_one_hot_logits(V, t, 1)[0] for t in (2, 5, 5)])[None, None]  # (1,1,3,V)
    beams = np.array([[[0, 2, NO_TOKEN]]])
    acc = accept_exact(beams, llm, SamplingParams(temperature=1.0), np.random.default_rng(0))
    assert (acc.beam[0], acc.n[0], acc.next_token[0]) == (0, 1, 5)


def test_exact_walks_the_tree() -> None:
    V = 8
    # Point masses: the LLM wants 2 after g0, then 5 (only beam 1 drafted 2, 5), then 7.
    llm = np.stack(
        [
            np.stack(
                [
                    _one_hot_logits(V, 2, 1)[0],
                    _one_hot_logits(V, 3, 1)[0],
                    _one_hot_logits(V, 0, 1)[0],
                ]
            ),
            np.stack(
                [
                    _one_hot_logits(V, 2, 1)[0],
                    _one_hot_logits(V, 5, 1)[0],
                    _one_hot_logits(V, 7, 1)[0],
                ]
            ),
        ]
    )[None]  # (1, 2, 3, V)
    beams = np.array([[[0, 1, 4], [0, 2, 5]]])
    acc = accept_exact(beams, llm, SamplingParams(temperature=1.0), np.random.default_rng(0))
    assert (acc.beam[0], acc.n[0], acc.next_token[0]) == (1, 2, 7)


@pytest.mark.parametrize("rule", ["apple", "exact"])
def test_sampling_is_reproducible_with_a_seed(rule: str) -> None:
    rng_logits = np.random.default_rng(3)
    llm = rng_logits.normal(size=(2, 3, 4, 30))
    beams = rng_logits.integers(0, 30, size=(2, 3, 4))
    q = np.log(np.full((2, 3, 3, 30), 1 / 30))
    params = SamplingParams(temperature=0.7)

    def run(seed: int):
        rng = np.random.default_rng(seed)
        if rule == "apple":
            return accept_apple(beams, llm, q, params, rng)
        return accept_exact(beams, llm, params, rng)

    a, b = run(5), run(5)
    np.testing.assert_array_equal(a.next_token, b.next_token)
    np.testing.assert_array_equal(a.n, b.n)
