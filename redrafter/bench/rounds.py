"""Interleaved rounds and engine comparisons (`benchmarks/peers.py --interleave`, docs/design.md
§8): every engine runs one repeat per round, round after round, so a ratio can be taken within
a round (engines measured minutes apart) rather than between two medians of a whole run (the
machine's speed drifts by up to ~20 % an hour).

Results are plain dicts, as the benchmarks save them. An engine's result is either flat (a
peer: `tokens_per_second`, `tokens_per_second_repeats`, ...) or holds one block per
implementation (ours: `{"native": {...}, "portable": {...}, ...}`), each block being
`redrafter.bench.harness.run_configs` results (configuration name -> figures, with
"autoregressive" among them) plus extra keys (`other_processes_cores`, `token_digests`).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from redrafter.bench.tokens import Agreement, compare_digests

OURS = "ours"


def is_configs_block(value: Any) -> bool:
    """Whether `value` is a block of `run_configs` results (it has an autoregressive entry)."""
    return isinstance(value, Mapping) and isinstance(value.get("autoregressive"), Mapping)


def is_result(value: Any) -> bool:
    """Whether `value` is one configuration's (or one peer's) figures."""
    return isinstance(value, Mapping) and "tokens_per_second" in value


def median_round(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One engine's (or one configuration's) results over interleaved rounds: the median
    round's figures, with every round's tokens/s, in round order, in
    `tokens_per_second_repeats`."""
    rates = [r["tokens_per_second"] for r in runs]
    middle = sorted(range(len(runs)), key=rates.__getitem__)[len(runs) // 2]
    return {
        **runs[middle],
        "tokens_per_second": statistics.median(rates),
        "tokens_per_second_repeats": rates,
    }


def merge_block(blocks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One implementation's `run_configs` blocks, one per round -> one block: each
    configuration's median round, `speedup_repeats` = each round's own speed-up (speculative
    over that round's autoregressive tokens/s), `speedup` = median over median. Keys that are
    not results (e.g. `token_digests`, decoded in the first round only) come from the first
    round; `other_processes_cores` is the largest of any round."""
    merged = dict(blocks[0])
    for config, first in blocks[0].items():
        if is_result(first):
            per = [b[config] for b in blocks]
            merged[config] = {**median_round(per), "speedup_repeats": [p["speedup"] for p in per]}
    ar = merged["autoregressive"]["tokens_per_second"]
    for r in merged.values():
        if is_result(r):
            r["speedup"] = r["tokens_per_second"] / ar if ar else 0.0
    loads = [b["other_processes_cores"] for b in blocks if "other_processes_cores" in b]
    if loads:
        merged["other_processes_cores"] = max(loads)
    return merged


def merge_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Engines measured in interleaved rounds (one repeat each; engine name -> result per
    round) -> one result per engine, as a plain run has them. `tokens_per_second_repeats`
    stay aligned by round across engines: an engine missing from a round (a failed peer) is
    left out of the merge."""
    merged: dict[str, Any] = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds if name in r]
        if len(runs) != len(rounds):
            continue
        if is_result(runs[0]):
            merged[name] = median_round(runs)
            continue
        entry = dict(runs[0])
        for key, block in runs[0].items():
            if is_configs_block(block):
                entry[key] = merge_block([run[key] for run in runs])
        merged[name] = entry
    return merged


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> list[float]:
    """Round by round a / b (two engines' tokens/s of the same rounds)."""
    return [a / b if b else 0.0 for a, b in zip(numerators, denominators, strict=True)]


def summarize_engines(
    engines: Mapping[str, Any],
    *,
    interleaved: bool = False,
    ours: str = OURS,
    ours_label: str = "ours ORT CPU",
) -> dict[str, Any]:
    """Our run against the peers': flat table rows (engine, tok/s, ...), our autoregressive
    and best speculative tokens/s (from our first implementation block, the preferred one),
    and for each peer ours over theirs, also round by round when `interleaved`. A peer's
    token agreement with our autoregressive run is the one recorded at run time
    (`agreement_with_ours_ar`, with the common prefix), else a comparison of digests."""
    rows: list[dict[str, Any]] = []
    mine = engines.get(ours, {})
    blocks = [(impl, block) for impl, block in mine.items() if is_configs_block(block)]
    best_spec: dict[str, Any] | None = None
    ours_ar: float | None = None
    reference = next((b["token_digests"] for _, b in blocks if "token_digests" in b), None)
    for i, (impl, block) in enumerate(blocks):
        for config, r in block.items():
            if not is_result(r):
                continue
            rows.append(
                {
                    "engine": f"{ours_label} {impl}, {config}",
                    "tokens_per_second": round(r["tokens_per_second"], 1),
                    "tokens_per_step": round(r["tokens_per_step"], 2),
                    "ms_per_step": round(r["ms_per_step"], 1),
                    "other_processes_cores": block.get("other_processes_cores"),
                }
            )
            if i > 0:
                continue
            if config == "autoregressive":
                ours_ar = r["tokens_per_second"]
            elif best_spec is None or r["tokens_per_second"] > best_spec["tokens_per_second"]:
                best_spec = {"config": f"{impl} {config}", **r}
    peers: dict[str, float] = {}
    for name, r in engines.items():
        if name == ours:
            continue
        peers[name] = r["tokens_per_second"]
        agreement = None
        if "agreement_with_ours_ar" in r:
            agreement = Agreement.from_dict(r["agreement_with_ours_ar"]).text()
        elif reference is not None and "token_digests" in r:
            agreement = compare_digests(reference, r["token_digests"]).text()
        rows.append(
            {
                "engine": r["label"],
                "tokens_per_second": round(r["tokens_per_second"], 1),
                "decode_tokens": r["decode_tokens"],
                "prefill_ms_mean": r["prefill_ms_mean"],
                "other_processes_cores": r["other_processes_cores"],
                "same_tokens_as_ours_ar": agreement,
            }
        )
    ratios: dict[str, dict[str, Any]] = {}
    for name, tps in peers.items():
        ratios[name] = {
            "ours_ar_over_peer": round(ours_ar / tps, 2) if ours_ar else None,
            "ours_spec_over_peer": round(best_spec["tokens_per_second"] / tps, 2)
            if best_spec
            else None,
        }
        if interleaved and best_spec:  # paired: same round, minutes apart
            paired = paired_ratios(
                best_spec["tokens_per_second_repeats"], engines[name]["tokens_per_second_repeats"]
            )
            ratios[name]["ours_spec_over_peer_rounds"] = [round(x, 2) for x in paired]
            ratios[name]["ours_spec_over_peer_median_round"] = round(statistics.median(paired), 2)
    return {
        "rows": rows,
        "ours_autoregressive_tokens_per_second": ours_ar,
        "ours_best_speculative": None
        if best_spec is None
        else {
            "config": best_spec["config"],
            "tokens_per_second": best_spec["tokens_per_second"],
            "tokens_per_step": best_spec["tokens_per_step"],
        },
        "ratios": ratios,
    }


def speedup_rounds_table(results: Mapping[str, Any]) -> str:
    """A markdown table of each configuration's speed-up per round (`speedup_repeats` of
    `run_configs` or `merge_block` results): how much of a difference is the machine's noise."""
    lines = ["| config | speed-up per round |", "|---|---|"]
    for name, r in results.items():
        if is_result(r):
            lines.append(f"| {name} | {', '.join(f'{x:.2f}x' for x in r['speedup_repeats'])} |")
    return "\n".join(lines)
