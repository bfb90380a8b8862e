"""Sampling controls top-k, top-p (nucleus) and min-p (docs/design.md §3.5): the warps on
hand-checkable distributions, their order, every acceptance rule sampling the controlled P,
exact speculative sampling matching autoregressive sampling with them, and the CLI flags."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from redrafter.cli import main
from redrafter.config import BeamShape, SamplingParams
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.decoding.accept import (
    accept_apple,
    accept_exact,
    choose_token,
    log_softmax,
    min_p_filter,
    target_probs,
    top_p_filter,
    warp_logits,
)
from redrafter.decoding.output import Step
from redrafter.errors import ConfigError
from redrafter.pipeline import decode_options
from redrafter.runtimes.torch import TorchRuntime

from conftest import collect, flat_tiny_pair, tiny_base, tiny_drafter
from test_driver import _chi_square_pvalue_ok, _target_joint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P4 = np.array([0.5, 0.3, 0.15, 0.05])  # the hand example of the warps below


# -- the warps on a hand-checkable distribution -------------------------------------------------
@pytest.mark.parametrize(
    "top_p,kept",
    [
        (0.8, [0.5, 0.3]),  # .5 + .3 reaches .8: the smallest prefix that does
        (0.81, [0.5, 0.3, 0.15]),
        (0.5, [0.5]),  # the first token alone reaches .5
        (0.2, [0.5]),  # at least the most probable token always stays
        (1e-15, [0.5]),
        (0.999, [0.5, 0.3, 0.15, 0.05]),
    ],
)
def test_top_p_keeps_the_smallest_prefix_that_reaches_p(top_p: float, kept: list[float]) -> None:
    expected = np.zeros(4)
    expected[: len(kept)] = np.array(kept) / sum(kept)
    np.testing.assert_allclose(top_p_filter(P4, top_p), expected, rtol=1e-12)
    # Token order does not matter: the same tokens survive a shuffled vocabulary.
    order = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(top_p_filter(P4[order], top_p), expected[order], rtol=1e-12)


def test_top_p_keeps_ties_with_the_last_kept_token() -> None:
    """.4 + .2 reaches .6 with any one of the three .2s: all three are kept, so P does not
    depend on which token id comes first (as the top-k warp keeps ties)."""
    np.testing.assert_allclose(
        top_p_filter(np.array([0.4, 0.2, 0.2, 0.2]), 0.6), [0.4, 0.2, 0.2, 0.2]
    )
    rows = np.array([[0.4, 0.2, 0.2, 0.2], [0.05, 0.15, 0.3, 0.5]])  # batched, per row
    np.testing.assert_allclose(
        top_p_filter(rows, 0.6), [[0.4, 0.2, 0.2, 0.2], [0, 0, 0.375, 0.625]]
    )


def test_top_p_looking_at_the_head_first_gives_the_same_p() -> None:
    """`head` (the top-k) only saves the full sort: bit-identical P, with ties at the k-th value
    (a support wider than k) and a hot temperature (masked tokens keep a sliver of mass), where
    the head does not reach top_p and the full sort decides."""
    rng = np.random.default_rng(1)
    logits = np.round(rng.normal(size=(7, 300)) * 2) / 2  # coarse: many ties
    for temperature in (0.5, 1.0, 100.0):
        for k in (3, 50):
            probs = target_probs(logits, SamplingParams(temperature, top_k=k))
            for top_p in (0.3, 0.9, 0.99):
                full = top_p_filter(probs, top_p)
                assert np.array_equal(top_p_filter(probs, top_p, head=k), full)


@pytest.mark.parametrize(
    "min_p,kept",
    [
        (0.2, [0.5, 0.3, 0.15]),  # floor .2 * .5 = .1: only .05 is below it
        (0.31, [0.5, 0.3]),  # floor .155
        (0.61, [0.5]),  # floor .305
        (0.0999, [0.5, 0.3, 0.15, 0.05]),  # floor .04995
    ],
)
def test_min_p_keeps_probabilities_at_least_min_p_times_the_max(
    min_p: float, kept: list[float]
) -> None:
    expected = np.zeros(4)
    expected[: len(kept)] = np.array(kept) / sum(kept)
    np.testing.assert_allclose(min_p_filter(P4, min_p), expected, rtol=1e-12)


def test_target_probs_order_is_temperature_top_k_top_p_min_p() -> None:
    logits = np.log(P4)
    # Temperature first: at T=2, P ~ sqrt(P4) = [.378, .293, .207, .120], so top_p .8 needs three
    # tokens (.671 < .8 <= .878); cutting before the temperature would keep two.
    hot = target_probs(logits, SamplingParams(temperature=2.0, top_p=0.8))
    tempered = np.sqrt(P4) / np.sqrt(P4).sum()
    np.testing.assert_allclose(hot, np.append(tempered[:3], 0) / tempered[:3].sum())
    # Top-k before top-p: top-2 renormalises to [.625, .375], which top_p .9 then keeps whole
    # (top-p alone would keep three tokens of P4).
    both = target_probs(logits, SamplingParams(temperature=1.0, top_k=2, top_p=0.9))
    np.testing.assert_allclose(both, [0.625, 0.375, 0, 0])
    # Top-p before min-p: top_p .95 keeps [.5, .3, .15]; min_p .5 of the renormalised max
    # (.526) drops .15/.95 = .158 but keeps .3/.95 = .316.
    three = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.95, min_p=0.5))
    np.testing.assert_allclose(three, [0.625, 0.375, 0, 0])


def test_default_controls_leave_p_bit_identical() -> None:
    """top_k 50, top_p 1 and min_p 0 are the P there was before the controls: Apple's top-50
    warp, then the temperature, bit for bit."""
    logits = np.random.default_rng(0).normal(size=(3, 200)).astype(np.float32)
    for temperature in (0.3, 1.0, 1.7):
        before = np.exp(log_softmax(warp_logits(logits.astype(np.float64), 50) / temperature))
        for sampling in (
            SamplingParams(temperature),
            SamplingParams(temperature, top_k=50, top_p=1.0, min_p=0.0),
        ):
            assert np.array_equal(target_probs(logits, sampling), before)


# -- every rule samples the controlled P --------------------------------------------------------
def test_choose_token_samples_only_the_kept_tokens() -> None:
    logits = np.log(np.tile(P4, (2, 1)))
    rng = np.random.default_rng(0)
    sampling = SamplingParams(temperature=1.0, top_p=0.8, seed=0)
    draws = np.concatenate([choose_token(logits, sampling, rng) for _ in range(2000)])
    assert set(draws.tolist()) == {0, 1}
    assert abs(np.mean(draws == 0) - 0.625) < 0.03
    greedy = SamplingParams(top_p=0.1, min_p=0.9, top_k=1)  # ignored: argmax either way
    assert choose_token(logits, greedy, rng).tolist() == [0, 0]


def test_exact_rule_never_accepts_or_emits_a_cut_token() -> None:
    """min_p .2 cuts token 3 (.05 < .1): the drafted 3 is never accepted, and the walk's
    draws at the root follow the renormalised [.5, .3, .15] / .95."""
    llm = np.broadcast_to(np.log(P4), (1, 2, 3, 4)).copy()  # (B, W, L, V)
    beams = np.array([[[9, 3, 3], [9, 0, 3]]])
    rng = np.random.default_rng(2)
    sampling = SamplingParams(temperature=1.0, min_p=0.2)
    root = []
    for _ in range(3000):
        acc = accept_exact(beams, llm, sampling, rng)
        assert acc.next_token[0] != 3 and not (acc.beam[0] == 0 and acc.n[0] > 0)
        if acc.n[0] == 0:
            root.append(acc.next_token[0])
        else:  # accepted draft 0 on beam 1; its child 3 is cut, so the walk stops there
            assert (acc.beam[0], acc.n[0]) == (1, 1)
    n_accepted = 3000 - len(root)
    assert abs(n_accepted / 3000 - 0.5 / 0.95) < 0.03
    assert abs(np.mean(np.array(root) == 1) - (0.3 / 0.95) / (0.45 / 0.95)) < 0.04


def test_apple_rule_uses_the_controlled_p() -> None:
    """Q is sure of token 3, which min_p .2 cuts from P: P(3)/Q(3) = 0, so the draft is always
    rejected and the resample from relu(P - Q) never gives 3."""
    V, L = 4, 2
    llm = np.broadcast_to(np.log(P4), (1, 1, L, V)).copy()
    beams = np.array([[[9, 3]]])
    q = np.log(np.array([[[[1e-9, 1e-9, 1e-9, 1.0 - 3e-9]]]]))
    rng = np.random.default_rng(3)
    sampling = SamplingParams(temperature=1.0, min_p=0.2)
    for _ in range(500):
        acc = accept_apple(beams, llm, q, sampling, rng)
        assert acc.n[0] == 0 and acc.next_token[0] != 3
    # Without the control the same draft is accepted about P(3)/Q(3) = 5 % of the time.
    plain = SamplingParams(temperature=1.0)
    accepted = [accept_apple(beams, llm, q, plain, rng).n[0] for _ in range(2000)]
    assert 0.02 < np.mean(accepted) < 0.08


# -- speculative decoding keeps the controls exact -----------------------------------------------
def _first_two(
    runtime: TorchRuntime, prompt: list[int], rows: int, options: DecodeOptions
) -> tuple[np.ndarray, list[Step]]:
    """Counts (6, 6) of the first two tokens over `rows` copies of `prompt`, and the steps."""
    steps = list(decode(runtime, [prompt] * rows, options.replace(max_new_tokens=2)))
    observed = np.zeros((6, 6))
    for row in collect(steps, rows):
        observed[row[0], row[1]] += 1
    return observed, steps


@pytest.mark.parametrize(
    "controls",
    [dict(top_k=3), dict(top_p=0.6), dict(min_p=0.5), dict(top_k=4, top_p=0.8, min_p=0.3)],
    ids=["top_k", "top_p", "min_p", "all"],
)
@pytest.mark.parametrize("W", [1, 4])
def test_exact_speculative_sampling_matches_autoregressive_with_controls(W, controls) -> None:
    """Speculative decoding (exact acceptance) and autoregressive sampling with the same
    controls both give the exact first-two-token joint under the controlled P: Pearson
    chi-square at the 0.1 % level over 5000 rows each, and no row ever emits a cut token."""
    base, drafter = flat_tiny_pair()
    runtime = TorchRuntime(base, drafter)
    prompt, rows = [1, 2, 3], 5000
    sampling = SamplingParams(temperature=1.0, seed=123, acceptance="exact", **controls)
    target = _target_joint(base, prompt, sampling)  # (6, 6)
    cut = target == 0
    assert cut.sum() >= 6  # the controls really cut tokens here (at least one whole first token)
    speculative, steps = _first_two(
        runtime, prompt, rows, DecodeOptions(beam=BeamShape(W, 3), sampling=sampling)
    )
    autoregressive, _ = _first_two(
        runtime,
        prompt,
        rows,
        AUTOREGRESSIVE.replace(sampling=dataclasses.replace(sampling, seed=124)),
    )
    accepted = np.concatenate([s.accepted for s in steps[1:]])
    assert accepted.mean() > 0.1  # drafts were really accepted, not just resampled
    for observed in (speculative, autoregressive):
        assert observed[cut].sum() == 0
        assert _chi_square_pvalue_ok(observed.ravel(), (target * rows).ravel())
    # The check has teeth: the same counts fail against the target without the controls.
    plain = _target_joint(base, prompt, SamplingParams(temperature=1.0)) * rows
    assert not _chi_square_pvalue_ok(speculative.ravel(), plain.ravel())


def test_greedy_ignores_the_controls_and_matches_autoregressive() -> None:
    base = tiny_base(seed=6)
    runtime = TorchRuntime(base, tiny_drafter(base))
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    plain = collect(decode(runtime, prompts, AUTOREGRESSIVE.replace(max_new_tokens=24)), 3)
    greedy = SamplingParams(top_k=2, top_p=0.3, min_p=0.9)
    for options in (
        AUTOREGRESSIVE.replace(max_new_tokens=24, sampling=greedy),
        DecodeOptions(max_new_tokens=24, beam=BeamShape(3, 4), sampling=greedy),
    ):
        assert collect(decode(runtime, prompts, options), 3) == plain


# -- configuration and CLI ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,bad",
    [
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", math.nan),
        ("top_p", math.inf),
        ("top_p", True),
        ("top_p", "0.9"),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("min_p", math.nan),
        ("min_p", -math.inf),
        ("top_k", 0),
        ("top_k", 2.5),
        ("top_k", True),
    ],
)
def test_bad_controls_are_one_line_config_errors(field: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} .* must be ") as info:
        SamplingParams(temperature=1.0, **{field: bad})
    assert "\n" not in str(info.value)


def test_good_controls_and_the_library_entry_point() -> None:
    assert SamplingParams(top_p=1.0, min_p=0.0, top_k=1).top_k == 1
    assert SamplingParams(top_k=np.int64(3)).top_k == 3
    options = decode_options(DecodeOptions(), temperature=0.7, top_k=5, top_p=0.9, min_p=0.05)
    s = options.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.7, 5, 0.9, 0.05)
    default = decode_options(DecodeOptions(), temperature=0.7).sampling
    assert default == SamplingParams(temperature=0.7)  # top-50, top_p 1, min_p 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--top-p", "0"], "top_p 0.0 must be a finite number in (0, 1]"),
        (["--min-p", "1"], "min_p 1.0 must be a finite number in [0, 1)"),
        (["--top-k", "0"], "top_k 0 must be an integer >= 1"),
        (["--top-p", "nan"], "top_p nan must be"),
    ],
)
def test_cli_bad_control_is_one_line_exit_2(flags: list[str], message: str) -> None:
    """Checked before any model loads (no --base here): one `error:` line, exit code 2."""
    result = CliRunner().invoke(
        main, ["generate", "--prompt-ids", "1", "--temperature", "1", *flags]
    )
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1  # one line
    assert result.output.startswith(f"error: {message}"), result.output


def test_cli_generates_with_the_controls(tiny_checkpoints: tuple[Path, Path, Path]) -> None:
    _, base_dir, drafter_dir = tiny_checkpoints
    args = ["generate", "--base", str(base_dir), "--drafter", str(drafter_dir)]
    args += ["--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json", "--seed", "1"]
    args += ["--temperature", "1", "--top-k", "3", "--top-p", "0.9", "--min-p", "0.1"]
    runner = CliRunner()
    first, again = runner.invoke(main, args), runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    ids = json.loads(first.output)["token_ids"]
    assert len(ids) == 8 and ids == json.loads(again.output)["token_ids"]  # seeded
