"""Repetition, presence and frequency penalties applied per tree node (decoding/penalties.py,
docs/algorithm.md "Per-node controls"), and per-token log-probabilities: the penalties on
hand-checkable logits, each node penalised with its own path, exact speculative sampling
reproducing the penalised distribution over three tokens (so a draft's own path counts), greedy
speculative == greedy autoregressive with every control on, and log-probs checked against a
full forward pass."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from redrafter.config import NO_TOKEN, BeamShape, SamplingParams
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.decoding.accept import log_softmax, target_probs
from redrafter.decoding.output import Step
from redrafter.decoding.penalties import penalise, penalise_tree
from redrafter.errors import ConfigError
from redrafter.models.llama import Transformer
from redrafter.pipeline import decode_options
from redrafter.runtimes.torch import TorchRuntime

from conftest import collect, flat_tiny_pair, tiny_base, tiny_drafter
from test_driver import _chi_square_pvalue_ok

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LOGITS4 = np.array([2.0, -1.0, 0.5, 3.0])


# -- the penalties on hand-checkable logits -----------------------------------------------------
@pytest.mark.parametrize(
    "controls,expected",
    [
        # prompt [0] and generated [1, 1, 2] were seen: 2 / 2, -1 * 2, .5 / 2; 3 untouched.
        (dict(repetition_penalty=2.0), [1.0, -2.0, 0.25, 3.0]),
        # generated only: token 1 (twice) and 2 (once) lose .5; token 0 (prompt) does not.
        (dict(presence_penalty=0.5), [2.0, -1.5, 0.0, 3.0]),
        (dict(frequency_penalty=0.25), [2.0, -1.5, 0.25, 3.0]),  # .25 per occurrence
        # repetition first, then .5 + .25 * count: [1, -2 - 1, .25 - .75, 3]
        (
            dict(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            [1.0, -3.0, -0.5, 3.0],
        ),
        (dict(presence_penalty=-1.0), [2.0, 0.0, 1.5, 3.0]),  # negative: encourages repeats
    ],
)
def test_penalties_on_hand_checked_logits(controls: dict, expected: list[float]) -> None:
    sampling = SamplingParams(**controls)
    out = penalise(LOGITS4.astype(np.float32), sampling, prompt=[0], generated=[1, 1, 2])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)
    assert out.dtype == np.float64
    assert sampling.penalised and not SamplingParams().penalised


def test_each_tree_node_is_penalised_with_its_own_path() -> None:
    """Beam 0 drafts [3, 1], beam 1 [1] then ends (ragged). Node (w, k) comes after the prompt,
    the generated tokens (ending in g0 = 0) and the beam's first k drafts."""
    V = 4
    llm = np.broadcast_to(LOGITS4, (1, 2, 3, V))  # (B, W, L, V)
    beams = np.array([[[0, 3, 1], [0, 1, NO_TOKEN]]])
    sampling = SamplingParams(presence_penalty=1.0)
    out = penalise_tree(llm, beams, sampling, prompts=[[2]], generated=[[0]])
    expected = np.array(
        [
            [[1.0, -1.0, 0.5, 3.0], [1.0, -1.0, 0.5, 2.0], [1.0, -2.0, 0.5, 2.0]],
            [[1.0, -1.0, 0.5, 3.0], [1.0, -2.0, 0.5, 3.0], [1.0, -2.0, 0.5, 3.0]],
        ]
    )  # the last node of beam 1 lies past its end: it keeps the path up to it
    np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "field,bad",
    [
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", math.nan),
        ("repetition_penalty", "1.2"),
        ("presence_penalty", 2.5),
        ("presence_penalty", math.inf),
        ("frequency_penalty", -2.1),
        ("frequency_penalty", True),
    ],
)
def test_bad_penalties_are_one_line_config_errors(field: str, bad: object) -> None:
    with pytest.raises(ConfigError, match=rf"^{field} .* must be ") as info:
        SamplingParams(temperature=1.0, **{field: bad})
    assert "\n" not in str(info.value)


def test_library_entry_point_takes_the_penalties() -> None:
    options = decode_options(
        DecodeOptions(), repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=-0.5
    )
    s = options.sampling
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.3, 0.5, -0.5)
    assert decode_options(DecodeOptions()).sampling == SamplingParams()
    with pytest.raises(ConfigError, match="^logprobs "):
        DecodeOptions(logprobs=1)  # type: ignore[arg-type]


# -- exact speculative sampling keeps the penalised distribution ----------------------------------
def _last_logits(base: Transformer, seqs: list[list[int]]) -> np.ndarray:
    """The base's next-token logits after each (equal-length) sequence, uncached: (n, V)."""
    with torch.no_grad():
        ids = torch.tensor(seqs)
        n, T = ids.shape
        logits, _, _ = base(
            ids,
            torch.arange(T).expand(n, -1),
            torch.ones(n, T, T, dtype=torch.bool).tril(),
            torch.zeros(n, dtype=torch.long),
            base.layer_caches(base.new_cache(n, T)),
        )
    return logits[:, -1].double().numpy()


def _penalised_joint3(
    base: Transformer, prompt: list[int], sampling: SamplingParams, *, paths: bool = True
) -> np.ndarray:
    """The exact joint (V, V, V) of the first three tokens under autoregressive sampling with
    the penalties, each position penalised with everything before it. `paths=False` is the
    mistake the test must catch: the third token penalised without the second (a tree node
    penalised with its root's history instead of its own path)."""
    V = base.config.vocab_size
    p1 = target_probs(
        penalise(_last_logits(base, [prompt])[0], sampling, prompt=prompt, generated=[]), sampling
    )  # (V,)
    l2 = _last_logits(base, [[*prompt, a] for a in range(V)])  # (V, V)
    p2 = np.stack(
        [
            target_probs(penalise(l2[a], sampling, prompt=prompt, generated=[a]), sampling)
            for a in range(V)
        ]
    )  # (V, V)
    l3 = _last_logits(base, [[*prompt, a, c] for a in range(V) for c in range(V)])  # (V*V, V)
    p3 = np.stack(
        [
            target_probs(
                penalise(
                    l3[a * V + c], sampling, prompt=prompt, generated=[a, c] if paths else [a]
                ),
                sampling,
            )
            for a in range(V)
            for c in range(V)
        ]
    ).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _first_three(
    runtime: TorchRuntime, prompt: list[int], rows: int, options: DecodeOptions
) -> tuple[np.ndarray, list[Step]]:
    steps = list(decode(runtime, [prompt] * rows, options.replace(max_new_tokens=3)))
    observed = np.zeros((6, 6, 6))
    for row in collect(steps, rows):
        observed[row[0], row[1], row[2]] += 1
    return observed, steps


@pytest.mark.parametrize(
    "controls",
    [
        dict(repetition_penalty=4.0, temperature=0.5),
        dict(presence_penalty=2.0),
        dict(frequency_penalty=2.0),
        dict(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=1.0, top_p=0.9),
    ],
    ids=["repetition", "presence", "frequency", "all"],
)
def test_exact_speculative_sampling_keeps_the_penalised_distribution(controls: dict) -> None:
    """Speculative decoding (exact acceptance, W 2, L 3) and autoregressive sampling both give
    the exact first-three-token joint under the penalties: the third token comes from a depth-1
    tree node whenever the root's draft was accepted, so its own path must count. Pearson
    chi-square at the 0.1 % level over 6000 rows each; the counts fail against the joint
    without the penalties."""
    base, drafter = flat_tiny_pair()
    runtime = TorchRuntime(base, drafter)
    prompt, rows = [1, 2, 3], 6000
    sampling = SamplingParams(**{"temperature": 1.0, "seed": 7, **controls})
    target = _penalised_joint3(base, prompt, sampling)  # (6, 6, 6)
    speculative, steps = _first_three(
        runtime, prompt, rows, DecodeOptions(beam=BeamShape(2, 3), sampling=sampling)
    )
    autoregressive, _ = _first_three(
        runtime,
        prompt,
        rows,
        AUTOREGRESSIVE.replace(sampling=dataclasses.replace(sampling, seed=8)),
    )
    accepted = np.concatenate([s.accepted for s in steps[1:]])
    assert accepted.mean() > 0.1  # drafts were really accepted, so deep nodes were sampled
    for observed in (speculative, autoregressive):
        assert _chi_square_pvalue_ok(observed.ravel(), (target * rows).ravel())
    plain = {k: v for k, v in controls.items() if "penalty" not in k}
    unpenalised = _penalised_joint3(base, prompt, SamplingParams(**{"temperature": 1.0, **plain}))
    assert not _chi_square_pvalue_ok(speculative.ravel(), (unpenalised * rows).ravel())


def test_the_path_counts_at_a_deep_node() -> None:
    """The check sees a node penalised with its root's history: with a strong presence
    penalty, the joint that forgets the second token is rejected by the speculative counts."""
    base, drafter = flat_tiny_pair()
    runtime = TorchRuntime(base, drafter)
    prompt, rows = [1, 2, 3], 6000
    sampling = SamplingParams(temperature=1.0, seed=9, presence_penalty=2.0)
    right = _penalised_joint3(base, prompt, sampling)
    wrong = _penalised_joint3(base, prompt, sampling, paths=False)
    speculative, _ = _first_three(
        runtime, prompt, rows, DecodeOptions(beam=BeamShape(2, 3), sampling=sampling)
    )
    assert _chi_square_pvalue_ok(speculative.ravel(), (right * rows).ravel())
    assert not _chi_square_pvalue_ok(speculative.ravel(), (wrong * rows).ravel())


# -- greedy with every control on ----------------------------------------------------------------
ALL_CONTROLS = dict(
    top_k=3,
    top_p=0.5,
    min_p=0.2,
    repetition_penalty=1.5,
    presence_penalty=0.6,
    frequency_penalty=0.4,
)


@pytest.mark.parametrize(
    "drafts",
    [{}, {"prompt_lookup": True, "min_draft_prob": 0.3, "packing": "full"}],
    ids=["drafter", "lookup+pruned+full"],
)
@pytest.mark.parametrize("W,L", [(1, 4), (3, 4), (4, 5)])
def test_greedy_speculative_matches_autoregressive_with_every_control(
    W: int, L: int, drafts: dict
) -> None:
    """With every sampling control on, greedy speculative decoding emits autoregressive's
    tokens, also when the tree holds a prompt-lookup beam (the prompts repeat n-grams for it
    to match), pruned drafter beams and full packing."""
    base = tiny_base(seed=6)
    runtime = TorchRuntime(base, tiny_drafter(base))
    prompts = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 7, 8, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    greedy = SamplingParams(**ALL_CONTROLS)
    ar = collect(
        decode(runtime, prompts, AUTOREGRESSIVE.replace(max_new_tokens=24, sampling=greedy)), 3
    )
    spec = DecodeOptions(max_new_tokens=24, beam=BeamShape(W, L), sampling=greedy, **drafts)
    assert collect(decode(runtime, prompts, spec), 3) == ar
    plain = collect(decode(runtime, prompts, AUTOREGRESSIVE.replace(max_new_tokens=24)), 3)
    assert ar != plain  # the penalties really changed the greedy text


# -- per-token log-probabilities -----------------------------------------------------------------
def _reference_logprobs(
    base: Transformer, prompt: list[int], tokens: list[int], sampling: SamplingParams
) -> list[float]:
    """Each token's log-probability recomputed from a forward pass over prompt + tokens."""
    out = []
    for i, t in enumerate(tokens):
        logits = penalise(
            _last_logits(base, [[*prompt, *tokens[:i]]])[0],
            sampling,
            prompt=prompt,
            generated=tokens[:i],
        )
        if sampling.greedy:
            out.append(float(log_softmax(logits)[t]))
        else:
            out.append(float(np.log(target_probs(logits, sampling)[t])))
    return out


@pytest.mark.parametrize("speculative", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_match_a_full_forward_pass(speculative: bool, temperature: float) -> None:
    base = tiny_base(seed=6)
    runtime = TorchRuntime(base, tiny_drafter(base))
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    sampling = SamplingParams(temperature=temperature, seed=3, **ALL_CONTROLS)
    options = DecodeOptions(
        max_new_tokens=12,
        speculative=speculative,
        beam=BeamShape(2, 4),
        sampling=sampling,
        logprobs=True,
        stop_token_ids=(5,),  # a stop cuts a step: its log-probs are cut with it
    )
    steps = list(decode(runtime, prompts, options))
    tokens = collect(steps, 2)
    for b, prompt in enumerate(prompts):
        got = sum((s.logprobs[b] for s in steps), [])
        assert len(got) == len(tokens[b])
        np.testing.assert_allclose(
            got, _reference_logprobs(base, prompt, tokens[b], sampling), atol=1e-4
        )
        assert all(lp <= 0 and math.isfinite(lp) for lp in got)
    assert all(
        s.logprobs is None for s in decode(runtime, prompts, options.replace(logprobs=False))
    )
