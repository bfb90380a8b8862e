"""The decode loop (DESIGN.md §3): fp32 greedy speculative decoding emits exactly the greedy
autoregressive tokens, and exact sampling preserves the target distribution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from redrafter.config import BeamShape, SamplingParams
from redrafter.decoding.accept import target_probs
from redrafter.decoding.autoregressive import autoregressive_decode
from redrafter.decoding.driver import speculative_decode
from redrafter.errors import PromptError, RuntimeUnavailableError
from redrafter.runtimes.torch import TorchRuntime

from conftest import OracleDrafts, tiny_base, tiny_drafter

PROMPTS_1 = [[1, 2, 3, 4, 5]]
PROMPTS_3 = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def _collect(steps, batch: int) -> list[list[int]]:
    steps = list(steps)
    return [sum((s.new_tokens[b] for s in steps), []) for b in range(batch)]


@pytest.mark.parametrize("lookup", [False, True], ids=["drafter", "drafter+lookup"])
@pytest.mark.parametrize("packing", ["dedup", "full"])
@pytest.mark.parametrize("W,L", [(1, 2), (1, 5), (4, 4), (3, 5)])
@pytest.mark.parametrize("prompts", [PROMPTS_1, PROMPTS_3], ids=["batch1", "batch3"])
def test_greedy_speculative_equals_autoregressive(prompts, W, L, packing, lookup) -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    ar = _collect(autoregressive_decode(runtime, prompts, max_new_tokens=24), len(prompts))
    spec = _collect(
        speculative_decode(
            runtime,
            prompts,
            beam=BeamShape(W, L),
            max_new_tokens=24,
            packing=packing,
            prompt_lookup=lookup,
        ),
        len(prompts),
    )
    assert spec == ar
    assert all(len(row) == 24 for row in ar)


@pytest.mark.parametrize("lookup", [False, True], ids=["drafter", "drafter+lookup"])
@pytest.mark.parametrize("min_draft_prob", [0.01, 0.5])
@pytest.mark.parametrize("W,L", [(1, 5), (3, 4)])
def test_greedy_parity_with_pruned_drafts(W, L, min_draft_prob, lookup) -> None:
    """Pruned (ragged) beams change how many tokens a step takes, never which."""
    base = tiny_base(seed=6)  # settles into a loop, so the lookup beam is long and accepted
    runtime = TorchRuntime(base, tiny_drafter(base))
    ar = _collect(autoregressive_decode(runtime, PROMPTS_3, max_new_tokens=48), 3)
    steps = list(
        speculative_decode(
            runtime,
            PROMPTS_3,
            beam=BeamShape(W, L),
            max_new_tokens=48,
            prompt_lookup=lookup,
            min_draft_prob=min_draft_prob,
        )
    )
    assert _collect(steps, 3) == ar
    if lookup:  # long lookup drafts were accepted: more than L-1 in one step
        assert max(int(s.accepted.max()) for s in steps[1:]) > L - 1


def test_pruning_verifies_fewer_tokens() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    verified = {}
    for min_draft_prob in (0.0, 0.01, 0.5):
        sizes = []
        inner = runtime.verify

        def spy(tokens, *args, sizes=sizes, inner=inner):
            sizes.append(tokens.shape[1])  # N of the packed tree
            return inner(tokens, *args)

        runtime.verify = spy  # type: ignore[method-assign]
        steps = list(
            speculative_decode(
                runtime,
                PROMPTS_1,
                beam=BeamShape(1, 5),
                max_new_tokens=16,
                min_draft_prob=min_draft_prob,
            )
        )
        runtime.verify = inner  # type: ignore[method-assign]
        verified[min_draft_prob] = sizes
        # Each step reports what the LLM ran (B = 1: the packed width is the row's tree).
        assert [int(s.verified[0]) for s in steps if s.kind == "speculative"] == sizes
    assert set(verified[0.0]) == {5}  # g0 and all 4 drafts, every step
    # A higher floor cuts more of a random drafter's drafts; 0.5 often keeps none.
    assert np.mean(verified[0.5]) < np.mean(verified[0.01]) < 5 and min(verified[0.5]) == 1


@pytest.mark.parametrize("packing", ["dedup", "full"])
@pytest.mark.parametrize("W,L", [(1, 5), (4, 4), (5, 3)])
def test_greedy_parity_with_long_accepts(W, L, packing) -> None:
    base = tiny_base(seed=3, model_type="qwen2")
    runtime = TorchRuntime(base, tiny_drafter(base))
    ar = _collect(autoregressive_decode(runtime, PROMPTS_3, max_new_tokens=40), 3)
    oracle = OracleDrafts(runtime, PROMPTS_3, ar, seed=W * 10 + L)
    steps = list(
        speculative_decode(
            oracle, PROMPTS_3, beam=BeamShape(W, L), max_new_tokens=40, packing=packing
        )
    )
    assert _collect(steps, 3) == ar
    accepted = np.concatenate([s.accepted for s in steps[1:]])
    assert accepted.max() == L - 1  # whole beams were accepted, so commits moved real rows
    assert len(steps) - 1 < 40  # fewer verify calls than tokens


def test_eos_stops_each_row_and_is_kept() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    ar = _collect(autoregressive_decode(runtime, PROMPTS_3, max_new_tokens=20), 3)
    eos = ar[1][6]  # stop row 1 at its 7th token; other rows stop at their first eos, if any
    spec = _collect(
        speculative_decode(
            runtime, PROMPTS_3, beam=BeamShape(3, 4), max_new_tokens=20, eos_token_ids=[eos]
        ),
        3,
    )
    for row_ar, row_spec in zip(ar, spec, strict=True):
        cut = row_ar.index(eos) + 1 if eos in row_ar else 20
        assert row_spec == row_ar[:cut]


def test_prompt_errors_are_named() -> None:
    base = tiny_base()
    runtime = TorchRuntime(base, tiny_drafter(base))
    with pytest.raises(PromptError, match="outside the vocab"):
        list(autoregressive_decode(runtime, [[1, 999]]))
    with pytest.raises(PromptError, match="context"):
        list(speculative_decode(runtime, [[1] * 250], beam=BeamShape(2, 3), max_new_tokens=10))
    with pytest.raises(PromptError, match="empty"):
        list(autoregressive_decode(runtime, [[]]))


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
    steps = list(
        speculative_decode(
            runtime, [prompt] * rows, beam=BeamShape(W, 3), sampling=sampling, max_new_tokens=2
        )
    )
    firsts = _collect(steps, rows)
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
    ar = _collect(autoregressive_decode(runtime, PROMPTS_1, max_new_tokens=12), 1)
    spec = _collect(
        speculative_decode(runtime, PROMPTS_1, beam=BeamShape(2, 4), max_new_tokens=12), 1
    )
    assert len(spec[0]) == len(ar[0]) == 12 and spec[0][0] == ar[0][0]  # same prefill


def test_unknown_torch_dtype_is_refused() -> None:
    with pytest.raises(RuntimeUnavailableError, match="float32"):
        TorchRuntime(tiny_base(), dtype="int8")
