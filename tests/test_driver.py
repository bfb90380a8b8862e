"""The decode loop (docs/design.md §3) on the torch runtime: pruned drafts, eos, prompt errors,
the bf16 runtime, and exact sampling preserving the target distribution. Greedy speculative ==
greedy autoregressive and long accepts are pinned for every runtime in test_conformance.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from redrafter.config import BeamShape, SamplingParams
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.decoding.accept import target_probs
from redrafter.errors import PromptError, RuntimeUnavailableError
from redrafter.runtimes.torch import TorchRuntime

from conftest import collect, tiny_base, tiny_drafter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS_1 = [[1, 2, 3, 4, 5]]
PROMPTS_3 = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def _ar(max_new_tokens: int) -> DecodeOptions:
    """Greedy autoregressive decoding of `max_new_tokens` tokens."""
    return AUTOREGRESSIVE.replace(max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("lookup", [False, True], ids=["drafter", "drafter+lookup"])
@pytest.mark.parametrize("min_draft_prob", [0.01, 0.5])
@pytest.mark.parametrize("W,L", [(1, 5), (3, 4)])
def test_greedy_parity_with_pruned_drafts(W, L, min_draft_prob, lookup) -> None:
    """Pruned (ragged) beams change how many tokens a step takes, never which."""
    base = tiny_base(seed=6)  # settles into a loop, so the lookup beam is long and accepted
    runtime = TorchRuntime(base, tiny_drafter(base))
    ar = collect(decode(runtime, PROMPTS_3, _ar(48)), 3)
    options = DecodeOptions(
        max_new_tokens=48,
        beam=BeamShape(W, L),
        prompt_lookup=lookup,
        min_draft_prob=min_draft_prob,
    )
    steps = list(decode(runtime, PROMPTS_3, options))
    assert collect(steps, 3) == ar
    if lookup:  # long lookup drafts were accepted: more than L-1 in one step
        assert max(int(s.accepted.max()) for s in steps[1:]) > L - 1


def test_pruning_verifies_fewer_tokens() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    verified = {}
    for min_draft_prob in (0.0, 0.01, 0.5):
        sizes = []
        inner = runtime.verify_greedy  # what plain greedy decoding calls

        def spy(tokens, *args, sizes=sizes, inner=inner):
            sizes.append(tokens.shape[1])  # N of the packed tree
            return inner(tokens, *args)

        runtime.verify_greedy = spy  # type: ignore[method-assign]
        options = DecodeOptions(
            max_new_tokens=16, beam=BeamShape(1, 5), min_draft_prob=min_draft_prob
        )
        steps = list(decode(runtime, PROMPTS_1, options))
        runtime.verify_greedy = inner  # type: ignore[method-assign]
        verified[min_draft_prob] = sizes
        # Each step reports what the LLM ran (B = 1: the packed width is the row's tree).
        assert [int(s.verified[0]) for s in steps if s.kind == "speculative"] == sizes
    assert set(verified[0.0]) == {5}  # g0 and all 4 drafts, every step
    # A higher floor cuts more of a random drafter's drafts; 0.5 often keeps none.
    assert np.mean(verified[0.5]) < np.mean(verified[0.01]) < 5 and min(verified[0.5]) == 1


def test_eos_stops_each_row_and_is_kept() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    ar = collect(decode(runtime, PROMPTS_3, _ar(20)), 3)
    eos = ar[1][6]  # stop row 1 at its 7th token; other rows stop at their first eos, if any
    options = DecodeOptions(max_new_tokens=20, beam=BeamShape(3, 4))
    spec = collect(decode(runtime, PROMPTS_3, options, eos_token_ids=[eos]), 3)
    for row_ar, row_spec in zip(ar, spec, strict=True):
        cut = row_ar.index(eos) + 1 if eos in row_ar else 20
        assert row_spec == row_ar[:cut]


def test_prompt_errors_are_named() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    with pytest.raises(PromptError, match="outside the vocab"):
        list(decode(runtime, [[1, 999]], AUTOREGRESSIVE))
    with pytest.raises(PromptError, match="context"):
        options = DecodeOptions(max_new_tokens=10, beam=BeamShape(2, 3))
        list(decode(runtime, [[1] * 250], options))
    with pytest.raises(PromptError, match="empty"):
        list(decode(runtime, [[]], AUTOREGRESSIVE))


def _chi_square_pvalue_ok(observed: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson chi-square at the 0.1% level, bins with expected < 5 merged into one."""
    small = expected < 5
    obs = np.append(observed[~small], observed[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    k = int(keep.sum()) - 1
    # Wilson-Hilferty: the chi-square quantile at z = 3.09 (p = 0.001).
    z = 3.09
    critical = k * (1 - 2 / (9 * k) + z * math.sqrt(2 / (9 * k))) ** 3
    return stat < critical


def _target_joint(base, prompt, sampling) -> np.ndarray:
    """Exact joint distribution of the first two tokens under autoregressive sampling."""
    V = base.config.vocab_size
    with torch.no_grad():
        ids = torch.tensor([prompt])
        T = ids.shape[1]
        mask = torch.ones(1, T, T, dtype=torch.bool).tril()
        logits, _, _ = base(
            ids,
            torch.arange(T)[None],
            mask,
            torch.zeros(1, dtype=torch.long),
            base.layer_caches(base.new_cache(1, T + 1)),
        )
        p1 = target_probs(logits[0, -1].numpy(), sampling)  # (V,)
        seqs = torch.tensor([prompt + [x] for x in range(V)])  # (V, T+1)
        mask2 = torch.ones(V, T + 1, T + 1, dtype=torch.bool).tril()
        logits2, _, _ = base(
            seqs,
            torch.arange(T + 1).expand(V, -1),
            mask2,
            torch.zeros(V, dtype=torch.long),
            base.layer_caches(base.new_cache(V, T + 1)),
        )
        p2 = target_probs(logits2[:, -1].numpy(), sampling)  # (V, V)
    return p1[:, None] * p2


@pytest.mark.parametrize("W", [1, 4])
def test_exact_sampling_preserves_the_target_distribution(W) -> None:
    base = tiny_base(seed=5, vocab_size=6)  # tiny vocab: the 36 two-token outcomes all show up
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(0.5)  # flatter target, so drafts are often right and often wrong
    drafter = tiny_drafter(base, seed=6)
    sampling = SamplingParams(temperature=1.0, seed=123, acceptance="exact")
    prompt = [1, 2, 3]
    rows = 3000
    runtime = TorchRuntime(base, drafter)
    options = DecodeOptions(max_new_tokens=2, beam=BeamShape(W, 3), sampling=sampling)
    steps = list(decode(runtime, [prompt] * rows, options))
    firsts = collect(steps, rows)
    observed = np.zeros((6, 6))
    for row in firsts:
        observed[row[0], row[1]] += 1
    accepted = np.concatenate([s.accepted for s in steps[1:]])
    assert accepted.mean() > 0.1  # drafts were really accepted, not just resampled
    expected = _target_joint(base, prompt, sampling) * rows
    assert _chi_square_pvalue_ok(observed.ravel(), expected.ravel())
    # The check has teeth: the same counts fail against a slightly hotter target.
    hotter = _target_joint(base, prompt, SamplingParams(temperature=1.6)) * rows
    assert not _chi_square_pvalue_ok(observed.ravel(), hotter.ravel())


def test_half_precision_torch_runtime_keeps_the_driver_contract() -> None:
    """dtype='bfloat16' casts the weights and the cache (not a no-op), the driver still gets
    fp32 numpy, and speculative decoding runs through it. (Token equality with autoregressive
    is not pinned: bf16 rounding of an N-token verify differs from a 1-token step.)"""
    base = tiny_base(seed=1)
    runtime = TorchRuntime(base, tiny_drafter(base), dtype="bfloat16")
    assert base.embed_weight.dtype == torch.bfloat16
    runtime.reset(batch=1, capacity=64)
    assert runtime.cache is not None and runtime.cache.dtype == torch.bfloat16
    logits, hidden = runtime.prefill(np.array(PROMPTS_1), np.array([5]))
    assert logits.dtype == np.float32 and hidden.dtype == np.float32
    reference = TorchRuntime(tiny_base(seed=1))
    reference.reset(batch=1, capacity=64)
    ref_logits, _ = reference.prefill(np.array(PROMPTS_1), np.array([5]))
    assert 0 < np.abs(logits - ref_logits).max() < 0.1  # rounded, but the same model
    ar = collect(decode(runtime, PROMPTS_1, _ar(12)), 1)
    spec = collect(
        decode(runtime, PROMPTS_1, DecodeOptions(max_new_tokens=12, beam=BeamShape(2, 4))), 1
    )
    assert len(spec[0]) == len(ar[0]) == 12 and spec[0][0] == ar[0][0]  # same prefill


def test_unknown_torch_dtype_is_refused() -> None:
    with pytest.raises(RuntimeUnavailableError, match="float32"):
        TorchRuntime(tiny_base(), dtype="int8")


def test_decode_options_name_the_configuration_and_check_their_values() -> None:
    """One options object for every caller: its `name` labels bench rows, `beam_length` sizes
    the acceptance histogram, and bad values are one-line ConfigErrors."""
    from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions
    from redrafter.errors import ConfigError

    assert AUTOREGRESSIVE.name == "autoregressive" and AUTOREGRESSIVE.beam_length is None
    options = DecodeOptions(beam=BeamShape(1, 5), prompt_lookup=True, min_draft_prob=0.25)
    assert options.name == "W1 L5 +lookup p>=0.25" and options.beam_length == 5
    assert options.replace(lookup_span=2).name == "W1 L5 +lookup span2 p>=0.25"
    assert options.replace(lookup_min_ngram=2).name == "W1 L5 +lookup 2-3gram p>=0.25"
    assert options.replace(lookup_max_ngram=8).name == "W1 L5 +lookup 1-8gram p>=0.25"
    assert options.replace(prompt_lookup=False, lookup_min_ngram=2).name == "W1 L5 p>=0.25"
    for bad in (dict(max_new_tokens=0), dict(packing="tree"), dict(min_draft_prob=1.0)):
        with pytest.raises(ConfigError):
            DecodeOptions(**bad)
    with pytest.raises(ConfigError):
        options.replace(lookup_span=0)
    for shortest in (0, 4, True, 2.0):
        with pytest.raises(ConfigError, match="lookup_min_ngram"):
            options.replace(lookup_min_ngram=shortest)
    for longest in (0, 33, False):
        with pytest.raises(ConfigError, match="lookup_max_ngram"):
            options.replace(lookup_max_ngram=longest)
    assert options.replace(lookup_min_ngram=4, lookup_max_ngram=6).lookup_max_ngram == 6


def test_phase_clock_charges_each_lap_to_its_phase() -> None:
    from redrafter.decoding.prefill import PhaseClock

    clock = PhaseClock()
    clock.lap("draft")
    clock.lap("verify")
    clock.lap("draft")
    assert set(clock.seconds) == {"draft", "verify"}
    assert all(v >= 0.0 for v in clock.seconds.values())
