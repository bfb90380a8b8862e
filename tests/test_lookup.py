"""Prompt lookup (decoding/lookup.py): hand-checked continuations, the extra beam's shape and
point-mass draft distribution, and the driver contract with the lookup beam on: exact sampling
still exact, lookup drafts really accepted on repetitive text (greedy output unchanged:
tests/test_conformance.py runs its parity test with and without the lookup beam, on every
runtime)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from redrafter.config import LOG_0, NO_TOKEN, BeamShape, SamplingParams
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.decoding.lookup import (
    SPAN_PER_NGRAM,
    add_lookup_beam,
    continuation,
    lookup_beam,
    lookup_length,
    padded_length,
)
from redrafter.decoding.output import Step
from redrafter.decoding.stats import summarize
from redrafter.pipeline import Pipeline
from redrafter.runtimes.torch import TorchRuntime

from conftest import collect, tiny_base, tiny_drafter
from test_driver import PROMPTS_3, _chi_square_pvalue_ok, _target_joint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _ids(*tokens: int) -> np.ndarray:
    return np.array(tokens, dtype=np.int64)


@pytest.mark.parametrize(
    "history, span, expected",
    [
        # The module docstring's example: no earlier `3 5 8`; `5 8` at 0, followed by 9 3 5 8.
        ((5, 8, 9, 3, 5, 8), 2, (9, 3, 5, 8)),
        ((5, 8, 9, 3, 5, 8), 3, (9, 3, 5, 8, 9, 3)),  # the copy overlaps its own output
        ((5, 8, 9, 3, 5, 8), 1, (9, 3)),  # a 2-gram match drafts 2 x span tokens
        # The longest suffix wins over a more recent shorter one: `1 2` (at 0) beats `2` (at 4).
        ((1, 2, 7, 7, 2, 9, 1, 2), 1, (7, 7)),
        # Among equal n-grams the latest occurrence wins: `4 6` at 3, not at 0.
        ((4, 6, 1, 4, 6, 2, 4, 6), 1, (2, 4)),
        # A match near the end copies with overlap: the loop `9 3` goes on.
        ((3, 9, 3), 4, (9, 3, 9, 3)),
        # A one-token loop.
        ((7, 7), 3, (7, 7, 7)),
    ],
)
def test_continuation_hand_examples(history, span, expected) -> None:
    found = continuation(_ids(*history), span_per_ngram=span)
    assert found is not None
    assert tuple(found) == expected


def test_continuation_span_grows_with_the_match() -> None:
    text = _ids(*range(1, 15), 1, 2, 3)  # 1..14 then `1 2 3` again: a 3-gram match at 0
    assert SPAN_PER_NGRAM == 4
    assert tuple(continuation(text)) == tuple(range(4, 15)) + (1,)  # 3 x 4 = 12 tokens
    # Only the 1-gram `2` recurs: 4 tokens.
    assert tuple(continuation(_ids(*range(1, 15), 9, 2))) == (3, 4, 5, 6)


def _continuation_by_definition(history, span, max_ngram, min_ngram):
    """The docstring's definition, literally: for n from the longest down, the latest start
    s < T - n with history[s:s+n] == the last n tokens; then span * n tokens copied from s + n
    with overlap (token t of the copy is history's token t, extended by the copy itself)."""
    T = len(history)
    for n in range(min(max_ngram, T - 1), min_ngram - 1, -1):
        starts = [s for s in range(T - n) if list(history[s : s + n]) == list(history[T - n :])]
        if starts:
            text = list(history)
            for t in range(span * n):
                text.append(text[starts[-1] + n + t])
            return text[T:]
    return None


@settings(max_examples=400, deadline=None)
@given(
    history=st.lists(st.integers(0, 4), min_size=1, max_size=40),
    span=st.integers(1, 4),
    max_ngram=st.integers(1, 5),
    min_ngram=st.integers(1, 3),
)
def test_continuation_is_the_latest_longest_match(history, span, max_ngram, min_ngram) -> None:
    found = continuation(
        _ids(*history), span_per_ngram=span, max_ngram=max_ngram, min_ngram=min_ngram
    )
    want = _continuation_by_definition(history, span, max_ngram, min_ngram)
    assert (None if found is None else found.tolist()) == want


@pytest.mark.parametrize("history", [(5,), (1, 2, 3, 4)])
def test_continuation_without_a_repeat_is_none(history) -> None:
    assert continuation(_ids(*history)) is None


def test_lookup_beam_is_ragged() -> None:
    X = NO_TOKEN
    history = _ids(5, 8, 9, 3, 5, 8)
    assert list(lookup_beam(history, 8, length=6, span_per_ngram=2)) == [8, 9, 3, 5, 8, X]
    assert list(lookup_beam(history, 8, length=3, span_per_ngram=2)) == [8, 9, 3]  # cut
    # A 1-gram match drafts 4: the overlapping copy repeats the loop `6 8`.
    assert list(lookup_beam(_ids(3, 8, 6, 8), 8, length=6)) == [8, 6, 8, 6, 8, X]
    # No repeat anywhere: g0 alone (it packs onto the root, no new tree token).
    assert list(lookup_beam(_ids(1, 2, 3, 8), 8, length=4)) == [8, X, X, X]


def test_add_lookup_beam_shapes_and_point_mass() -> None:
    B, W, L, V = 2, 3, 4, 50
    rng = np.random.default_rng(0)
    beams = rng.integers(10, V, (B, W, L))
    beams[0, :, 0], beams[1, :, 0] = 8, 6
    q = np.log(rng.dirichlet(np.ones(V), (B, W, L - 1))).astype(np.float32)
    histories = [[5, 8, 9, 3, 5, 8], [2, 6, 7, 1, 6]]
    # span 1: the longest lookup beam is 1 + 3 = L, so nothing is padded.
    out, q_out = add_lookup_beam(beams, q, histories, length=L, span_per_ngram=1)
    assert out.shape == (B, W + 1, L) and q_out is not None and q_out.shape == (B, W + 1, L - 1, V)
    np.testing.assert_array_equal(out[:, :W], beams)
    np.testing.assert_array_equal(q_out[:, :W], q)
    assert list(out[0, W]) == [8, 9, 3, NO_TOKEN]  # `5 8` matched: 2 drafts
    assert list(out[1, W]) == [6, 7, NO_TOKEN, NO_TOKEN]  # `6` matched: 1 draft
    for b in range(B):
        for k in range(L - 1):
            row = q_out[b, W, k]
            drafted = out[b, W, k + 1]
            if drafted != NO_TOKEN:
                assert row[drafted] == 0.0  # log 1 on the drafted token
            assert np.count_nonzero(row == LOG_0) == V - (drafted != NO_TOKEN)
    out2, none = add_lookup_beam(beams, None, histories, length=L, span_per_ngram=1)
    assert none is None
    np.testing.assert_array_equal(out2, out)


def test_add_lookup_beam_pads_the_drafter_beams() -> None:
    B, W, L, V = 1, 2, 3, 20
    beams = np.array([[[8, 11, 12], [8, 13, 14]]])  # (1, 2, 3)
    q = np.zeros((B, W, L - 1, V), np.float32)
    K = padded_length(L)
    assert K == lookup_length() == 13  # by default a 3-gram match may draft 12 tokens
    out, q_out = add_lookup_beam(beams, q, [[5, 8, 9, 3, 5, 8]], length=K)
    assert out.shape == (1, 3, K) and q_out is not None and q_out.shape == (1, 3, K - 1, V)
    np.testing.assert_array_equal(out[0, :2, :L], beams[0])
    assert np.all(out[0, :2, L:] == NO_TOKEN)
    assert list(out[0, 2]) == [8, 9, 3, 5, 8, 9, 3, 5, 8] + [NO_TOKEN] * 4  # 2-gram: 8
    assert np.all(q_out[0, :2, L - 1 :] == LOG_0)
    # A runtime whose commit takes at most 4 rows gets beams of 4, never fewer than L.
    assert padded_length(L, max_length=4) == 4 and padded_length(L, max_length=2) == L
    capped, _ = add_lookup_beam(beams, None, [[5, 8, 9, 3, 5, 8]], length=4)
    assert capped.shape == (1, 3, 4) and list(capped[0, 2]) == [8, 9, 3, 5]


def test_add_lookup_beam_drafts_only_from_matches_of_min_ngram_tokens() -> None:
    """`min_ngram`: a suffix match shorter than it drafts nothing (g0 alone, no tree token)."""
    two_gram = [5, 8, 9, 3, 5, 8]  # `5 8` recurs, `3 5 8` does not
    one_gram = [1, 2, 7, 2]  # only `2` recurs
    for history, shortest, drafted in [
        (two_gram, 1, [9, 3, 5, 8]),  # the longest match wins: 2 tokens x span 2
        (two_gram, 2, [9, 3, 5, 8]),
        (two_gram, 3, []),
        (one_gram, 1, [7, 2]),
        (one_gram, 2, []),
    ]:
        g0 = history[-1]
        beams = np.array([[[g0, 1, 2]]])  # (1, 1, 3)
        out, _ = add_lookup_beam(
            beams, None, [history], length=9, span_per_ngram=2, min_ngram=shortest
        )
        assert [int(t) for t in out[0, 1] if t != NO_TOKEN] == [g0, *drafted]


def test_decode_passes_the_lookup_ngram_range_and_keeps_greedy_output(monkeypatch) -> None:
    """DecodeOptions.lookup_min_ngram / lookup_max_ngram reach the lookup search: a longer
    minimum match drafts less (fewer tree tokens), a longer maximum drafts further into a
    repeat (bigger trees: span x n tokens for a match of n); greedy output stays autoregressive
    decoding's either way."""
    import redrafter.decoding.driver as driver

    base = tiny_base(seed=6)  # settles into a loop, so long matches recur
    runtime = TorchRuntime(base, tiny_drafter(base))
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    ar = collect(decode(runtime, prompt, AUTOREGRESSIVE.replace(max_new_tokens=64)), 1)[0]
    seen: list[tuple[int, int]] = []
    real = driver.add_lookup_beam

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append((kwargs["min_ngram"], kwargs["max_ngram"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(driver, "add_lookup_beam", spy)
    verified, largest = {}, {}
    for ngrams in ((1, 3), (3, 3), (1, 8)):
        options = DecodeOptions(
            max_new_tokens=64,
            beam=BeamShape(1, 3),
            prompt_lookup=True,
            lookup_min_ngram=ngrams[0],
            lookup_max_ngram=ngrams[1],
        )
        run = list(decode(runtime, prompt, options))
        assert collect(run, 1)[0] == ar
        assert seen and set(seen) == {ngrams}
        seen.clear()
        verified[ngrams] = sum(int(s.verified.sum()) for s in run[1:])
        largest[ngrams] = max(int(s.verified.max()) for s in run[1:])
    assert verified[3, 3] < verified[1, 3]
    assert largest[1, 3] <= 3 + 4 * 3 < largest[1, 8]  # W L - 1 drafts + span x 3 at most


def test_lookup_drafts_are_accepted_on_repetitive_text() -> None:
    """This tiny base (seed 6) settles into repeating one token under greedy decoding; its random
    drafter never guesses right, but the lookup beam copies the repeats and is accepted."""
    base = tiny_base(seed=6)
    runtime = TorchRuntime(base, tiny_drafter(base))
    prompt = [[3, 1, 4, 1, 5, 9, 2, 6]]
    ar = collect(decode(runtime, prompt, AUTOREGRESSIVE.replace(max_new_tokens=64)), 1)[0]
    assert len(set(ar[32:])) <= 4, "the tiny base is expected to repeat itself"
    steps, accepted = {}, {}
    for lookup in (False, True):
        options = DecodeOptions(max_new_tokens=64, beam=BeamShape(1, 5), prompt_lookup=lookup)
        run = list(decode(runtime, prompt, options))
        assert collect(run, 1)[0] == ar
        steps[lookup] = len(run) - 1
        accepted[lookup] = sum(int(s.accepted.sum()) for s in run[1:])
    assert accepted[False] <= 2 and accepted[True] >= 20
    assert steps[True] < steps[False] * 0.7  # far fewer verify calls for the same tokens


@pytest.mark.parametrize("W,min_draft_prob", [(1, 0.0), (3, 0.0), (3, 0.05)])
def test_exact_sampling_with_lookup_preserves_the_target_distribution(W, min_draft_prob) -> None:
    base = tiny_base(seed=5, vocab_size=6)
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(0.5)
    sampling = SamplingParams(temperature=1.0, seed=7, acceptance="exact")
    prompt = [1, 2, 1, 2, 1]  # repeats, so the lookup beam drafts `2 1 ...`
    rows = 3000
    runtime = TorchRuntime(base, tiny_drafter(base, seed=6))
    options = DecodeOptions(
        max_new_tokens=2,
        beam=BeamShape(W, 3),
        sampling=sampling,
        prompt_lookup=True,
        min_draft_prob=min_draft_prob,  # ragged drafter beams next to the lookup beam
    )
    steps = list(decode(runtime, [prompt] * rows, options))
    observed = np.zeros((6, 6))
    for row in collect(steps, rows):
        observed[row[0], row[1]] += 1
    expected = _target_joint(base, prompt, sampling) * rows
    assert _chi_square_pvalue_ok(observed.ravel(), expected.ravel())


def test_apple_rule_with_lookup_runs_and_emits_valid_tokens() -> None:
    base = tiny_base(seed=2)
    runtime = TorchRuntime(base, tiny_drafter(base))
    sampling = SamplingParams(temperature=0.8, seed=1, acceptance="apple")
    options = DecodeOptions(
        max_new_tokens=20, beam=BeamShape(2, 4), sampling=sampling, prompt_lookup=True
    )
    rows = collect(decode(runtime, PROMPTS_3, options), 3)
    assert all(len(r) == 20 for r in rows)
    assert all(0 <= t < base.config.vocab_size for r in rows for t in r)


def test_stats_count_lookup_accepts_longer_than_the_drafters_beam() -> None:
    """The lookup beam can be longer than L, so a step may accept more than L-1 drafts: the
    acceptance histogram grows to hold them (it once indexed past its end: make demo crashed)."""
    base = tiny_base(seed=6)  # settles into a loop: long lookup drafts are accepted
    pipe = Pipeline(TorchRuntime(base, tiny_drafter(base)), None, ())
    options = DecodeOptions(max_new_tokens=64, beam=BeamShape(1, 3), prompt_lookup=True)
    stats = pipe.generate([[3, 1, 4, 1, 5, 9, 2, 6]], options).stats
    histogram = stats["acceptance_histogram"]
    assert len(histogram) > 3 and sum(histogram[3:]) > 0  # accepts beyond L-1 = 2
    assert sum(histogram) == stats["steps"]


def test_summarize_histogram_hand_example() -> None:
    steps = [
        Step([[7]], np.zeros(1, np.int64), {"prefill": 0.1}, "prefill"),
        *[
            Step([[1] * (n + 1)], np.array([n]), {"verify": 0.01}, "speculative", np.array([v]))
            for n, v in ((0, 4), (2, 5), (5, 9), (2, 3))
        ],
    ]
    stats = summarize(steps, beam_length=3)
    assert stats["acceptance_histogram"] == [1, 0, 2, 0, 0, 1]
    assert stats["tokens_per_step"] == (1 + 3 + 6 + 3) / 4
    assert stats["verified_per_step"] == (4 + 5 + 9 + 3) / 4  # the prefill's step not counted
