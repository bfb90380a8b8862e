"""Prompt lookup (decoding/lookup.py): hand-checked continuations, the extra beam's shape and
point-mass draft distribution, and the driver contract with the lookup beam on: exact sampling
still exact, lookup drafts really accepted on repetitive text (greedy output unchanged:
tests/test_driver.py runs its parity test with and without the lookup beam)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redrafter.config import LOG_0, BeamShape, SamplingParams
from redrafter.decoding.autoregressive import autoregressive_decode
from redrafter.decoding.driver import speculative_decode
from redrafter.decoding.lookup import add_lookup_beam, continuation, lookup_beam
from redrafter.runtimes.torch import TorchRuntime

from conftest import tiny_base, tiny_drafter
from test_driver import PROMPTS_3, _chi_square_pvalue_ok, _collect, _target_joint


def _ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


@pytest.mark.parametrize(
    "history, length, expected",
    [
        # The module docstring's example: no earlier `3 5 8`; `5 8` at 0, followed by 9 3 5.
        ((5, 8, 9, 3, 5, 8), 3, (9, 3, 5)),
        # The longest suffix wins over a more recent shorter one: `1 2` (at 0) beats `2` (at 4).
        ((1, 2, 7, 7, 2, 9, 1, 2), 2, (7, 7)),
        # Among equal n-grams the latest occurrence wins.
        ((4, 6, 1, 4, 6, 2, 4, 6), 1, (2,)),
        # A match near the end gives a short continuation.
        ((3, 9, 3), 4, (9, 3)),
        # A single token.
        ((7, 7), 3, (7,)),
    ],
)
def test_continuation_hand_examples(history, length, expected) -> None:
    found = continuation(_ids(*history), length=length)
    assert found is not None
    assert tuple(found) == expected


@pytest.mark.parametrize("history", [(5,), (1, 2, 3, 4)])
def test_continuation_without_a_repeat_is_none(history) -> None:
    assert continuation(_ids(*history), length=3) is None


def test_lookup_beam_fills_and_falls_back() -> None:
    fallback = _ids(8, 40, 41, 42)  # the drafter's beam 0: g0 = 8
    assert list(lookup_beam(_ids(5, 8, 9, 3, 5, 8), fallback)) == [8, 9, 3, 5]
    # Only one token follows the match: the rest repeats it.
    assert list(lookup_beam(_ids(3, 8, 6, 8), fallback)) == [8, 6, 8, 8]
    # No repeat anywhere: the fallback beam itself (it packs onto beam 0, no new tree token).
    assert list(lookup_beam(_ids(1, 2, 3, 8), fallback)) == [8, 40, 41, 42]


def test_add_lookup_beam_shapes_and_point_mass() -> None:
    B, W, L, V = 2, 3, 4, 50
    rng = np.random.default_rng(0)
    beams = rng.integers(10, V, (B, W, L))
    beams[0, :, 0], beams[1, :, 0] = 8, 6
    q = np.log(rng.dirichlet(np.ones(V), (B, W, L - 1))).astype(np.float32)
    histories = [[5, 8, 9, 3, 5, 8], [2, 6, 7, 1, 6]]
    out, q_out = add_lookup_beam(beams, q, histories)
    assert out.shape == (B, W + 1, L) and q_out is not None and q_out.shape == (B, W + 1, L - 1, V)
    np.testing.assert_array_equal(out[:, :W], beams)
    np.testing.assert_array_equal(q_out[:, :W], q)
    assert list(out[0, W]) == [8, 9, 3, 5]
    assert list(out[1, W]) == [6, 7, 1, 6]
    for b in range(B):
        for k in range(L - 1):
            row = q_out[b, W, k]
            assert row[out[b, W, k + 1]] == 0.0  # log 1 on the drafted token
            assert np.count_nonzero(row == LOG_0) == V - 1
    out2, none = add_lookup_beam(beams, None, histories)
    assert none is None
    np.testing.assert_array_equal(out2, out)


def test_lookup_drafts_are_accepted_on_repetitive_text() -> None:
    """This tiny base (seed 6) settles into repeating one token under greedy decoding; its random
    drafter never guesses right, but the lookup beam copies the repeats and is accepted."""
    base = tiny_base(seed=6)
    runtime = TorchRuntime(base, tiny_drafter(base))
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    ar = _collect(autoregressive_decode(runtime, prompt, max_new_tokens=64), 1)[0]
    assert len(set(ar[32:])) <= 4, "the tiny base is expected to repeat itself"
    steps, accepted = {}, {}
    for lookup in (False, True):
        run = list(
            speculative_decode(
                runtime, prompt, beam=BeamShape(1, 5), max_new_tokens=64, prompt_lookup=lookup
            )
        )
        assert _collect(run, 1)[0] == ar
        steps[lookup] = len(run) - 1
        accepted[lookup] = sum(int(s.accepted.sum()) for s in run[1:])
    assert accepted[False] <= 2 and accepted[True] >= 20
    assert steps[True] < steps[False] * 0.7  # far fewer verify calls for the same tokens


@pytest.mark.parametrize("W", [1, 3])
def test_exact_sampling_with_lookup_preserves_the_target_distribution(W) -> None:
    base = tiny_base(seed=5, vocab_size=6)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(0.5)
    sampling = SamplingParams(temperature=1.0, seed=7, acceptance="exact")
    prompt = [1, 2, 1, 2, 1]  # repeats, so the lookup beam drafts `2 1 ...`
    rows = 3000
    runtime = TorchRuntime(base, tiny_drafter(base, seed=6))
    steps = list(
        speculative_decode(
            runtime,
            [prompt] * rows,
            beam=BeamShape(W, 3),
            sampling=sampling,
            max_new_tokens=2,
            prompt_lookup=True,
        )
    )
    observed = np.zeros((6, 6))
    for row in _collect(steps, rows):
        observed[row[0], row[1]] += 1
    expected = _target_joint(base, prompt, sampling) * rows
    assert _chi_square_pvalue_ok(observed.ravel(), expected.ravel())


def test_apple_rule_with_lookup_runs_and_emits_valid_tokens() -> None:
    base = tiny_base(seed=2)
    runtime = TorchRuntime(base, tiny_drafter(base))
    sampling = SamplingParams(temperature=0.8, seed=1, acceptance="apple")
    steps = list(
        speculative_decode(
            runtime,
            PROMPTS_3,
            beam=BeamShape(2, 4),
            sampling=sampling,
            max_new_tokens=20,
            prompt_lookup=True,
        )
    )
    rows = _collect(steps, 3)
    assert all(len(r) == 20 for r in rows)
    assert all(0 <= t < base.config.vocab_size for r in rows for t in r)
