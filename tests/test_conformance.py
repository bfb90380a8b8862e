"""Runtime conformance: one suite that every runtime passes (docs/design.md §3's invariant on
the runtime protocol of §6, decoding/runtime.py).

Each entry of `RUNTIMES` builds a `Subject`: a runtime, the fp32 torch runtime whose greedy
autoregressive tokens it must reproduce, the beam shapes it can draft and how much to decode
(the Core ML evaluators are slow: two rows, fewer tokens). Adding a runtime is adding an entry;
the bundles come from conftest's session fixtures, so each is exported once per session. Every
runtime must:

- emit exactly the reference's greedy autoregressive tokens under greedy speculative decoding,
  for both packings, with drafter beams alone and with the prompt-lookup beam beside pruned
  (ragged) drafter beams, for one prompt and for a batch of ragged prompts;
- keep those tokens when oracle drafts get whole beams accepted, so commits move real cache rows;
- sample reproducibly: the same seed gives the same tokens, another seed others (exact and apple
  acceptance);
- refill a row mid-batch (`prefill_rows`), and decode each row of a continuous batch whose rows
  join and leave between steps (decoding/batch.py) exactly as that row's prompt alone.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from redrafter import ops
from redrafter.config import BeamShape, SamplingParams
from redrafter.decoding import AUTOREGRESSIVE, DecodeOptions, decode
from redrafter.decoding.driver import open_batch
from redrafter.decoding.output import pad_prompts
from redrafter.decoding.runtime import Runtime
from redrafter.errors import ConfigError, RuntimeUnavailableError
from redrafter.runtimes.torch import TorchRuntime

from conftest import BUNDLE_BEAM, OracleDrafts, collect, tiny_base, tiny_drafter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SINGLE = [[1, 2, 3, 4, 5]]
RAGGED = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
# The torch runtime drafts any shape: W = 1 (a chain), L = 2 (one draft), wide and long beams.
TORCH_BEAMS = (BeamShape(3, 5), BeamShape(1, 2), BeamShape(1, 5), BeamShape(4, 4), BeamShape(5, 3))
# Drafter beams alone; or the prompt-lookup beam beside drafter beams cut where their draft
# probability falls below 5 % (ragged: about one draft fewer per tree with these drafters).
DRAFTS: dict[str, dict[str, Any]] = {
    "drafter": {},
    "lookup+pruned": {"prompt_lookup": True, "min_draft_prob": 0.05},
}


@dataclasses.dataclass
class Subject:
    """A runtime under test and what to hold it to: `reference` (fp32 torch) decodes the greedy
    autoregressive truth; `beams` are the shapes the runtime drafts (a bundle: those exported);
    `ragged` is its ragged batch; each decode makes `max_new_tokens` tokens per row."""

    runtime: Runtime
    reference: Runtime
    beams: tuple[BeamShape, ...]
    ragged: list[list[int]]
    max_new_tokens: int
    _truth: dict[tuple[tuple[int, ...], ...], list[list[int]]] = dataclasses.field(
        default_factory=dict
    )

    def prompts(self, batch: str) -> list[list[int]]:
        """'single': one prompt; 'ragged': rows of different lengths."""
        return SINGLE if batch == "single" else self.ragged

    def truth(self, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        """The reference's greedy autoregressive tokens (computed once per prompt set)."""
        key = tuple(tuple(p) for p in prompts)
        if key not in self._truth:
            options = AUTOREGRESSIVE.replace(max_new_tokens=self.max_new_tokens)
            rows = collect(decode(self.reference, prompts, options), len(prompts))
            assert all(len(row) == self.max_new_tokens for row in rows)
            self._truth[key] = rows
        return self._truth[key]

    def options(self, beam: BeamShape, **changes: Any) -> DecodeOptions:
        """Speculative decoding with `beam`, `max_new_tokens` and `changes`."""
        return DecodeOptions(max_new_tokens=self.max_new_tokens, beam=beam, **changes)


# -- the runtimes: one factory each ------------------------------------------------------------
def _torch(request: pytest.FixtureRequest) -> Subject:
    """TorchRuntime over a tiny in-process qwen2 model (q/k/v biases; the bundles are llama),
    held to itself, at every beam shape in TORCH_BEAMS."""
    base = tiny_base(seed=3, model_type="qwen2")
    return Subject(
        TorchRuntime(base, tiny_drafter(base)), TorchRuntime(base), TORCH_BEAMS, RAGGED, 24
    )


def _onnx(request: pytest.FixtureRequest, *, native: bool, device_commit: bool = False) -> Subject:
    """OnnxRuntime on the CPU over the session's ONNX bundle: TreeAttention as the portable ONNX
    function body, or the native library's kernel writing the cache in place. `device_commit`:
    cache rows move through the commit graph CUDA runs (KVCommit in place, or the portable
    gather/scatter into the second buffer) instead of numpy."""
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    if native and ops.library_path() is None:
        pytest.skip("the native op library is not built (make ops)")
    bundle = request.getfixturevalue("onnx_bundle")
    runtime = OnnxRuntime(bundle, native=native, device_commit=device_commit)
    assert runtime.implementation == ("native" if native else "portable")
    assert (runtime._commit is not None) == device_commit
    reference = request.getfixturevalue("torch_reference")
    return Subject(runtime, reference, (BUNDLE_BEAM,), RAGGED, 20)


def _onnx_cuda(request: pytest.FixtureRequest) -> Subject:
    """OnnxRuntime on the CUDA execution provider (the native kernels when the library has them,
    else the portable body), proven to hold its cache in CUDA memory."""
    from redrafter.runtimes.onnxruntime import OnnxRuntime

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (onnxruntime lists CUDAExecutionProvider; torch sees no GPU)")
    native = ops.library_path() is not None and ops.has_cuda_kernels()
    runtime = OnnxRuntime(request.getfixturevalue("onnx_bundle"), device="cuda", native=native)
    # On a CUDA machine a silent fall-back to the CPU is a failure, not a skip.
    assert runtime.device == "cuda", runtime.base.get_providers()
    assert runtime.base.get_providers()[0] == "CUDAExecutionProvider"
    runtime.reset(batch=1, capacity=16)
    assert runtime.buffers[0].device_name().lower() == "cuda"  # the KV cache lives on the GPU
    reference = request.getfixturevalue("torch_reference")
    return Subject(runtime, reference, (BUNDLE_BEAM,), RAGGED, 20)


def _coreml_mil(request: pytest.FixtureRequest) -> Subject:
    """The float32 Core ML programs through coremltools' MIL evaluator (any OS). Programs are
    batch 1 (the runtime loops rows, one state per row) and commit at most L rows."""
    bundle = request.getfixturevalue("coreml_bundle32")  # skips without coremltools
    from redrafter.runtimes.coreml_mil import CoreMLMilRuntime

    runtime = CoreMLMilRuntime(bundle)
    assert runtime.max_beam_length == BUNDLE_BEAM.length  # lookup beams are capped to it
    reference = request.getfixturevalue("torch_reference")
    return Subject(runtime, reference, (BUNDLE_BEAM,), RAGGED[:2], 12)


def _coreml(request: pytest.FixtureRequest) -> Subject:
    """The same programs through Apple's runtime (MLModel.predict, CPU only): macOS 15+."""
    if sys.platform != "darwin":
        pytest.skip("Core ML prediction (MLModel.predict) needs macOS 15+")
    bundle = request.getfixturevalue("coreml_bundle32")
    from redrafter.runtimes.coreml import CoreMLRuntime

    runtime = CoreMLRuntime(bundle, compute_units="cpu_only")
    reference = request.getfixturevalue("torch_reference")
    return Subject(runtime, reference, (BUNDLE_BEAM,), RAGGED[:2], 12)


RUNTIMES: dict[str, Callable[[pytest.FixtureRequest], Subject]] = {
    "torch": _torch,
    "ort-portable": lambda request: _onnx(request, native=False),
    "ort-native": lambda request: _onnx(request, native=True),
    "ort-portable-device-commit": lambda r: _onnx(r, native=False, device_commit=True),
    "ort-native-device-commit": lambda r: _onnx(r, native=True, device_commit=True),
    "ort-cuda": _onnx_cuda,
    "coreml-mil": _coreml_mil,
    "coreml": _coreml,
}
# A runtime that does not conform yet: its tests must fail with this error, and an entry here
# fails (strict) once the runtime conforms, so the gap cannot close unnoticed.
KNOWN_GAPS: dict[str, str] = {}


def _param(name: str) -> Any:
    gap = KNOWN_GAPS.get(name)
    marks = [pytest.mark.xfail(raises=RuntimeUnavailableError, strict=True, reason=gap)]
    return pytest.param(name, marks=marks if gap else ())


@pytest.fixture(scope="module", params=[_param(name) for name in RUNTIMES])
def subject(request: pytest.FixtureRequest) -> Subject:
    """Each runtime once per module (pytest groups the tests by runtime)."""
    return RUNTIMES[request.param](request)


# -- the checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("drafts", list(DRAFTS))
@pytest.mark.parametrize("packing", ["dedup", "full"])
@pytest.mark.parametrize("batch", ["single", "ragged"])
def test_greedy_speculative_equals_reference_autoregressive(
    subject: Subject, batch: str, packing: str, drafts: str
) -> None:
    """fp32 greedy speculative decoding emits exactly the reference's greedy autoregressive
    tokens at every beam shape the runtime drafts: the tree's mask, positions and packing, the
    lookup beam (capped to the runtime's commit length) and ragged beams change how many tokens
    a step takes, never which; ragged rows keep their own past lengths."""
    prompts = subject.prompts(batch)
    want = subject.truth(prompts)
    for beam in subject.beams:
        options = subject.options(beam, packing=packing, **DRAFTS[drafts])
        got = collect(decode(subject.runtime, prompts, options), len(prompts))
        assert got == want, options.name


@pytest.mark.parametrize("packing", ["dedup", "full"])
def test_long_accepts_keep_the_reference_tokens(subject: Subject, packing: str) -> None:
    """Oracle drafts follow the known answer for a random length per beam, so whole beams (L-1
    drafts), also of non-first beams, are accepted in a ragged batch: commits move real cache
    rows, and the tokens stay the reference's, in fewer verify calls than tokens."""
    prompts = subject.ragged
    want = subject.truth(prompts)
    for beam in subject.beams:
        oracle = OracleDrafts(subject.runtime, prompts, want, seed=beam.width * 10 + beam.length)
        steps = list(decode(oracle, prompts, subject.options(beam, packing=packing)))
        assert collect(steps, len(prompts)) == want, beam
        assert max(int(s.accepted.max()) for s in steps[1:]) == beam.length - 1, beam
        assert len(steps) - 1 < subject.max_new_tokens, beam


@pytest.mark.parametrize("acceptance", ["exact", "apple"])
def test_sampling_is_reproducible_per_seed(subject: Subject, acceptance: str) -> None:
    """Sampling (temperature 1, a ragged batch) draws from the seeded generator alone: the same
    seed gives the same tokens twice on one runtime, and another seed other tokens."""
    prompts, beam = subject.ragged, subject.beams[0]

    def run(seed: int) -> list[list[int]]:
        sampling = SamplingParams(temperature=1.0, seed=seed, acceptance=acceptance)
        options = subject.options(beam, sampling=sampling)
        return collect(decode(subject.runtime, prompts, options), len(prompts))

    first = run(7)
    assert all(len(row) == subject.max_new_tokens for row in first)
    assert run(7) == first
    assert run(8) != first


def test_a_row_refilled_mid_batch_decodes_as_if_alone(subject: Subject) -> None:
    """`prefill_rows` (continuous batching's join): after a few greedy steps of a ragged batch,
    row 1 takes a new, longer prompt while the other rows go on. Every row then emits exactly
    what its prompt gives decoded alone: the refill overwrote row 1 only, and its stale slots
    past the new prompt are never read."""
    rt, prompts, n = subject.runtime, subject.ragged, subject.max_new_tokens
    fresh = [11, 3, 5, 8, 13, 2, 9, 4, 6, 1, 7, 12]  # longer than the row it replaces
    want, want_fresh = subject.truth(prompts), subject.truth([fresh])[0]
    B, k = len(prompts), 3  # rows, steps before the refill
    tokens, lengths = pad_prompts(
        prompts, vocab_size=rt.vocab_size, context_length=rt.context_length, max_new_tokens=n
    )
    rt.reset(batch=B, capacity=len(fresh) + n + 4)
    logits, _ = rt.prefill(tokens, lengths)
    token, past = logits.argmax(-1), lengths.astype(np.int64)  # (B,), (B,)
    got: list[list[int]] = [[int(t)] for t in token]
    one = np.ones((B, 1, 1), bool)
    for step in range(n - 1):
        if step == k:
            row_logits, _ = rt.prefill_rows(np.array([1]), np.array([fresh]), np.array([12]))
            token[1], past[1] = row_logits[0].argmax(), len(fresh)
            got[1] = [int(token[1])]
        ids, _ = rt.verify_greedy(token[:, None], past[:, None], one, past)  # (B, 1)
        token, past = ids[:, 0], past + 1
        for b in range(B):
            got[b].append(int(token[b]))
    assert got[0] == want[0] and all(got[b] == want[b] for b in range(2, B))
    assert got[1] == want_fresh[: len(got[1])] and len(got[1]) == n - k


@pytest.mark.parametrize(("rows", "count"), [([2], 1), ([-1], 1), ([0, 0], 2), ([0], 2)], ids=str)
def test_prefill_rows_refuses_bad_rows(subject: Subject, rows: list[int], count: int) -> None:
    """Rows outside the batch, repeated, or not one per prompt: a one-line ConfigError."""
    subject.runtime.reset(batch=2, capacity=16)
    prompts = np.ones((count, 3), np.int64)
    with pytest.raises(ConfigError, match="distinct row indices"):
        subject.runtime.prefill_rows(np.array(rows), prompts, np.full(count, 3))


@pytest.mark.parametrize("speculative", [True, False], ids=["speculative", "autoregressive"])
def test_rows_joining_and_leaving_a_running_batch_decode_as_if_alone(
    subject: Subject, speculative: bool
) -> None:
    """Continuous batching (decoding/batch.py): rows join a running batch between steps (each
    prefilled into a free row while the others keep their caches and committed lengths) and
    leave when done or abandoned. Row 2 joins above the running rows (the span grows), row 0
    is abandoned mid-way (a hole the steps run over) and taken by a fourth prompt; finished
    rows leave at once. Every prompt emits exactly the reference's greedy tokens for it alone
    (the abandoned one, a prefix of them)."""
    rt, n = subject.runtime, subject.max_new_tokens
    fresh = [11, 3, 5, 8, 13, 2, 9, 4, 6, 1, 7, 12]
    prompts = [*subject.ragged[:2], fresh, subject.ragged[-1]]
    beam = subject.beams[0]
    options = subject.options(beam) if speculative else AUTOREGRESSIVE.replace(max_new_tokens=n)
    batch = open_batch(rt, options, rows=3, row_tokens=max(map(len, prompts)) + n)
    owner: dict[int, int] = {}  # row -> prompt index
    got: dict[int, list[int]] = {}

    def add(i: int, row: int) -> None:
        rows, step = batch.add([prompts[i]])
        assert rows == [row]
        owner[row], got[i] = i, list(step.new_tokens[row])

    def step() -> None:
        s = batch.step()
        for row, i in owner.items():
            got[i] += s.new_tokens[row]
        done = batch.finished
        batch.remove(done)
        for row in done:
            del owner[row]

    add(0, 0)
    add(1, 1)
    step()
    step()
    add(2, 2)
    step()
    assert 0 in owner, "prompt 0 finished before it could be abandoned: raise max_new_tokens"
    batch.remove([0])  # abandoned (a client gone)
    del owner[0]
    step()
    add(3, 0)
    for _ in range(4 * n):
        if not owner:
            break
        step()
    assert not owner and batch.free_rows == [0, 1, 2]
    for i, p in enumerate(prompts):
        want = subject.truth([p])[0]
        if i == 0:
            assert 0 < len(got[0]) < n and got[0] == want[: len(got[0])]
        else:
            assert got[i] == want, (i, options.name)


@pytest.mark.parametrize("drafts", list(DRAFTS), ids=list(DRAFTS))
def test_speculating_only_below_a_row_limit_keeps_each_rows_tokens(
    subject: Subject, drafts: str
) -> None:
    """`speculate_max_rows=1`: while two rows decode, steps verify g0 alone per row without the
    drafter ("autoregressive" steps, one node each); once the shorter row finishes, the other
    speculates again from the hidden state those steps left (the reference's at the row's last
    committed token). Both rows emit the reference's greedy tokens, and both kinds of step
    occur."""
    rt, n = subject.runtime, subject.max_new_tokens
    prompts = subject.ragged[:2]
    options = subject.options(subject.beams[0], speculate_max_rows=1, **DRAFTS[drafts])
    batch = open_batch(rt, options, rows=2, row_tokens=max(map(len, prompts)) + n)
    short = max(2, n // 3)
    got = [batch.add([prompts[0]], max_new_tokens=short)[1].new_tokens[0]]
    got.append(batch.add([prompts[1]])[1].new_tokens[1])
    kinds: list[str] = []
    while not batch.done:
        step = batch.step()
        kinds.append(step.kind)
        if step.kind == "autoregressive":  # one node per decoding row
            assert step.verified is not None and int(step.verified.sum()) <= 2
        for row in (0, 1):
            got[row] = [*got[row], *step.new_tokens[row]]
        if step.kind == "autoregressive":  # row 1 drafts next from its last committed token
            committed = [*prompts[1], *got[1][:-1]]
            subject.reference.reset(batch=1, capacity=len(committed) + 8)
            _, hidden = subject.reference.prefill(np.array([committed]), np.array([len(committed)]))
            assert batch.context is not None
            np.testing.assert_allclose(batch.context[1], hidden[0], rtol=1e-2, atol=1e-2)
    want = subject.truth(prompts)
    assert got[0] == want[0][:short] and got[1] == want[1], options.name
    assert "autoregressive" in kinds and "speculative" in kinds, kinds
    assert kinds.index("speculative") > kinds.index("autoregressive")


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_speculate_max_rows_is_one_line(bad: Any) -> None:
    with pytest.raises(ConfigError, match="speculate_max_rows .* must be None or an integer >= 1"):
        DecodeOptions(speculate_max_rows=bad)
