"""`redrafter validate`: run tensor and token parity for a bundle and report them as a readable
table and as JSON. Pass/fail is what a CI gate needs."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redrafter.bundle import Bundle
from redrafter.validate.drift import Drift, measure_drift
from redrafter.validate.tensors import TensorReport, compare_runtimes
from redrafter.validate.tokens import TokenCheck, check_token_parity

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that checks whether a number is prime.",
    "Explain what a compiler does.",
    "List three uses of a hash table.",
)


@dataclasses.dataclass
class ValidationReport:
    bundle: str
    runtime: str
    implementation: str
    device: str
    dtype: str
    tensors: TensorReport
    tokens: list[TokenCheck]
    token_reference: str = "torch autoregressive (fp32)"
    drift: Drift | None = None

    @property
    def passed(self) -> bool:
        drift_ok = self.drift is None or self.drift.passed
        return self.tensors.passed and all(t.passed for t in self.tokens) and drift_ok

    @property
    def drafter_graphs(self) -> list[str]:
        """The drafter graphs' beam shapes ("WxL") whose tensors were compared, in order."""
        return list(dict.fromkeys(c.beam for c in self.tensors.checks if c.beam is not None))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle": self.bundle,
            "runtime": self.runtime,
            "implementation": self.implementation,
            "device": self.device,
            "dtype": self.dtype,
            "passed": self.passed,
            "drafter_graphs": self.drafter_graphs,
            "tensors": [dataclasses.asdict(c) for c in self.tensors.checks],
            "tokens": [{**dataclasses.asdict(t), "passed": t.passed} for t in self.tokens],
            "token_parity": f"{sum(t.passed for t in self.tokens)}/{len(self.tokens)}",
            "token_reference": self.token_reference,
            "drift": None
            if self.drift is None
            else {**dataclasses.asdict(self.drift), "passed": self.drift.passed},
        }

    def table(self) -> str:
        lines = [
            f"bundle {self.bundle}: {self.runtime} ({self.implementation} TreeAttention, "
            f"{self.device}, {self.dtype})",
            "",
            f"{'graph':12} {'output':16} {'max abs':>10} {'max rel':>10} {'argmax':>7} "
            f"{'KL':>9} {'tol':>8}  result",
        ]
        for c in self.tensors.checks:
            agree = "" if c.agreement is None else f"{c.agreement:.3f}"
            kl = "" if c.kl is None else f"{c.kl:.2e}"
            lines.append(
                f"{c.label:12} {c.output:16} {c.max_abs:10.2e} {c.max_rel:10.2e} "
                f"{agree:>7} {kl:>9} {c.tolerance:8.0e}  {'ok' if c.passed else 'FAIL'}"
            )
        if self.drafter_graphs:
            lines.append(f"drafter graphs compared: {', '.join(self.drafter_graphs)}")
        lines += [
            "",
            f"token parity against {self.token_reference}:",
            f"{'prompt':>6} {'prompt tok':>10} {'generated':>9} {'tok/step':>8}  result",
        ]
        for t in self.tokens:
            verdict = "identical" if t.passed else f"DIVERGES at token {t.first_divergence}"
            lines.append(
                f"{t.prompt:>6} {t.prompt_tokens:>10} {t.generated:>9} "
                f"{t.tokens_per_step:>8.2f}  {verdict}"
            )
        ok = sum(t.passed for t in self.tokens)
        verdict = (
            f"{'PASS' if self.passed else 'FAIL'}: tensors "
            f"{'ok' if self.tensors.passed else 'FAIL'}, tokens {ok}/{len(self.tokens)}"
        )
        if self.drift is not None:
            d = self.drift
            lines += [
                "",
                f"drift against the fp32 torch reference ({d.precision}, teacher-forced over "
                f"{d.positions} positions): top-1 agreement {d.top1:.3f}, mean KL "
                f"{d.mean_kl:.2e} nats (limit {d.limit:g})  {'ok' if d.passed else 'FAIL'}",
            ]
            verdict += f", drift {'ok' if d.passed else 'FAIL'}"
        lines += ["", verdict]
        return "\n".join(lines)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def validate_bundle(
    bundle: Bundle,
    *,
    candidate: Any,
    reference: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    drift_texts: Sequence[Sequence[int]] | None = None,
) -> ValidationReport:
    """Tensor parity on random inputs (the base graph and every drafter graph the candidate
    runs: all of an ONNX bundle's beam shapes), greedy token parity on `prompts` (the default
    beam), and drift (top-1 and mean KL against the fp32 reference, teacher-forced over
    `drift_texts`, default `prompts`).

    fp32 bundles must emit exactly the torch reference's autoregressive tokens. fp16 rounding
    and int4/int8 weights change some argmaxes, so such a bundle's speculative tokens are held
    to its own autoregressive tokens on the same runtime (speculation must change nothing),
    while its tensors and drift are held to its precision's limits against the fp32 reference."""
    beam = bundle.beam if bundle.drafter_config is not None else None
    # A runtime with its own precision (Core ML: float16 by default) is held to that dtype.
    dtype = getattr(candidate, "precision", None) or bundle.precision
    others = getattr(candidate, "beams", None) or () if beam is not None else ()
    extra = sorted(others, key=lambda b: (b.width, b.length))
    tensors = compare_runtimes(candidate, reference, dtype=dtype, beam=beam, extra_beams=extra)
    token_reference = reference if dtype == "float32" else candidate
    tokens = check_token_parity(
        candidate,
        token_reference,
        prompts,
        max_new_tokens=max_new_tokens,
        beam=beam,
        packing=bundle.packing,  # type: ignore[arg-type]
        eos_token_ids=eos_token_ids,
    )
    drift = measure_drift(
        candidate, reference, drift_texts if drift_texts is not None else prompts, precision=dtype
    )
    return ValidationReport(
        str(bundle.root),
        candidate.name,
        getattr(candidate, "implementation", "-"),
        getattr(candidate, "device", "cpu"),
        dtype,
        tensors,
        tokens,
        "torch autoregressive (fp32)"
        if token_reference is reference
        else f"{candidate.name} autoregressive ({dtype})",
        drift,
    )
