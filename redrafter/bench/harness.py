"""Run autoregressive and speculative decoding on the same runtime and prompts, interleaved,
after a warm-up, for `repeats` rounds; aggregate per configuration (docs/design.md §8).

A configuration is a `DecodeOptions` (its `name` labels the results; the autoregressive
baseline always runs too). Timings come from the driver's per-phase clocks plus the wall time
between steps; host overhead is what is left over.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from redrafter.config import BeamShape
from redrafter.decoding.driver import decode
from redrafter.decoding.lookup import MAX_NGRAM, MIN_NGRAM, SPAN_PER_NGRAM
from redrafter.decoding.options import AUTOREGRESSIVE, DecodeOptions
from redrafter.decoding.runtime import Runtime
from redrafter.decoding.tree import Packing

PHASES = ("draft", "verify", "accept_commit", "host")
# `--prompt-lookup off|on|both` (bench, benchmarks/): the settings each beam shape runs with.
PROMPT_LOOKUP_SETTINGS: dict[str, tuple[bool, ...]] = {
    "off": (False,),
    "on": (True,),
    "both": (False, True),
}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 1e6


@dataclasses.dataclass
class RunStats:
    """One configuration, one repeat, all prompts."""

    tokens: int = 0
    steps: int = 0
    verified: int = 0  # tokens the LLM ran (tree sizes summed over steps)
    seconds: float = 0.0
    phase_seconds: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(PHASES, 0.0)
    )
    token_latencies_ms: list[float] = dataclasses.field(default_factory=list)
    peak_rss_mb: float = 0.0


def run_once(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    options: DecodeOptions,
    *,
    eos_token_ids: Sequence[int],
) -> RunStats:
    """Decode every prompt (batch 1); prefill time is excluded from the decode figures."""
    stats = RunStats()
    for prompt in prompts:
        steps = decode(runtime, [prompt], options, eos_token_ids=eos_token_ids)
        last = time.perf_counter()
        for step in steps:
            now = time.perf_counter()
            wall, last = now - last, now
            if step.kind == "prefill":
                continue
            n = len(step.new_tokens[0])
            s = step.seconds
            phases = {
                "draft": s.get("draft", 0.0),
                "verify": s.get("verify", 0.0),
                "accept_commit": s.get("accept", 0.0) + s.get("commit", 0.0),
            }
            phases["host"] = max(wall - sum(phases.values()), 0.0)
            for k, v in phases.items():
                stats.phase_seconds[k] += v
            stats.tokens += n
            stats.steps += 1
            stats.verified += int(step.verified[0])
            stats.seconds += wall
            # Every token of a step becomes visible when the step ends.
            stats.token_latencies_ms += [1000 * wall / max(n, 1)] * n
        stats.peak_rss_mb = max(stats.peak_rss_mb, _rss_mb())
    return stats


def summarize_runs(runs: list[RunStats]) -> dict[str, Any]:
    """Median over repeats of each figure; latency percentiles over all tokens of all repeats."""

    def med(values: list[float]) -> float:
        return float(statistics.median(values))

    lat = np.array([x for r in runs for x in r.token_latencies_ms] or [0.0])
    return {
        "tokens_per_second": med([r.tokens / r.seconds if r.seconds else 0.0 for r in runs]),
        "tokens_per_step": med([r.tokens / r.steps if r.steps else 0.0 for r in runs]),
        "verified_per_step": med([r.verified / r.steps if r.steps else 0.0 for r in runs]),
        "ms_per_step": med([1000 * r.seconds / r.steps if r.steps else 0.0 for r in runs]),
        "ms_per_step_by_phase": {
            k: med([1000 * r.phase_seconds[k] / r.steps if r.steps else 0.0 for r in runs])
            for k in PHASES
        },
        "token_latency_ms_p50": float(np.percentile(lat, 50)),
        "token_latency_ms_p95": float(np.percentile(lat, 95)),
        "peak_rss_mb": max(r.peak_rss_mb for r in runs),
        "tokens_per_second_repeats": [r.tokens / r.seconds if r.seconds else 0.0 for r in runs],
        "tokens": runs[0].tokens,
    }


def speculative_grid(
    beams: Sequence[BeamShape],
    *,
    max_new_tokens: int,
    packing: Packing = "dedup",
    prompt_lookup: Sequence[bool] = (False,),
    min_draft_prob: Sequence[float] = (0.0,),
    lookup_span: int = SPAN_PER_NGRAM,
    lookup_min_ngram: int = MIN_NGRAM,
    lookup_max_ngram: int = MAX_NGRAM,
) -> list[DecodeOptions]:
    """Every beam shape once per value in `prompt_lookup` (without and/or with the
    prompt-lookup beam: `lookup_span` drafts per token of a match of `lookup_min_ngram` to
    `lookup_max_ngram` tokens) and per
    draft-probability floor in `min_draft_prob` (greedy)."""
    return [
        DecodeOptions(
            max_new_tokens=max_new_tokens,
            beam=b,
            packing=packing,
            prompt_lookup=lookup,
            min_draft_prob=floor,
            lookup_span=lookup_span,
            lookup_min_ngram=lookup_min_ngram,
            lookup_max_ngram=lookup_max_ngram,
        )
        for b in beams
        for lookup in prompt_lookup
        for floor in min_draft_prob
    ]


def runs_in(spec: Sequence[DecodeOptions], repeats: int) -> int:
    """How many runs `run_configs(..., spec, repeats=repeats)` makes (and reports to `on_run`):
    a warm-up and `repeats` rounds of each configuration plus the autoregressive baseline."""
    return (repeats + 1) * (len(spec) + 1)


def run_configs(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    spec: Sequence[DecodeOptions],
    *,
    repeats: int = 3,
    eos_token_ids: Sequence[int] = (),
    on_run: Callable[[str], None] = lambda name: None,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """Warm up each configuration once, then `repeats` interleaved rounds (AR, W1 L3, ..., AR,
     ...), so slow drifts of the machine hit every configuration alike. The autoregressive
    baseline runs at `max_new_tokens` (default: the first configuration's). Results per
     configuration name (`DecodeOptions.name`), each with its speed-up over autoregressive
     decoding; with an empty `spec` (no drafter), the baseline alone."""
    if max_new_tokens is None:
        max_new_tokens = spec[0].max_new_tokens if spec else AUTOREGRESSIVE.max_new_tokens
    configs = [AUTOREGRESSIVE.replace(max_new_tokens=max_new_tokens), *spec]
    for c in configs:  # warm-up: session init, allocator growth, caches
        run_once(runtime, prompts[:1], c, eos_token_ids=eos_token_ids)
        on_run(f"warm-up {c.name}")
    runs: dict[str, list[RunStats]] = {c.name: [] for c in configs}
    for r in range(repeats):
        for c in configs:
            runs[c.name].append(run_once(runtime, prompts, c, eos_token_ids=eos_token_ids))
            on_run(f"repeat {r + 1}/{repeats} {c.name}")
    results = {name: summarize_runs(rs) for name, rs in runs.items()}
    base = results["autoregressive"]["tokens_per_second"]
    ar_repeats = results["autoregressive"]["tokens_per_second_repeats"]
    for c in spec:
        entry = results[c.name]
        entry["beam_width"], entry["beam_length"] = c.beam.width, c.beam.length
        entry["prompt_lookup"] = c.prompt_lookup
        entry["min_draft_prob"] = c.min_draft_prob
        if c.prompt_lookup:
            entry["lookup_span"] = c.lookup_span
            entry["lookup_min_ngram"] = c.lookup_min_ngram
            entry["lookup_max_ngram"] = c.lookup_max_ngram
        entry["speedup"] = entry["tokens_per_second"] / base if base else 0.0
        # Paired per repeat (the rounds interleave): the spread shows the machine's noise.
        entry["speedup_repeats"] = [
            s / a if a else 0.0
            for s, a in zip(entry["tokens_per_second_repeats"], ar_repeats, strict=True)
        ]
    results["autoregressive"]["speedup"] = 1.0
    results["autoregressive"]["speedup_repeats"] = [1.0] * repeats
    return results
