"""Tensor parity: the same protocol calls (prefill, draft, verify) on a candidate runtime and on
the torch reference, compared output by output (docs/design.md §7).

Dimensions: B batch, T prompt, W beam width, L beam length, N packed tokens, E hidden, V vocab.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from redrafter.bundle import Bundle, Parity
from redrafter.config import LOG_0
from redrafter.decoding.accept import log_softmax
from redrafter.decoding.runtime import Runtime
from redrafter.decoding.tree import pack
from redrafter.models.drafter import Drafter
from redrafter.models.llama import Transformer
from redrafter.runtimes.coreml_mil import CoreMLMilRuntime
from redrafter.runtimes.onnxruntime import OnnxRuntime
from redrafter.runtimes.torch import TorchRuntime

# Tolerances by precision: max-abs on fp32 logits / hidden states / draft log-probs, the share
# of positions whose argmax agrees, the share of identical beams, and (quantized weights only)
# the mean KL divergence of the next-token distribution from the reference's. fp32 runs the same
# math in another order; fp16 rounds weights and activations; int4/int8 weights change the model
# a little everywhere, so their max-abs bounds only catch gross breakage and the distribution
# bounds decide: mean KL on these random-token inputs, which are harsher than text (a sound int4
# SmolLM2-135M gives 0.6-1.6 nats here, 0.4 on prose; see docs/parity.md for the figures).
INF = float("inf")
TOLERANCES = {
    "float32": {"logits": 1e-3, "hidden": 1e-3, "log_probs": 1e-3, "argmax": 1.0, "beams": 1.0},
    "float16": {"logits": 0.5, "hidden": 0.5, "log_probs": 0.5, "argmax": 0.95, "beams": 0.5},
    "int8": {"logits": INF, "hidden": INF, "log_probs": INF, "argmax": 0.0, "beams": 0.0,
             "kl": 0.1},
    "int4": {"logits": INF, "hidden": INF, "log_probs": INF, "argmax": 0.0, "beams": 0.0,
             "kl": 2.0},
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TensorCheck:
    """One output compared: max-abs and max-rel error, argmax agreement (logits only)."""

    graph: str
    output: str
    max_abs: float
    max_rel: float
    agreement: float | None
    tolerance: float
    passed: bool
    kl: float | None = None  # logits: mean KL(reference || candidate) of softmax, nats
    beam: str | None = None  # drafter checks: the graph's beam shape, "WxL"

    @property
    def label(self) -> str:
        """The graph as reports name it: 'base', or 'drafter WxL'."""
        return self.graph if self.beam is None else f"{self.graph} {self.beam}"


@dataclasses.dataclass(frozen=True)
class TensorReport:
    checks: list[TensorCheck]

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)


def _compare(
    graph: str,
    output: str,
    got: np.ndarray,
    want: np.ndarray,
    tol: dict[str, float],
    key: str,
    argmax: bool = False,
) -> TensorCheck:
    got64, want64 = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(got64 - want64)
    max_abs = float(diff.max()) if diff.size else 0.0
    max_rel = float((diff / np.maximum(np.abs(want64), 1e-6)).max()) if diff.size else 0.0
    agreement = float((got.argmax(-1) == want.argmax(-1)).mean()) if argmax else None
    kl = mean_kl(want64, got64) if argmax else None
    passed = max_abs <= tol[key] and (agreement is None or agreement >= tol["argmax"])
    if kl is not None and "kl" in tol:
        passed = passed and kl <= tol["kl"]
    return TensorCheck(graph, output, max_abs, max_rel, agreement, tol[key], passed, kl)


def mean_kl(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> float:
    """Mean over positions of KL(P_ref || P_cand), P = softmax of (..., V) logits, in nats."""
    log_p = log_softmax(reference_logits.astype(np.float64))
    log_q = log_softmax(candidate_logits.astype(np.float64))
    return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean()) if log_p.size else 0.0


def _compare_drafter(
    candidate: Runtime,
    reference: Runtime,
    context: np.ndarray,
    g0: np.ndarray,
    beam: Any,
    tol: dict[str, float],
) -> tuple[list[TensorCheck], np.ndarray]:
    """One drafter graph (beam shape `beam`) on identical inputs: identical beams, log-probs.
    Returns the checks and the reference's beams (B, W, L)."""
    shape = f"{beam.width}x{beam.length}"
    beams, log_probs = reference.draft(context, g0, beam)
    c_beams, c_log_probs = candidate.draft(context, g0, beam)
    same = float((c_beams == beams).all(axis=-1).mean())
    checks = [
        TensorCheck(
            "drafter", "beams", 0.0, 0.0, same, tol["beams"], same >= tol["beams"], beam=shape
        )
    ]
    live = (log_probs > LOG_0 / 2) & (c_log_probs > LOG_0 / 2)  # the top-50 both kept
    check = _compare("drafter", "log_probs", c_log_probs[live], log_probs[live], tol, "log_probs")
    checks.append(dataclasses.replace(check, beam=shape))
    return checks, beams


def compare_runtimes(
    candidate: Runtime,
    reference: Runtime,
    *,
    dtype: str,
    beam: Any | None,
    seed: int = 0,
    extra_beams: Sequence[Any] = (),
) -> TensorReport:
    """Prefill two ragged prompts, draft from the reference's context, verify the packed tree,
    on both runtimes with identical inputs; compare every output. Each of `extra_beams` (other
    exported drafter graphs) is drafted from the same context and compared too."""
    tol = TOLERANCES[dtype]
    rng = np.random.default_rng(seed)
    V = reference.vocab_size
    lengths = np.array([9, 5], dtype=np.int64)
    tokens = rng.integers(0, V, size=(2, int(lengths.max())))
    checks = []
    for rt in (candidate, reference):
        rt.reset(batch=2, capacity=64)
    got, want = candidate.prefill(tokens, lengths), reference.prefill(tokens, lengths)
    checks.append(_compare("base", "prefill logits", got[0], want[0], tol, "logits", argmax=True))
    checks.append(_compare("base", "prefill hidden", got[1], want[1], tol, "hidden"))
    context, g0 = want[1], want[0].argmax(-1)
    if beam is not None:
        drafted, beams = _compare_drafter(candidate, reference, context, g0, beam, tol)
        checks += drafted
        for other in extra_beams:
            if other != beam:
                checks += _compare_drafter(candidate, reference, context, g0, other, tol)[0]
    else:
        beams = np.stack([g0, rng.integers(0, V, size=2), rng.integers(0, V, size=2)], axis=-1)
        beams = beams[:, None, :]  # (B, 1, 3) an arbitrary chain to verify
    tree = pack(beams)
    positions = lengths[:, None] + tree.depth
    got = candidate.verify(tree.tokens, positions, tree.tree_mask, lengths)
    want = reference.verify(tree.tokens, positions, tree.tree_mask, lengths)
    checks.append(_compare("base", "verify logits", got[0], want[0], tol, "logits", argmax=True))
    checks.append(_compare("base", "verify hidden", got[1], want[1], tol, "hidden"))
    return TensorReport(checks)


def parity_record(report: TensorReport, *, runtime: str | None = None) -> Parity:
    """A report as the manifest records it: passed, and the max-abs error per output."""
    return Parity(
        report.passed,
        {f"{c.graph}.{c.output}": round(c.max_abs, 7) for c in report.checks},
        runtime,
    )


def onnx_export_parity(
    bundle: Bundle, base: Transformer, drafter: Drafter | None, *, seed: int = 0
) -> Parity:
    """Export-time parity: a bundle's ONNX graphs (ONNX Runtime, CPU) against the torch modules
    they were exported from."""
    report = compare_runtimes(
        OnnxRuntime(bundle, device="cpu"),
        TorchRuntime(base, drafter),
        dtype=bundle.precision,
        beam=bundle.beam if drafter is not None else None,
        seed=seed,
    )
    return parity_record(report)


def coreml_export_parity(bundle: Bundle, base: Transformer, drafter: Drafter | None) -> Parity:
    """Export-time parity of a bundle's Core ML programs (through the MIL evaluator,
    `coreml-mil`) against the torch modules they came from."""
    candidate = CoreMLMilRuntime(bundle)
    report = compare_runtimes(
        candidate,
        TorchRuntime(base, drafter),
        dtype=candidate.precision,
        beam=bundle.beam if drafter is not None else None,
    )
    return parity_record(report, runtime=candidate.name)
